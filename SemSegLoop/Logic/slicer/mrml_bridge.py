"""The one place where Slicer's MRML nodes (volumes, segmentations) become numpy arrays and back.
MRML and VTK are not thread-safe and most functions add temporary nodes: main thread only.

``slicer`` and ``vtk`` are imported inside the functions: the engine imports without Slicer.

Coordinate conventions
----------------------
Slicer places a volume with its IJK-to-RAS matrix; the engine's :class:`Geometry` follows ITK
(SimpleITK), which uses LPS. The two differ by a sign flip of the first two physical axes, so::

    origin_LPS    = diag(-1, -1, 1) @ origin_RAS
    direction_LPS = diag(-1, -1, 1) @ direction_RAS      (the first two rows change sign)

which is exactly what Slicer's own ITK-based file readers do. Voxel arrays are KJI-ordered:
array axes (S, Y, X) are Slicer's (K, J, I), and ``Geometry.spacing`` (z, y, x) is the node's
spacing (i, j, k) reversed.

Parent transforms are not applied: arrays live in the volume's own (local) frame. A segmentation
and the volume it is read against must sit under the same parent transform (or none), because
Slicer's label-map export does not resample across differing transforms (found by testing:
a segment exported against a transformed volume comes back shifted by the transform).

Class order
-----------
Label k is the class ``classes[k-1]`` and the segment ``segment_ids[k-1]``. Segment IDs are always
passed explicitly in class order; the order of segments inside the node never matters.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Sequence

import numpy as np

from semsegloop.errors import ImageReadError, LabelError
from semsegloop.data.imageio import Geometry, ImageData

__all__ = [
    "CLASS_TAG", "LABEL_TAG", "segmentations_logic", "volume_geometry", "volume_to_image",
    "image_to_volume_node", "ensure_class_segments", "segmentation_to_labels",
    "labels_to_segmentation", "create_prediction_segmentation", "merge_corrections",
    "array_to_volume", "check_geometry_matches",
]

# Segment tags that tie a segment to a project class (see ensure_class_segments).
CLASS_TAG = "SemSegLoop.class"
LABEL_TAG = "SemSegLoop.label"

_TEMPORARY_NAME = "SemSegLoop temporary labels"
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])  # its own inverse, so it also maps RAS -> LPS
_MAX_CLASSES = 255  # labels are uint8

# One module logic per scene outside the application, held only while the scene lives.
_LOGICS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def _describe(node) -> str:
    if node is None:
        return "(none)"
    return f"'{node.GetName()}' ({node.GetID()})"


def _string_array(ids: Sequence[str]):
    import vtk

    # ImportLabelmapToSegmentationNode has no list overload in Python; use vtkStringArray for both.
    array = vtk.vtkStringArray()
    for segment_id in ids:
        array.InsertNextValue(segment_id)
    return array


def _matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _ijk_to_ras(volume_node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _matrix_to_numpy(matrix)


def _require_volume(volume_node, what: str) -> tuple[int, int, int]:
    """Check that a reference volume exists and holds voxels; return its (K, J, I) shape."""
    if volume_node is None:
        raise LabelError(f"{what}: no reference volume given; select the image the labels belong to")
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise LabelError(f"{what}: reference volume {_describe(volume_node)} has no voxels")
    i, j, k = image.GetDimensions()
    return (k, j, i)


def _image_array(image_data, what: str) -> np.ndarray:
    """Copy of a vtkImageData's scalars as a (K, J, I, C) array."""
    from vtk.util import numpy_support

    scalars = image_data.GetPointData().GetScalars() if image_data is not None else None
    if scalars is None:
        raise ImageReadError(f"{what} has no scalar voxels")
    i, j, k = image_data.GetDimensions()
    channels = image_data.GetNumberOfScalarComponents()
    return numpy_support.vtk_to_numpy(scalars).reshape(k, j, i, channels).copy()


def _set_image_array(volume_node, array: np.ndarray) -> None:
    """Replace a volume node's voxels with a (K, J, I, C) array (deep copy)."""
    import vtk
    from vtk.util import numpy_support

    k, j, i, channels = array.shape
    image = vtk.vtkImageData()
    # Slicer keeps geometry in the node, never in vtkImageData (origin 0, spacing 1).
    image.SetDimensions(i, j, k)
    image.AllocateScalars(numpy_support.get_vtk_array_type(array.dtype), channels)
    target = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    target[...] = array.reshape(target.shape)
    volume_node.SetAndObserveImageData(image)


def _vtk_dtype(array: np.ndarray, what: str) -> np.ndarray:
    """Cast to a dtype VTK stores and Slicer displays."""
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.uint8)
    if kind == "f":
        return array if array.dtype in (np.float32, np.float64) else array.astype(np.float32)
    if kind in "ui":
        if array.dtype.itemsize == 8:
            # Slicer does not render 64-bit integer volumes (slicer.util.updateVolumeFromArray
            # rejects them), so narrow to int32 when the values fit, else go to float64.
            if array.size == 0 or (array.min() >= np.iinfo(np.int32).min
                                   and array.max() <= np.iinfo(np.int32).max):
                return array.astype(np.int32)
            return array.astype(np.float64)
        return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))
    raise ImageReadError(f"{what} has unsupported pixel type {array.dtype}")


def _check_same_transform(segmentation_node, volume_node) -> None:
    seg_transform = segmentation_node.GetTransformNodeID() or None
    vol_transform = volume_node.GetTransformNodeID() or None
    if seg_transform != vol_transform:
        raise LabelError(
            f"segmentation {_describe(segmentation_node)} and volume {_describe(volume_node)} are "
            f"under different parent transforms ({seg_transform} vs {vol_transform}); harden or "
            "remove the transforms so both share one frame")


def _check_segment_ids(segmentation_node, segment_ids: Sequence[str]) -> list[str]:
    if segmentation_node is None:
        raise LabelError("no segmentation node given")
    if segmentation_node.GetScene() is None:
        raise LabelError(f"segmentation {_describe(segmentation_node)} is not in a scene")
    ids = [str(s) for s in segment_ids]
    if len(ids) > _MAX_CLASSES:
        raise LabelError(f"{len(ids)} segments requested from {_describe(segmentation_node)}; "
                         f"at most {_MAX_CLASSES} classes fit uint8 labels")
    if len(set(ids)) != len(ids):
        raise LabelError(f"segment IDs {ids} for {_describe(segmentation_node)} repeat an ID; "
                         "each class needs its own segment")
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in ids:
        if segmentation.GetSegment(segment_id) is None:
            raise LabelError(f"segment '{segment_id}' does not exist in segmentation "
                             f"{_describe(segmentation_node)}")
    return ids


def _on_volume_grid(array, shape: tuple[int, int, int], what: str) -> np.ndarray:
    """``array`` as (K, J, I) of a volume of ``shape``; (J, I) is accepted for one-slice volumes."""
    values = np.asarray(array)
    if values.ndim == 2 and shape[0] == 1:
        values = values[None]  # the squeezed form of a one-slice (2D) image
    if tuple(values.shape) != tuple(shape):
        raise LabelError(f"{what} of shape {tuple(np.shape(array))} does not match the volume's "
                         f"(slices, rows, columns) shape {tuple(shape)}")
    return values


def _as_labels(labels, shape: tuple[int, int, int], n_classes: int, what: str) -> np.ndarray:
    """Validate a label array against a volume shape and class count; return (K, J, I) uint8."""
    array = np.asarray(labels)
    if array.dtype.kind not in "uib":
        raise LabelError(f"{what}: labels must hold integers, got dtype {array.dtype}")
    array = _on_volume_grid(array, shape, f"{what}: labels")
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > n_classes:
            raise LabelError(f"{what}: label values range {low}..{high} but only 0..{n_classes} "
                             f"exist ({n_classes} classes)")
    return array.astype(np.uint8, copy=False)


def _color_node_ids(scene) -> set[str]:
    # GetNthNodeByClass avoids GetNodesByClass, whose new collection leaks from Python.
    count = scene.GetNumberOfNodesByClass("vtkMRMLColorNode")
    return {scene.GetNthNodeByClass(n, "vtkMRMLColorNode").GetID() for n in range(count)}


@contextlib.contextmanager
def _temporary_labelmap(scene, volume_node=None) -> Iterator:
    """A hidden vtkMRMLLabelMapVolumeNode that is removed, with everything it brought, on exit.

    ExportSegmentsToLabelmapNode gives the label map a display node and a new colour table named
    after the segmentation; removing the volume node alone leaves both behind in the scene.
    """
    colors_before = _color_node_ids(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", _TEMPORARY_NAME)
    labelmap.SetHideFromEditors(True)
    labelmap.SetSaveWithScene(False)
    if volume_node is not None:
        labelmap.SetIJKToRASMatrix(_numpy_to_matrix(_ijk_to_ras(volume_node)))
        labelmap.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    try:
        yield labelmap
    finally:
        extra = []
        for n in range(labelmap.GetNumberOfDisplayNodes()):
            display = labelmap.GetNthDisplayNode(n)
            if display is None:
                continue
            extra.append(display)
            color = display.GetColorNode()
            if color is not None and color.GetID() not in colors_before:
                extra.append(color)
        storage = labelmap.GetStorageNode()
        if storage is not None:
            extra.append(storage)
        scene.RemoveNode(labelmap)
        for node in extra:
            if node.GetScene() is scene:
                scene.RemoveNode(node)


# --------------------------------------------------------------------------------------------
# Segmentations logic
# --------------------------------------------------------------------------------------------

def segmentations_logic(scene):
    """The Segmentations module logic for ``scene``. Main thread only.

    In the Slicer application and for ``slicer.mrmlScene`` this is
    ``slicer.modules.segmentations.logic()``. Otherwise (slicer-core without the application, or
    a private scene) a ``vtkSlicerSegmentationsModuleLogic`` is created, registered on the scene
    with ``SetMRMLScene`` so segments can hold label maps, and cached for as long as the scene
    lives, so each scene has exactly one.
    """
    import slicer

    if scene is None:
        raise LabelError("no MRML scene given")
    modules = getattr(slicer, "modules", None)
    if modules is not None and getattr(slicer, "mrmlScene", None) is scene:
        try:
            logic = modules.segmentations.logic()
        except AttributeError:
            logic = None
        if logic is not None:
            return logic
    logic = _LOGICS.get(scene)
    if logic is None or logic.GetMRMLScene() is not scene:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        _LOGICS[scene] = logic
    return logic


# --------------------------------------------------------------------------------------------
# Volumes <-> ImageData
# --------------------------------------------------------------------------------------------

def volume_geometry(volume_node) -> Geometry:
    """The engine Geometry (ITK/LPS, spacing z,y,x) of a volume node's IJK-to-RAS. Main thread only."""
    import vtk

    spacing_ijk = volume_node.GetSpacing()
    direction = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(direction)
    direction_ras = _matrix_to_numpy(direction)[:3, :3]
    origin_ras = np.asarray(volume_node.GetOrigin(), dtype=np.float64)
    return Geometry(tuple(reversed(spacing_ijk)), tuple(_RAS_FROM_LPS @ origin_ras),
                    tuple((_RAS_FROM_LPS @ direction_ras).ravel()))


def _ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    direction_ras = _RAS_FROM_LPS @ np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    spacing_ijk = np.asarray(tuple(reversed(geometry.spacing)), dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = direction_ras * spacing_ijk[None, :]  # column n = axis n direction * spacing
    matrix[:3, 3] = _RAS_FROM_LPS @ np.asarray(geometry.origin, dtype=np.float64)
    return matrix


def volume_to_image(volume_node) -> ImageData:
    """Copy a volume node's voxels and geometry into an ImageData. Main thread only.

    A scalar (or label map) volume gives (S=K, Y=J, X=I, 1); a vector volume such as an RGB
    image gives (K, J, I, C). The geometry is converted from RAS to LPS (module docstring).
    float64/float16 voxels become float32 (the engine trains in float32). ``source`` is the
    storage node's file name when the volume was loaded from a file.
    """
    if volume_node is None:
        raise ImageReadError("no volume node given")
    what = f"volume {_describe(volume_node)}"
    array = _image_array(volume_node.GetImageData(), what)
    if array.size == 0:
        raise ImageReadError(f"{what} has no voxels")
    if array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    storage = volume_node.GetStorageNode()
    source = storage.GetFileName() if storage is not None and storage.GetFileName() else None
    return ImageData(array, volume_geometry(volume_node), volume_node.GetName() or "volume", source)


def image_to_volume_node(scene, image: ImageData, name: str | None = None, node_class: str | None = None):
    """Add a volume node holding ``image`` (e.g. an image file read by the engine). Main thread only.

    One channel gives a ``vtkMRMLScalarVolumeNode``, several a ``vtkMRMLVectorVolumeNode``, unless
    ``node_class`` names another volume class (a label map needs one channel). The geometry goes
    from LPS to RAS (module docstring). Display nodes are created; the node is returned.
    """
    array = np.asarray(image.array)
    if array.ndim != 4 or array.size == 0:
        raise ImageReadError(f"image '{image.name}' must be a non-empty (S, Y, X, C) array, "
                             f"got shape {array.shape}")
    channels = array.shape[3]
    if node_class is None:
        node_class = "vtkMRMLScalarVolumeNode" if channels == 1 else "vtkMRMLVectorVolumeNode"
    elif channels > 1 and node_class in ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode"):
        raise ImageReadError(f"image '{image.name}' has {channels} channels; {node_class} holds one")
    array = np.ascontiguousarray(_vtk_dtype(array, f"image '{image.name}'"))
    node = scene.AddNewNodeByClass(node_class, name or image.name)
    if node is None:
        raise ImageReadError(f"cannot create a {node_class} for image '{image.name}'")
    node.SetIJKToRASMatrix(_numpy_to_matrix(_ijk_to_ras_from_geometry(image.geometry)))
    _set_image_array(node, array)
    node.CreateDefaultDisplayNodes()
    return node


def array_to_volume(scene, array, reference_volume, name: str):
    """Add a float32 scalar volume (e.g. the uncertainty map) on the reference volume's grid.

    ``array`` is (S, Y, X) = (K, J, I) of the reference volume (or (Y, X) for a one-slice volume);
    the IJK-to-RAS matrix and parent transform are copied from ``reference_volume``. Main thread
    only. Returns the new vtkMRMLScalarVolumeNode.
    """
    shape = _require_volume(reference_volume, f"volume '{name}'")
    values = _on_volume_grid(array, shape, f"array for volume '{name}' (reference volume "
                                           f"{_describe(reference_volume)})")
    if values.dtype.kind not in "uifb":
        raise LabelError(f"array for volume '{name}' has unsupported dtype {values.dtype}")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_numpy_to_matrix(_ijk_to_ras(reference_volume)))
    node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    _set_image_array(node, np.ascontiguousarray(values, dtype=np.float32)[..., None])
    node.CreateDefaultDisplayNodes()
    return node


# --------------------------------------------------------------------------------------------
# Classes <-> segments
# --------------------------------------------------------------------------------------------

def _segment_tag(segment, tag: str) -> str | None:
    import vtk

    value = vtk.reference("")
    return value.get() if segment.GetTag(tag, value) else None


def ensure_class_segments(segmentation_node, classes: Sequence[dict]) -> list[str]:
    """Make sure the segmentation has one segment per class; return their IDs in class order.

    ``classes``: ``[{"name": str, "color": [r, g, b] 0..255}, ...]`` in project order (label k =
    classes[k-1]); ``color`` may be left out. Main thread only.

    Which segment belongs to class k (name n), first rule that applies:
      1. a segment tagged ``SemSegLoop.class = n``: the person may have renamed it in Slicer,
         the tag keeps its identity;
      2. a segment tagged ``SemSegLoop.label = k`` whose class tag names no current class:
         the class was renamed in the project;
      3. an untagged segment named n (segments made by hand before the project existed);
      4. otherwise a new empty segment is added.
    Matched segments get the class name, colour (0..1) and both tags, so the project is the
    authority on names and colours. Segments matching no class are left alone (and are never
    exported, since the IDs are passed explicitly).
    """
    if segmentation_node is None:
        raise LabelError("no segmentation node given")
    names: list[str] = []
    colors: list[list[float] | None] = []
    for k, cls in enumerate(classes, 1):
        name = cls.get("name") if isinstance(cls, dict) else None
        if not isinstance(name, str) or not name:
            raise LabelError(f"class {k} for segmentation {_describe(segmentation_node)} has no name: "
                             f"{cls!r}")
        names.append(name)
        color = cls.get("color")
        if color is None:
            colors.append(None)
            continue
        try:
            rgb = [float(c) for c in color]
        except (TypeError, ValueError):
            rgb = []
        if len(rgb) != 3 or not all(0.0 <= c <= 255.0 for c in rgb):
            raise LabelError(f"class '{name}' has colour {color!r}; give [r, g, b] in 0..255")
        colors.append([c / 255.0 for c in rgb])
    if not names:
        raise LabelError(f"no classes given for segmentation {_describe(segmentation_node)}")
    if len(set(names)) != len(names):
        raise LabelError(f"class names {names} repeat a name")
    if len(names) > _MAX_CLASSES:
        raise LabelError(f"{len(names)} classes; at most {_MAX_CLASSES} fit uint8 labels")

    if segmentation_node.GetScene() is not None:
        # Creating the module logic registers the label-map representation; without it (a bare
        # slicer-core session) AddEmptySegment fails with "Unable to construct empty representation".
        segmentations_logic(segmentation_node.GetScene())
    segmentation = segmentation_node.GetSegmentation()
    existing = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    tags = {sid: (_segment_tag(segmentation.GetSegment(sid), CLASS_TAG),
                  _segment_tag(segmentation.GetSegment(sid), LABEL_TAG)) for sid in existing}
    claimed: set[str] = set()

    rules = (
        lambda sid, k, name: tags[sid][0] == name,
        lambda sid, k, name: tags[sid][0] not in names and tags[sid][1] == str(k),
        lambda sid, k, name: tags[sid] == (None, None)
        and segmentation.GetSegment(sid).GetName() == name,
    )
    # Each rule is tried for every class before the next one, so an exact tag match is never
    # taken away by an earlier class's looser rule.
    matches: dict[int, str] = {}
    for rule in rules:
        for k, name in enumerate(names, 1):
            if k in matches:
                continue
            for sid in existing:
                if sid not in claimed and rule(sid, k, name):
                    matches[k] = sid
                    claimed.add(sid)
                    break

    was_modifying = segmentation_node.StartModify()
    try:
        ids = []
        for k, (name, cls) in enumerate(zip(names, classes), 1):
            rgb = colors[k - 1]
            sid = matches.get(k)
            if sid is None:
                # Without a colour Slicer picks its next default one.
                sid = (segmentation.AddEmptySegment("", name, rgb) if rgb is not None
                       else segmentation.AddEmptySegment("", name))
                if not sid:
                    raise LabelError(f"Slicer could not add segment '{name}' to segmentation "
                                     f"{_describe(segmentation_node)}")
            segment = segmentation.GetSegment(sid)
            if segment.GetName() != name:
                segment.SetName(name)
            if rgb is not None:
                segment.SetColor(*rgb)
            segment.SetTag(CLASS_TAG, name)
            segment.SetTag(LABEL_TAG, str(k))
            ids.append(sid)
    finally:
        segmentation_node.EndModify(was_modifying)
    return ids


# --------------------------------------------------------------------------------------------
# Segmentations <-> label arrays
# --------------------------------------------------------------------------------------------

def segmentation_to_labels(segmentation_node, segment_ids: Sequence[str], reference_volume) -> np.ndarray:
    """Read segments as one (S, Y, X) uint8 label array on the reference volume's grid.

    Label k marks voxels of ``segment_ids[k-1]``; 0 is unlabeled. Export goes through
    ``ExportSegmentsToLabelmapNode`` with the IDs passed explicitly (so the node's segment order
    never matters) and ``EXTENT_REFERENCE_GEOMETRY`` (the full volume, whatever each segment's own
    extent); the temporary label map and its colour table are removed afterwards. Where segments
    overlap, the one later in ``segment_ids`` wins (Slicer paints them in list order). Empty
    segments are fine. Main thread only.

    Raises LabelError when the reference volume is missing or empty, a segment ID does not exist
    (naming it), or the segmentation and volume sit under different parent transforms.
    """
    import slicer

    what = f"segmentation {_describe(segmentation_node)}"
    ids = _check_segment_ids(segmentation_node, segment_ids)
    shape = _require_volume(reference_volume, what)
    _check_same_transform(segmentation_node, reference_volume)
    if not ids:
        return np.zeros(shape, dtype=np.uint8)
    scene = segmentation_node.GetScene()
    logic = segmentations_logic(scene)
    with _temporary_labelmap(scene) as labelmap:
        ok = logic.ExportSegmentsToLabelmapNode(
            segmentation_node, _string_array(ids), labelmap, reference_volume,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not ok or labelmap.GetImageData() is None:
            raise LabelError(f"Slicer could not export the segments of {what} against volume "
                             f"{_describe(reference_volume)}")
        array = _image_array(labelmap.GetImageData(), what)[..., 0]
    if tuple(array.shape) != shape:
        raise LabelError(f"{what} exported to shape {array.shape}, not the volume's {shape}")
    return array.astype(np.uint8)


def labels_to_segmentation(labels, segmentation_node, segment_ids: Sequence[str], reference_volume) -> None:
    """Write a (S, Y, X) label array into existing segments: label k -> ``segment_ids[k-1]``.

    The listed segments are replaced entirely (a segment whose label is absent becomes empty);
    other segments are untouched. Goes through a temporary vtkMRMLLabelMapVolumeNode with the
    reference volume's geometry and ``ImportLabelmapToSegmentationNode``, one call for all
    classes; the segmentation's reference geometry is set from the volume first. Main thread only.
    Raises LabelError for a shape mismatch, label values above len(segment_ids), or unknown IDs.
    """
    what = f"segmentation {_describe(segmentation_node)}"
    ids = _check_segment_ids(segmentation_node, segment_ids)
    shape = _require_volume(reference_volume, what)
    _check_same_transform(segmentation_node, reference_volume)
    array = _as_labels(labels, shape, len(ids), what)
    if not ids:
        return
    scene = segmentation_node.GetScene()
    logic = segmentations_logic(scene)
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    with _temporary_labelmap(scene, reference_volume) as labelmap:
        _set_image_array(labelmap, np.ascontiguousarray(array)[..., None])
        # Values above len(ids) would be dropped silently by Slicer; _as_labels rejected them.
        if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, _string_array(ids)):
            raise LabelError(f"Slicer could not import labels into {what}")


def create_prediction_segmentation(scene, labels, classes: Sequence[dict], reference_volume,
                                   name: str = "SemSegLoop prediction"):
    """Add a new segmentation node (e.g. "SemSegLoop round 3") showing a prediction.

    One segment per class, with the class names and colours (``ensure_class_segments``), display
    nodes created, filled from ``labels`` (S, Y, X) with values 0..len(classes). The node sits
    under the reference volume's parent transform. Main thread only. Returns the node.
    """
    shape = _require_volume(reference_volume, f"prediction '{name}'")
    _as_labels(labels, shape, len(classes), f"prediction '{name}'")  # fail before adding nodes
    segmentations_logic(scene)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        node.CreateDefaultDisplayNodes()
        node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        ids = ensure_class_segments(node, classes)
        labels_to_segmentation(labels, node, ids, reference_volume)
    except BaseException:
        display = node.GetDisplayNode()
        scene.RemoveNode(node)
        if display is not None and display.GetScene() is scene:
            scene.RemoveNode(display)
        raise
    return node


def merge_corrections(labels_segmentation, segment_ids: Sequence[str], reference_volume, prediction,
                      mask=None, classes: Sequence[int] | None = None) -> dict[int, int]:
    """Copy predicted classes into the person's label segmentation without touching their strokes.

    A voxel takes the prediction's value only where it is unlabeled now (label 0), the prediction
    is not 0, ``mask`` (bool (S, Y, X), optional) is True and the predicted class is in
    ``classes`` (class values 1..K, optional; default all). Every other voxel keeps its value.
    Reads the current labels with ``segmentation_to_labels``, writes the merged array back with
    ``labels_to_segmentation`` (only when something changed), so where the person's segments
    overlapped, the later class now owns the voxel. Main thread only.

    Undo belongs to the caller: the widget calls the segment editor's ``saveStateForUndo()``
    before this.

    Returns ``{class value: voxels added}`` for the classes considered.
    """
    what = f"segmentation {_describe(labels_segmentation)}"
    ids = _check_segment_ids(labels_segmentation, segment_ids)
    shape = _require_volume(reference_volume, what)
    n_classes = len(ids)
    predicted = _as_labels(prediction, shape, n_classes, f"prediction for {what}")
    if classes is None:
        wanted = list(range(1, n_classes + 1))
    else:
        wanted = sorted({int(c) for c in classes})
        bad = [c for c in wanted if not 1 <= c <= n_classes]
        if bad:
            raise LabelError(f"classes {bad} to merge into {what} are outside 1..{n_classes}")
    current = segmentation_to_labels(labels_segmentation, ids, reference_volume)
    take = (current == 0) & np.isin(predicted, wanted)
    if mask is not None:
        take &= _on_volume_grid(mask, shape, f"mask for {what}").astype(bool)
    added = {c: 0 for c in wanted}
    values, counts = np.unique(predicted[take], return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist()):
        added[int(value)] = int(count)
    if take.any():
        merged = current.copy()
        merged[take] = predicted[take]
        labels_to_segmentation(merged, labels_segmentation, ids, reference_volume)
    return added


def check_geometry_matches(target, reference_volume) -> None:
    """Raise LabelError unless ``target`` fits the reference volume's voxel grid. Main thread only.

    ``target`` is a label array (or its shape): it must be (K, J, I) of the volume, or (J, I) for a
    one-slice volume. Or a segmentation node: its reference image geometry, when it has one, must
    have the volume's dimensions and IJK-to-RAS matrix (a segmentation made for another image
    would otherwise be resampled silently), and both must share one parent transform.
    """
    if hasattr(target, "GetSegmentation"):
        import slicer
        import vtk

        what = f"segmentation {_describe(target)}"
        shape = _require_volume(reference_volume, what)
        _check_same_transform(target, reference_volume)
        converter = slicer.vtkSegmentationConverter
        serialized = target.GetSegmentation().GetConversionParameter(
            converter.GetReferenceImageGeometryParameterName())
        if not serialized:
            return  # no grid of its own yet: exports use the volume's grid
        geometry = slicer.vtkOrientedImageData()
        if not converter.DeserializeImageGeometry(serialized, geometry, False):
            raise LabelError(f"{what} has an unreadable reference geometry '{serialized}'")
        i0, i1, j0, j1, k0, k1 = geometry.GetExtent()
        seg_shape = (k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
        matrix = vtk.vtkMatrix4x4()
        geometry.GetImageToWorldMatrix(matrix)
        seg_matrix = _matrix_to_numpy(matrix)
        # An extent starting above 0 shifts the grid's first voxel; fold it into the origin.
        seg_matrix[:3, 3] += seg_matrix[:3, :3] @ np.array([i0, j0, k0], dtype=np.float64)
        if seg_shape != shape or not np.allclose(seg_matrix, _ijk_to_ras(reference_volume),
                                                 rtol=1e-5, atol=1e-4):
            raise LabelError(
                f"{what} was made on another voxel grid ({seg_shape} voxels) than volume "
                f"{_describe(reference_volume)} ({shape} voxels, or a different position/spacing); "
                "set the volume as the segmentation's source geometry before painting")
        return
    shape = _require_volume(reference_volume, "labels")
    got = tuple(target.shape) if hasattr(target, "shape") else tuple(int(v) for v in target)
    if len(got) == 2 and shape[0] == 1:
        got = (1,) + got
    if got != shape:
        raise LabelError(f"labels of shape {tuple(target.shape) if hasattr(target, 'shape') else got} "
                         f"do not match volume {_describe(reference_volume)} of shape {shape} "
                         "(slices, rows, columns)")
