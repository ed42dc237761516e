"""Per-class clean-up of a predicted label map: largest connected component, islands below a
physical size removed, holes filled, light smoothing; 2D (per slice) or 3D, spacing-aware.

Settings are plain JSON ({class value: {option: value}}) so the project stores them; painted
pixels are never changed, and a component holding a stroke of its class is always kept.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from semsegloop.errors import ProjectError

OPTIONS = {
    "largest_component": bool,   # keep only the largest connected piece of the class
    "min_size": float,           # remove pieces smaller than this, in mm^2 (2D) or mm^3 (3D)
    "fill_holes": bool,          # fill what the class encloses completely
    "smoothing": str,            # "none", "closing" or "median"
    "smoothing_mm": float,       # radius of the closing / median, in mm
}
SMOOTHING = ("none", "closing", "median")


def validate_settings(settings: dict, n_classes: int, class_names: list[str] | None = None) -> dict:
    """Checked copy of ``settings`` with class keys as strings "1".."K"; names are accepted too."""
    if not isinstance(settings, dict):
        raise ProjectError(f"post-processing settings must be a dict, got {type(settings).__name__}")
    names = class_names or []
    out = {}
    for key, opts in settings.items():
        k = _class_value(key, n_classes, names)
        if not isinstance(opts, dict):
            raise ProjectError(f"post-processing of class {key!r}: expected a dict of options")
        clean = {}
        for name, value in opts.items():
            if name not in OPTIONS:
                raise ProjectError(f"post-processing of class {key!r}: unknown option '{name}' "
                                   f"(options: {', '.join(OPTIONS)})")
            try:
                value = OPTIONS[name](value)
            except (TypeError, ValueError):
                raise ProjectError(f"post-processing option '{name}' of class {key!r} must be "
                                   f"{OPTIONS[name].__name__}, got {value!r}") from None
            if name == "smoothing" and value not in SMOOTHING:
                raise ProjectError(f"post-processing of class {key!r}: smoothing must be one of "
                                   f"{', '.join(SMOOTHING)}, got '{value}'")
            if name in ("min_size", "smoothing_mm") and value < 0:
                raise ProjectError(f"post-processing option '{name}' of class {key!r} must be "
                                   f">= 0, got {value}")
            clean[name] = value
        if clean.get("smoothing", "none") != "none" and not clean.get("smoothing_mm"):
            raise ProjectError(f"post-processing of class {key!r}: smoothing "
                               f"'{clean['smoothing']}' needs smoothing_mm > 0")
        if any(_active(clean).values()):
            out[str(k)] = clean
    return out


def _class_value(key, n_classes: int, names: list[str]) -> int:
    if isinstance(key, str) and key in names:
        return names.index(key) + 1
    try:
        k = int(key)
    except (TypeError, ValueError):
        raise ProjectError(f"post-processing: '{key}' is neither a class name "
                           f"({', '.join(names) or 'none'}) nor a class value 1..{n_classes}") from None
    if not 1 <= k <= n_classes:
        raise ProjectError(f"post-processing: class value {k} is outside 1..{n_classes}")
    return k


def _active(opts: dict) -> dict:
    return {"largest_component": bool(opts.get("largest_component")),
            "min_size": float(opts.get("min_size", 0)) > 0,
            "fill_holes": bool(opts.get("fill_holes")),
            "smoothing": opts.get("smoothing", "none") != "none"}


def postprocess_labels(labels: np.ndarray, settings: dict, spacing, dims: int,
                       strokes: np.ndarray | None = None) -> np.ndarray:
    """Cleaned copy of ``labels`` (S, Y, X) uint8 1..K.

    Classes are processed in label order; pixels a class gives up go to the nearest pixel of
    another class (what surrounds an island or a spur). ``strokes`` (0 = none) are restored at
    the end and protect the components they touch. ``dims`` 2 works slice by slice.
    """
    out = np.array(labels, dtype=np.uint8, copy=True)
    if not settings:
        return out
    spacing = tuple(float(s) for s in spacing)
    if dims == 2:
        for s in range(out.shape[0]):
            out[s] = _process(out[s:s + 1], settings, (1.0,) + spacing[-2:], 2,
                              None if strokes is None else strokes[s:s + 1])[0]
    else:
        out = _process(out, settings, spacing, 3, strokes)
    if strokes is not None:
        out[strokes > 0] = strokes[strokes > 0]
    return out


def _process(lab: np.ndarray, settings: dict, spacing, dims: int, strokes) -> np.ndarray:
    lab = lab.copy()
    view = lab[0] if dims == 2 else lab                  # 2D work on (Y, X)
    sp = spacing[1:] if dims == 2 else spacing
    st = None if strokes is None else (strokes[0] if dims == 2 else strokes)
    voxel = float(np.prod(sp))
    for key in sorted(settings, key=int):
        k, opts = int(key), settings[key]
        mask = view == k
        before = mask.copy()
        if opts.get("smoothing", "none") != "none":
            mask = _smooth(mask, opts["smoothing"], float(opts["smoothing_mm"]), sp)
        if opts.get("fill_holes"):
            mask = ndi.binary_fill_holes(mask)
        if opts.get("largest_component") or float(opts.get("min_size", 0)) > 0:
            mask = _components(mask, opts, voxel, None if st is None else st == k)
        if np.array_equal(mask, before):
            continue
        view[mask] = k
        lost = before & ~mask
        if lost.any():
            _give_to_neighbours(view, lost, k)
    return lab


def _components(mask, opts, voxel: float, stroke_mask) -> np.ndarray:
    comp, n = ndi.label(mask)     # face connectivity: diagonal touches do not join pieces
    if n == 0:
        return mask
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:] * voxel
    keep = np.ones(n, dtype=bool)
    if float(opts.get("min_size", 0)) > 0:
        keep &= sizes >= float(opts["min_size"])
    if opts.get("largest_component"):
        largest = np.zeros(n, dtype=bool)
        largest[int(np.argmax(sizes))] = True
        keep &= largest
    if stroke_mask is not None and stroke_mask.any():
        keep[np.unique(comp[stroke_mask & (comp > 0)]) - 1] = True
    return np.concatenate([[False], keep])[comp]


def _smooth(mask: np.ndarray, how: str, radius_mm: float, spacing) -> np.ndarray:
    radii = [max(int(round(radius_mm / s)), 0) for s in spacing]
    if max(radii) == 0:
        return mask
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    ball = sum((g * s / radius_mm) ** 2 for g, s in zip(grids, spacing)) <= 1.0
    if how == "closing":
        # Padding keeps the closing from eating into the class at the image border.
        pad = [(r, r) for r in radii]
        return ndi.binary_closing(np.pad(mask, pad, mode="edge"), structure=ball)[
            tuple(slice(r, r + n) for r, n in zip(radii, mask.shape))]
    return ndi.median_filter(mask.astype(np.uint8), footprint=ball, mode="nearest").astype(bool)


def _give_to_neighbours(view: np.ndarray, lost: np.ndarray, k: int) -> None:
    """Relabel ``lost`` pixels (no longer class k) with the class of the nearest other pixel."""
    other = (view != k) & ~lost
    if not other.any():
        return  # the whole image was this class: nothing else to give the pixels to
    _, idx = ndi.distance_transform_edt(~other, return_indices=True)
    view[lost] = view[tuple(i[lost] for i in idx)]
