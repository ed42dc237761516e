"""The benchmark's second classical anchor: 3D Slicer's "Grow from seeds" (the Segment Editor
effect), i.e. ``vtkImageGrowCutSegment`` from the slicer-core wheel, seeded with the strokes.

It labels the image it is seeded on (no model to carry to other images), so it applies where the
scored image is the painted one: volumes painted on a few slices. RGB images are turned to grey
first (the effect takes a scalar volume). Distance penalty 0, the effect's default "seed
locality"."""

from __future__ import annotations

import numpy as np


def available() -> bool:
    try:
        import slicer  # noqa: F401  (the slicer-core wheel)
        return hasattr(slicer, "vtkImageGrowCutSegment")
    except ImportError:
        return False


def _to_vtk(array: np.ndarray, spacing, vtk_type):
    import vtk
    from vtk.util import numpy_support

    img = vtk.vtkImageData()
    Z, Y, X = array.shape
    img.SetDimensions(X, Y, Z)
    img.SetSpacing(*[float(s) for s in spacing[::-1]])  # VTK spacing is (x, y, z)
    data = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True,
                                      array_type=vtk_type)
    img.GetPointData().SetScalars(data)
    return img


def grow_from_seeds(image: np.ndarray, seeds: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """(S, Y, X, C) image and (S, Y, X) strokes (0 = unlabeled) -> (S, Y, X) uint8 labels."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    grey = np.asarray(image, np.float32).mean(axis=-1) if image.ndim == 4 else np.asarray(image, np.float32)
    f = slicer.vtkImageGrowCutSegment()
    f.SetIntensityVolume(_to_vtk(grey, spacing, vtk.VTK_FLOAT))
    f.SetSeedLabelVolume(_to_vtk(seeds.astype(np.int16), spacing, vtk.VTK_SHORT))
    f.SetDistancePenalty(0.0)
    f.Update()
    out = numpy_support.vtk_to_numpy(f.GetOutput().GetPointData().GetScalars())
    return out.reshape(seeds.shape).astype(np.uint8)
