"""Simulated annotators: paint short strokes from a reference label map, and add correction
disks where a prediction is wrong. Used by the demo command, the benchmark and the tests.

Both functions follow the engine's label conventions: (S, Y, X) uint8 maps, 0 = unlabeled,
k = class k. A reference may hold 0 for "no ground truth here"; those pixels are never painted.
Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

# A person paints a few short strokes, not one long line: these bound each stroke's length along
# the medial axis, in skeleton pixels (the brush makes it ~2r+1 pixels wide).
_STROKE_MIN = 20
_STROKE_MAX = 60
# Fewer painted slices than this look nothing like someone annotating a volume; more is tedious.
_DEFAULT_3D_SLICES = 3

# 8-neighbour offsets in a fixed order so the skeleton walk is deterministic.
_NEIGHBOURS = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])


def brush_offsets(radius: int) -> np.ndarray:
    """(N, 2) integer (dy, dx) offsets of a round brush; radius 1 is the 3x3 cross."""
    r = int(radius)
    if r < 0:
        raise ValueError(f"brush radius must be >= 0, got {radius}")
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    keep = yy * yy + xx * xx <= r * r
    return np.stack([yy[keep], xx[keep]], axis=1)


def _as_stack(array, what: str) -> tuple[np.ndarray, bool]:
    arr = np.asarray(array)
    if arr.ndim == 2:
        return arr[None], True
    if arr.ndim != 3:
        raise ValueError(f"{what} must be (S, Y, X) or (Y, X), got shape {arr.shape}")
    return arr, False


def default_slices(reference: np.ndarray, n_classes: int, n: int = _DEFAULT_3D_SLICES) -> list[int]:
    """A few evenly spaced z indices of a volume that show as many classes as any slice does.

    The ends of the candidate range are skipped (a person annotates where the structure is
    well developed, not its first or last appearance).
    """
    ref, _ = _as_stack(reference, "reference")
    present = np.zeros((ref.shape[0], n_classes), dtype=bool)
    for k in range(1, n_classes + 1):
        present[:, k - 1] = (ref == k).any(axis=(1, 2))
    counts = present.sum(axis=1)
    if counts.max() == 0:
        return []
    candidates = np.flatnonzero(counts == counts.max())
    n = min(n, len(candidates))
    # Centres of n equal bins over the candidates: spread out, ends avoided.
    pos = ((np.arange(n) + 0.5) * len(candidates) / n).astype(int)
    return sorted(int(candidates[p]) for p in np.unique(pos))


def simulate_strokes(reference, n_classes: int, pixels_per_class: int = 300, brush_radius: int = 1,
                     seed: int = 0, dims: int = 2, slices: Iterable[int] | None = None) -> np.ndarray:
    """Strokes a person might paint, drawn from a reference label map.

    For every painted image (each slice of a 2D stack, or only the ``slices`` given; in 3D the
    volume, painted on its ``slices``, by default a few evenly spaced ones that show the
    classes) and every class 1..n_classes: short strokes of 20-60 pixels follow the medial
    axis (skeleton) of the class's connected regions, drawn at random with larger, deeper
    regions more likely and regions already stroked less likely, each widened by a round brush
    of ``brush_radius`` and clipped to the region, until about ``pixels_per_class`` pixels are
    painted per 2D image, or per volume in 3D (shared evenly by its painted slices). A class
    with less skeleton than that gets what it has. Returns uint8 labels of the reference's
    shape (0 = unlabeled).
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    ref, squeezed = _as_stack(reference, "reference")
    if ref.dtype.kind not in "uib":
        raise ValueError(f"reference must hold integer class values, got dtype {ref.dtype}")
    if n_classes < 1 or n_classes > 255:
        raise ValueError(f"n_classes must be 1..255, got {n_classes}")
    if slices is None:
        chosen = list(range(ref.shape[0])) if dims == 2 else default_slices(ref, n_classes)
    else:
        chosen = sorted({int(s) for s in slices})
        bad = [s for s in chosen if not 0 <= s < ref.shape[0]]
        if bad:
            raise ValueError(f"slices {bad} outside 0..{ref.shape[0] - 1}")
    offsets = brush_offsets(brush_radius)
    labels = np.zeros(ref.shape, dtype=np.uint8)
    # In 3D the painted image is the volume: its budget is shared by its painted slices.
    per_slice = pixels_per_class if dims == 2 else -(-pixels_per_class // max(len(chosen), 1))
    for s in chosen:
        # One generator per (seed, slice): painting slice 5 does not depend on which other
        # slices were painted.
        rng = np.random.default_rng([int(seed), int(s)])
        depth = _depth(ref[s])
        for k in range(1, n_classes + 1):
            _paint_class(labels[s], ref[s] == k, depth, k, per_slice, offsets, rng)
    return labels[0] if squeezed else labels


def _depth(ref2d: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the edge of its class region (the image border counts).

    One distance transform for all classes: the distance to the nearest region-edge pixel
    plus one, within a pixel of the exact per-class distance, which is all that ranking
    regions and stroke starts needs.
    """
    padded = np.pad(ref2d.astype(np.int32), 1, constant_values=-1)
    centre = padded[1:-1, 1:-1]
    edge = ((centre != padded[:-2, 1:-1]) | (centre != padded[2:, 1:-1])
            | (centre != padded[1:-1, :-2]) | (centre != padded[1:-1, 2:]))
    if not edge.any():
        edge[0, 0] = True
    return ndi.distance_transform_edt(~edge) + 1.0


def _paint_class(out: np.ndarray, mask: np.ndarray, depth: np.ndarray, k: int, target: int,
                 offsets: np.ndarray, rng: np.random.Generator) -> None:
    if target <= 0 or not mask.any():
        return
    regions, n_regions = ndi.label(mask, structure=np.ones((3, 3), bool))
    flat = regions.ravel()
    areas = np.bincount(flat, minlength=n_regions + 1)[1:]
    max_depth = np.zeros(n_regions + 1)
    np.maximum.at(max_depth, flat, depth.ravel())
    # Big, thick regions are the obvious ones to paint; each stroke already in a region makes it
    # less likely to get the next, so strokes spread over several regions as a person's would.
    weight = areas * max_depth[1:]
    objects = ndi.find_objects(regions)
    axes: dict[int, tuple] = {}  # region -> (skeleton crop, visited crop, crop origin); lazy
    width = 2 * int(np.abs(offsets).max(initial=0)) + 1
    painted = 0
    strokes = np.zeros(n_regions)
    # Only the regions visited are skeletonized: most of a 1024^2 slice is never looked at.
    while painted < target:
        p = weight / (1.0 + strokes) ** 2
        total = p.sum()
        if total <= 0:
            break
        r = int(rng.choice(n_regions, p=p / total))
        strokes[r] += 1
        if r not in axes:
            axes[r] = _medial_axis(regions, objects[r], r + 1, depth)
        skeleton, visited, (y0, x0) = axes[r]
        fy, fx = np.nonzero(skeleton & ~visited)
        if fy.size == 0:
            weight[r] = 0.0
            continue
        w = depth[fy + y0, fx + x0]
        i = rng.choice(fy.size, p=w / w.sum())
        remaining_axis = int(np.ceil((target - painted) / width)) + 2
        length = min(int(rng.integers(_STROKE_MIN, _STROKE_MAX + 1)), remaining_axis)
        path = np.asarray(_walk(skeleton, visited, (int(fy[i]), int(fx[i])), length))
        painted += _stamp(out, mask, path + (y0, x0), offsets, k)


def _medial_axis(regions: np.ndarray, sl: tuple, label: int, depth: np.ndarray) -> tuple:
    from skimage.morphology import skeletonize

    sub = regions[sl] == label
    skeleton = skeletonize(sub)
    if not skeleton.any():
        # Too thin or small for a skeleton: its deepest pixel stands for the axis.
        local = np.where(sub, depth[sl], -1.0)
        skeleton[np.unravel_index(np.argmax(local), local.shape)] = True
    return skeleton, np.zeros_like(skeleton), (sl[0].start, sl[1].start)


def _walk(skeleton: np.ndarray, visited: np.ndarray, start: tuple[int, int],
          length: int) -> list[tuple[int, int]]:
    """Follow the skeleton from ``start`` in both directions, up to ``length`` pixels in all,
    keeping straight where it branches; marks the pixels visited."""
    H, W = skeleton.shape
    visited[start] = True
    path = [start]
    for half in (0, 1):
        budget = (length - 1) // 2 if half == 0 else length - len(path)
        y, x = start
        heading = None
        for _ in range(max(budget, 0)):
            best, best_score = None, None
            for dy, dx in _NEIGHBOURS:
                ny, nx = y + dy, x + dx
                if 0 <= ny < H and 0 <= nx < W and skeleton[ny, nx] and not visited[ny, nx]:
                    # Prefer the continuation most aligned with the current heading.
                    score = 0.0 if heading is None else -(dy * heading[0] + dx * heading[1])
                    score += 0.01 * (abs(dy) + abs(dx))  # face neighbours before diagonals
                    if best_score is None or score < best_score:
                        best, best_score = (ny, nx), score
            if best is None:
                break
            heading = (best[0] - y, best[1] - x)
            y, x = best
            visited[y, x] = True
            path.append(best)
        if half == 0:
            path.reverse()
    return path


def _stamp(out: np.ndarray, mask: np.ndarray, path: Sequence[tuple[int, int]],
           offsets: np.ndarray, k: int) -> int:
    """Paint the brush along ``path`` inside ``mask`` on unlabeled pixels; returns pixels added."""
    pts = (np.asarray(path)[:, None, :] + offsets[None, :, :]).reshape(-1, 2)
    H, W = out.shape
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < H) & (pts[:, 1] >= 0) & (pts[:, 1] < W)
    pts = np.unique(pts[inside], axis=0)
    ys, xs = pts[:, 0], pts[:, 1]
    ok = mask[ys, xs] & (out[ys, xs] == 0)
    out[ys[ok], xs[ok]] = k
    return int(ok.sum())


def simulate_correction(labels, prediction, reference, n_regions: int = 5, radius: int = 3,
                        dims: int = 2, seed: int = 0) -> np.ndarray:
    """Labels after one simulated correction pass over a prediction.

    Errors are the unlabeled pixels whose prediction differs from a non-zero reference. They
    are split into connected regions of one reference class each; in every painted image (a 2D
    slice holding any label) or, with ``dims=3``, in the whole volume, the ``n_regions``
    largest get a disk of ``radius`` of their reference class, centred on the region's deepest
    pixel (maximum of its distance transform) and clipped to the region, in that pixel's slice.
    Existing labels are never changed. Returns a new array; the inputs are untouched.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    lab, squeezed = _as_stack(labels, "labels")
    pred, _ = _as_stack(prediction, "prediction")
    ref, _ = _as_stack(reference, "reference")
    if not (lab.shape == pred.shape == ref.shape):
        raise ValueError(f"labels {lab.shape}, prediction {pred.shape} and reference {ref.shape} "
                         "must have the same shape")
    out = np.array(lab, dtype=np.uint8, copy=True)
    rng = np.random.default_rng(int(seed))
    disk = brush_offsets(radius)
    if dims == 2:
        for s in np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1)):
            _correct(out[s:s + 1], pred[s:s + 1], ref[s:s + 1], n_regions, disk, rng)
    else:
        _correct(out, pred, ref, n_regions, disk, rng)
    return out[0] if squeezed else out


def _correct(out: np.ndarray, pred: np.ndarray, ref: np.ndarray, n_regions: int,
             disk: np.ndarray, rng: np.random.Generator) -> None:
    error = (pred != ref) & (ref > 0) & (out == 0)
    if n_regions <= 0 or not error.any():
        return
    # Splitting where the reference class changes keeps each region, and so each disk, of one
    # class: a person correcting a region paints one class there.
    candidates = []  # (size, tie-break, class, region mask view, its slices)
    for k in np.unique(ref[error]):
        comp, n = ndi.label(error & (ref == k))
        sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        objects = ndi.find_objects(comp)
        for i in np.argsort(-sizes, kind="stable")[:n_regions]:
            candidates.append((int(sizes[i]), float(rng.random()), int(k), comp, i + 1, objects[i]))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    for size, _, k, comp, idx, sl in candidates[:n_regions]:
        region = comp[sl] == idx
        # The deepest pixel, in-plane: the disk is painted on one slice as a person would.
        depth = np.zeros(region.shape)
        for z in range(region.shape[0]):
            if region[z].any():
                depth[z] = ndi.distance_transform_edt(np.pad(region[z], 1))[1:-1, 1:-1]
        z, y, x = np.unravel_index(np.argmax(depth), depth.shape)
        z0, y0, x0 = z + sl[0].start, y + sl[1].start, x + sl[2].start
        pts = np.array([y0, x0]) + disk
        H, W = out.shape[1:]
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < H) & (pts[:, 1] >= 0) & (pts[:, 1] < W)
        ys, xs = pts[inside, 0], pts[inside, 1]
        ok = (comp[z0, ys, xs] == idx) & (out[z0, ys, xs] == 0)
        out[z0, ys[ok], xs[ok]] = k
