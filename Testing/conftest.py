"""Shared pytest fixtures: a real MRML scene from the slicer-core wheel, set up the way the
Slicer application sets up its own scene, so MRML code is tested without mocks or the app."""

from __future__ import annotations

import pytest


@pytest.fixture
def mrml_scene():
    """A fresh ``slicer.vtkMRMLScene`` with a Segmentations module logic registered on it.

    The logic (``vtkSlicerSegmentationsModuleLogic`` + ``SetMRMLScene(scene)``) is what lets
    segments hold binary label maps; it is made through ``semsegloop.slicer.mrml_bridge.
    segmentations_logic`` so the bridge and the tests share one logic per scene, as in the app.
    The colour logic adds Slicer's default colour tables ("Labels", "Grey", ...), without which
    every label map display node logs a missing-colour-table warning. Skipped without slicer-core.
    """
    slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")
    from semsegloop.slicer import mrml_bridge

    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    logic = mrml_bridge.segmentations_logic(scene)
    assert isinstance(logic, slicer.vtkSlicerSegmentationsModuleLogic)
    assert logic.GetMRMLScene() is scene
    yield scene
    # Unregistering breaks the logic <-> scene reference cycle, which Python's GC cannot see.
    logic.SetMRMLScene(None)
    colors.SetMRMLScene(None)
    scene.Clear(True)
