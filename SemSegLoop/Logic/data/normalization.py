"""Intensity normalisation: picks a method per project from the first image (CT window, MRI
z-score, microscopy percentiles, RGB scaling) and applies it the same in training and prediction."""

from __future__ import annotations

import math

import numpy as np

from semsegloop.errors import ProjectError

__all__ = ["METHODS", "detect_normalization", "validate_normalization", "normalization_stats",
           "normalize", "describe_normalization"]

METHODS = ("ct", "zscore", "percentile", "scale", "none")

DEFAULT_CT_WINDOW = (-1000.0, 1000.0)
DEFAULT_LOW, DEFAULT_HIGH = 0.5, 99.5
# Enough voxels for percentiles stable to well under 1% of the range, fast on any volume.
MAX_SAMPLES = 1_000_000
_SEED = 20240607

_KEYS = {"ct": {"window"}, "zscore": {"low", "high"}, "percentile": {"low", "high"},
         "scale": {"factor"}, "none": set()}


def validate_normalization(spec) -> dict:
    """Check a normalisation spec and return it complete (defaults filled, plain floats).

    Accepts a dict with "method" or a bare method name ("ct", "zscore", "percentile", "none").
    Raises ProjectError naming the offending setting, e.g.
    "normalization.method='foo' is not one of 'ct', 'zscore', 'percentile', 'scale', 'none'".
    """
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, dict):
        raise ProjectError(f"normalization={spec!r} must be a dict with a 'method' key")
    method = spec.get("method")
    if method not in METHODS:
        allowed = ", ".join(f"'{m}'" for m in METHODS)
        raise ProjectError(f"normalization.method={method!r} is not one of {allowed}")
    unknown = set(spec) - {"method"} - _KEYS[method]
    if unknown:
        allowed = ", ".join(sorted(_KEYS[method])) or "no other settings"
        raise ProjectError(f"normalization.{sorted(unknown)[0]} is not a setting of method "
                           f"'{method}' (it takes {allowed})")
    out: dict = {"method": method}
    if method == "ct":
        window = spec.get("window", DEFAULT_CT_WINDOW)
        try:
            lo, hi = (float(v) for v in window)
        except (TypeError, ValueError):
            raise ProjectError(f"normalization.window={window!r} must be two numbers "
                               "[low, high]") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ProjectError(f"normalization.window={window!r} must be finite with low < high")
        out["window"] = [lo, hi]
    elif method in ("zscore", "percentile"):
        low = _number(spec.get("low", DEFAULT_LOW), "low")
        high = _number(spec.get("high", DEFAULT_HIGH), "high")
        if not 0.0 <= low < high <= 100.0:
            raise ProjectError(f"normalization.low={low:g} and normalization.high={high:g} must "
                               "satisfy 0 <= low < high <= 100 (percentiles)")
        out["low"], out["high"] = low, high
    elif method == "scale":
        if "factor" not in spec:
            raise ProjectError("normalization.factor is required for method 'scale' "
                               "(e.g. 1/255 for 8-bit RGB)")
        factor = _number(spec["factor"], "factor")
        if not factor > 0:
            raise ProjectError(f"normalization.factor={factor!r} must be positive")
        out["factor"] = factor
    return out


def _number(value, key: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ProjectError(f"normalization.{key}={value!r} must be a number") from None
    if not math.isfinite(v):
        raise ProjectError(f"normalization.{key}={value!r} must be finite")
    return v


def detect_normalization(image, dims: int | None = None) -> dict:
    """Pick a sensible default spec for ``image`` (an ImageData or an (S, Y, X, C) array).

    Rules, first match wins:
      uint8 with 3 or 4 channels (RGB histology)        -> scale 1/255 (uint16 RGB: 1/65535);
      signed-integer or float pixels with min <= -500   -> ct, window [-1000, 1000] HU;
      a 3D volume (``dims=3``)                          -> zscore (MRI and other volumes);
      otherwise (2D grey/float/multi-channel)           -> percentile 0.5..99.5.
    ``dims`` is the project's mode; when None, an image with more than one slice counts as 3D.
    """
    array = getattr(image, "array", image)
    array = np.asarray(array)
    if array.ndim != 4:
        raise ValueError(f"expected an (S, Y, X, C) array, got shape {array.shape}")
    if dims is None:
        dims = 3 if array.shape[0] > 1 else 2
    channels = array.shape[3]
    if channels in (3, 4) and array.dtype == np.uint8:
        return {"method": "scale", "factor": 1.0 / 255.0}
    if channels in (3, 4) and array.dtype == np.uint16:
        return {"method": "scale", "factor": 1.0 / 65535.0}
    # HU air is about -1000; nothing else people segment goes that negative. min() streams.
    if array.dtype.kind in "if" and array.size and float(np.nanmin(array)) <= -500:
        return {"method": "ct", "window": list(DEFAULT_CT_WINDOW)}
    if dims == 3:
        return {"method": "zscore", "low": DEFAULT_LOW, "high": DEFAULT_HIGH}
    return {"method": "percentile", "low": DEFAULT_LOW, "high": DEFAULT_HIGH}


def _channel_sample(array: np.ndarray, c: int) -> np.ndarray:
    """float64 values of channel ``c``: all of them, or a fixed pseudo-random subsample.

    The seed is fixed, so one image always gives the same sample, hence the same statistics
    in training and in prediction.
    """
    n_per_channel = array.size // array.shape[-1]
    if n_per_channel <= MAX_SAMPLES:
        return array[..., c].astype(np.float64).ravel()
    rng = np.random.default_rng(_SEED)
    idx = np.sort(rng.integers(0, n_per_channel, MAX_SAMPLES))
    if array.flags.c_contiguous:
        flat = array.reshape(-1)
        return flat[idx * array.shape[-1] + c].astype(np.float64)
    return array[..., c].reshape(-1)[idx].astype(np.float64)


def normalization_stats(array: np.ndarray, spec: dict) -> list[tuple[float, float]]:
    """Per-channel (offset, scale) so that normalized = (x - offset) * scale (then clipped for
    'ct' and 'percentile'). Lets a caller normalise patches lazily with whole-image statistics."""
    spec = validate_normalization(spec)
    method = spec["method"]
    channels = array.shape[-1]
    if method == "none":
        return [(0.0, 1.0)] * channels
    if method == "scale":
        return [(0.0, spec["factor"])] * channels
    if method == "ct":
        lo, hi = spec["window"]
        return [((lo + hi) / 2.0, 2.0 / (hi - lo))] * channels
    stats = []
    for c in range(channels):
        sample = _channel_sample(array, c)
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            stats.append((0.0, 1.0))
            continue
        plo, phi = np.percentile(sample, [spec["low"], spec["high"]])
        if method == "percentile":
            if phi <= plo:
                # Mostly-constant images (e.g. sparse bright spots on black) collapse the
                # percentiles; the full range still maps the spots into [0, 1].
                plo, phi = sample.min(), sample.max()
            scale = 1.0 / (phi - plo) if phi > plo else 1.0
            stats.append((float(plo), float(scale)))
        else:
            inside = sample[(sample >= plo) & (sample <= phi)]
            mean = float(inside.mean())
            std = float(inside.std())
            if not std > 1e-12:
                std = float(sample.std())
            # A constant image maps to 0 instead of dividing by zero.
            stats.append((mean, 1.0 / std if std > 1e-12 else 1.0))
    return stats


def normalize(array: np.ndarray, spec: dict, stats: list[tuple[float, float]] | None = None
              ) -> np.ndarray:
    """Normalise an (S, Y, X, C) array to float32 with ``spec``.

    ct: clip to the window, map it to [-1, 1]. zscore: (x - mean) / std per channel, statistics
    over voxels within the low..high percentiles. percentile: per channel low..high percentiles
    -> [0, 1], clipped. scale: x * factor. none: float32 copy. Statistics come from ``stats``
    when given (see ``normalization_stats``), else from this array. Work is done in float32;
    only the statistics use float64, on at most MAX_SAMPLES voxels per channel.
    """
    spec = validate_normalization(spec)
    array = np.asarray(array)
    if array.ndim != 4:
        raise ValueError(f"expected an (S, Y, X, C) array, got shape {array.shape}")
    if stats is None:
        stats = normalization_stats(array, spec)
    if len(stats) != array.shape[-1]:
        raise ValueError(f"{len(stats)} channel statistics for {array.shape[-1]} channels")
    out = np.empty(array.shape, dtype=np.float32)
    method = spec["method"]
    for c, (offset, scale) in enumerate(stats):
        o = out[..., c]
        o[...] = array[..., c]
        if method == "ct":
            lo, hi = spec["window"]
            np.clip(o, np.float32(lo), np.float32(hi), out=o)
        if offset != 0.0:
            o -= np.float32(offset)
        if scale != 1.0:
            o *= np.float32(scale)
        if method == "ct":
            # float32 rounding of centre/scale can overshoot by an ulp; keep [-1, 1] exact.
            np.clip(o, np.float32(-1.0), np.float32(1.0), out=o)
        elif method == "percentile":
            np.clip(o, np.float32(0.0), np.float32(1.0), out=o)
    return out


def describe_normalization(spec: dict) -> str:
    """One line for logs and the UI, e.g. 'CT window [-1000, 1000] HU -> [-1, 1]'."""
    spec = validate_normalization(spec)
    method = spec["method"]
    if method == "ct":
        lo, hi = spec["window"]
        return f"CT window [{lo:g}, {hi:g}] HU -> [-1, 1]"
    if method == "zscore":
        return (f"z-score per image and channel (mean/std of voxels within the "
                f"{spec['low']:g}-{spec['high']:g} percentiles)")
    if method == "percentile":
        return f"percentiles {spec['low']:g}-{spec['high']:g} per image and channel -> [0, 1]"
    if method == "scale":
        factor = spec["factor"]
        inverse = 1.0 / factor
        if inverse >= 2 and abs(inverse - round(inverse)) <= 1e-9 * inverse:
            return f"scale x 1/{round(inverse)}"
        return f"scale x {factor:g}"
    return "none (raw intensities as float32)"
