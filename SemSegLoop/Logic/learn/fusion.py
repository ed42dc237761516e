"""Held-out strokes and the fusion of network and teacher: some stroke components are kept out
of a round's training, both models are scored on them, and the blend weight they choose is what
prediction uses, so the result is never worse (on held-out strokes) than either model alone.

Why: on a laptop CPU a 3D student gets tens of steps and is worse than the forest that taught
it; on a GPU it gets thousands and is better. A weight chosen on strokes neither model saw
follows whichever is better on this image set, whatever the compute. The same scores are the
engine's own estimate of its accuracy (per class, per round)."""

from __future__ import annotations

import numpy as np

HOLDOUT_FRACTION = 0.25
# Classes with fewer stroke components than this have their strokes cut into grid cells, so a
# single long stroke can still give held-out pixels.
MIN_COMPONENTS = 4
CELL = 16


def stroke_components(labels: np.ndarray, k: int, dims: int) -> tuple[np.ndarray, int]:
    """Connected components of class ``k``'s strokes in an (S, Y, X) label map (per slice in
    2D, in the volume in 3D), 8/26-connected; returns (component ids, count)."""
    from scipy import ndimage

    m = labels == k
    if dims == 2:
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = True  # never connect across slices of a 2D stack
    else:
        structure = np.ones((3, 3, 3), bool)
    comp, n = ndimage.label(m, structure=structure)
    return comp, int(n)


def painting_units(labels: list[np.ndarray], dims: int) -> list[tuple[int, tuple]]:
    """Where the person painted, as (image, index into its (S, Y, X) grid) units: each painted
    slice of a 2D stack (an image of the collection), and in a volume each painted plane along
    the axis with the fewest painted planes (the axis they painted on)."""
    units = []
    for n, lab in enumerate(labels):
        if not lab.any():
            continue
        if dims == 2:
            for s in np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1)):
                units.append((n, (slice(int(s), int(s) + 1),)))
            continue
        planes = [np.flatnonzero(lab.any(axis=tuple(a for a in range(3) if a != ax)))
                  for ax in range(3)]
        ax = int(np.argmin([len(p) for p in planes]))
        for z in planes[ax]:
            idx = [slice(None)] * 3
            idx[ax] = slice(int(z), int(z) + 1)
            units.append((n, tuple(idx)))
    return units


def holdout_masks(labels: list[np.ndarray], n_classes: int, dims: int, seed: int = 0,
                  fraction: float = HOLDOUT_FRACTION,
                  prefer: list[np.ndarray | None] | None = None) -> list[np.ndarray]:
    """Per image, a bool mask of the stroke pixels held out of training: about ``fraction`` of
    the painted pixels, every class keeping some in training. ``prefer`` (per image, bool, e.g.
    the strokes new this round) are picked first, so a correction round is scored on
    corrections.

    With at least MIN_UNITS painting units (painting_units: images of a collection, painted
    planes of a volume) whole units are held out, so the held-out strokes stand for what the
    result is judged on (unseen images, unpainted slices); strokes next to training strokes of
    the same slice favour whatever copies its neighbours (on the hippocampus volumes, scoring
    on held-out components of the painted slices gave Grow from seeds a weight of 0.4 and the
    result 0.67 mean Dice where the forest alone had 0.76). Otherwise whole stroke components
    (see _holdout_components)."""
    units = painting_units(labels, dims)
    if len(units) >= MIN_UNITS:
        out = _holdout_units(labels, units, n_classes, seed, fraction, prefer)
        if out is not None:
            return out
    return _holdout_components(labels, n_classes, dims, seed, fraction, prefer)


MIN_UNITS = 3


def _holdout_units(labels, units, n_classes, seed, fraction, prefer):
    """Whole units, preferred (mostly new) first and random within; a unit is skipped when it
    would take the last training strokes of a class. None when no unit can be held out."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((len(units), n_classes + 1), np.int64)
    pref = np.zeros(len(units), bool)
    for u, (n, idx) in enumerate(units):
        lab = labels[n][idx]
        counts[u] = np.bincount(lab.ravel(), minlength=n_classes + 1)[:n_classes + 1]
        if prefer is not None and prefer[n] is not None and (counts[u, 1:] > 0).sum() >= 2:
            # A unit of one class (a correction disk alone on its slice) scores only whether
            # that class is predicted there, which favours whatever copies nearby seeds.
            painted = lab > 0
            pref[u] = prefer[n][idx][painted].mean() > 0.5 if painted.any() else False
    total = counts[:, 1:].sum()
    left = counts[:, 1:] > 0
    order = sorted(rng.permutation(len(units)), key=lambda u: not pref[u])
    out = [np.zeros(lab.shape, bool) for lab in labels]
    taken, held = 0, 0
    for u in order:
        if taken >= fraction * total or held + 1 >= len(units):
            break
        size = int(counts[u, 1:].sum())
        if held and taken + size - fraction * total > fraction * total - taken:
            continue  # it would overshoot the share more than stopping short of it
        keep = left.copy()
        keep[u] = False
        if (keep.sum(axis=0) == 0)[left.any(axis=0)].any():
            continue
        n, idx = units[u]
        out[n][idx] |= labels[n][idx] > 0
        left, taken, held = keep, taken + size, held + 1
    return out if held else None


def _holdout_components(labels, n_classes, dims, seed, fraction, prefer):
    """About ``fraction`` of each class's painted pixels, whole components at a time; at least
    one component of every class stays in training."""
    rng = np.random.default_rng(seed)
    out = [np.zeros(lab.shape, bool) for lab in labels]
    for k in range(1, n_classes + 1):
        units = []  # (image, component mask index array, pixels, preferred)
        for n, lab in enumerate(labels):
            if not (lab == k).any():
                continue
            comp, c = stroke_components(lab, k, dims)
            units.append((n, comp, c))
        total_comps = sum(c for _, _, c in units)
        pieces = []
        for n, comp, c in units:
            if total_comps < MIN_COMPONENTS:
                comp = _cut_cells(comp, dims)
            flat = comp.ravel()
            nz = np.flatnonzero(flat)
            ids = flat[nz]
            order = np.argsort(ids, kind="stable")
            ids, nz = ids[order], nz[order]
            bounds = np.flatnonzero(np.diff(ids)) + 1
            for part in np.split(nz, bounds):
                if len(part):
                    pref = bool(prefer is not None and prefer[n] is not None
                                and prefer[n].ravel()[part].mean() > 0.5)
                    pieces.append((n, part, pref))
        if len(pieces) < 2:
            continue
        total = sum(len(p) for _, p, _ in pieces)
        perm = rng.permutation(len(pieces))
        perm = sorted(perm, key=lambda i: not pieces[i][2])  # preferred first, random within
        taken, held = 0, 0
        for i in perm:
            n, part, _ = pieces[i]
            if held + 1 >= len(pieces) or taken >= fraction * total:
                break
            out[n].ravel()[part] = True
            taken += len(part)
            held += 1
    return out


def _cut_cells(comp: np.ndarray, dims: int) -> np.ndarray:
    """Split components further by a CELL-pixel grid in the image plane."""
    S, Y, X = comp.shape
    zz, yy, xx = np.indices((S, Y, X), sparse=True)
    cell = (yy // CELL) * ((X + CELL - 1) // CELL) + xx // CELL
    n_cells = ((Y + CELL - 1) // CELL) * ((X + CELL - 1) // CELL)
    if dims == 2:
        cell = cell + zz * n_cells
    return np.where(comp > 0, comp.astype(np.int64) * (n_cells * S + 1) + cell + 1, 0)


def class_dice(pred: np.ndarray, y: np.ndarray, n_classes: int,
               weights: np.ndarray | None = None) -> np.ndarray:
    """Dice per class (1..K) of predicted classes ``pred`` against ``y`` on the same pixels
    (each counted ``weights`` times when given); NaN for classes absent from ``y``."""
    n = n_classes + 1
    conf = np.bincount(y.astype(np.int64) * n + pred.astype(np.int64), weights=weights,
                       minlength=n * n).reshape(n, n)
    tp = np.diag(conf)[1:].astype(np.float64)
    ref = conf.sum(axis=1)[1:]
    prd = conf.sum(axis=0)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 2 * tp / (ref + prd)
    d[ref == 0] = np.nan
    return d


def prior_weights(y: np.ndarray, prior: np.ndarray | None) -> np.ndarray | None:
    """Per held-out pixel, a weight that gives each class the share ``prior`` (K,) has of the
    image instead of its share of the strokes; None without a prior.

    Why: people paint about as much of every class, so held-out strokes are a class-balanced
    sample, while images are mostly background. On such a sample a barely trained network
    that calls background foreground loses little, and blending it in chose weights that cost
    the hippocampus volumes 0.02-0.04 mean Dice. Weighted, the held-out confusion matrix
    estimates the image's (within each class, strokes still stand for that class)."""
    if prior is None or len(y) == 0:
        return None
    K = len(prior)
    counts = np.bincount(y.astype(np.int64), minlength=K + 1)[1:K + 1].astype(np.float64)
    share = np.asarray(prior, np.float64) / max(float(np.sum(prior)), 1e-12)
    # A class the teacher barely sees keeps a floor of weight: its strokes still count.
    share = np.maximum(share, 0.01 / K)
    w = np.where(counts > 0, share / np.maximum(counts, 1), 0.0)
    return (w * len(y) / max(float((w * counts).sum()), 1e-12))[y.astype(np.int64) - 1]


def score(p: np.ndarray, y: np.ndarray, n_classes: int,
          weights: np.ndarray | None = None) -> tuple[float, float]:
    """(mean Dice over classes present, mean log-likelihood) of (N, K) probabilities, pixels
    counted ``weights`` times when given (prior_weights)."""
    d = class_dice(np.argmax(p, axis=1) + 1, y, n_classes, weights)
    ll = float(np.average(np.log(np.clip(p[np.arange(len(y)), y.astype(np.int64) - 1], 1e-4, 1)),
                          weights=weights))
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan"), ll


def simplex_grid(n: int, step: float = 0.1) -> list[tuple[float, ...]]:
    """All weight vectors of ``n`` non-negative multiples of ``step`` summing to 1."""
    m = int(round(1 / step))

    def rec(k, left):
        if k == 1:
            yield (left,)
            return
        for a in range(left, -1, -1):
            for rest in rec(k - 1, left - a):
                yield (a,) + rest
    return [tuple(round(a / m, 4) for a in w) for w in rec(n, m)]


def sampling_noise(dice: float, n: int) -> float:
    """Half a binomial standard error of a Dice near ``dice`` measured on ``n`` pixels: scores
    closer than this are a tie."""
    return 0.5 * float(np.sqrt(max(dice * (1 - dice), 0.0) / max(n, 1)))


def choose_weights(components: list[np.ndarray], y: np.ndarray, n_classes: int,
                   step: float = 0.1, weights: np.ndarray | None = None,
                   unit_se: float = 0.0, penalised: int = 0
                   ) -> tuple[tuple[float, ...], dict]:
    """The blend sum_i w_i * p_i (weights on a simplex grid) that scores best on held-out
    pixels ``y`` (1..K) by mean Dice over classes. Every single model is a grid point, so the
    blend never scores below the best model alone. Among blends that score within sampling
    noise of the best (a plateau: held-out strokes lie inside objects and often cannot tell
    models apart), the one nearest the plateau's centre is taken: when the strokes cannot
    tell, an even blend is the safer bet than the most confident model (taking the teacher
    alone instead lost 0.01 mean Dice on both synthetic cases of Testing/test_floor.py).
    ``weights`` count held-out pixels (prior_weights).

    ``unit_se`` is the standard error of a score taken on the held-out painting units
    (unit_standard_error): component ``penalised`` (the network) must earn its share, each
    unit of weight costing one standard error. Why: with three painted images one image is
    held out, and one image's score moves far more between images than between pixels
    (Drosophila: the forest's held-out mean Dice was 0.47, 0.62 and 0.70 on its three
    images), so a gain of a few hundredths there is no evidence; the network held out on
    its hardest image took weight 0.6 and the result lost 0.06 to the forest on the 17
    unseen images. A score lower by one standard error is the one-standard-error rule of
    cross-validation, with the forest-like parts as the simpler model. Returns (weights,
    {weights: (dice, loglik)}); the dice is the raw score, before the penalty."""
    table = {}
    for w in simplex_grid(len(components), step):
        p = sum(wi * c for wi, c in zip(w, components) if wi)
        table[w] = score(p, y, n_classes, weights)
    dice = {w: float(np.nan_to_num(v[0], nan=-1.0)) - unit_se * w[penalised]
            for w, v in table.items()}
    top = max(dice.values())
    tol = sampling_noise(top, len(y)) + 1e-9
    plateau = [w for w in table if dice[w] >= top - tol]
    centre = np.mean(np.array(plateau), axis=0)
    best = min(plateau, key=lambda w: (float(np.sum((np.array(w) - centre) ** 2)),
                                       -dice[w], -table[w][1]))
    return best, table


def unit_ids(labels: list[np.ndarray], dims: int) -> list[np.ndarray]:
    """Per image an int32 (S, Y, X) map of the painting unit (painting_units) each pixel lies
    in, -1 outside every unit."""
    out = [np.full(lab.shape, -1, np.int32) for lab in labels]
    for u, (n, idx) in enumerate(painting_units(labels, dims)):
        out[n][idx] = u
    return out


def unit_scores(proba: np.ndarray, y: np.ndarray, unit: np.ndarray, n_classes: int,
                prior: np.ndarray | None = None) -> np.ndarray:
    """Score (mean Dice, pixels weighted by ``prior`` as fusion scores them) of (N, K)
    probabilities on each painting unit ``unit`` (N,) holding at least two painted classes;
    units with one class (a correction alone on its plane) score only recall and are left
    out."""
    out = []
    for u in np.unique(unit[unit >= 0]):
        m = unit == u
        if len(np.unique(y[m])) < 2:
            continue
        out.append(score(proba[m], y[m], n_classes, prior_weights(y[m], prior))[0])
    return np.array([v for v in out if np.isfinite(v)], np.float64)


def unit_standard_error(scores: np.ndarray, n_held_units: int) -> float:
    """Standard error of a score taken on ``n_held_units`` painting units, from the spread of
    per-unit scores (``scores``, one per unit, from k-fold refits of the teacher): the sample
    standard deviation over sqrt(units). 0 with fewer than MIN_UNITS unit scores (two values
    are no spread to go by: only the pixel noise then counts)."""
    scores = np.asarray(scores, np.float64)
    if len(scores) < MIN_UNITS or n_held_units < 1:
        return 0.0
    return float(np.std(scores, ddof=1) / np.sqrt(n_held_units))


def choose_weight(p_net: np.ndarray, p_teacher: np.ndarray, y: np.ndarray, n_classes: int,
                  step: float = 0.1) -> tuple[float, dict]:
    """The network's weight w in w * p_net + (1 - w) * p_teacher chosen on held-out pixels
    (see choose_weights); returns (w, {w: (dice, loglik)})."""
    w, table = choose_weights([p_net, p_teacher], y, n_classes, step)
    return w[0], {k[0]: v for k, v in table.items()}


def per_class(p: np.ndarray, y: np.ndarray, n_classes: int, names: list[str],
              weights: np.ndarray | None = None) -> dict:
    d = class_dice(np.argmax(p, axis=1) + 1, y, n_classes, weights)
    return {nm: round(float(v), 4) for nm, v in zip(names, d) if np.isfinite(v)}


def score_tiles(models: list, images: list[np.ndarray], held: list[np.ndarray], plan, device,
                n_classes: int, deadline: float | None = None, cancel=None,
                labels: list[np.ndarray] | None = None
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Network probabilities at held-out pixels, one forward pass per patch-sized tile, fullest
    tiles first, until ``deadline`` (perf_counter; at least one tile is always scored).

    Returns ([(N, K) float32 per model], per image the bool mask of the pixels scored); rows
    are in image order and raster order within an image, like Teacher.samples."""
    import time

    import torch

    from semsegloop.learn.training import autocast

    dims = plan.dims
    patch = [int(p) for p in plan.patch_size]
    tiles = []
    for n, h in enumerate(held):
        if not h.any():
            continue
        coords = np.argwhere(h)
        key = (np.concatenate([coords[:, :1], coords[:, 1:] // patch], axis=1) if dims == 2
               else coords // patch)
        uniq, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
        inv = inv.ravel()
        for t in range(len(uniq)):
            pts = coords[inv == t]
            tiles.append((int(counts[t]), n, uniq[t], pts,
                          set(np.unique(labels[n][tuple(pts.T)]).tolist()) if labels else set()))
    tiles.sort(key=lambda t: -t[0])
    # Fullest tile of every class first (those run even past the deadline: a weight chosen on
    # one class would be blind to the others), then the rest by fullness.
    first, seen = [], set()
    for t in tiles:
        if t[4] - seen:
            first.append(t)
            seen |= t[4]
    rest = [t for t in tiles if not any(t is f for f in first)]
    tiles = first + rest
    got = [[[] for _ in images] for _ in models]
    scored = [np.zeros(h.shape, bool) for h in held]
    for m in models:
        m.eval()
    for done, (_, n, key, pts, _cls) in enumerate(tiles):
        if done >= max(1, len(first)) and deadline is not None and time.perf_counter() > deadline:
            break
        if cancel is not None and cancel():
            raise InterruptedError("held-out scoring cancelled")
        img = images[n]
        spatial = img.shape[1:3] if dims == 2 else img.shape[:3]
        cell = key[1:] if dims == 2 else key
        starts = [int(max(0, min(c * p, sz - p))) for c, p, sz in zip(cell, patch, spatial)]
        region = tuple(slice(st, st + p) for st, p in zip(starts, patch))
        crop = img[int(key[0])][region] if dims == 2 else img[region]
        pads = [(0, p - c) for p, c in zip(patch, crop.shape[:dims])]
        if any(q[1] for q in pads):
            crop = np.pad(crop, pads + [(0, 0)], mode="edge")
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(crop, -1, 0)))[None].to(device)
        local = pts[:, 1:] - starts if dims == 2 else pts - starts
        for j, m in enumerate(models):
            with torch.inference_mode(), autocast(device, dims, inference=True):
                prob = torch.softmax(m(x).float(), dim=1)[0].cpu().numpy()
            got[j][n].append(prob[(slice(None),) + tuple(local.T)].T)
        scored[n][tuple(pts.T)] = True
        for j in range(len(models)):
            got[j][n][-1] = (np.ravel_multi_index(tuple(pts.T), held[n].shape), got[j][n][-1])
    out = []
    for j in range(len(models)):
        parts = []
        for n in range(len(images)):
            if got[j][n]:
                flat = np.concatenate([f for f, _ in got[j][n]])
                pr = np.concatenate([p for _, p in got[j][n]])
                parts.append(pr[np.argsort(flat, kind="stable")])
        out.append(np.concatenate(parts) if parts else np.zeros((0, n_classes), np.float32))
    return out, scored
