"""The loss curve and result tables as MRML nodes: a table + plot series + chart that grows while
a round trains, table nodes from rows (class fractions, comparison), and which table is shown.

``vtk`` and ``slicer`` are imported inside the functions (the engine imports without Slicer);
everything here runs on Slicer's main thread, and on slicer-core in the tests.
"""

from __future__ import annotations

import math
from typing import Sequence

LOSS_TABLE = "SemSegLoop training loss"
LOSS_CHART = "SemSegLoop training"
COLUMNS = ("step", "round", "loss", "validation Dice")


class LossPlot:
    """The "SemSegLoop training" chart of one scene: loss (and validation Dice, once reference
    labels give one) against the step counted over all rounds, so rounds follow each other."""

    def __init__(self, scene):
        import vtk

        self.scene = scene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", LOSS_TABLE)
        for name in COLUMNS:
            column = vtk.vtkDoubleArray()
            column.SetName(name)
            self.table.AddColumn(column)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", LOSS_CHART)
        self._add_series("loss", (0.9, 0.4, 0.0))
        self.chart.SetTitle(LOSS_CHART)
        self.chart.SetXAxisTitle("step (all rounds)")
        self.chart.SetYAxisTitle("loss / Dice")
        self.step_offset = 0

    @property
    def alive(self) -> bool:
        """False once its scene was closed or its nodes removed."""
        return self.table.GetScene() is self.scene and self.chart.GetScene() is self.scene

    def _add_series(self, column: str, color) -> None:
        import slicer

        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"SemSegLoop {column}")
        series.SetAndObserveTableNodeID(self.table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName(column)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetColor(*color)
        self.chart.AddAndObservePlotSeriesNodeID(series.GetID())

    def last_step(self) -> int:
        table = self.table.GetTable()
        rows = table.GetNumberOfRows()
        return int(table.GetValueByName(rows - 1, "step").ToDouble()) if rows else 0

    def start_round(self) -> None:
        """The next round's steps continue after the last plotted one."""
        self.step_offset = self.last_step()

    def add(self, progress) -> bool:
        """One point per training step (a TrainProgress); other phases add nothing."""
        if progress.phase != "train" or progress.loss is None or not math.isfinite(progress.loss):
            return False
        dice = progress.val_dice
        if dice and self.chart.GetNumberOfPlotSeriesNodes() < 2:
            # Only once Dice exists: an all-NaN series has no bounds and upsets the chart.
            self._add_series("validation Dice", (0.0, 0.45, 0.7))
        values = {"step": self.step_offset + progress.step, "round": progress.round,
                  "loss": progress.loss,
                  "validation Dice": sum(dice.values()) / len(dice) if dice else math.nan}
        table = self.table.GetTable()
        for name, value in values.items():
            table.GetColumnByName(name).InsertNextValue(float(value))
        table.Modified()
        self.table.Modified()
        return True


def table_from_rows(scene, name: str, rows: Sequence[dict]):
    """A table node with one column per key of the rows (numbers as doubles, the rest text)."""
    import vtk

    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    if not rows:
        return table
    for key in rows[0]:
        numeric = all(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
                      or row.get(key) is None for row in rows)
        column = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        column.SetName(key)
        for row in rows:
            value = row.get(key)
            if numeric:
                column.InsertNextValue(math.nan if value is None else float(value))
            else:
                column.InsertNextValue("" if value is None else str(value))
        table.AddColumn(column)
    return table


def select_table(scene, table_node) -> bool:
    """Make ``table_node`` the scene's active table (what the table view shows); False when the
    scene has no selection node (a bare scene outside the application)."""
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    if selection is None:
        return False
    selection.SetActiveTableID(table_node.GetID())
    return True
