"""The web app's MRML side: one project image as a volume, its labels as a segmentation with one
segment per class, the round's prediction and uncertainty overlay. Main (trame) thread only.

Every MRML <-> array conversion goes through ``semsegloop.slicer.mrml_bridge``, so strokes saved
here are the same label maps the Slicer module and the CLI read and write.
"""

from __future__ import annotations

import numpy as np

from semsegloop.errors import LabelError
from semsegloop.slicer import mrml_bridge as bridge
from semsegloop.slicer.predictions import UNCERTAINTY_COLORS

PREDICTION_PREFIX = "SemSegLoop round"
UNCERTAINTY_SUFFIX = "uncertainty"
UNCERTAINTY_SHOWN_FROM = 0.2   # normalised entropy below this is not drawn


class ImageScene:
    """The nodes of the image on screen: volume, labels segmentation, prediction, uncertainty."""

    def __init__(self, scene, image, classes: list[dict], labels: np.ndarray | None = None):
        """``image``: the project's ImageData; ``labels``: its sparse labels (S, Y, X) or None."""
        self.scene = scene
        self.name = image.name
        self.volume = bridge.image_to_volume_node(scene, image, name=image.name)
        self.labels_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{image.name} labels")
        self.labels_node.CreateDefaultDisplayNodes()
        self.labels_node.SetReferenceImageGeometryParameterFromVolumeNode(self.volume)
        self.classes = [dict(c) for c in classes]
        self.segment_ids = bridge.ensure_class_segments(self.labels_node, self.classes)
        if labels is not None and np.any(labels):
            bridge.labels_to_segmentation(labels, self.labels_node, self.segment_ids, self.volume)
        self.prediction_node = None
        self.prediction_ids: list[str] = []
        self.prediction_round = 0
        self.prediction_refined = False
        self.uncertainty_node = None

    # ------------------------------------------------------------------ labels
    def labels(self) -> np.ndarray:
        """The painted labels now on screen, (S, Y, X) uint8, 0 = unlabeled."""
        return bridge.segmentation_to_labels(self.labels_node, self.segment_ids, self.volume)

    def set_labels(self, labels: np.ndarray) -> None:
        bridge.labels_to_segmentation(labels, self.labels_node, self.segment_ids, self.volume)

    def set_classes(self, classes: list[dict]) -> None:
        """Rename / recolour / append classes on the labels (and prediction) segments."""
        self.classes = [dict(c) for c in classes]
        self.segment_ids = bridge.ensure_class_segments(self.labels_node, self.classes)
        if self.prediction_node is not None:
            self.prediction_ids = bridge.ensure_class_segments(self.prediction_node, self.classes)

    # ------------------------------------------------------------------ prediction
    def show_prediction(self, labels: np.ndarray, round_index: int,
                        uncertainty: np.ndarray | None = None, refined: bool = False) -> None:
        """Replace the shown prediction by ``labels`` (S, Y, X) 1..K as "SemSegLoop round N"
        (``refined``: Refine's output, which has no uncertainty map)."""
        self.remove_prediction()
        self.prediction_refined = refined
        node = bridge.create_prediction_segmentation(
            self.scene, labels, self.classes, self.volume, name=f"{PREDICTION_PREFIX} {round_index}")
        display = node.GetDisplayNode()
        # Strokes stay readable on top: the prediction is a fill without outline emphasis.
        display.SetOpacity2DFill(0.45)
        display.SetOpacity2DOutline(0.6)
        self.prediction_node = node
        self.prediction_ids = bridge.ensure_class_segments(node, self.classes)
        self.prediction_round = round_index
        if uncertainty is not None:
            self.set_uncertainty(uncertainty)

    def set_uncertainty(self, uncertainty: np.ndarray) -> None:
        """Show ``uncertainty`` (S, Y, X) in [0, 1] beside the prediction (which is kept as it
        is on screen, edits included)."""
        if self.uncertainty_node is not None and self.uncertainty_node.GetScene() is self.scene:
            self.scene.RemoveNode(self.uncertainty_node)
        self.uncertainty_node = bridge.array_to_volume(
            self.scene, np.asarray(uncertainty, np.float32), self.volume,
            f"{self.name} {UNCERTAINTY_SUFFIX} round {self.prediction_round}")
        unc_display = self.uncertainty_node.GetDisplayNode()
        if unc_display is None:
            self.uncertainty_node.CreateDefaultDisplayNodes()
            unc_display = self.uncertainty_node.GetDisplayNode()
        if self.scene.GetNodeByID(UNCERTAINTY_COLORS) is not None:   # as in the Slicer module
            unc_display.SetAndObserveColorNodeID(UNCERTAINTY_COLORS)
        unc_display.AutoWindowLevelOff()
        unc_display.SetWindowLevelMinMax(0.0, 1.0)
        # Confident pixels are left out of the overlay (transparent in the slice views, as
        # Slicer's volume threshold does), so the image stays readable under it.
        unc_display.AutoThresholdOff()
        unc_display.SetApplyThreshold(True)
        unc_display.SetLowerThreshold(UNCERTAINTY_SHOWN_FROM)
        unc_display.SetUpperThreshold(1.0)

    def prediction_labels(self) -> np.ndarray | None:
        """The prediction as it is now on screen (the person may have erased parts of it)."""
        if self.prediction_node is None:
            return None
        return bridge.segmentation_to_labels(self.prediction_node, self.prediction_ids, self.volume)

    def copy_prediction_into_labels(self, only_classes: list[int] | None = None) -> dict[int, int]:
        """Copy the shown prediction into the labels wherever nothing is painted.

        Returns {class value: pixels added}. Strokes are never overwritten (mrml_bridge's
        merge_corrections takes only unlabeled pixels).
        """
        prediction = self.prediction_labels()
        if prediction is None:
            raise LabelError("no prediction is shown for this image: press Predict first")
        return bridge.merge_corrections(self.labels_node, self.segment_ids, self.volume, prediction,
                                        classes=only_classes)

    def remove_prediction(self) -> None:
        for node in (self.prediction_node, self.uncertainty_node):
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
        self.prediction_node, self.prediction_ids, self.uncertainty_node = None, [], None

    def remove(self) -> None:
        """Take every node of this image out of the scene (switching images)."""
        self.remove_prediction()
        for node in (self.labels_node, self.volume):
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
