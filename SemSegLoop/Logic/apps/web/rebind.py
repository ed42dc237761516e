"""Workaround for trame-slicer 2.0.0: Segment Editor effect pipelines created while their view is
still being built have no view, so Paint/Erase strokes never reach the labels.

Upstream (trame-slicer 2.0.0, read-only):
- ``trame_slicer/core/segmentation_editor.py``, ``SegmentationEditor._try_create_effect_pipeline``
  calls ``pipeline.SetView(self._view_manager.get_view(view_node))``;
- ``trame_slicer/core/view_manager.py``, ``ViewManager.create_view`` returns the view only after
  the factory has built it, and the layer displayable manager asks for the pipelines *during* that
  build, so ``get_view()`` is still None then;
- ``trame_slicer/segmentation/segmentation_paint_pipeline.py``, ``SegmentationPaintPipeline.
  CreateWidget`` then builds no widget (``isinstance(None, SliceView)`` is False) and ``SetActive``
  raises ``AttributeError: 'NoneType' object has no attribute 'paint_interaction_stopped'``.

The fix belongs upstream (bind the view when the factory registers it, or look it up lazily in
``SegmentationEffectPipeline``); until then ``rebind_effect_pipelines`` is called after the layout
is built and after each layout change.
"""

from __future__ import annotations


def rebind_effect_pipelines(segmentation_editor, view_manager) -> int:
    """Give every effect pipeline without a view the view of its view node.

    Reads the editor's effects (``SegmentationEditor._effects``) and each effect's pipelines
    (``SegmentationEffect.pipelines``, weak references). Returns how many were re-bound.
    """
    fixed = 0
    for effect in list(getattr(segmentation_editor, "_effects", {}).values()):
        for ref in list(effect.pipelines):
            pipeline = ref()
            if pipeline is None or getattr(pipeline, "_view", None) is not None:
                continue
            view_node = pipeline.GetViewNode()
            view = view_manager.get_view(view_node) if view_node is not None else None
            if view is None:
                continue
            pipeline.SetView(view)
            fixed += 1
            if effect.is_active and getattr(pipeline, "widget", True) is None:
                # Activated without a view, so without a widget; SetActive(False) would touch
                # the missing widget (LoseFocus), so clear the flag and activate again.
                pipeline._isActive = False
                pipeline.SetActive(True)
    return fixed
