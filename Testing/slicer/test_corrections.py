"""The panel's Refine / post-processing / Suggest decisions, and the refined segmentation on a
real MRML scene (slicer-core): each Refine updates one node in place, never a new one per click."""

from __future__ import annotations

import numpy as np
import pytest

from semsegloop.slicer import corrections

CLASSES = [{"name": "cell", "color": [230, 159, 0]}, {"name": "background", "color": [86, 180, 233]}]


def test_refined_map_is_shown_in_one_segmentation_updated_by_each_refine(mrml_scene):
    slicer = pytest.importorskip("slicer")
    from semsegloop.slicer import mrml_bridge

    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "image")
    slicer.util.updateVolumeFromArray(volume, np.zeros((1, 16, 16), np.float32))
    volume.CreateDefaultDisplayNodes()
    name = corrections.refined_name(2)
    assert name == "SemSegLoop round 2 refined" and corrections.refined_name(2, "b") == f"{name} (b)"
    first = np.full((1, 16, 16), 2, np.uint8)
    first[0, 4:8, 4:8] = 1
    node = corrections.show_refined(mrml_scene, first, CLASSES, volume, name)
    second = first.copy()
    second[0, 10:14, 10:14] = 1
    again = corrections.show_refined(mrml_scene, second, CLASSES, volume, name)
    assert again is node
    assert mrml_scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1
    ids = mrml_bridge.ensure_class_segments(node, CLASSES)
    np.testing.assert_array_equal(mrml_bridge.segmentation_to_labels(node, ids, volume), second)


def test_postprocessing_form_round_trips_through_the_settings():
    settings = {"1": {"fill_holes": True, "min_size": 20.0}}
    form = corrections.postprocess_form(settings, 1)
    assert form == {"largest_component": False, "fill_holes": True, "min_size": 20.0,
                    "smoothing": "none", "smoothing_mm": 1.0}
    assert corrections.postprocess_form(settings, 2)["fill_holes"] is False
    form.update(largest_component=True, smoothing="median", smoothing_mm=1.5)
    new = corrections.postprocess_update(settings, [1, 2], form)
    assert new["1"] == new["2"] == {"largest_component": True, "fill_holes": True, "min_size": 20.0,
                                    "smoothing": "median", "smoothing_mm": 1.5}
    cleared = corrections.postprocess_update(new, [2], {"smoothing": "none"})
    assert "2" not in cleared and cleared["1"] == new["1"]
    assert settings == {"1": {"fill_holes": True, "min_size": 20.0}}       # input untouched
    text = corrections.postprocess_summary(new, ["cell", "background"])
    assert text.startswith("cell: largest piece, holes filled, islands < 20 removed, median 1.5 mm")
    assert corrections.postprocess_summary({}, ["cell"]) == "No post-processing."


def test_suggestions_read_as_places_and_focus_on_the_suggested_slice(mrml_scene):
    slicer = pytest.importorskip("slicer")
    s = {"image_id": "vol", "slice": 4, "score": 0.4567}
    assert corrections.suggestion_text(s, "CT", 3) == "CT, slice 5  (uncertainty 0.46)"
    assert corrections.suggestion_text({**s, "slice": None}, "tile", 2) == "tile  (uncertainty 0.46)"
    assert corrections.suggestion_focus_ijk(s, (10, 20, 30)) == (14.5, 9.5, 4.0)
    assert corrections.suggestion_focus_ijk({**s, "slice": None}, (10, 20, 30))[2] == 4.5
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(volume, np.zeros((10, 20, 30), np.float32))
    volume.SetSpacing(0.5, 0.5, 3.0)
    volume.SetOrigin(10.0, 0.0, -5.0)
    ras = corrections.ijk_to_ras(volume, (0, 0, 4))
    assert ras[2] == pytest.approx(-5.0 + 4 * 3.0) and ras[0] == pytest.approx(10.0)


def test_clicking_a_suggestion_centres_the_slice_views_on_its_slice(mrml_scene):
    slicer = pytest.importorskip("slicer")
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(volume, np.zeros((10, 20, 30), np.float32))
    volume.SetSpacing(0.5, 0.5, 3.0)
    red = mrml_scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    red.SetOrientationToAxial()
    ras = corrections.jump_to_suggestion(mrml_scene, volume, {"image_id": "CT", "slice": 7,
                                                              "score": 0.5}, (10, 20, 30))
    m = red.GetSliceToRAS()
    assert m.GetElement(2, 3) == pytest.approx(ras[2]) == pytest.approx(7 * 3.0)
