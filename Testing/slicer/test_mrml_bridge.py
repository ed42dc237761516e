"""Tests of the MRML <-> numpy bridge against the real MRML classes of the slicer-core wheel:
segments painted in a scene must come out as the right class values on the right voxels."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")
import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from semsegloop import LabelError  # noqa: E402
from semsegloop.slicer import mrml_bridge  # noqa: E402
from semsegloop.data.imageio import Geometry, ImageData, read_image  # noqa: E402

CLASSES = [{"name": "collagen", "color": [200, 60, 60]},
           {"name": "cell", "color": [60, 200, 60]},
           {"name": "background", "color": [60, 60, 200]}]


# --------------------------------------------------------------------------------------------
# Scene builders that use Slicer's own API, not the bridge, so the bridge is checked against them
# --------------------------------------------------------------------------------------------

def rotation_with_flip(degrees: float = 30.0) -> np.ndarray:
    """RAS directions: rotated about S by ``degrees``, with the K axis flipped.

    Deliberately not symmetric, so a transposed direction matrix cannot pass unnoticed.
    """
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    directions = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, 1.0, -1.0])
    assert not np.allclose(directions, directions.T)
    return directions


def add_volume(scene, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), directions=None,
               node_class="vtkMRMLScalarVolumeNode", name="image"):
    """A volume node from a (K, J, I[, C]) array; spacing/origin in Slicer's I, J, K / RAS order."""
    node = scene.AddNewNodeByClass(node_class, name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    if directions is not None:
        matrix = vtk.vtkMatrix4x4()
        for r in range(3):
            for c in range(3):
                matrix.SetElement(r, c, float(directions[r][c]))
        node.SetIJKToRASDirectionMatrix(matrix)
    node.CreateDefaultDisplayNodes()
    return node


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def add_segmentation(scene, segments, name="labels"):
    """A segmentation node with empty segments ``[(id, name), ...]`` in the given node order."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    for segment_id, segment_name in segments:
        assert node.GetSegmentation().AddEmptySegment(segment_id, segment_name) == segment_id
    return node


def paint(scene, segmentation, segment_id, volume, mask, ijk_offset=(0, 0, 0)):
    """Set a segment from a (K, J, I) bool mask on the volume's grid, as Slicer stores a stroke.

    The stored binary label map covers only the mask's bounding box (a smaller extent than the
    volume). With ``ijk_offset`` the same voxels are described by a shifted grid instead: the
    image-to-world matrix moves by whole voxels and the extent starts at 0, as an oriented image
    made elsewhere would be.
    """
    mask = np.asarray(mask, dtype=bool)
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0)
    box = mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].astype(np.uint8)
    image = slicer.vtkOrientedImageData()
    matrix = ijk_to_ras(volume)
    offset = np.array(ijk_offset, dtype=float)
    if offset.any():
        matrix[:3, 3] += matrix[:3, :3] @ offset  # world position of voxel (i, j, k) = offset
        extent_lo = np.array([lo[2], lo[1], lo[0]]) - offset.astype(int)
    else:
        extent_lo = np.array([lo[2], lo[1], lo[0]])
    extent_hi = extent_lo + np.array([hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]])
    image.SetExtent(int(extent_lo[0]), int(extent_hi[0]), int(extent_lo[1]), int(extent_hi[1]),
                    int(extent_lo[2]), int(extent_hi[2]))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = box.ravel()
    vtk_matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_matrix.SetElement(r, c, matrix[r, c])
    image.SetImageToWorldMatrix(vtk_matrix)
    logic = mrml_bridge.segmentations_logic(scene)
    assert logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, logic.MODE_REPLACE)


def box_mask(shape, k, j, i):
    mask = np.zeros(shape, dtype=bool)
    mask[k, j, i] = True
    return mask


def node_counts(scene) -> tuple[int, int]:
    return (scene.GetNumberOfNodes(), scene.GetNumberOfNodesByClass("vtkMRMLColorNode"))


# --------------------------------------------------------------------------------------------
# Logic and import hygiene
# --------------------------------------------------------------------------------------------

def test_segmentations_logic_is_one_per_scene(mrml_scene):
    logic = mrml_bridge.segmentations_logic(mrml_scene)
    assert mrml_bridge.segmentations_logic(mrml_scene) is logic
    other = slicer.vtkMRMLScene()
    other_logic = mrml_bridge.segmentations_logic(other)
    assert other_logic is not logic and other_logic.GetMRMLScene() is other
    other_logic.SetMRMLScene(None)


def test_engine_imports_bridge_without_slicer_torch_or_qt():
    code = ("import sys; sys.modules['slicer'] = None; sys.modules['vtk'] = None\n"
            "import semsegloop.slicer.mrml_bridge\n"
            "bad = [m for m in ('torch', 'qt', 'PythonQt', 'slicer', 'vtk') if sys.modules.get(m)]\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_fresh_process_gets_label_map_segments_without_any_setup():
    # The label-map representation is registered when the module logic is first made; the
    # fixture makes one, so only a fresh interpreter shows that the bridge does it by itself.
    code = ("import numpy as np, slicer\n"
            "from semsegloop.slicer import mrml_bridge as mb\n"
            "scene = slicer.vtkMRMLScene()\n"
            "volume = scene.AddNewNodeByClass('vtkMRMLScalarVolumeNode', 'v')\n"
            "slicer.util.updateVolumeFromArray(volume, np.zeros((1, 3, 4), np.uint8))\n"
            "labels = np.arange(12, dtype=np.uint8).reshape(1, 3, 4) % 3\n"
            "classes = [{'name': 'a', 'color': [1, 2, 3]}, {'name': 'b', 'color': [4, 5, 6]}]\n"
            "node = mb.create_prediction_segmentation(scene, labels, classes, volume, 'p')\n"
            "ids = mb.ensure_class_segments(node, classes)\n"
            "assert (mb.segmentation_to_labels(node, ids, volume) == labels).all()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# Volumes <-> ImageData
# --------------------------------------------------------------------------------------------

def test_volume_to_image_matches_simpleitk_reading_slicers_own_file(mrml_scene, tmp_path):
    array = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    volume = add_volume(mrml_scene, array, spacing=(0.8, 0.7, 6.5), origin=(10.0, -20.0, 5.0),
                        directions=rotation_with_flip())
    image = mrml_bridge.volume_to_image(volume)

    assert image.array.shape == (3, 4, 5, 1) and image.array.dtype == np.int16
    np.testing.assert_array_equal(image.array[..., 0], array)
    # RAS origin (10, -20, 5) is LPS (-10, 20, 5); spacing is reversed into (z, y, x).
    assert image.geometry.origin == pytest.approx((-10.0, 20.0, 5.0))
    assert image.geometry.spacing == pytest.approx((6.5, 0.7, 0.8))

    # Slicer's NRRD writer is the reference for what ITK sees.
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLNRRDStorageNode")
    storage.SetFileName(str(tmp_path / "slicer_written.nrrd"))
    assert storage.WriteData(volume)
    itk_image = sitk.ReadImage(str(tmp_path / "slicer_written.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk_image), array)
    assert image.geometry.origin == pytest.approx(itk_image.GetOrigin(), abs=1e-6)
    assert image.geometry.direction == pytest.approx(itk_image.GetDirection(), abs=1e-6)
    assert image.geometry.spacing == pytest.approx(tuple(reversed(itk_image.GetSpacing())), abs=1e-6)


def test_image_to_volume_node_places_the_image_as_slicers_reader_does(mrml_scene, tmp_path):
    array = np.random.default_rng(0).integers(0, 1000, size=(4, 5, 6)).astype(np.uint16)
    itk_image = sitk.GetImageFromArray(array)
    itk_image.SetSpacing((0.5, 0.6, 3.0))
    itk_image.SetOrigin((1.0, 2.0, 3.0))
    # LPS directions of a 30 degree rotation with a flipped third axis (not symmetric).
    itk_image.SetDirection(tuple((np.diag([-1.0, -1.0, 1.0]) @ rotation_with_flip()).ravel()))
    path = tmp_path / "written_by_itk.nrrd"
    sitk.WriteImage(itk_image, str(path))

    image = read_image(path, dims=3)
    node = mrml_bridge.image_to_volume_node(mrml_scene, image, name="from engine")
    assert node.GetClassName() == "vtkMRMLScalarVolumeNode" and node.GetName() == "from engine"
    assert node.GetDisplayNode() is not None

    slicer_read = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read by Slicer")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLNRRDStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(slicer_read)
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(slicer_read), atol=1e-6)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), array)
    assert node.GetOrigin() == pytest.approx((-1.0, -2.0, 3.0))

    back = mrml_bridge.volume_to_image(node)
    np.testing.assert_array_equal(back.array, image.array)
    assert back.array.dtype == np.uint16
    assert back.geometry.matches(image.geometry, tol=1e-6)


def test_rgb_image_round_trips_through_a_vector_volume(mrml_scene):
    rgb = np.random.default_rng(1).integers(0, 256, size=(1, 5, 7, 3)).astype(np.uint8)
    geometry = Geometry((1.0, 0.25, 0.5), (3.0, -4.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    node = mrml_bridge.image_to_volume_node(mrml_scene, ImageData(rgb, geometry, "photo"))
    assert node.GetClassName() == "vtkMRMLVectorVolumeNode"
    assert node.GetImageData().GetNumberOfScalarComponents() == 3
    assert node.GetSpacing() == pytest.approx((0.5, 0.25, 1.0))
    back = mrml_bridge.volume_to_image(node)
    assert back.array.shape == (1, 5, 7, 3)
    np.testing.assert_array_equal(back.array, rgb)
    assert back.geometry.matches(geometry, tol=1e-9)
    assert back.name == "photo"


def test_float64_volume_becomes_float32_image(mrml_scene):
    volume = add_volume(mrml_scene, np.linspace(0, 1, 24).reshape(2, 3, 4))
    image = mrml_bridge.volume_to_image(volume)
    assert image.array.dtype == np.float32
    np.testing.assert_allclose(image.array[..., 0], np.linspace(0, 1, 24).reshape(2, 3, 4), rtol=1e-6)


def test_array_to_volume_copies_the_reference_grid(mrml_scene):
    reference = add_volume(mrml_scene, np.zeros((2, 4, 5), np.int16), spacing=(0.8, 0.8, 6.5),
                           origin=(1.0, 2.0, 3.0), directions=rotation_with_flip())
    entropy = np.random.default_rng(2).random((2, 4, 5)).astype(np.float16)
    node = mrml_bridge.array_to_volume(mrml_scene, entropy, reference, "uncertainty")
    assert node.GetClassName() == "vtkMRMLScalarVolumeNode" and node.GetName() == "uncertainty"
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(reference))
    values = slicer.util.arrayFromVolume(node)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, entropy.astype(np.float32))
    with pytest.raises(LabelError, match="image"):
        mrml_bridge.array_to_volume(mrml_scene, np.zeros((2, 4, 4)), reference, "bad")


# --------------------------------------------------------------------------------------------
# Segments -> sparse labels
# --------------------------------------------------------------------------------------------

def paint_two_strokes(scene, volume, shape, **paint_kwargs):
    segmentation = add_segmentation(scene, [("seg_a", "collagen"), ("seg_b", "cell")])
    stroke_a = box_mask(shape, slice(0, 2), slice(1, 3), slice(1, 4))
    stroke_b = box_mask(shape, slice(shape[0] - 1, shape[0]), slice(4, 6), slice(2, 3))
    paint(scene, segmentation, "seg_a", volume, stroke_a, **paint_kwargs)
    paint(scene, segmentation, "seg_b", volume, stroke_b, **paint_kwargs)
    expected = np.zeros(shape, np.uint8)
    expected[stroke_a] = 1
    expected[stroke_b] = 2
    return segmentation, expected


@pytest.mark.parametrize("directions,origin", [
    (None, (0.0, 0.0, 0.0)),
    (rotation_with_flip(30.0), (12.5, -40.0, 7.0)),
], ids=["axis-aligned", "rotated-flipped-offset"])
def test_painted_segments_become_sparse_labels_on_an_anisotropic_volume(mrml_scene, directions, origin):
    shape = (4, 7, 6)
    volume = add_volume(mrml_scene, np.zeros(shape, np.int16), spacing=(0.8, 0.8, 6.5),
                        origin=origin, directions=directions)
    segmentation, expected = paint_two_strokes(mrml_scene, volume, shape)
    before = node_counts(mrml_scene)

    labels = mrml_bridge.segmentation_to_labels(segmentation, ["seg_a", "seg_b"], volume)

    assert labels.dtype == np.uint8 and labels.shape == shape
    np.testing.assert_array_equal(labels, expected)
    # The temporary label map, its display node and its colour table are gone again.
    assert node_counts(mrml_scene) == before


def test_segment_stored_on_a_shifted_smaller_grid_lands_on_the_right_voxels(mrml_scene):
    shape = (3, 8, 9)
    volume = add_volume(mrml_scene, np.zeros(shape, np.float32), spacing=(0.5, 0.5, 2.0),
                        origin=(-3.0, 4.0, 1.0), directions=rotation_with_flip(-45.0))
    segmentation, expected = paint_two_strokes(mrml_scene, volume, shape, ijk_offset=(2, 1, 1))
    stored = segmentation.GetSegmentation().GetSegment("seg_b").GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    assert stored.GetExtent() != (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)

    labels = mrml_bridge.segmentation_to_labels(segmentation, ["seg_a", "seg_b"], volume)
    np.testing.assert_array_equal(labels, expected)


def test_overlapping_segments_later_class_in_the_list_wins(mrml_scene):
    shape = (1, 6, 6)
    volume = add_volume(mrml_scene, np.zeros(shape, np.uint8))
    segmentation = add_segmentation(mrml_scene, [("seg_a", "a"), ("seg_b", "b")])
    mask_a = box_mask(shape, 0, slice(0, 4), slice(0, 4))
    mask_b = box_mask(shape, 0, slice(2, 6), slice(2, 6))
    paint(mrml_scene, segmentation, "seg_a", volume, mask_a)
    paint(mrml_scene, segmentation, "seg_b", volume, mask_b)
    overlap = mask_a & mask_b
    assert overlap.any()

    a_then_b = mrml_bridge.segmentation_to_labels(segmentation, ["seg_a", "seg_b"], volume)
    assert (a_then_b[overlap] == 2).all()  # seg_b is label 2 and listed last
    assert (a_then_b[mask_a & ~overlap] == 1).all()

    b_then_a = mrml_bridge.segmentation_to_labels(segmentation, ["seg_b", "seg_a"], volume)
    assert (b_then_a[overlap] == 2).all()  # now seg_a is label 2 and listed last
    assert (b_then_a[mask_b & ~overlap] == 1).all()


def test_rgb_vector_volume_as_reference(mrml_scene):
    rgb = np.random.default_rng(3).integers(0, 256, size=(1, 6, 8, 3)).astype(np.uint8)
    volume = add_volume(mrml_scene, rgb, spacing=(0.3, 0.3, 1.0), origin=(5.0, 6.0, 0.0),
                        node_class="vtkMRMLVectorVolumeNode")
    image = mrml_bridge.volume_to_image(volume)
    assert image.array.shape == (1, 6, 8, 3)
    np.testing.assert_array_equal(image.array, rgb)

    segmentation, expected = paint_two_strokes(mrml_scene, volume, (1, 6, 8))
    labels = mrml_bridge.segmentation_to_labels(segmentation, ["seg_a", "seg_b"], volume)
    assert labels.shape == image.array.shape[:3]
    np.testing.assert_array_equal(labels, expected)


def test_class_order_follows_the_ids_passed_not_the_node(mrml_scene):
    shape = (1, 5, 5)
    volume = add_volume(mrml_scene, np.zeros(shape, np.uint8))
    # Segments made by hand, in another order than the project's classes.
    segmentation = add_segmentation(mrml_scene, [("s_bg", "background"), ("s_cell", "cell"),
                                                 ("s_col", "collagen")])
    paint(mrml_scene, segmentation, "s_bg", volume, box_mask(shape, 0, 0, slice(None)))
    paint(mrml_scene, segmentation, "s_cell", volume, box_mask(shape, 0, 2, slice(None)))
    paint(mrml_scene, segmentation, "s_col", volume, box_mask(shape, 0, 4, slice(None)))

    ids = mrml_bridge.ensure_class_segments(segmentation, CLASSES)
    assert ids == ["s_col", "s_cell", "s_bg"]  # adopted by name, nothing added
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 3
    labels = mrml_bridge.segmentation_to_labels(segmentation, ids, volume)
    np.testing.assert_array_equal(labels[0, :, 0], [3, 0, 2, 0, 1])


def test_empty_segments_and_missing_classes(mrml_scene):
    shape = (2, 3, 4)
    volume = add_volume(mrml_scene, np.zeros(shape, np.int16))
    segmentation = add_segmentation(mrml_scene, [("a", "a"), ("b", "b")])
    labels = mrml_bridge.segmentation_to_labels(segmentation, ["a", "b"], volume)
    assert labels.shape == shape and not labels.any()


# --------------------------------------------------------------------------------------------
# Classes <-> segments
# --------------------------------------------------------------------------------------------

def segment_tag(segment, tag):
    value = vtk.reference("")
    return value.get() if segment.GetTag(tag, value) else None


def test_ensure_class_segments_creates_tags_and_keeps_identity(mrml_scene):
    segmentation = add_segmentation(mrml_scene, [("other", "my notes")])
    ids = mrml_bridge.ensure_class_segments(segmentation, CLASSES)
    seg = segmentation.GetSegmentation()
    assert len(ids) == 3 and seg.GetNumberOfSegments() == 4  # the extra segment is left alone
    for k, (sid, cls) in enumerate(zip(ids, CLASSES), 1):
        segment = seg.GetSegment(sid)
        assert segment.GetName() == cls["name"]
        assert segment.GetColor() == pytest.approx([c / 255 for c in cls["color"]])
        assert segment_tag(segment, mrml_bridge.CLASS_TAG) == cls["name"]
        assert segment_tag(segment, mrml_bridge.LABEL_TAG) == str(k)
    assert segment_tag(seg.GetSegment("other"), mrml_bridge.CLASS_TAG) is None

    # Idempotent.
    assert mrml_bridge.ensure_class_segments(segmentation, CLASSES) == ids
    assert seg.GetNumberOfSegments() == 4

    # The person renames a segment in Slicer: the tag keeps it, and the class name comes back.
    seg.GetSegment(ids[1]).SetName("cells (nuclei)")
    seg.GetSegment(ids[1]).SetColor(0.0, 0.0, 0.0)
    assert mrml_bridge.ensure_class_segments(segmentation, CLASSES) == ids
    assert seg.GetSegment(ids[1]).GetName() == "cell"
    assert seg.GetSegment(ids[1]).GetColor() == pytest.approx([60 / 255, 200 / 255, 60 / 255])

    # The project renames class 1: the label tag finds the segment, which takes the new name.
    renamed = [dict(CLASSES[0], name="fibres")] + CLASSES[1:]
    assert mrml_bridge.ensure_class_segments(segmentation, renamed) == ids
    assert seg.GetSegment(ids[0]).GetName() == "fibres"
    assert segment_tag(seg.GetSegment(ids[0]), mrml_bridge.CLASS_TAG) == "fibres"

    # A user segment that happens to be named like a class but is already tagged elsewhere is
    # not stolen; an untagged duplicate name is not adopted when the tagged one exists.
    seg.AddEmptySegment("dup", "cell")
    assert mrml_bridge.ensure_class_segments(segmentation, renamed) == ids


def test_ensure_class_segments_rejects_bad_classes(mrml_scene):
    segmentation = add_segmentation(mrml_scene, [])
    with pytest.raises(LabelError, match="repeat"):
        mrml_bridge.ensure_class_segments(segmentation, [{"name": "a"}, {"name": "a"}])
    with pytest.raises(LabelError, match="colour"):
        mrml_bridge.ensure_class_segments(segmentation, [{"name": "a", "color": [300, 0, 0]}])
    with pytest.raises(LabelError, match="no name"):
        mrml_bridge.ensure_class_segments(segmentation, [{"color": [1, 2, 3]}])
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


# --------------------------------------------------------------------------------------------
# Labels -> segments
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,directions", [
    ((1, 17, 23), None),
    ((6, 11, 9), rotation_with_flip(30.0)),
], ids=["2d-one-slice", "3d-rotated"])
def test_prediction_round_trip_is_exact(mrml_scene, shape, directions):
    volume = add_volume(mrml_scene, np.zeros(shape, np.int16), spacing=(0.8, 0.8, 6.5),
                        origin=(3.0, -2.0, 1.0), directions=directions)
    labels = np.random.default_rng(4).integers(0, len(CLASSES) + 1, size=shape).astype(np.uint8)
    before = node_counts(mrml_scene)

    node = mrml_bridge.create_prediction_segmentation(mrml_scene, labels, CLASSES, volume,
                                                      "SemSegLoop round 3")

    assert node.GetName() == "SemSegLoop round 3" and node.GetDisplayNode() is not None
    seg = node.GetSegmentation()
    ids = [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())]
    assert [seg.GetSegment(i).GetName() for i in ids] == [c["name"] for c in CLASSES]
    assert seg.GetSegment(ids[2]).GetColor() == pytest.approx([60 / 255, 60 / 255, 200 / 255])
    # Only the segmentation and its display node were added: no temporary leftovers.
    assert node_counts(mrml_scene) == (before[0] + 2, before[1])
    np.testing.assert_array_equal(mrml_bridge.segmentation_to_labels(node, ids, volume), labels)
    mrml_bridge.check_geometry_matches(node, volume)


def test_prediction_with_an_absent_class_has_an_empty_segment(mrml_scene):
    shape = (1, 4, 4)
    volume = add_volume(mrml_scene, np.zeros(shape, np.uint8))
    labels = np.ones(shape, np.uint8)
    labels[0, 0] = 3
    node = mrml_bridge.create_prediction_segmentation(mrml_scene, labels[0], CLASSES, volume)
    ids = mrml_bridge.ensure_class_segments(node, CLASSES)
    assert node.GetSegmentation().GetNumberOfSegments() == 3
    out = mrml_bridge.segmentation_to_labels(node, ids, volume)
    np.testing.assert_array_equal(out, labels)
    assert not (out == 2).any()


def test_labels_to_segmentation_replaces_listed_segments_only(mrml_scene):
    shape = (1, 5, 5)
    volume = add_volume(mrml_scene, np.zeros(shape, np.uint8))
    segmentation = add_segmentation(mrml_scene, [("a", "a"), ("b", "b"), ("keep", "keep")])
    paint(mrml_scene, segmentation, "a", volume, box_mask(shape, 0, 0, slice(None)))
    paint(mrml_scene, segmentation, "keep", volume, box_mask(shape, 0, 4, slice(None)))

    new = np.zeros(shape, np.uint8)
    new[0, 2, 1:3] = 2
    mrml_bridge.labels_to_segmentation(new, segmentation, ["a", "b"], volume)

    got = mrml_bridge.segmentation_to_labels(segmentation, ["a", "b", "keep"], volume)
    expected = new.copy()
    expected[0, 4, :] = 3
    np.testing.assert_array_equal(got, expected)  # old stroke of "a" is gone, "keep" untouched


def test_prediction_rejects_bad_labels_without_adding_nodes(mrml_scene):
    volume = add_volume(mrml_scene, np.zeros((2, 3, 4), np.uint8))
    before = node_counts(mrml_scene)
    with pytest.raises(LabelError, match=r"0\.\.3"):
        mrml_bridge.create_prediction_segmentation(mrml_scene, np.full((2, 3, 4), 4, np.uint8),
                                                   CLASSES, volume, "bad")
    with pytest.raises(LabelError, match="shape"):
        mrml_bridge.create_prediction_segmentation(mrml_scene, np.zeros((2, 4, 3), np.uint8),
                                                   CLASSES, volume, "bad")
    with pytest.raises(LabelError, match="integers"):
        mrml_bridge.create_prediction_segmentation(mrml_scene, np.zeros((2, 3, 4), np.float32),
                                                   CLASSES, volume, "bad")
    assert node_counts(mrml_scene) == before


# --------------------------------------------------------------------------------------------
# Corrections
# --------------------------------------------------------------------------------------------

def test_merge_corrections_never_touches_painted_voxels(mrml_scene):
    shape = (2, 6, 6)
    volume = add_volume(mrml_scene, np.zeros(shape, np.int16), spacing=(0.8, 0.8, 6.5))
    segmentation = add_segmentation(mrml_scene, [])
    ids = mrml_bridge.ensure_class_segments(segmentation, CLASSES)
    painted = np.zeros(shape, np.uint8)
    painted[0, 0, :] = 1
    painted[1, :, 0] = 3
    mrml_bridge.labels_to_segmentation(painted, segmentation, ids, volume)
    prediction = np.random.default_rng(5).integers(1, 4, size=shape).astype(np.uint8)

    mask = np.zeros(shape, bool)
    mask[:, :3, :] = True
    added = mrml_bridge.merge_corrections(segmentation, ids, volume, prediction, mask=mask,
                                          classes=[2, 3])

    merged = mrml_bridge.segmentation_to_labels(segmentation, ids, volume)
    painted_voxels = painted > 0
    np.testing.assert_array_equal(merged[painted_voxels], painted[painted_voxels])
    taken = ~painted_voxels & mask & np.isin(prediction, [2, 3])
    np.testing.assert_array_equal(merged[taken], prediction[taken])
    assert not merged[~painted_voxels & ~taken].any()  # outside mask / class 1: still unlabeled
    assert set(added) == {2, 3}
    assert added == {c: int((prediction[taken] == c).sum()) for c in (2, 3)}
    assert sum(added.values()) > 0


def test_merge_corrections_everywhere_and_nothing_to_add(mrml_scene):
    shape = (1, 4, 5)
    volume = add_volume(mrml_scene, np.zeros(shape, np.uint8))
    segmentation = add_segmentation(mrml_scene, [])
    ids = mrml_bridge.ensure_class_segments(segmentation, CLASSES)
    painted = np.zeros(shape, np.uint8)
    painted[0, 1, 1] = 2
    mrml_bridge.labels_to_segmentation(painted, segmentation, ids, volume)
    prediction = np.full(shape, 1, np.uint8)

    added = mrml_bridge.merge_corrections(segmentation, ids, volume, prediction)
    assert added == {1: 19, 2: 0, 3: 0}
    merged = mrml_bridge.segmentation_to_labels(segmentation, ids, volume)
    expected = prediction.copy()
    expected[0, 1, 1] = 2
    np.testing.assert_array_equal(merged, expected)

    assert mrml_bridge.merge_corrections(segmentation, ids, volume, prediction) == {1: 0, 2: 0, 3: 0}
    with pytest.raises(LabelError, match="outside 1..3"):
        mrml_bridge.merge_corrections(segmentation, ids, volume, prediction, classes=[4])
    with pytest.raises(LabelError, match="mask"):
        mrml_bridge.merge_corrections(segmentation, ids, volume, prediction,
                                      mask=np.ones((1, 5, 4), bool))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def test_missing_segment_and_missing_reference_are_named(mrml_scene):
    volume = add_volume(mrml_scene, np.zeros((1, 3, 3), np.uint8))
    segmentation = add_segmentation(mrml_scene, [("a", "a")], name="strokes")
    with pytest.raises(LabelError, match=r"segment 'gone'.*'strokes'"):
        mrml_bridge.segmentation_to_labels(segmentation, ["a", "gone"], volume)
    with pytest.raises(LabelError, match=r"'strokes'.*no reference volume"):
        mrml_bridge.segmentation_to_labels(segmentation, ["a"], None)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(LabelError, match="'empty'.*no voxels"):
        mrml_bridge.segmentation_to_labels(segmentation, ["a"], empty)
    with pytest.raises(LabelError, match="segment 'gone'"):
        mrml_bridge.labels_to_segmentation(np.zeros((1, 3, 3), np.uint8), segmentation, ["gone"], volume)
    with pytest.raises(LabelError, match="'strokes'.*0..1"):
        mrml_bridge.labels_to_segmentation(np.full((1, 3, 3), 2, np.uint8), segmentation, ["a"], volume)


def test_check_geometry_matches(mrml_scene):
    volume = add_volume(mrml_scene, np.zeros((1, 4, 6), np.uint8), name="slide")
    mrml_bridge.check_geometry_matches(np.zeros((1, 4, 6)), volume)
    mrml_bridge.check_geometry_matches(np.zeros((4, 6)), volume)  # squeezed 2D form
    mrml_bridge.check_geometry_matches((1, 4, 6), volume)
    with pytest.raises(LabelError, match="'slide'"):
        mrml_bridge.check_geometry_matches(np.zeros((1, 6, 4)), volume)

    segmentation = add_segmentation(mrml_scene, [("a", "a")], name="strokes")
    mrml_bridge.check_geometry_matches(segmentation, volume)  # no grid of its own yet
    other = add_volume(mrml_scene, np.zeros((1, 4, 6), np.uint8), spacing=(2.0, 2.0, 1.0), name="other")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(other)
    with pytest.raises(LabelError, match="'strokes'.*another voxel grid.*'slide'"):
        mrml_bridge.check_geometry_matches(segmentation, volume)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    mrml_bridge.check_geometry_matches(segmentation, volume)


def test_different_parent_transforms_are_refused(mrml_scene):
    shape = (1, 5, 6)
    volume = add_volume(mrml_scene, np.zeros(shape, np.uint8))
    segmentation, expected = paint_two_strokes(mrml_scene, volume, shape)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 2.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(LabelError, match="different parent transforms"):
        mrml_bridge.segmentation_to_labels(segmentation, ["seg_a", "seg_b"], volume)

    # Under one shared transform, labels are read and written in the volume's own frame.
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_array_equal(
        mrml_bridge.segmentation_to_labels(segmentation, ["seg_a", "seg_b"], volume), expected)
    prediction = mrml_bridge.create_prediction_segmentation(mrml_scene, expected, CLASSES[:2],
                                                            volume, "moved")
    assert prediction.GetTransformNodeID() == transform.GetID()
    ids = mrml_bridge.ensure_class_segments(prediction, CLASSES[:2])
    np.testing.assert_array_equal(mrml_bridge.segmentation_to_labels(prediction, ids, volume), expected)
