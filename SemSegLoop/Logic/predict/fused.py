"""Fused prediction: the network's sliding-window probabilities blended with the teacher
forest's, w * p_net + (1 - w) * p_teacher, with the weight the round chose on held-out strokes.

The network part runs window row by window row (predict/sliding_window.py), the forest block
by block, so memory stays bounded; with w = 1 the forest is skipped and with w = 0 the network."""

from __future__ import annotations

from typing import Callable

import numpy as np

from semsegloop.predict.sliding_window import Prediction, labels_and_entropy, predict_image


def blend_weights(fusion, has_teacher: bool, has_seeds: bool, component: str) -> tuple:
    """(network, teacher, seeded) shares for one image: the round's three-way weights where
    the image was painted in that round (and region growing is available), else its
    network-vs-teacher weight; ``component`` picks one model alone instead."""
    from semsegloop.learn import seeded

    fusion = {"weight": float(fusion)} if isinstance(fusion, (int, float)) else dict(fusion or {})
    alone = {"network": (1.0, 0.0, 0.0), "teacher": (0.0, 1.0, 0.0), "seeded": (0.0, 0.0, 1.0)}
    if component in alone:
        w = alone[component]
        if (w[1] and not has_teacher) or (w[2] and not (has_seeds and seeded.available())):
            raise ValueError(f"this round has no {component} to predict with")
        return w
    if component != "fused":
        raise ValueError(f"component must be fused, network, teacher or seeded, got {component!r}")
    if not has_teacher:
        return (1.0, 0.0, 0.0)
    three = fusion.get("seeded_weights")
    if three and has_seeds and seeded.available():
        return tuple(float(v) for v in three)
    w = float(fusion.get("weight", 1.0))
    return (w, 1.0 - w, 0.0)


def predict_fused(model, teacher, fusion, image: np.ndarray, plan, device, n_classes: int,
                  cancel: Callable[[], bool] | None = None,
                  progress: Callable[[float], None] | None = None,
                  component: str = "fused", keep_probabilities: bool = True,
                  seeds: np.ndarray | None = None, spacing=None,
                  teacher_image: np.ndarray | None = None,
                  grown: np.ndarray | None = None) -> Prediction:
    """Predict a normalised (S, Y, X, C) image: the blend of network, teacher and (for an
    image painted in the round, ``seeds`` its strokes) grow-from-seeds that the round chose.
    ``fusion`` is the round's record (or a plain network weight); ``component`` "network",
    "teacher" or "seeded" gives one model alone (for comparisons). ``teacher_image`` is what
    the teacher and the region growing see (teacher.teacher_input), default ``image``.
    ``grown``: grow_from_seeds of ``seeds`` already computed (the round grows its painted
    images inside its budget), used as it is."""
    from semsegloop.learn import seeded
    from semsegloop.learn.teacher import CancelledError

    raw = image if teacher_image is None else teacher_image
    a, b, c = blend_weights(fusion, teacher is not None, seeds is not None and seeds.any(),
                            component)
    if a >= 1.0:
        return predict_image(model, image, plan, device, n_classes, cancel=cancel,
                             progress=progress, keep_probabilities=keep_probabilities)
    if a > 0.0:
        net = predict_image(model, image, plan, device, n_classes, cancel=cancel,
                            progress=None if progress is None else (lambda f: progress(0.5 * f)))
        probs = net.probabilities
        del net
        if a != 1.0:
            _scale(probs, a)
    else:
        probs = np.zeros((n_classes,) + image.shape[:3], np.float16)
    try:
        if b > 0.0:
            for idx, p in teacher.predict_blocks(raw, cancel):
                sl = (slice(None),) + tuple(idx)
                probs[sl] = (probs[sl].astype(np.float32) + b * p).astype(np.float16)
    except CancelledError:
        raise InterruptedError("prediction cancelled") from None
    if c > 0.0:
        if grown is None:
            grown = seeded.grow_from_seeds(raw, seeds, plan.dims, spacing)
        for s in range(grown.shape[0]):  # one slice at a time: bounded temporaries
            g = np.moveaxis(seeded.as_probabilities(grown[s], n_classes), -1, 0)
            p = probs[:, s].astype(np.float32)
            # Where nothing grew (a slice with strokes of one class) the other models carry
            # the pixel alone: a uniform share would leave the labels but flatten the
            # uncertainty map to c * (1 - 1/K) everywhere there.
            none = grown[s] == 0
            if c < 1.0:
                p[:, none] /= (1.0 - c)
            else:
                p[:, none] = g[:, none]
            p[:, ~none] += c * g[:, ~none]
            probs[:, s] = p.astype(np.float16)
    if progress is not None:
        progress(1.0)
    labels, entropy = labels_and_entropy(probs)
    return Prediction(labels=labels, probabilities=probs if keep_probabilities else None,
                      entropy=entropy)


def _scale(probs: np.ndarray, w: float, chunk: int = 1 << 22) -> None:
    flat = probs.reshape(-1)
    for i in range(0, flat.size, chunk):
        flat[i:i + chunk] = (flat[i:i + chunk].astype(np.float32) * w).astype(np.float16)
