"""The loss chart, result tables and imported predictions on a real MRML scene (slicer-core):
the curve grows per step across rounds, tables keep numbers as numbers, a new prediction never
replaces one the person may have edited, and the default image is never a label map."""

from __future__ import annotations

import math

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")

from semsegloop.learn.training import TrainProgress  # noqa: E402
from semsegloop.slicer import mrml_bridge, plots, predictions  # noqa: E402

CLASSES = [{"name": "cell", "color": [230, 159, 0]}, {"name": "background", "color": [86, 180, 233]}]


def _volume(scene, shape=(1, 16, 16), node_class="vtkMRMLScalarVolumeNode", name="image"):
    node = scene.AddNewNodeByClass(node_class, name)
    slicer.util.updateVolumeFromArray(node, np.zeros(shape, np.float32))
    node.CreateDefaultDisplayNodes()
    return node


def _progress(step, loss, round=1, phase="train", val_dice=None):
    return TrainProgress(round=round, step=step, total_steps=None, elapsed_s=step * 0.1, eta_s=1.0,
                         loss=loss, throughput=10.0, val_dice=val_dice, phase=phase)


def _column(table_node, name):
    table = table_node.GetTable()
    col = table.GetColumnByName(name)
    return [col.GetValue(i) for i in range(table.GetNumberOfRows())]


def test_the_loss_curve_grows_per_step_and_the_next_round_continues_after_it(mrml_scene):
    plot = plots.LossPlot(mrml_scene)
    assert plot.alive and plot.chart.GetNumberOfPlotSeriesNodes() == 1
    for step, loss in ((1, 0.9), (2, 0.7), (3, 0.6)):
        assert plot.add(_progress(step, loss))
    assert not plot.add(_progress(3, 0.6, phase="done"))      # the round's end adds no point
    assert not plot.add(_progress(0, math.nan, phase="prepare"))
    plot.start_round()
    plot.add(_progress(1, 0.5, round=2, val_dice={"cell": 0.8, "background": 0.6}))
    assert _column(plot.table, "step") == [1, 2, 3, 4]
    assert _column(plot.table, "round") == [1, 1, 1, 2]
    assert _column(plot.table, "loss") == pytest.approx([0.9, 0.7, 0.6, 0.5])
    dice = _column(plot.table, "validation Dice")
    assert all(math.isnan(v) for v in dice[:3]) and dice[3] == pytest.approx(0.7)
    assert plot.chart.GetNumberOfPlotSeriesNodes() == 2       # Dice joins once it exists
    series = plot.chart.GetNthPlotSeriesNode(0)
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("step", "loss")
    assert series.GetTableNodeID() == plot.table.GetID()
    mrml_scene.RemoveNode(plot.table)
    assert not plot.alive                                     # a new one is made then


def test_tables_keep_numbers_as_numbers_and_become_the_active_table(mrml_scene):
    rows = [{"image": "a", "class": "cell", "pixels": 10, "fraction": 0.25, "hd95_mm": None},
            {"image": "b", "class": "cell", "pixels": 3, "fraction": 0.5, "hd95_mm": 1.5}]
    table = plots.table_from_rows(mrml_scene, "SemSegLoop class fractions", rows)
    vt = table.GetTable()
    assert vt.GetNumberOfRows() == 2 and vt.GetNumberOfColumns() == 5
    assert vt.GetColumnByName("pixels").IsNumeric() and not vt.GetColumnByName("image").IsNumeric()
    assert _column(table, "fraction") == [0.25, 0.5]
    assert math.isnan(_column(table, "hd95_mm")[0])
    assert plots.table_from_rows(mrml_scene, "empty", []).GetTable().GetNumberOfColumns() == 0
    assert not plots.select_table(slicer.vtkMRMLScene(), table)   # a bare scene has no selection
    selection = mrml_scene.AddNewNodeByClass("vtkMRMLSelectionNode")
    assert plots.select_table(mrml_scene, table)
    assert selection.GetActiveTableID() == table.GetID()


def test_predicting_a_round_again_keeps_the_segmentation_the_person_edited(mrml_scene):
    volume = _volume(mrml_scene)
    labels = np.ones((1, 16, 16), np.uint8)
    labels[0, :, 8:] = 2
    first = predictions.import_prediction(mrml_scene, labels, CLASSES, volume, "SemSegLoop round 1")
    # The person erases part of "cell" in the prediction ...
    cell = first.GetSegmentation().GetSegmentIdBySegmentName("cell")
    edited = mrml_bridge.segmentation_to_labels(first, [cell], volume)
    edited[0, :4] = 0
    mrml_bridge.labels_to_segmentation(edited, first, [cell], volume)
    # ... then predicts the same round again.
    second = predictions.import_prediction(mrml_scene, labels, CLASSES, volume, "SemSegLoop round 1")
    third = predictions.import_prediction(mrml_scene, labels, CLASSES, volume, "SemSegLoop round 1")
    assert first.GetScene() is mrml_scene and first.GetName() == "SemSegLoop round 1"
    assert (second.GetName(), third.GetName()) == ("SemSegLoop round 1 (2)", "SemSegLoop round 1 (3)")
    kept = mrml_bridge.segmentation_to_labels(first, [cell], volume)
    assert int(kept.sum()) == 12 * 8                           # the edit survived
    ids = mrml_bridge.ensure_class_segments(second, CLASSES)
    np.testing.assert_array_equal(mrml_bridge.segmentation_to_labels(second, ids, volume), labels)
    assert second.GetDisplayNode().GetOpacity2DFill() == pytest.approx(0.3)


def test_uncertainty_is_a_volume_on_the_image_grid_shown_over_0_to_1(mrml_scene):
    volume = _volume(mrml_scene, (2, 8, 8))
    volume.SetSpacing(0.5, 0.5, 3.0)
    entropy = np.linspace(0, 1, 128, dtype=np.float32).reshape(2, 8, 8)
    node = predictions.import_uncertainty(mrml_scene, entropy, volume, "SemSegLoop uncertainty round 1 (image)")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), entropy)
    assert node.GetSpacing() == pytest.approx((0.5, 0.5, 3.0))
    display = node.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
    assert display.GetColorNodeID() == predictions.UNCERTAINTY_COLORS    # the colour logic adds it


def test_the_default_image_is_a_scalar_or_rgb_volume_never_a_label_map(mrml_scene):
    assert predictions.first_image_volume(mrml_scene) is None
    _volume(mrml_scene, node_class="vtkMRMLLabelMapVolumeNode", name="mask")
    rgb = mrml_scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    scalar = _volume(mrml_scene, name="ct")
    assert mrml_scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode").GetName() == "mask"  # the trap
    assert predictions.first_image_volume(mrml_scene) is rgb
    mrml_scene.RemoveNode(rgb)
    assert predictions.first_image_volume(mrml_scene) is scalar
