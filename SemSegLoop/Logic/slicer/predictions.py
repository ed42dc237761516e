"""Predictions into the scene: the "SemSegLoop round N" segmentation with the class names and
colours, the uncertainty overlay, and the first image volume a panel may paint on.

An earlier segmentation of the same name is never replaced (the person may have edited it): the
new one gets the next free name. Main thread only; tested on slicer-core.
"""

from __future__ import annotations

from typing import Sequence

from semsegloop.slicer import mrml_bridge

IMAGE_VOLUME_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode")
UNCERTAINTY_COLORS = "vtkMRMLColorTableNodeRainbow"


def free_name(scene, name: str) -> str:
    """``name`` if no node has it, else "name (2)", "name (3)", ..."""
    if scene.GetFirstNodeByName(name) is None:
        return name
    n = 2
    while scene.GetFirstNodeByName(f"{name} ({n})") is not None:
        n += 1
    return f"{name} ({n})"


def import_prediction(scene, labels, classes: Sequence[dict], volume, name: str,
                      fill_opacity: float = 0.3):
    """A new segmentation showing ``labels`` (S, Y, X) on ``volume``'s grid, named ``name`` or,
    when that name is taken, the next free variant; earlier ones are kept as they are."""
    node = mrml_bridge.create_prediction_segmentation(scene, labels, classes, volume,
                                                      free_name(scene, name))
    node.GetDisplayNode().SetOpacity2DFill(fill_opacity)
    return node


def import_uncertainty(scene, entropy, volume, name: str):
    """The uncertainty map (0 = sure, 1 = undecided) as a volume on ``volume``'s grid, shown
    with a rainbow colour table over the fixed range 0..1 (when the scene has that table)."""
    node = mrml_bridge.array_to_volume(scene, entropy, volume, free_name(scene, name))
    display = node.GetDisplayNode()
    if scene.GetNodeByID(UNCERTAINTY_COLORS) is not None:
        display.SetAndObserveColorNodeID(UNCERTAINTY_COLORS)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    return node


def first_image_volume(scene):
    """The first scalar or RGB volume of the scene, never a label map or another subclass
    (GetFirstNodeByClass("vtkMRMLScalarVolumeNode") also returns label maps)."""
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetClassName() in IMAGE_VOLUME_CLASSES:
            return node
    return None
