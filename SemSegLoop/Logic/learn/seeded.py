"""Grow from seeds on the painted image itself: 3D Slicer's GrowCut (``vtkImageGrowCutSegment``,
in Slicer and in the slicer-core wheel) seeded with the strokes, a third opinion for the fusion.

Why: on volumes painted on a few slices, region growing from the strokes follows the image's
own edges between them and often beats any pixel classifier there (it is what a Slicer user
would otherwise press). It only labels the image it is seeded on, so it joins the fusion for
painted images only, with a weight chosen on held-out strokes like the others. Without Slicer's
libraries it is simply left out."""

from __future__ import annotations

import numpy as np


_loading: dict = {}


def available() -> bool:
    """Slicer's GrowCut can be used (imports it: seconds the first time outside Slicer)."""
    try:
        import slicer  # noqa: F401  (Slicer itself, or the slicer-core wheel)
    except ImportError:
        return False
    return hasattr(slicer, "vtkImageGrowCutSegment")


def warm_up() -> None:
    """Start importing Slicer's libraries in the background (a round calls this first, so
    the import never takes time out of the training budget)."""
    import importlib.util
    import sys
    import threading

    if "thread" in _loading:
        return
    if "slicer" in sys.modules or importlib.util.find_spec("slicer") is None:
        _loading["thread"] = None
        return
    t = threading.Thread(target=lambda: _loading.setdefault("ok", available()), daemon=True,
                         name="semsegloop-slicer-import")
    _loading["thread"] = t
    t.start()


def ready(wait: bool = False) -> bool:
    """True once GrowCut is importable without waiting (already imported or warmed up);
    ``wait``: first let a warm-up under way finish (a round without a time budget, whose
    result must not depend on how fast the import ran)."""
    import sys

    t = _loading.get("thread")
    if t is not None and t.is_alive():
        if not wait:
            return False
        t.join()
    mod = sys.modules.get("slicer")
    return mod is not None and hasattr(mod, "vtkImageGrowCutSegment")


def _to_vtk(array: np.ndarray, spacing, vtk_type):
    import vtk
    from vtk.util import numpy_support

    img = vtk.vtkImageData()
    Z, Y, X = array.shape
    img.SetDimensions(X, Y, Z)
    img.SetSpacing(*[float(s) for s in spacing[::-1]])  # VTK spacing is (x, y, z)
    img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        np.ascontiguousarray(array).ravel(), deep=True, array_type=vtk_type))
    return img


def grow(grey: np.ndarray, seeds: np.ndarray, spacing, mask: np.ndarray | None = None
         ) -> np.ndarray:
    """GrowCut of a (Z, Y, X) grey volume (at least 3 voxels along every axis) from ``seeds``
    (0 = unlabelled), ``mask`` nonzero where nothing grows; (Z, Y, X) uint8 labels."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    f = slicer.vtkImageGrowCutSegment()
    f.SetIntensityVolume(_to_vtk(grey.astype(np.float32), spacing, vtk.VTK_FLOAT))
    f.SetSeedLabelVolume(_to_vtk(seeds.astype(np.int16), spacing, vtk.VTK_SHORT))
    if mask is not None:  # nonzero: neither grown into nor grown through
        f.SetMaskVolume(_to_vtk(mask.astype(np.uint8), spacing, vtk.VTK_UNSIGNED_CHAR))
    f.SetDistancePenalty(0.0)
    f.Update()
    out = f.GetOutput().GetPointData().GetScalars()
    if out is None:
        return np.zeros(seeds.shape, np.uint8)
    return numpy_support.vtk_to_numpy(out).reshape(seeds.shape).astype(np.uint8)


def grow_from_seeds(image: np.ndarray, seeds: np.ndarray, dims: int, spacing=None) -> np.ndarray:
    """(S, Y, X, C) image and (S, Y, X) strokes -> (S, Y, X) uint8 labels, 0 where nothing
    grew (2D slices without strokes, or fewer than two painted classes)."""
    grey = np.asarray(image, np.float32).mean(axis=-1)
    sp = tuple(spacing) if spacing is not None else (1.0, 1.0, 1.0)
    out = np.zeros(seeds.shape, np.uint8)
    if dims == 3:
        if len(np.unique(seeds[seeds > 0])) >= 2 and min(seeds.shape) >= 3:
            out[:] = grow(grey, seeds, sp)
        return out
    outer = np.ones((3,) + seeds.shape[1:], np.uint8)
    outer[1] = 0
    for s in range(seeds.shape[0]):
        if len(np.unique(seeds[s][seeds[s] > 0])) < 2:
            continue
        # The filter needs three voxels along every axis: a 2D image is grown as a 3-slice
        # stack of itself. The outer slices are the filter's border (never grown from), so
        # masking them out changes nothing but the heap's size: 3x faster (1024^2: 3.1 s ->
        # 1.0 s; 10 of 1M pixels differ, ties taken in another order).
        stack = np.repeat(grey[s][None], 3, axis=0)
        out[s] = grow(stack, np.repeat(seeds[s][None], 3, axis=0), (1.0,) + sp[-2:],
                       mask=outer)[1]
    return out


def as_probabilities(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(..., ) labels -> (..., K) float32 one-hot; 0 (nothing grew) -> uniform, which leaves
    the other models' argmax unchanged."""
    p = np.full(labels.shape + (n_classes,), 1.0 / n_classes, np.float32)
    m = labels > 0
    p[m] = 0.0
    p[m, labels[m].astype(np.int64) - 1] = 1.0
    return p
