"""The web app's MRML side on the real slicer-core MRML: a project image and its labels in a
scene, strokes read back unchanged, prediction segments with the class colours, copy without
overwriting strokes; and the trame-slicer pipeline re-binding workaround."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")

from semsegloop.apps.web.scene import ImageScene  # noqa: E402
from semsegloop.data.imageio import as_image_data  # noqa: E402
from semsegloop.slicer import mrml_bridge  # noqa: E402

CLASSES = [{"name": "disk", "color": [230, 159, 0]}, {"name": "background", "color": [86, 180, 233]}]


def _image():
    rng = np.random.default_rng(1)
    return as_image_data(rng.integers(0, 255, (40, 50)).astype(np.uint8), name="tile")


def test_labels_round_trip_and_prediction_copy(mrml_scene):
    labels = np.zeros((1, 40, 50), np.uint8)
    labels[0, 5:8, 5:30] = 1
    labels[0, 30:33, 10:40] = 2
    sc = ImageScene(mrml_scene, _image(), CLASSES, labels)
    assert sc.labels_node.GetName() == "tile labels"
    np.testing.assert_array_equal(sc.labels(), labels)

    prediction = np.full((1, 40, 50), 2, np.uint8)
    prediction[0, :20] = 1                        # wrong on rows 8..19 of the left part
    unc = np.linspace(0, 1, 2000, dtype=np.float32).reshape(1, 40, 50)
    sc.show_prediction(prediction, 1, unc)
    node = sc.prediction_node
    assert node.GetName() == "SemSegLoop round 1"
    seg = node.GetSegmentation()
    colors = [seg.GetSegment(s).GetColor() for s in sc.prediction_ids]
    assert np.allclose(colors[0], np.array(CLASSES[0]["color"]) / 255)
    assert sc.uncertainty_node is not None and sc.uncertainty_node.GetImageData() is not None

    # Erase the wrong part of the prediction (rows 10..19) as the person would, then copy.
    edited = sc.prediction_labels()
    edited[0, 10:20] = 0
    mrml_bridge.labels_to_segmentation(edited, node, sc.prediction_ids, sc.volume)
    added = sc.copy_prediction_into_labels()
    after = sc.labels()
    assert np.array_equal(after[labels > 0], labels[labels > 0]), "strokes were overwritten"
    assert (after[0, 10:20] == 0).all(), "an erased region was copied"
    assert (after[0, 20:30] == 2).all() and (after[0, :5] == 1).all()
    assert added[1] == int(((after == 1) & (labels == 0)).sum()) > 0

    sc.set_classes([{"name": "nucleus", "color": [1, 2, 3]}, CLASSES[1],
                    {"name": "fibre", "color": [9, 9, 9]}])
    seg = sc.labels_node.GetSegmentation()
    assert [seg.GetSegment(s).GetName() for s in sc.segment_ids] == ["nucleus", "background", "fibre"]
    np.testing.assert_array_equal(sc.labels(), after)   # renaming keeps what is painted
    sc.remove()
    assert mrml_scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_rebind_gives_late_views_a_working_paint_pipeline():
    """Paint active before the view exists: trame-slicer leaves the pipeline without a view
    (so without a widget and strokes never land) until rebind_effect_pipelines."""
    pytest.importorskip("trame_slicer", reason="the [web] extra (trame-slicer) is not installed")
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from trame_slicer.core import SlicerApp
    from trame_slicer.segmentation import SegmentationEffectPaint
    from trame_slicer.views import ViewLayoutDefinition
    from trame_slicer.views.direct_view_factory import DirectViewFactory

    from semsegloop.apps.web.rebind import rebind_effect_pipelines

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    sc = ImageScene(app.scene, _image(), CLASSES)
    editor = app.segmentation_editor
    editor.set_active_segmentation(sc.labels_node, sc.volume)
    effect = editor.set_active_effect_type(SegmentationEffectPaint)
    app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    pipelines = [r() for r in effect.pipelines if r() is not None]
    assert pipelines and all(p._view is None and p.widget is None for p in pipelines), \
        "trame-slicer now binds the view itself: drop rebind.py"
    assert rebind_effect_pipelines(editor, app.view_manager) == len(pipelines)
    widget = pipelines[0].widget
    assert widget is not None
    bounds = [0.0] * 6
    sc.volume.GetRASBounds(bounds)
    centre = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
    widget.start_painting()
    widget.update_widget_position(centre)
    widget.stop_painting()
    painted = sc.labels()
    assert (painted == 1).sum() > 20 and not (painted == 2).any()
    assert rebind_effect_pipelines(editor, app.view_manager) == 0
