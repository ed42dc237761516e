"""Refine's global step in 2D: a pixel classifier fit on one image's strokes carries a
correction to the pixels elsewhere in the image that look like the corrected ones.

Why: a click fixes the region around it, but a network's errors repeat across an image (on the
H&E nuclei tiles most wrong pixels are background called nucleus, in many places). A
multinomial logistic regression on the prediction's log-probabilities and the teacher's filter
bank (learn.features), fit on every stroke of the image in a few milliseconds, learns what the
corrected pixels look like. Its change is kept only where every refit that leaves out one
correction (or a fold of the older strokes) agrees, so one odd click cannot relabel the image.
"""

from __future__ import annotations

import numpy as np

# Older strokes are cut into this many folds for the agreement test.
STROKE_FOLDS = 3
# Slices whose filter bank would take more than this are refined locally only.
MAX_FEATURE_BYTES = 512 * 2 ** 20
# Unpainted pixels labelled by the prediction join the fit with this share of the strokes'
# weight, so the classifier stays near the prediction where no stroke says otherwise.
ANCHOR_PIXELS = 3000


def applies(strokes: np.ndarray, corrections: np.ndarray) -> bool:
    """Whether the strokes can fit a classifier that changes anything: two classes painted
    and at least one correction."""
    return bool(corrections.any()) and len(np.unique(strokes[strokes > 0])) >= 2


def fits_in_memory(shape, channels: int, sigmas) -> bool:
    """Whether a (Y, X) slice's filter bank stays within MAX_FEATURE_BYTES (float32)."""
    from semsegloop.learn.features import feature_channels

    return int(np.prod(shape)) * feature_channels(2, channels, tuple(sigmas)) * 4 <= MAX_FEATURE_BYTES


def slice_features(image: np.ndarray, spacing, sigmas) -> np.ndarray:
    """(Y, X, C) normalised image -> (Y * X, F) float32: the teacher's 2D filter bank."""
    from semsegloop.learn.features import add_features

    f = add_features(np.asarray(image, np.float32), 2, tuple(sigmas), spacing)
    return f.reshape(-1, f.shape[-1])


def recalibrated_unary(features: np.ndarray, probabilities: np.ndarray, strokes: np.ndarray,
                       corrections: np.ndarray, settings) -> np.ndarray | None:
    """Log-probabilities (K, Y, X) of one slice after the global step, or None when the
    strokes cannot fit a classifier (fewer than two classes painted, or no correction).

    ``features`` (Y * X, F) from slice_features; ``probabilities`` (K, Y, X) the prediction's;
    ``strokes`` (Y, X) every stroke, 0 = none; ``corrections`` (Y, X) bool, the strokes the
    prediction gets wrong. Outside the agreement of the refits the prediction's own
    log-probabilities are returned unchanged."""
    from threadpoolctl import threadpool_limits

    if not applies(strokes, corrections):
        return None
    # One BLAS thread: the fits are small, and with a second core busy (training, the GUI)
    # multithreaded BLAS waited on it, 0.02 s fits taking up to 0.7 s.
    with threadpool_limits(1, user_api="blas"):
        return _unary(features, probabilities, strokes, corrections, settings)


def _unary(features, probabilities, strokes, corrections, settings):
    from scipy import ndimage as ndi
    from scipy.special import logsumexp

    K = probabilities.shape[0]
    flat = strokes.ravel()
    painted = np.flatnonzero(flat)
    y = flat[painted].astype(np.int64)
    logp = np.log(np.clip(np.asarray(probabilities, np.float32), settings.min_probability, 1.0))
    lp = logp.reshape(K, -1).T
    N = len(lp)
    # Units left out one at a time: each correction (a connected component), and folds of the
    # older strokes.
    unit = np.zeros(flat.shape, np.int64)
    comp, n_corr = ndi.label(corrections)
    old, n_old = ndi.label((strokes > 0) & ~corrections)
    rng = np.random.default_rng(0)
    folds = np.zeros(n_old + 1, np.int64)
    folds[rng.permutation(n_old) + 1] = np.arange(n_old) % STROKE_FOLDS
    unit.reshape(strokes.shape)[comp > 0] = comp[comp > 0]
    unit.reshape(strokes.shape)[old > 0] = n_corr + 1 + folds[old[old > 0]]
    units = unit[painted]
    w = np.ones(len(painted))
    idx, lab = painted, y
    unpainted = np.flatnonzero(flat == 0)
    if settings.anchor > 0 and len(unpainted):
        extra = rng.choice(unpainted, min(ANCHOR_PIXELS, len(unpainted)), replace=False)
        prior = np.argmax(logp.reshape(K, -1)[:, extra], axis=0) + 1
        idx = np.concatenate([painted, extra])
        lab = np.concatenate([y, prior])
        w = np.concatenate([w, np.full(len(extra), settings.anchor * len(painted) / len(extra))])
        units = np.concatenate([units, np.zeros(len(extra), np.int64)])
    Xtr = np.concatenate([lp[idx], features[idx]], axis=1)
    mu = Xtr.mean(axis=0)
    sd = Xtr.std(axis=0) + 1e-6
    Ztr = (Xtr - mu) / sd

    def fitted(keep):
        """(classes 1..K of the fit, logits (N, classes)) or None."""
        classes = np.unique(lab[keep])
        if len(classes) < 2:
            return None
        coef, icpt = _fit(Ztr[keep], lab[keep], w[keep], settings.C)
        # Standardisation folded into the weights, and the two inputs multiplied apart: the
        # slice's features are never copied.
        a = (coef / sd).T.astype(np.float32)
        return classes, (lp @ a[:K] + features @ a[K:]
                         + (icpt - coef @ (mu / sd)).astype(np.float32))
    fit = fitted(np.ones(len(idx), bool))
    if fit is None:
        return None
    classes, logits = fit
    choice = classes[np.argmax(logits, axis=1)]
    agree = np.ones(len(choice), bool)
    for u in np.unique(units[units > 0]):
        other = fitted(units != u)
        if other is None:  # the classes of the fit need this unit: no agreement possible
            return None
        agree &= other[0][np.argmax(other[1], axis=1)] == choice
    unary = logp.reshape(K, -1).copy()
    unary[:, agree] = np.log(settings.min_probability)  # classes the fit has never seen
    sure = logits[agree]
    unary[classes[:, None] - 1, agree] = (sure - logsumexp(sure, axis=1, keepdims=True)).T
    return unary.reshape(logp.shape)


def _fit(Xtr, ytr, wtr, C: float) -> tuple[np.ndarray, np.ndarray]:
    """Weighted multinomial logistic regression (sklearn, Newton steps: a few milliseconds on
    thousands of strokes); returns (coef (classes, F), intercept (classes,)), two rows for
    two classes."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, solver="newton-cholesky", max_iter=50)
    clf.fit(Xtr, ytr, sample_weight=wtr)
    coef, icpt = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps the second class's logit only
        coef = np.concatenate([np.zeros_like(coef), coef])
        icpt = np.concatenate([np.zeros_like(icpt), icpt])
    return coef, icpt

