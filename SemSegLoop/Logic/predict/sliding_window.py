"""Sliding-window prediction with bounded memory: label map, per-class probabilities (float16)
and normalised entropy, for a 2D stack (slice by slice) or a 3D volume (window row by row)."""

from __future__ import annotations

import math
import tracemalloc
from dataclasses import dataclass
from typing import Callable

import numpy as np

from semsegloop.errors import TrainingError

# The blended logits of the rows a window row still touches (K x window height x plane) are
# float32 up to this size, else float16; finished rows are turned into probabilities in chunks
# of about this many bytes of float32 (K per voxel; the softmax's work buffers are a few).
MAX_BAND_BYTES = 512 * 2**20
FINISH_CHUNK_BYTES = 64 * 2**20


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
# On a CPU, predict with inference_network's copy of the model (group norms, channels-last):
# the same function, twice as fast. False runs the model as trained (tests compare the two).
CPU_INFERENCE_NETWORK = True


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
                  overlap: float = OVERLAP, keep_probabilities: bool = True,
                  _timed: bool = True) -> Prediction:
    """Predict a normalised (S, Y, X, C) float32 image.

    2D plans run each slice separately; 3D plans run the whole volume. Probabilities are
    written into a preallocated float16 array as rows are finished, so peak memory is about
    K x S x Y x X x 2 bytes plus the blended band of one window row (see _blended_rows). With
    ``keep_probabilities=False`` only labels and entropy are kept (3 bytes per voxel whatever
    K: a 40-class CT), and ``.probabilities`` is None.
    """
    import time

    if image.ndim != 4:
        raise TrainingError(f"predict_image expects (S, Y, X, C), got shape {image.shape}")
    t0 = time.perf_counter()
    S, Y, X, C = image.shape
    if C != plan.in_channels:
        raise TrainingError(f"image has {C} channels but the model expects {plan.in_channels}")
    probs = np.empty((n_classes, S, Y, X), dtype=np.float16) if keep_probabilities else None
    labels = np.empty((S, Y, X), np.uint8)
    entropy = np.empty((S, Y, X), np.float16)
    from semsegloop.predict.inference_network import inference_network

    model.eval()
    net = inference_network(model, device) if CPU_INFERENCE_NETWORK else model
    units = range(S) if plan.dims == 2 else [None]
    for n, s in enumerate(units):
        if cancel is not None and cancel():
            raise InterruptedError("prediction cancelled")
        vol = image[s] if s is not None else image            # (Y,X,C) or (Z,Y,X,C)
        part = None if progress is None else (lambda f, n=n: progress((n + f) / len(units)))
        for a, b, p in _blended_rows(net, vol, n_classes, plan, device, overlap, cancel, part):
            sl = (s, slice(a, b)) if s is not None else (slice(a, b),)
            if probs is not None:
                probs[(slice(None),) + sl] = p
            labels[sl], entropy[sl] = labels_and_entropy(p)
    if _timed and S * Y * X >= MIN_TIMED_VOXELS and not tracemalloc.is_tracing():
        runs = _SPEED.setdefault(_speed_key(plan, device), [])
        runs.append((time.perf_counter() - t0) / (S * Y * X))
        del runs[:-SPEED_RUNS]
    return Prediction(labels=labels, probabilities=probs, entropy=entropy)


# Seconds per voxel of the latest few predict_image runs per (plan, device type), for round
# budgets (their median: one prediction slowed by something else moves it little).
_SPEED: dict = {}
SPEED_RUNS = 5
# Images smaller than this are not timed (fixed costs would dominate the per-voxel figure).
MIN_TIMED_VOXELS = 65_536
PROBE_PIXELS_2D = 512 * 512


def _speed_key(plan, device) -> str:
    import json

    return json.dumps(plan.to_json(), sort_keys=True, default=str) + getattr(device, "type", str(device))


def seconds_per_voxel(plan, device, image: np.ndarray) -> float:
    """Seconds per voxel predict_image takes with a network of ``plan`` on ``device``: as the
    latest predictions in this process took (a network's speed does not depend on its weights),
    else timed on a crop of the normalised (S, Y, X, C) ``image`` (2D: up to PROBE_PIXELS_2D;
    3D: one training patch) with a fresh network, the faster of two runs after a first that
    primes the kernels."""
    import time

    from semsegloop.learn.networks import build_network

    known = _SPEED.get(_speed_key(plan, device))
    if known:
        return float(np.median(known))
    if plan.dims == 2:
        side = int(math.sqrt(PROBE_PIXELS_2D))
        crop = image[:1, :side, :side]
    else:
        crop = image[tuple(slice(0, max(int(p), 1)) for p in plan.patch_size)]
    crop = np.ascontiguousarray(crop)
    model = build_network(plan).to(device)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        predict_image(model, crop, plan, device, plan.out_channels, keep_probabilities=False,
                      _timed=False)
        times.append(time.perf_counter() - t)
    return min(times[1:]) / max(int(np.prod(crop.shape[:3])), 1)


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


def _blended_rows(model, vol: np.ndarray, n_classes: int, plan, device, overlap,
                  cancel: Callable[[], bool] | None = None,
                  progress: Callable[[float], None] | None = None):
    """Yield (start, stop, (K, stop - start, ...) float16 probabilities) for ``vol``
    (*spatial, C), run window by window and blended as MONAI's gaussian sliding window does.

    Why not MONAI's sliding_window_inference: it holds float32 logits of every class for the
    whole image (a 512x512x300 CT with 40 classes: 12.6 GB). Here windows run in rows along
    the first axis and only the rows the next window row still touches are held (one window
    high); rows no window will touch again are finished (softmax) and handed out. Windows,
    padding and weights are MONAI's (dense_patch_slices, compute_importance_map)."""
    import torch
    from monai.data.utils import compute_importance_map

    from semsegloop.learn.training import autocast, cancel_inside

    spatial = vol.shape[:-1]
    roi = inference_roi(plan, spatial, n_classes)
    # MONAI pads an image smaller than the window up to it, centred, with zeros.
    pads = [((max(r - n, 0)) // 2, max(r - n, 0) - max(r - n, 0) // 2) for r, n in zip(roi, spatial)]
    if any(a or b for a, b in pads):
        vol = np.pad(vol, pads + [(0, 0)])
    full = vol.shape[:-1]
    windows = window_grid(full, roi, overlap)
    rows = sorted({w[0].start for w in windows})
    plane = tuple(full[1:])
    # One window (the whole image: the usual 2D case): MONAI's blend sum(w * l) / sum(w) is the
    # logits themselves, so they are used as they come, with no band, weights or division.
    single = len(windows) == 1
    if not single:
        weight = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device=device)
        band_shape = (n_classes, roi[0]) + plane
        # Float32 where the band fits the budget, else float16 (its 11-bit mantissa is finer
        # than the bfloat16 logits a CPU 3D net gives); the weights stay float32.
        wide = 4 * int(np.prod(band_shape)) <= MAX_BAND_BYTES
        band = torch.zeros(band_shape, dtype=torch.float32 if wide else torch.float16,
                           device=device)
        weights = torch.zeros((roi[0],) + plane, dtype=torch.float32, device=device)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, -1, 0))).to(device)
    keep = tuple(slice(a, a + n) for (a, _), n in zip(pads[1:], spatial[1:]))
    chunk_rows = max(1, FINISH_CHUNK_BYTES // (4 * n_classes * max(int(np.prod(plane)), 1)))
    top = rows[0]                                   # the image row held at band[:, 0]
    with torch.inference_mode(), autocast(device, plan.dims, inference=True), \
            cancel_inside(model, cancel, backward=False):
        for r, z in enumerate(rows):
            if z > top:                             # the band moves down to start at z
                shift = z - top
                for j in range(roi[0] - shift):     # row by row: no copy of the band
                    band[:, j].copy_(band[:, j + shift])
                    weights[j].copy_(weights[j + shift])
                band[:, max(roi[0] - shift, 0):] = 0
                weights[max(roi[0] - shift, 0):] = 0
                top = z
            row = [w for w in windows if w[0].start == z]
            for b in range(0, len(row), SW_BATCH):
                if cancel is not None and cancel():
                    raise InterruptedError("prediction cancelled")
                batch = row[b:b + SW_BATCH]
                logits = model(torch.stack([x[(slice(None),) + w] for w in batch]))
                logits = logits.to(torch.float32, memory_format=torch.contiguous_format)
                if single:
                    band = logits[0]                # (K, *roi): already the blend
                    continue
                for w, lg in zip(batch, logits):
                    at = (slice(0, roi[0]),) + tuple(w[1:])
                    band[(slice(None),) + at] += lg.mul_(weight)
                    weights[at] += weight
            end = rows[r + 1] if r + 1 < len(rows) else full[0]
            for a in range(z, end, chunk_rows):     # rows [z, end) are final
                b = min(end, a + chunk_rows)
                lo, hi = max(a, pads[0][0]), min(b, pads[0][0] + spatial[0])
                if lo < hi:
                    part = (band[:, lo - z:hi - z] if single else
                            band[:, lo - z:hi - z].float() / weights[lo - z:hi - z])
                    prob = torch.softmax(part, dim=0)[(slice(None), slice(None)) + keep]
                    yield lo - pads[0][0], hi - pads[0][0], prob.to(torch.float16).cpu().numpy()
            if progress is not None:
                progress((r + 1) / len(rows))


def window_grid(shape, roi, overlap: float = OVERLAP) -> list[tuple[slice, ...]]:
    """The windows MONAI's sliding window runs over an image of ``shape`` (at least ``roi``
    along every axis, as after its padding), in raster order of their starts."""
    from monai.data.utils import dense_patch_slices

    interval = [r if r == n else max(int(r * (1 - overlap)), 1) for r, n in zip(roi, shape)]
    return sorted(dense_patch_slices(shape, roi, interval), key=lambda w: [x.start for x in w])


def _ceil_to(x: int, m: int) -> int:
    return int(-(-int(x) // m) * m)
