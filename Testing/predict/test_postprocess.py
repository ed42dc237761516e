"""Post-processing options, each on a constructed label map (2D and 3D, spacing-aware), painted
strokes untouched, settings checked and stored in the project and applied when predicting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_engine import copy_project, make_square_project, tiny_models  # noqa: F401
from semsegloop.errors import ProjectError
from semsegloop.predict.postprocess import postprocess_labels, validate_settings


def scene_2d():
    """Background 1; class 2: a 20x20 square with a 4x4 hole, a 3x3 island and a 6x6 island."""
    lab = np.ones((1, 60, 60), np.uint8)
    lab[0, 10:30, 10:30] = 2
    lab[0, 18:22, 18:22] = 1          # hole
    lab[0, 40:43, 40:43] = 2          # small island (9 px)
    lab[0, 45:51, 5:11] = 2           # larger island (36 px)
    return lab


def test_largest_component_keeps_only_the_square():
    out = postprocess_labels(scene_2d(), {"2": {"largest_component": True}}, (1, 1, 1), 2)
    assert (out[0, 40:43, 40:43] == 1).all() and (out[0, 45:51, 5:11] == 1).all()
    assert (out[0, 10:18, 10:30] == 2).all()
    assert (out[0, 18:22, 18:22] == 1).all()          # holes are not this option's business


def test_min_size_is_physical_area_so_spacing_changes_what_counts_as_small():
    lab = scene_2d()
    out = postprocess_labels(lab, {"2": {"min_size": 20.0}}, (1, 1, 1), 2)    # mm^2
    assert (out[0, 40:43, 40:43] == 1).all() and (out[0, 45:51, 5:11] == 2).all()
    # At 0.5 mm pixels the 36-pixel island is 9 mm^2: now it goes too; the square stays.
    out = postprocess_labels(lab, {"2": {"min_size": 20.0}}, (1, 0.5, 0.5), 2)
    assert (out[0, 45:51, 5:11] == 1).all() and (out[0, 10:18, 10:30] == 2).all()


def test_fill_holes_fills_only_what_the_class_encloses():
    out = postprocess_labels(scene_2d(), {"2": {"fill_holes": True}}, (1, 1, 1), 2)
    assert (out[0, 10:30, 10:30] == 2).all()
    assert (out[0, 0, :] == 1).all() and (out[0, 35:39, :] == 1).all()


def test_closing_and_median_smooth_a_notched_edge():
    lab = np.ones((1, 40, 40), np.uint8)
    lab[0, 10:30, 10:30] = 2
    lab[0, 10:30, 19] = 1             # a one-pixel slit
    lab[0, 5, 5] = 2                  # a lone pixel
    closed = postprocess_labels(lab, {"2": {"smoothing": "closing", "smoothing_mm": 1.5}},
                                (1, 1, 1), 2)
    assert (closed[0, 11:29, 19] == 2).all()
    median = postprocess_labels(lab, {"2": {"smoothing": "median", "smoothing_mm": 1.5}},
                                (1, 1, 1), 2)
    assert median[0, 5, 5] == 1 and (median[0, 12:28, 12:18] == 2).all()


def test_3d_components_are_3d_and_sizes_are_volumes():
    lab = np.ones((10, 20, 20), np.uint8)
    lab[2:8, 5:15, 5:15] = 2          # 600 voxels
    lab[0, 0:2, 0:2] = 2              # 4 voxels on another slice
    out = postprocess_labels(lab, {"2": {"min_size": 10.0}}, (2.0, 1.0, 1.0), 3)   # 4 vox = 8 mm^3
    assert (out[0, 0:2, 0:2] == 1).all() and (out[2:8, 5:15, 5:15] == 2).all()
    # In a 2D stack each slice is its own image: the hole in slice 4 is filled in-plane.
    lab[4, 9:11, 9:11] = 1
    out = postprocess_labels(lab, {"2": {"fill_holes": True}}, (2.0, 1.0, 1.0), 2)
    assert (out[4, 9:11, 9:11] == 2).all()


def test_painted_strokes_are_never_changed_and_keep_their_component():
    lab = scene_2d()
    strokes = np.zeros_like(lab)
    strokes[0, 41, 41] = 2            # the person painted the small island
    strokes[0, 19, 19] = 1            # and the hole
    out = postprocess_labels(lab, {"2": {"largest_component": True, "fill_holes": True}},
                             (1, 1, 1), 2, strokes=strokes)
    assert (out[0, 40:43, 40:43] == 2).all()          # kept: it holds a stroke of its class
    assert out[0, 19, 19] == 1 and out[0, 20, 20] == 2
    assert (out[0, 45:51, 5:11] == 1).all()


def test_settings_are_checked_with_messages_naming_the_class_and_option():
    assert validate_settings({"nucleus": {"fill_holes": True}}, 2, ["bg", "nucleus"]) == \
        {"2": {"fill_holes": True}}
    assert validate_settings({"1": {"fill_holes": False}}, 2) == {}
    for bad, msg in [({"3": {"fill_holes": True}}, "outside 1..2"),
                     ({"cell": {"fill_holes": True}}, "neither a class name"),
                     ({"1": {"dilate": 2}}, "unknown option 'dilate'"),
                     ({"1": {"min_size": -1}}, "must be >= 0"),
                     ({"1": {"smoothing": "gauss", "smoothing_mm": 1}}, "smoothing must be one of"),
                     ({"1": {"smoothing": "median"}}, "needs smoothing_mm")]:
        with pytest.raises(ProjectError, match=msg):
            validate_settings(bad, 2, ["bg", "nucleus"])


def test_project_stores_settings_and_applies_them_when_predicting(tmp_path, tiny_models):
    proj, image_id, ref = make_square_project(tmp_path / "p")
    proj.train(steps=30, device="cpu", seed=0)
    raw = proj.predict(image_id, device="cpu", postprocess=False).reshape(ref.shape)
    proj.set_postprocessing({"square": {"largest_component": True, "fill_holes": True}})
    stored = json.loads((tmp_path / "p" / "project.json").read_text())["postprocessing"]
    assert stored == {"1": {"largest_component": True, "fill_holes": True}}
    proj.close()
    reopened = copy_project(tmp_path / "p", tmp_path / "q")
    assert reopened.postprocessing == stored
    cleaned = reopened.predict(image_id, device="cpu").reshape(ref.shape)
    expected = postprocess_labels(raw, stored, reopened.geometry(image_id).spacing, 2,
                                  strokes=reopened.labels(image_id).reshape(ref.shape))
    np.testing.assert_array_equal(cleaned, expected)
    np.testing.assert_array_equal(reopened.saved_prediction(image_id).reshape(ref.shape), cleaned)
