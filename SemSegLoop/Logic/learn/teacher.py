"""Pseudo-labels from a quick pixel classifier (scale-space features + random forest) fitted on
the strokes: the UNet's first seconds get dense, confident targets instead of ~1% of pixels.

Why: a random forest on filter-bank features reaches a sensible segmentation from strokes in
a couple of seconds, while a UNet needs thousands of steps to do as well from strokes alone.
Training the UNet on the forest's confident pixels (plus the strokes, which always win, plus
the pairwise term) lets it start where the forest ends and then fix the forest's speckle with
context: the "noisy student" recipe. scikit-learn is optional: without it, training uses the
strokes only."""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger("semsegloop")

TEACHER_SIGMAS = (1.0, 2.0, 4.0, 8.0)
MAX_SAMPLES_PER_CLASS = 20_000
# The filter bank of one image is held whole; larger images are left to the strokes alone
# (a 512^3 CT would need ~7 GB of features).
MAX_FEATURE_BYTES = 1.5 * 2**30


def _fits(x: np.ndarray, dims: int) -> bool:
    from semsegloop.learn.features import feature_channels

    voxels = int(np.prod(x.shape[:-1]))
    return voxels * feature_channels(dims, x.shape[-1], TEACHER_SIGMAS) * 4 <= MAX_FEATURE_BYTES


def available() -> bool:
    try:
        import sklearn.ensemble  # noqa: F401
    except ImportError:
        return False
    return True


def _features(x: np.ndarray, dims: int, spacing) -> np.ndarray:
    """(S, Y, X, C) normalised image -> (S, Y, X, F) float32 filter bank (per slice in 2D)."""
    from semsegloop.learn.features import add_features

    if dims == 2:
        return np.stack([add_features(x[s], 2, TEACHER_SIGMAS, spacing) for s in range(x.shape[0])])
    return add_features(x, 3, TEACHER_SIGMAS, spacing)


def teacher_pseudo_labels(images: list[np.ndarray], labels: list[np.ndarray], n_classes: int,
                          dims: int, spacing=None, confidence: float = 0.75,
                          n_trees: int = 48, seed: int = 0, n_jobs: int = 1,
                          time_limit_s: float | None = None,
                          cancel=None) -> list[np.ndarray | None]:
    """Fit a forest on the painted pixels of ``images`` and label each image's confident pixels.

    ``images``: normalised (S, Y, X, C) float32; ``labels``: (S, Y, X) uint8 strokes (0 =
    unlabeled; images without strokes are pseudo-labelled only, in the order given, until
    ``time_limit_s``). Returns per image an (S, Y, X) uint8 map, 0 where the forest is less than
    ``confidence`` sure, or None for images left out because ``time_limit_s`` ran out.
    Painted pixels keep their painted class. ``cancel`` (a zero-argument callable) is checked
    between images and prediction chunks: once it returns True the remaining images get None.
    """
    from sklearn.ensemble import RandomForestClassifier

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    stop = cancel or (lambda: False)
    feats: list[np.ndarray | None] = [None] * len(images)
    X, y = [], []
    for n, (x, lab) in enumerate(zip(images, labels)):
        if not lab.any() or not _fits(x, dims) or stop():
            continue  # unpainted images are only pseudo-labelled, below
        feats[n] = _features(x, dims, spacing)
        m = lab > 0
        X.append(feats[n][m])
        y.append(lab[m])
    if not X:  # cancelled, or every painted image too large for the filter bank
        return [None] * len(images)
    X = np.concatenate(X)
    y = np.concatenate(y)
    keep = []
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        if len(idx) > MAX_SAMPLES_PER_CLASS:
            idx = rng.choice(idx, MAX_SAMPLES_PER_CLASS, replace=False)
        keep.append(idx)
    keep = np.concatenate(keep)
    forest = RandomForestClassifier(n_estimators=n_trees, min_samples_leaf=2, n_jobs=n_jobs,
                                    random_state=seed, class_weight="balanced")
    forest.fit(X[keep], y[keep])
    classes = forest.classes_.astype(np.uint8)
    out: list[np.ndarray | None] = []
    for n, (x, lab) in enumerate(zip(images, labels)):
        if (stop() or not _fits(x, dims)
                or (time_limit_s is not None and time.perf_counter() - t0 > time_limit_s)):
            out.append(None)
            continue
        f = feats[n] if feats[n] is not None else _features(x, dims, spacing)
        feats[n] = None
        flat = f.reshape(-1, f.shape[-1])
        pseudo = np.zeros(flat.shape[0], np.uint8)
        for a in range(0, flat.shape[0], 1 << 18):  # bounded memory for big images
            if stop():
                break
            p = forest.predict_proba(flat[a:a + (1 << 18)])
            best = p.argmax(axis=1)
            sure = p[np.arange(len(best)), best] >= confidence
            pseudo[a:a + len(best)] = np.where(sure, classes[best], 0)
        if stop():
            out.append(None)
            continue
        pseudo = pseudo.reshape(lab.shape)
        pseudo[lab > 0] = lab[lab > 0]
        out.append(pseudo)
    log.info("teacher: %d trees on %d painted pixels, pseudo-labels for %d image(s) in %.1f s",
             n_trees, len(keep), sum(o is not None for o in out), time.perf_counter() - t0)
    return out
