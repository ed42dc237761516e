"""One training round on arrays: plan the network, fit the teacher, warm-start, train the student.
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


@dataclass
class RoundImage:
    """One image of the round: normalised (S, Y, X, C) float32 and sparse (S, Y, X) uint8 labels
    (all zeros for an unpainted image that joins only through the teacher's pseudo-labels)."""
    image_id: str
    image: np.ndarray
    labels: np.ndarray


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
              started: float | None = None) -> RoundOutcome:
    """Train one round. ``warm_start(model)`` loads earlier weights into the model and returns
    where they came from; ``make_validator(model, plan, device)`` returns a callable giving
    validation Dice. ``started`` (perf_counter) is when the round began, so time spent before
    the call (reading images) counts in the budget too."""
    from semsegloop.learn import training as tr
    from semsegloop.learn.losses import SparseLabelLoss
    from semsegloop.learn.networks import build_network
    from semsegloop.learn.sampling import PatchSampler, TrainingImage
    from semsegloop.learn.teacher import teacher_pseudo_labels

    t_start = time.perf_counter() if started is None else started
    s = settings
    if not any(im.labels.any() for im in images):
        raise TrainingError("a training round needs at least one image with painted labels")
    plan = plan_for(s, [im.labels.shape for im in images if im.labels.any()])
    pseudo: list = [None] * len(images)
    if s.use_teacher:
        limit = None if s.time_budget_s is None else 0.35 * s.time_budget_s
        pseudo = teacher_pseudo_labels([im.image for im in images], [im.labels for im in images],
                                       s.n_classes, s.dims, s.spacing, seed=s.seed,
                                       n_jobs=tr.cpu_threads(), time_limit_s=limit,
                                       cancel=tr.cancel_checker(cancel))
    train_images = [TrainingImage(im.image, im.labels, im.image_id, ps)
                    for im, ps in zip(images, pseudo) if im.labels.any() or ps is not None]
    device_t = tr.select_device(s.device)
    tr.seed_everything(s.seed)
    model = build_network(plan)
    warm = warm_start(model) if warm_start is not None else None
    anisotropic = s.dims == 3 and max(s.spacing) > 2 * min(s.spacing)
    sampler = PatchSampler(train_images, s.n_classes, plan.patch_size, s.dims, seed=s.seed,
                           in_plane_aug_only=anisotropic or s.dims == 2,
                           image_channels=s.channels)
    pw = 1.0 if s.pairwise_weight is None else s.pairwise_weight
    loss_fn = SparseLabelLoss(pairwise_weight=pw, in_plane_only=anisotropic,
                              image_channels=s.channels)
    validate = make_validator(model, plan, device_t) if make_validator is not None else None
    logf = log or (lambda rec: None)
    logf({"event": "train_start", "round": s.round_index, "preset": s.preset.get("name"),
          "images": [im.image_id for im in images if im.labels.any()], "device": str(device_t),
          "warm_start": warm, "steps": s.steps, "time_budget_s": s.time_budget_s,
          "patch_size": plan.patch_size})
    budget = None
    if s.time_budget_s is not None:  # preparation (teacher, features) counts in the budget
        budget = max(1.0, s.time_budget_s - (time.perf_counter() - t_start))
    n_steps, _, last_loss, cancelled, val = tr.run_training(
        model, sampler, loss_fn, device=device_t, round_index=s.round_index,
        batch_size=int(s.preset["batch_size"]), learning_rate=float(s.preset["learning_rate"]),
        steps=s.steps, time_budget_s=budget, progress=progress, cancel=cancel,
        validate=validate, log=logf, seed=s.seed)
    return RoundOutcome(model=model.eval(), plan=plan, device=device_t, steps=n_steps,
                        seconds=time.perf_counter() - t_start, final_loss=last_loss,
                        cancelled=cancelled, val_dice=val, warm_start=warm)
