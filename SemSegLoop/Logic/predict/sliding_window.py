"""Sliding-window prediction with bounded memory: label map, per-class probabilities (float16)
and normalised entropy, for a 2D stack (slice by slice) or a 3D volume (slab by slab)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from semsegloop.errors import TrainingError

# Largest region handed to MONAI's sliding window at once. Its float32 accumulators take
# 4 x (K + 2) bytes per voxel, so large volumes and slides are cut into slabs along the first
# axis, as large as that budget allows (windows touching two slabs run twice: larger is faster).
MAX_REGION_VOXELS = 64_000_000
MAX_REGION_BYTES = 800 * 2**20


@dataclass
class Prediction:
    labels: np.ndarray          # (S, Y, X) uint8, 1..K
    probabilities: np.ndarray | None   # (K, S, Y, X) float16 (None: not kept)
    entropy: np.ndarray         # (S, Y, X) float16, 0 = certain, 1 = uniform over K classes


# Largest window: one window per image where it fits, so no voxel is computed twice (MONAI
# blends overlapping windows; with 512^2 / 64x160x160 caps a 1024^2 image ran 2.25x and a
# 96x192^2 volume 3.7x its voxels). Bounded by the windows' float32 logits, K per voxel.
MAX_WINDOW_VOXELS = {2: 2_097_152, 3: 2_097_152}
MAX_WINDOW_LOGIT_BYTES = 256 * 2**20
SW_BATCH = 2
OVERLAP = 0.25


def inference_roi(plan, spatial_shape, n_classes: int | None = None) -> list[int]:
    """Window size: the whole image where it fits MAX_WINDOW_VOXELS (and the logits budget for
    ``n_classes``), else the fewest windows per axis that cover it with
    MONAI's overlap, each a multiple of the net's divisor and at least its training patch."""
    cap = MAX_WINDOW_VOXELS[plan.dims]
    if n_classes:
        cap = min(cap, MAX_WINDOW_LOGIT_BYTES // (4 * n_classes * SW_BATCH))
    floor = [max(_ceil_to(p, d), d) for p, d in zip(plan.patch_size, plan.divisor)]
    counts = [1] * len(spatial_shape)

    def size(ax):
        n, d = spatial_shape[ax], plan.divisor[ax]
        k = counts[ax]
        return max(floor[ax] if k > 1 else d, _ceil_to(math.ceil(n / (k - (k - 1) * OVERLAP)), d))
    roi = [size(ax) for ax in range(len(spatial_shape))]
    while int(np.prod(roi)) > cap:
        # One more window along the axis whose window is largest against its floor.
        room = [r / f if r > f else 0.0 for r, f in zip(roi, floor)]
        ax = int(np.argmax(room))
        if room[ax] == 0.0:
            break
        counts[ax] += 1
        roi[ax] = size(ax)
    if all(r <= d for r, d in zip(roi, plan.divisor)):
        # A window of one divisor would reach the deepest level as a single pixel, where
        # instance norm fails: pad the longest side to two (a tiny image in a big plan).
        roi[-1] = 2 * plan.divisor[-1]
    return roi


def predict_image(model, image: np.ndarray, plan, device, n_classes: int,
                  cancel: Callable[[], bool] | None = None,
                  progress: Callable[[float], None] | None = None,
                  overlap: float = 0.25, keep_probabilities: bool = True) -> Prediction:
    """Predict a normalised (S, Y, X, C) float32 image.

    2D plans run each slice separately; 3D plans run the whole volume. Probabilities are
    written into a preallocated float16 array region by region, so peak memory is about
    K x S x Y x X x 2 bytes plus one region's float32 work buffers. With
    ``keep_probabilities=False`` only labels and entropy are kept (3 bytes per voxel whatever
    K: a 40-class CT), and ``.probabilities`` is None.
    """
    if image.ndim != 4:
        raise TrainingError(f"predict_image expects (S, Y, X, C), got shape {image.shape}")
    S, Y, X, C = image.shape
    if C != plan.in_channels:
        raise TrainingError(f"image has {C} channels but the model expects {plan.in_channels}")
    probs = np.empty((n_classes, S, Y, X), dtype=np.float16) if keep_probabilities else None
    labels = np.empty((S, Y, X), np.uint8)
    entropy = np.empty((S, Y, X), np.float16)
    model.eval()
    units = range(S) if plan.dims == 2 else [None]
    for n, s in enumerate(units):
        if cancel is not None and cancel():
            raise InterruptedError("prediction cancelled")
        vol = image[s] if s is not None else image            # (Y,X,C) or (Z,Y,X,C)
        for a, b, p in _region_slabs(model, vol, n_classes, plan, device, overlap, cancel):
            sl = (s, slice(a, b)) if s is not None else (slice(a, b),)
            if probs is not None:
                probs[(slice(None),) + sl] = p
            labels[sl], entropy[sl] = labels_and_entropy(p)
        if progress is not None:
            progress((n + 1) / len(units))
    return Prediction(labels=labels, probabilities=probs, entropy=entropy)


def labels_and_entropy(probs: np.ndarray, chunk: int = 4_000_000) -> tuple[np.ndarray, np.ndarray]:
    """argmax + 1 and normalised entropy, computed in chunks to stay off float64/large temps."""
    K = probs.shape[0]
    flat = probs.reshape(K, -1)
    n = flat.shape[1]
    labels = np.empty(n, dtype=np.uint8)
    entropy = np.empty(n, dtype=np.float16)
    norm = math.log(K) if K > 1 else 1.0
    for a in range(0, n, chunk):
        p = flat[:, a:a + chunk].astype(np.float32)
        labels[a:a + chunk] = np.argmax(p, axis=0).astype(np.uint8) + 1
        ent = -(p * np.log(np.clip(p, 1e-6, 1.0))).sum(axis=0) / norm
        entropy[a:a + chunk] = np.clip(ent, 0, 1)
    shape = probs.shape[1:]
    return labels.reshape(shape), entropy.reshape(shape)


def _region_slabs(model, vol: np.ndarray, n_classes: int, plan, device, overlap, cancel):
    """Yield (start, stop, (K, stop - start, ...) float16 probabilities) for ``vol``
    (*spatial, C), slab by slab along the first axis.

    Each slab is widened to the whole windows that touch it, so its kept rows equal the
    unsliced prediction."""
    spatial = vol.shape[:-1]
    region = min(MAX_REGION_VOXELS, MAX_REGION_BYTES // (4 * (n_classes + 2)))
    roi = inference_roi(plan, spatial, n_classes)
    per_row = int(np.prod(spatial[1:]))
    slab = max(roi[0], (region // max(per_row, 1)) // roi[0] * roi[0])
    n0 = spatial[0]
    starts = _window_starts(n0, roi[0], overlap)
    start = 0
    while start < n0:
        if cancel is not None and cancel():
            raise InterruptedError("prediction cancelled")
        stop = min(n0, start + slab)
        # Run exactly the windows of the whole-image grid that touch [start, stop): the rows
        # kept get the same blend of the same windows as without slabs.
        touching = [p for p in starts if p < stop and p + roi[0] > start]
        a, b = min(touching), min(n0, max(touching) + roi[0])
        p = _sliding_window(model, vol[a:b], roi, plan, device, overlap, cancel)
        yield start, stop, p[:, start - a:stop - a]
        start = stop


def _window_starts(n: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis, as MONAI's sliding window places them."""
    if roi >= n:
        return [0]
    step = max(int(roi * (1 - overlap)), 1)
    count = int(math.ceil((n - roi) / step)) + 1
    return sorted({min(i * step, n - roi) for i in range(count)})


def _sliding_window(model, vol: np.ndarray, roi, plan, device, overlap,
                    cancel: Callable[[], bool] | None = None) -> np.ndarray:
    import torch
    from monai.inferers import sliding_window_inference

    from semsegloop.learn.training import autocast, cancel_inside

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, -1, 0)))[None].to(device)
    # The cancel is checked before every layer of every window, not only between slabs: one
    # slab of a large volume is many windows.
    with torch.inference_mode(), autocast(device, plan.dims), \
            cancel_inside(model, cancel, backward=False):
        logits = sliding_window_inference(x, roi_size=roi, sw_batch_size=SW_BATCH, predictor=model,
                                          overlap=overlap, mode="gaussian")
        prob = torch.softmax(logits.float(), dim=1)[0]
    return prob.to(torch.float16).cpu().numpy()


def _ceil_to(x: int, m: int) -> int:
    return int(-(-int(x) // m) * m)
