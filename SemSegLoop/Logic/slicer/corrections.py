"""The panel's Refine, post-processing and Suggest decisions as plain functions, plus the one
scene step they need (show a refined map in place); the widget only wires them to buttons.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SMOOTHING_CHOICES = [("none", "No smoothing"), ("closing", "Closing (fills notches)"),
                     ("median", "Median (removes specks)")]


def refined_name(round_index: int, image_name: str | None = None) -> str:
    """The segmentation a Refine shows: one per image and round, updated by each Refine."""
    base = f"SemSegLoop round {round_index} refined"
    return f"{base} ({image_name})" if image_name else base


def show_refined(scene, labels, classes: Sequence[dict], volume, name: str):
    """The refined map in the segmentation ``name``: updated in place when it exists (each click
    replaces the last refinement), created like a prediction otherwise. Main thread only."""
    from semsegloop.slicer import mrml_bridge, predictions

    node = scene.GetFirstNodeByName(name)
    if node is None or not node.IsA("vtkMRMLSegmentationNode"):
        return predictions.import_prediction(scene, labels, classes, volume, name)
    ids = mrml_bridge.ensure_class_segments(node, classes)
    mrml_bridge.labels_to_segmentation(labels, node, ids, volume)
    return node


def postprocess_form(settings: dict, class_value: int) -> dict:
    """What the post-processing widgets show for class ``class_value`` (1..K)."""
    opts = settings.get(str(class_value), {})
    return {"largest_component": bool(opts.get("largest_component", False)),
            "fill_holes": bool(opts.get("fill_holes", False)),
            "min_size": float(opts.get("min_size", 0.0)),
            "smoothing": str(opts.get("smoothing", "none")),
            "smoothing_mm": float(opts.get("smoothing_mm", 1.0))}


def postprocess_update(settings: dict, class_values: Sequence[int], form: dict) -> dict:
    """The project's settings with the form applied to ``class_values`` (the others kept)."""
    out = {k: dict(v) for k, v in settings.items()}
    for k in class_values:
        opts = {}
        if form.get("largest_component"):
            opts["largest_component"] = True
        if form.get("fill_holes"):
            opts["fill_holes"] = True
        if float(form.get("min_size") or 0) > 0:
            opts["min_size"] = float(form["min_size"])
        if form.get("smoothing", "none") != "none":
            opts["smoothing"] = form["smoothing"]
            opts["smoothing_mm"] = float(form.get("smoothing_mm") or 0)
        if opts:
            out[str(k)] = opts
        else:
            out.pop(str(k), None)
    return out


def postprocess_summary(settings: dict, class_names: Sequence[str]) -> str:
    """One line per class with post-processing, for the panel's status label."""
    if not settings:
        return "No post-processing."
    parts = []
    for key in sorted(settings, key=int):
        o = settings[key]
        what = [w for w, on in (("largest piece", o.get("largest_component")),
                                ("holes filled", o.get("fill_holes"))) if on]
        if o.get("min_size"):
            what.append(f"islands < {o['min_size']:g} removed")
        if o.get("smoothing", "none") != "none":
            what.append(f"{o['smoothing']} {o.get('smoothing_mm', 0):g} mm")
        name = class_names[int(key) - 1] if int(key) <= len(class_names) else key
        parts.append(f"{name}: {', '.join(what)}")
    return "; ".join(parts)


def suggestion_text(suggestion: dict, image_name: str, dims: int) -> str:
    """A Suggest list row: where, and how unsure the model is there."""
    where = image_name
    if suggestion.get("slice") is not None:
        where += f", {'image' if dims == 2 else 'slice'} {suggestion['slice'] + 1}"
    return f"{where}  (uncertainty {suggestion['score']:.2f})"


def suggestion_focus_ijk(suggestion: dict, shape: Sequence[int]) -> tuple[float, float, float]:
    """The voxel (i, j, k) the slice views centre on for a suggestion on an (S, Y, X) image:
    the middle of the suggested slice (k = slice), or of the whole image."""
    S, Y, X = shape[:3]
    k = suggestion.get("slice")
    return ((X - 1) / 2.0, (Y - 1) / 2.0, float((S - 1) / 2.0 if k is None else k))


def ijk_to_ras(volume, ijk) -> tuple[float, float, float]:
    """The RAS point of voxel ``ijk`` of ``volume`` (its IJK-to-RAS matrix, parent transforms
    not applied: the panel's volumes are untransformed)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    p = m.MultiplyPoint((float(ijk[0]), float(ijk[1]), float(ijk[2]), 1.0))
    return (p[0], p[1], p[2])


def jump_to_suggestion(scene, volume, suggestion: dict, shape: Sequence[int]) -> tuple[float, float, float]:
    """Centre every slice view of ``scene`` on the suggested slice of ``volume``; returns the
    RAS point. (The caller shows ``volume`` in the views first.)"""
    import slicer

    ras = ijk_to_ras(volume, suggestion_focus_ijk(suggestion, shape))
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, ras[0], ras[1], ras[2],
                                         slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    return ras
