"""One training round on arrays: hold out strokes, fit the teacher, warm-start, train the student,
choose the fusion weight on the held-out strokes, keep the previous model when it scores better.
The project gives it normalised images and labels and stores what it returns (checkpoint, history).

Nothing here knows the project folder: images come in as arrays, the warm start as a state dict,
and validation as a callable, so the round can be tested and benchmarked on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from semsegloop.errors import TrainingError


# Share of the round's budget kept for scoring the networks on held-out strokes.
SCORING_SHARE = 0.05
# The painted images' network prediction is reserved at its measured speed times this margin
# (blending the teacher and the grown labels in, writing the result).
PREDICT_MARGIN = 1.5
MAX_RESERVE_SHARE = 0.5
WARM_UP_MIN_BUDGET_S = 30.0
# Hold out this round's new strokes first (so a warm-started network, which saw the old ones,
# is scored on strokes it never saw). Corrections sit where the last result was wrong, so
# they also score the models that made that result low.
PREFER_NEW_STROKES = True


@dataclass
class RoundImage:
    """One image of the round: normalised (S, Y, X, C) float32 and sparse (S, Y, X) uint8 labels
    (all zeros for an unpainted image that joins only through the teacher's pseudo-labels)."""
    image_id: str
    image: np.ndarray
    labels: np.ndarray
    previous: np.ndarray | None = None   # bool (S, Y, X): painted in the previous round
    # What the teacher and grow-from-seeds see (the image unclipped; teacher.teacher_input);
    # None: the network's input.
    teacher_image: np.ndarray | None = None

    @property
    def raw(self) -> np.ndarray:
        return self.image if self.teacher_image is None else self.teacher_image


@dataclass
class RoundSettings:
    n_classes: int
    dims: int
    channels: int
    spacing: tuple
    preset: dict
    round_index: int
    time_budget_s: float | None = None
    steps: int | None = None
    device: str = "auto"
    seed: int = 0
    pairwise_weight: float | None = None
    use_teacher: bool = True
    class_names: list | None = None


@dataclass
class RoundOutcome:
    model: Any                     # torch module (eval mode), the student after training
    plan: Any                      # NetworkPlan that rebuilds it
    device: Any
    steps: int
    seconds: float                 # the whole round, preparation included
    final_loss: float | None
    cancelled: bool
    val_dice: dict | None
    warm_start: str | None
    extra: dict = field(default_factory=dict)


def plan_for(settings: RoundSettings, shapes: list[tuple]):
    """The network plan for the biggest image of the round (patch size fits every image)."""
    from semsegloop.learn.networks import plan_network

    biggest = tuple(int(v) for v in np.max(shapes, axis=0))
    return plan_network(settings.preset, settings.channels, settings.n_classes,
                        spacing=settings.spacing,
                        image_shape=biggest if settings.dims == 3 else biggest[1:])


def run_round(images: list[RoundImage], settings: RoundSettings, *,
              warm_start: Callable[[Any], str | None] | None = None,
              make_validator: Callable[[Any, Any, Any], Callable[[], dict]] | None = None,
              progress: Callable | None = None, cancel: Any = None,
              log: Callable[[dict], None] | None = None,
              started: float | None = None,
              predict_cost: Callable[[Any, Any, np.ndarray], float] | None = None
              ) -> RoundOutcome:
    """Train one round. ``warm_start(model)`` loads earlier weights into the model and returns
    where they came from; ``make_validator(model, plan, device)`` returns a callable giving
    validation Dice. ``started`` (perf_counter) is when the round began, so time spent before
    the call (reading images) counts in the budget too. ``predict_cost(plan, device, image)``
    gives the seconds per voxel of predicting with the network (predict.sliding_window
    .seconds_per_voxel): the budget keeps that much for predicting the painted images.

    With the teacher on, about a quarter of each class's stroke components (the newest first)
    is held out of the student's and the scoring teacher's training; both are scored there,
    and ``extra["fusion"]`` holds the chosen network weight and the per-class estimates;
    ``extra["teacher"]`` is the forest re-fitted on all strokes, which prediction fuses."""
    import copy

    from semsegloop.learn import training as tr
    from semsegloop.learn.fusion import holdout_masks, unit_ids
    from semsegloop.learn.losses import SparseLabelLoss
    from semsegloop.learn.networks import build_network
    from semsegloop.learn.sampling import PatchSampler, TrainingImage
    from semsegloop.learn.teacher import CancelledError, Teacher, pseudo_from_proba

    from semsegloop.learn import seeded

    t_start = time.perf_counter() if started is None else started
    s = settings
    if s.use_teacher and (s.time_budget_s is None or s.time_budget_s >= WARM_UP_MIN_BUDGET_S):
        # Outside Slicer, importing its GrowCut takes seconds of CPU: only rounds long enough
        # to hide it start it (shorter ones use it when it is already loaded).
        seeded.warm_up()
    K = s.n_classes
    names = s.class_names or [str(k) for k in range(1, K + 1)]
    if not any(im.labels.any() for im in images):
        raise TrainingError("a training round needs at least one image with painted labels")
    plan = plan_for(s, [im.labels.shape for im in images if im.labels.any()])
    painted_vox = sum(int(np.prod(im.labels.shape)) for im in images if im.labels.any())
    net_s = None
    if s.time_budget_s is not None and predict_cost is not None:
        # What predicting the painted images with the network will take, from its measured
        # speed (taken here, before the teacher's refit shares the cores), not from the
        # training steps: under load (another process on the two cores) a 2D step took 4.4 s
        # against 0.27 s, and its 1/3 forward share put the reserve at 35 s where
        # predicting took 4.
        net_s = PREDICT_MARGIN * painted_vox * predict_cost(
            plan, tr.select_device(s.device), next(im.image for im in images if im.labels.any()))
    stop = tr.cancel_checker(cancel)
    logf = log or (lambda rec: None)
    pseudo: list = [None] * len(images)
    held = [np.zeros(im.labels.shape, bool) for im in images]
    teacher_full = teacher_h = refit = grown = prior = unit_proba = None
    # Seconds the painted images' teacher predictions took here: predicting them after the
    # round costs as much again (a reserve kept out of the student's budget).
    painted_s = 0.0
    # Grow from seeds on the painted images from all their strokes, what predicting them
    # blends in: grown here (its time is taken from the student's), handed to prediction.
    grown_all: dict = {}
    fusion: dict = {"weight": 1.0}
    p_teacher = y_h = None
    if s.use_teacher:
        new = [None if im.previous is None else (im.labels > 0) & ~im.previous for im in images]
        held = holdout_masks([im.labels for im in images], K, s.dims,
                             seed=s.seed + s.round_index,
                             prefer=new if PREFER_NEW_STROKES else None)
    train_labels = [np.where(h, 0, im.labels).astype(np.uint8) for im, h in zip(images, held)]
    if s.use_teacher:
        t0 = time.perf_counter()
        limit = None if s.time_budget_s is None else 0.35 * s.time_budget_s
        try:
            X, (y, h, unit) = Teacher(K, s.dims, s.spacing).samples(
                [im.raw for im in images], [im.labels > 0 for im in images],
                [[im.labels for im in images], held,
                 unit_ids([im.labels for im in images], s.dims)], stop)
            y, h, unit = y.astype(np.uint8), h.astype(bool), unit.astype(np.int64)
            kw = dict(seed=s.seed, n_jobs=tr.cpu_threads())
            teacher_h = Teacher(K, s.dims, s.spacing, **kw).fit(X[~h], y[~h], stop)
            if h.any():
                p_teacher, y_h = teacher_h.proba_samples(X[h]), y[h]
            for n, im in enumerate(images):
                if (limit is not None and not im.labels.any()
                        and time.perf_counter() - t_start > limit):
                    continue  # unpainted context images are optional, painted ones are not
                tp = time.perf_counter()
                p_img = teacher_h.predict_proba(im.raw, stop)
                if im.labels.any():
                    painted_s += time.perf_counter() - tp
                # An image whose strokes are all held out stands for the unseen images the
                # result is judged on, so it gets no pseudo-labels either: trained on them, the
                # student was scored on an image it had learnt (H&E nuclei: held-out network
                # 0.93 against the teacher's 0.83, on unseen tiles 0.70 against 0.72).
                if not (held[n].any() and not train_labels[n].any()):
                    pseudo[n] = pseudo_from_proba(p_img, train_labels[n])
                # The classes' shares of the images, as the teacher sees them (fusion.prior_weights).
                share = np.bincount(np.argmax(p_img, axis=0).ravel(), minlength=K)[:K]
                prior = share if prior is None else prior + share
                del p_img
            if h.any():
                # The forest prediction uses is re-fitted on all strokes while the student
                # trains (sklearn releases the GIL; one core), joined after training; then
                # small forests score every painting unit unseen (fusion's evidence).
                refit = _Background(lambda: (
                    Teacher(K, s.dims, s.spacing, seed=s.seed, n_jobs=1).fit(X, y, stop),
                    _unit_folds(X, y, unit, s, stop)))
            else:
                teacher_full = teacher_h
            # Without a time budget nothing is gained by skipping it while Slicer's import
            # is still loading, and a round budgeted in steps must give the same result
            # however fast that import ran beside it (skipped here, growing happens after
            # training on the scored images only, and the painted images get none).
            if (h.any() and seeded.ready(wait=s.time_budget_s is None)
                    and _seeded_evidence(train_labels, held)):
                # Grow from seeds does not depend on the network: grown here, its time is
                # taken from the student's budget instead of running past the round's end
                # (Drosophila, 5 s per 1024^2 image: a 60 s round took 78 s to its result).
                grown = _grow_training_strokes(images, train_labels, held, s)
                grown_all = _grow_all_strokes(images, s)
        except CancelledError:
            pseudo = [None] * len(images)
            teacher_full = teacher_h = None
        logf({"event": "teacher", "round": s.round_index, "seconds": round(time.perf_counter() - t0, 3),
              "held_out_pixels": int(sum(m.sum() for m in held)),
              "pseudo_images": sum(p is not None for p in pseudo)})
    train_images = [TrainingImage(im.image, lab, im.image_id, ps)
                    for im, lab, ps in zip(images, train_labels, pseudo) if lab.any() or ps is not None]
    if not any(ti.labels.any() for ti in train_images):  # everything held out: train on all
        train_images = [TrainingImage(im.image, im.labels, im.image_id, ps)
                        for im, ps in zip(images, pseudo) if im.labels.any() or ps is not None]
    device_t = tr.select_device(s.device)
    tr.seed_everything(s.seed)
    model = build_network(plan)
    warm = warm_start(model) if warm_start is not None else None
    previous = copy.deepcopy(model).eval() if warm else None
    anisotropic = s.dims == 3 and max(s.spacing) > 2 * min(s.spacing)
    sampler = PatchSampler(train_images, K, plan.patch_size, s.dims, seed=s.seed,
                           in_plane_aug_only=anisotropic or s.dims == 2,
                           image_channels=s.channels)
    pw = 1.0 if s.pairwise_weight is None else s.pairwise_weight
    loss_fn = SparseLabelLoss(pairwise_weight=pw, in_plane_only=anisotropic,
                              image_channels=s.channels)
    validate = make_validator(model, plan, device_t) if make_validator is not None else None
    logf({"event": "train_start", "round": s.round_index, "preset": s.preset.get("name"),
          "images": [im.image_id for im in images if im.labels.any()], "device": str(device_t),
          "warm_start": warm, "steps": s.steps, "time_budget_s": s.time_budget_s,
          "patch_size": plan.patch_size})
    budget = None
    scoring = 0.0
    if s.time_budget_s is not None:  # preparation (teacher, features) counts in the budget
        # Rounds too short to hide it score within their budget's last step instead.
        scoring = (SCORING_SHARE * s.time_budget_s
                   if p_teacher is not None and s.time_budget_s >= WARM_UP_MIN_BUDGET_S else 0.0)
        budget = max(1.0, s.time_budget_s - (time.perf_counter() - t_start) - scoring)
    # A warm-started model is refined, not retrained: a lower rate keeps what it knew.
    lr = float(s.preset["learning_rate"]) * (0.5 if warm else 1.0)
    last_reserve = [0.0]

    patch_vox = int(np.prod(plan.patch_size)) * int(s.preset["batch_size"])

    def reserve(step_s: float) -> float:
        # Without a measured speed: a forward pass costs about a third of a training step
        # (forward + backward) per voxel. However slow an estimate, the student keeps at
        # least half of what the preparation left it (the overrun is then reported).
        net = net_s if net_s is not None else step_s * painted_vox / (3 * patch_vox)
        last_reserve[0] = min(painted_s + net, MAX_RESERVE_SHARE * budget)
        return last_reserve[0]
    t_train0 = time.perf_counter()
    n_steps, _, last_loss, cancelled, val = tr.run_training(
        model, sampler, loss_fn, device=device_t, round_index=s.round_index,
        batch_size=int(s.preset["batch_size"]), learning_rate=lr,
        steps=s.steps, time_budget_s=budget, progress=progress, cancel=cancel,
        validate=validate, log=logf, seed=s.seed, dims=s.dims,
        reserve=reserve if s.time_budget_s is not None else None)
    t_trained = time.perf_counter()
    if refit is not None:
        try:
            teacher_full, unit_proba = refit.join()
            # Fitted on one core beside the student; prediction has every core.
            teacher_full.set_jobs(tr.cpu_threads())
        except CancelledError:
            teacher_full, cancelled = teacher_h, True
    t_joined = time.perf_counter()
    kept_previous = False
    unit_ev = None if unit_proba is None else (unit_proba, y, unit, h)
    if p_teacher is not None and n_steps > 0 and not cancelled:
        deadline = None
        if s.time_budget_s is not None:
            # Scoring may use what training left of the budget, not the painted images'
            # prediction reserve.
            deadline = max(time.perf_counter(), t_start + s.time_budget_s - last_reserve[0])
        try:
            fusion, kept_previous = _fuse(images, train_labels, held, model, previous, plan,
                                          device_t, p_teacher, y_h, s, names, stop, deadline,
                                          grown, prior, unit_ev)
        except InterruptedError:
            cancelled = True
    # Where the round's seconds went (from its start), for budget overruns.
    logf({"event": "round_phases", "round": s.round_index, "steps": n_steps,
          "train_start_s": round(t_train0 - t_start, 2), "train_budget_s": budget,
          "train_end_s": round(t_trained - t_start, 2),
          "refit_joined_s": round(t_joined - t_start, 2),
          "fuse_end_s": round(time.perf_counter() - t_start, 2),
          "reserve_s": round(last_reserve[0], 2), "teacher_painted_s": round(painted_s, 2),
          "network_painted_s": None if net_s is None else round(net_s, 2)})
    model.eval()
    if kept_previous:
        model.load_state_dict(previous.state_dict())
        logf({"event": "kept_previous_model", "round": s.round_index, "warm_start": warm,
              "held_out": fusion.get("candidates")})
    extra = {"fusion": fusion, "teacher": teacher_full, "kept_previous": kept_previous,
             "grown": grown_all if teacher_full is not None else {}}
    return RoundOutcome(model=model, plan=plan, device=device_t, steps=n_steps,
                        seconds=time.perf_counter() - t_start, final_loss=last_loss,
                        cancelled=cancelled, val_dice=val, warm_start=warm, extra=extra)


class _Background:
    """Run ``fn`` on a thread; ``join()`` returns its result or raises its exception."""

    def __init__(self, fn):
        import threading

        self.out: list = []
        self.err: list = []

        def run():
            try:
                self.out.append(fn())
            except BaseException as e:  # handed to join()
                self.err.append(e)
        self.thread = threading.Thread(target=run, daemon=True, name="semsegloop-teacher-refit")
        self.thread.start()

    def join(self):
        self.thread.join()
        if self.err:
            raise self.err[0]
        return self.out[0]


# Folds and trees of the forests that score every painting unit unseen: the spread of their
# scores is all they are for, so they are a quarter of the teacher's size.
UNIT_FOLDS = 5
UNIT_TREES = 16


def _unit_folds(X, y, unit, s: RoundSettings, stop) -> np.ndarray | None:
    """(N, K) probabilities at every stroke sample from a forest that did not see its painting
    unit (k-fold over units, at most UNIT_FOLDS forests); None with fewer than two units.
    What fusion.unit_scores turns into the evidence one held-out unit gives."""
    from semsegloop.learn.teacher import Teacher

    units = np.unique(unit[unit >= 0])
    if len(units) < 2:
        return None
    n_folds = min(UNIT_FOLDS, len(units))
    order = np.random.default_rng(s.seed).permutation(units)
    fold_of = np.full(int(units.max()) + 1, -1)
    fold_of[order] = np.arange(len(order)) % n_folds
    fold = np.where(unit >= 0, fold_of[np.maximum(unit, 0)], -1)
    out = np.full((len(y), s.n_classes), 1.0 / s.n_classes, np.float32)
    for f in range(n_folds):
        test, train = fold == f, (fold != f) & (fold >= 0)
        if not test.any() or len(np.unique(y[train])) < 2:
            continue
        t = Teacher(s.n_classes, s.dims, s.spacing, n_trees=UNIT_TREES, seed=s.seed,
                    n_jobs=1).fit(X[train], y[train], stop)
        out[test] = t.proba_samples(X[test])
    return out


def _seeded_evidence(train_labels, where) -> bool:
    """Grow from seeds can be scored: some image has both training strokes to grow from and
    pixels ``where`` (held out or scored) to score it on. A collection that holds out whole
    images has none (nothing grows on an image without training strokes), so its weight
    would be chosen on nothing: H&E nuclei under load gave it 0.8, the painted images were
    mostly Grow from seeds (mean Dice 0.42 on their unpainted pixels), and the next round,
    corrected there, scored 0.71 on the unseen images against the forest's 0.81."""
    return any(w.any() and lab.any() for lab, w in zip(train_labels, where))


def _grow_training_strokes(images, train_labels, where, s: RoundSettings) -> list:
    """Per image, grow-from-seeds labels from the training strokes on images where ``where``
    (held-out or scored pixels) has any pixel, None elsewhere: what _fuse scores it with."""
    from semsegloop.learn import seeded

    return [seeded.grow_from_seeds(im.raw, lab, s.dims, s.spacing) if w.any() else None
            for im, lab, w in zip(images, train_labels, where)]


def _grow_all_strokes(images, s: RoundSettings) -> dict:
    """{image id: grow-from-seeds labels from all its strokes} for the painted images: what
    predicting them after the round blends in (predict_fused's ``grown``)."""
    from semsegloop.learn import seeded

    return {im.image_id: seeded.grow_from_seeds(im.raw, im.labels, s.dims, s.spacing)
            for im in images if im.labels.any()}


def _fuse(images, train_labels, held, model, previous, plan, device, p_teacher_all, y_all,
          s: RoundSettings, names, stop, deadline, grown=None, prior=None, units=None):
    """Score the new (and the previous) network, the teacher and grow-from-seeds on held-out
    strokes; returns (fusion record, keep the previous network?).

    "weight" is the network's share against the teacher (every image); "seeded_weights" are
    (network, teacher, grow from seeds) shares for the painted images, where the strokes can
    seed a region growing. ``units`` (k-fold probabilities, classes, painting units and
    held-out flags of every stroke sample) give the standard error of a score on the
    held-out units, which the network's share must beat (fusion.choose_weights)."""
    from semsegloop.learn import seeded
    from semsegloop.learn.fusion import (choose_weights, per_class, prior_weights, sampling_noise,
                                         score_tiles, unit_scores, unit_standard_error)

    K = s.n_classes
    models = [model] + ([previous] if previous is not None else [])
    t0 = time.perf_counter()
    probs, scored = score_tiles(models, [im.image for im in images], held, plan, device, K,
                                deadline, stop, labels=[im.labels for im in images])
    rows = np.concatenate([sc[h] for sc, h in zip(scored, held) if h.any()])
    p_teacher, y_h = p_teacher_all[rows], y_all[rows]
    p_net = probs[0]
    record: dict = {"held_out_pixels": int(len(y_all)), "scored_pixels": int(len(y_h)),
                    "scoring_s": round(time.perf_counter() - t0, 2)}
    wts = prior_weights(y_h, prior)
    se = 0.0
    if units is not None:
        u_proba, u_y, u_unit, u_held = units
        unit_sc = unit_scores(u_proba, u_y, u_unit, K, prior)
        # Units the held-out score was taken on (those with scored pixels). Held out in
        # part (stroke components, fewer than MIN_UNITS units), the held-out strokes lie
        # beside training strokes of every unit, and one unit's noise is not theirs.
        n_held = len(np.unique(u_unit[np.flatnonzero(u_held)[rows]]))
        whole = all(u_held[u_unit == u].all() for u in np.unique(u_unit[u_held]))
        se = unit_standard_error(unit_sc, n_held) if whole else 0.0
        record.update(unit_scores=[round(float(v), 4) for v in unit_sc], held_units=n_held,
                      unit_se=round(se, 4))
    if prior is not None:
        record["class_shares"] = [round(float(v) / max(float(np.sum(prior)), 1), 4) for v in prior]
    comps = {"network": p_net, "teacher": p_teacher}
    if grown is None and seeded.ready() and _seeded_evidence(train_labels, scored):
        # GrowCut was still loading before training: grown now, on the scored images only.
        grown = _grow_training_strokes(images, train_labels, scored, s)
    if grown is not None:
        # Grown from the training strokes only; read at the held-out pixels scored (scored
        # pixels are held out, so every image with some was grown).
        at = np.concatenate([g[sc] for g, sc in zip(grown, scored) if sc.any()])
        # Where nothing grew it is uniform and leaves the others' argmax as it is: its weight
        # would be chosen on nothing (see _seeded_evidence).
        if (at > 0).any():
            comps["seeded"] = seeded.as_probabilities(at, K)

    def decide(p_network):
        w2, t2 = choose_weights([p_network, p_teacher], y_h, K, weights=wts, unit_se=se)
        out = {"weight": float(w2[0]), "dice2": t2[w2][0], "alone": t2[(1.0, 0.0)]}
        if "seeded" in comps:
            w3, t3 = choose_weights([p_network, p_teacher, comps["seeded"]], y_h, K,
                                    weights=wts, unit_se=se)
            out.update(seeded_weights=[float(v) for v in w3], dice3=t3[w3][0])
        return out

    new = decide(p_net)
    keep = False
    if previous is not None:
        old = decide(probs[1])
        # Best blend first; on a tie the network that scores better alone (it is what carries
        # to unpainted images), then its log-likelihood.
        def best(d):
            return (float(np.nan_to_num(d.get("dice3", d["dice2"]), nan=-1.0)),
                    float(np.nan_to_num(d["alone"][0], nan=-1.0)), float(d["alone"][1]))
        record["candidates"] = {"new": [round(v, 4) for v in best(new)],
                                "previous": [round(v, 4) for v in best(old)]}
        # Within sampling noise of each other the newer network (trained longer, on the
        # corrections) is kept: a 1-step previous network once won a tie on Drosophila by
        # 0.001 against a 107-step new one.
        d_new, d_old = best(new)[0], best(old)[0]
        tol = sampling_noise(d_new, len(y_h))
        if d_old > d_new + tol or (abs(d_old - d_new) <= tol and best(old)[1] > best(new)[1] + tol):
            keep, new, p_net = True, old, probs[1]
            record["kept_previous"] = True
    record["weight"] = new["weight"]
    if "seeded_weights" in new:
        record["seeded_weights"] = new["seeded_weights"]
    w = new["weight"]
    fused = w * p_net + (1 - w) * p_teacher
    record["estimate"] = {"fused": per_class(fused, y_h, K, names, wts),
                          "network": per_class(p_net, y_h, K, names, wts),
                          "teacher": per_class(p_teacher, y_h, K, names, wts)}
    if "seeded" in comps:
        a, b, c = new["seeded_weights"]
        record["estimate"]["fused_painted"] = per_class(
            a * p_net + b * p_teacher + c * comps["seeded"], y_h, K, names, wts)
        record["estimate"]["seeded"] = per_class(comps["seeded"], y_h, K, names, wts)
    record["fusion_s"] = round(time.perf_counter() - t0, 2)
    return record, keep
