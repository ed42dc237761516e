"""Per-image class statistics of a label map: pixel counts, fractions and physical area or
volume, and their CSV table (one row per image and class) for export and reports."""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Sequence

import numpy as np

from semsegloop.data.atomic import atomic_write_text
from semsegloop.errors import LabelError, ProjectError

CSV_COLUMNS = ("image", "class", "pixels", "fraction", "area_or_volume", "unit")

# Bincount casts its input to intp (8 bytes per voxel); counting in slabs bounds that copy.
_CHUNK = 1 << 24


def class_fractions(labels, class_names: Sequence[str], spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    dims: int = 2, image_name: str = "", length_unit: str = "mm") -> list[dict]:
    """One row per class 1..K: ``image, class, pixels, fraction, area_or_volume, unit``.

    ``fraction`` is the share of the *labelled* pixels (values > 0), so unlabelled background
    does not dilute it and the fractions of an image sum to 1; it is NaN when nothing is
    labelled. In 2D mode (a stack of 2D images) ``area_or_volume`` is an area, count * sy * sx
    in ``length_unit``^2 summed over the slices; in 3D it is a volume, count * sz * sy * sx in
    ``length_unit``^3. ``spacing`` is (z, y, x).
    """
    names = [str(n) for n in class_names]
    K = len(names)
    arr = np.asarray(labels)
    where = f"label map of image '{image_name}'" if image_name else "label map"
    if K < 1:
        raise LabelError(f"Class fractions of the {where} need at least one class.")
    if arr.ndim != 3:
        raise LabelError(f"The {where} must be (S, Y, X); got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise LabelError(f"The {where} must hold integer class values; got dtype {arr.dtype}.")
    if dims not in (2, 3):
        raise LabelError(f"dims must be 2 or 3 for the {where}; got {dims!r}.")
    try:
        sz, sy, sx = (float(s) for s in spacing)
    except (TypeError, ValueError):
        raise LabelError(f"Spacing of the {where} must be three numbers (z, y, x); "
                         f"got {spacing!r}.") from None
    if not all(math.isfinite(s) and s > 0 for s in (sz, sy, sx)):
        raise LabelError(f"Spacing of the {where} must be positive; got {spacing!r}.")

    counts = np.zeros(K + 1, dtype=np.int64)
    flat = arr.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0 or hi > K:
            raise LabelError(f"The {where} holds value {lo if lo < 0 else hi}, outside 0..{K} "
                             f"({K} classes: {', '.join(names)}).")
        counts += np.bincount(chunk, minlength=K + 1)

    labelled = int(counts[1:].sum())
    cell = sy * sx if dims == 2 else sz * sy * sx
    unit = f"{length_unit}^{dims}"
    rows = []
    for k, name in enumerate(names, start=1):
        n = int(counts[k])
        rows.append({"image": image_name, "class": name, "pixels": n,
                     "fraction": n / labelled if labelled else math.nan,
                     "area_or_volume": n * cell, "unit": unit})
    return rows


def write_fractions_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write rows (from one or many images) atomically as CSV with the ``CSV_COLUMNS`` header.

    Floats are written with ``repr`` so reading the file back gives the same numbers.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, row in enumerate(rows):
        try:
            writer.writerow([row["image"], row["class"], int(row["pixels"]),
                             repr(float(row["fraction"])), repr(float(row["area_or_volume"])),
                             row["unit"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProjectError(f"Row {i} for fractions file {path} is incomplete or not "
                               f"numeric ({exc!r}): {row!r}") from None
    atomic_write_text(path, buf.getvalue())


def read_fractions_csv(path: str | os.PathLike) -> list[dict]:
    """Read a file written by :func:`write_fractions_csv` back into typed rows."""
    try:
        text = open(path, encoding="utf-8", newline="").read()
    except OSError as exc:
        raise ProjectError(f"Cannot read fractions file {path}: {exc.strerror or exc}") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(header) != CSV_COLUMNS:
        raise ProjectError(f"Fractions file {path} does not start with the header "
                           f"{','.join(CSV_COLUMNS)}; found {header!r}.")
    rows = []
    for line_no, rec in enumerate(reader, start=2):
        if not rec:
            continue
        try:
            image, cls, pixels, fraction, amount, unit = rec
            rows.append({"image": image, "class": cls, "pixels": int(pixels),
                         "fraction": float(fraction), "area_or_volume": float(amount),
                         "unit": unit})
        except ValueError:
            raise ProjectError(f"Fractions file {path}, line {line_no} is malformed: "
                               f"{rec!r}") from None
    return rows
