"""Reading and writing images, label maps and float maps, keeping their physical geometry,
and turning any input (file, folder, DICOM series, numpy array) into canonical (S, Y, X, C)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import SimpleITK as sitk

from semsegloop.data.atomic import atomic_path
from semsegloop.errors import ImageReadError, LabelError, ProjectError

__all__ = [
    "Geometry", "ImageData", "read_image", "as_image_data", "check_finite", "write_image",
    "write_labels", "read_labels", "write_float_map", "geometry_from_sitk", "geometry_to_sitk",
    "natural_sort_key", "list_image_files", "PLANAR_EXTENSIONS", "VOLUME_EXTENSIONS",
]

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

# Formats read per file as 2D images (possibly multi-page); also the members of an image folder.
PLANAR_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
_TIFF_EXTENSIONS = (".tif", ".tiff")
_PILLOW_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
# Formats read through SimpleITK with full geometry.
VOLUME_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm")


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """Physical placement of a canonical (S, Y, X, C) array.

    spacing: (z, y, x) in array-axis order (axes 0, 1, 2), physical units (mm).
    origin: physical (x, y, z) of the first voxel, ITK/LPS as SimpleITK reports it.
    direction: 9 floats, row-major 3x3, ITK convention (SimpleITK ``GetDirection``).
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def __post_init__(self):
        # Coerce here so numpy scalars or lists never leak into project.json or comparisons.
        spacing = tuple(float(v) for v in self.spacing)
        origin = tuple(float(v) for v in self.origin)
        direction = tuple(float(v) for v in self.direction)
        if len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
            raise ValueError(f"Geometry needs 3 spacings, 3 origin values and 9 direction values, "
                             f"got {len(spacing)}, {len(origin)} and {len(direction)}")
        if not all(math.isfinite(v) and v > 0 for v in spacing):
            raise ValueError(f"Geometry spacing must be positive and finite, got {spacing}")
        if not all(math.isfinite(v) for v in origin + direction):
            raise ValueError("Geometry origin and direction must be finite")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    @classmethod
    def identity(cls, spacing: Iterable[float] = (1.0, 1.0, 1.0)) -> "Geometry":
        """Origin (0, 0, 0), identity direction and the given (z, y, x) spacing."""
        return cls(tuple(spacing), (0.0, 0.0, 0.0), IDENTITY_DIRECTION)

    def matches(self, other: "Geometry", tol: float = 1e-4) -> bool:
        """True when spacing, origin and direction agree within ``tol`` (absolute or relative)."""
        if not isinstance(other, Geometry):
            return False
        return all(np.allclose(a, b, rtol=tol, atol=tol) for a, b in (
            (self.spacing, other.spacing), (self.origin, other.origin),
            (self.direction, other.direction)))

    def to_json(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_json(cls, d: Any) -> "Geometry":
        try:
            return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProjectError(f"geometry {d!r} is malformed: {e}") from None


@dataclass
class ImageData:
    """A canonical image: ``array`` is (S, Y, X, C) in its native dtype (never float64)."""

    array: np.ndarray
    geometry: Geometry
    name: str
    source: str | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.array.shape)

    @property
    def n_slices(self) -> int:
        return int(self.array.shape[0])

    @property
    def channels(self) -> int:
        return int(self.array.shape[3])


# --------------------------------------------------------------------------------------------
# Geometry <-> SimpleITK
# --------------------------------------------------------------------------------------------

def geometry_from_sitk(img: sitk.Image) -> Geometry:
    """Geometry of a SimpleITK image of dimension 2, 3 or 4 (a 4th axis becomes channels).

    SimpleITK reports spacing as (x, y, z) while its arrays are (z, y, x); Geometry keeps spacing
    in array order, so it is reversed here. A 2D image gets z spacing 1, origin z 0 and its 2x2
    direction embedded in a 3x3 identity.
    """
    dim = img.GetDimension()
    spacing = img.GetSpacing()
    origin = img.GetOrigin()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if dim == 2:
        d3 = np.eye(3)
        d3[:2, :2] = direction
        return Geometry((1.0, spacing[1], spacing[0]), (origin[0], origin[1], 0.0),
                        tuple(d3.ravel()))
    if dim >= 3:
        return Geometry((spacing[2], spacing[1], spacing[0]), tuple(origin[:3]),
                        tuple(direction[:3, :3].ravel()))
    raise ValueError(f"unsupported image dimension {dim}")


def geometry_to_sitk(img: sitk.Image, geometry: Geometry) -> sitk.Image:
    """Set spacing, origin and direction of a 2D or 3D SimpleITK image in place; returns it."""
    dim = img.GetDimension()
    sz, sy, sx = geometry.spacing
    if dim == 3:
        img.SetSpacing((sx, sy, sz))
        img.SetOrigin(geometry.origin)
        img.SetDirection(geometry.direction)
    elif dim == 2:
        d = np.asarray(geometry.direction).reshape(3, 3)
        img.SetSpacing((sx, sy))
        img.SetOrigin(geometry.origin[:2])
        img.SetDirection(tuple(d[:2, :2].ravel()))
    else:
        raise ValueError(f"unsupported image dimension {dim}")
    return img


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def natural_sort_key(name: str) -> tuple:
    """Sort key putting 'img_2' before 'img_10' (digit runs compare as numbers, case ignored)."""
    parts = re.split(r"(\d+)", str(name))
    # re.split with a capture group alternates text/number, so equal positions hold equal types.
    key = tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))
    return (key, str(name))


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """2D image files (TIFF, PNG, JPEG, BMP) directly inside ``folder``, naturally sorted."""
    folder = Path(folder)
    files = [p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".")
             and p.suffix.lower() in PLANAR_EXTENSIONS]
    return sorted(files, key=lambda p: natural_sort_key(p.name))


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _stem(path: Path) -> str:
    suffix = _suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    if suffix in _TIFF_EXTENSIONS and stem.lower().endswith(".ome"):
        stem = stem[:-4]
    return stem


def _fail(path, what: str) -> ImageReadError:
    return ImageReadError(f"cannot read '{path}': {what}")


def _itk_reason(e: Exception) -> str:
    """The informative line of a SimpleITK/ITK exception (its full text is a stack of paths)."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "ITK ERROR" in ln:
            return ln.split("):", 1)[-1].strip()[:300]
        if ln.startswith("sitk::ERROR:"):
            return ln[len("sitk::ERROR:"):].strip()[:300]
    for ln in reversed(lines):
        if not ln.startswith(("Exception thrown", "sitk::ERROR")):
            return ln[:300]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _canonical_dtype(arr: np.ndarray, what: str) -> np.ndarray:
    """Keep the native dtype except where no downstream writer or net can use it."""
    kind = arr.dtype.kind
    if kind == "b":
        return arr.astype(np.uint8)
    if kind == "f":
        # float64 doubles memory for no gain (training runs in float32); float16 cannot be
        # written to NRRD by SimpleITK, so both become float32 to keep write/read round trips exact.
        if arr.dtype != np.float32:
            return arr.astype(np.float32)
        return arr
    if kind in "ui":
        if not arr.dtype.isnative:
            return arr.astype(arr.dtype.newbyteorder("="))
        return arr
    raise ImageReadError(f"{what} has unsupported pixel type {arr.dtype}; "
                         "use integer or floating-point pixels")


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

def read_image(path: str | os.PathLike, dims: int | None = None) -> ImageData:
    """Read an image file, an image folder or a DICOM series folder into canonical (S, Y, X, C).

    - TIFF (tifffile): single page -> S=1; multi-page or shaped stacks -> S pages (all axes other
      than Y, X and channel/sample axes are flattened into S); RGB samples and ImageJ/OME channel
      axes become C. With ``dims=3`` the pages are the Z axis of a volume and the z spacing is
      taken from ImageJ/OME metadata when present (else 1); with ``dims=2`` (or None) they are a
      stack of independent 2D slices with z spacing 1. The pixel data is identical either way.
      X/Y spacing comes from ImageJ or OME metadata only (a bare 72-dpi tag is not a pixel size).
    - PNG, JPEG, BMP (Pillow): grey -> C=1, RGB -> C=3; alpha is dropped, palette images become
      RGB, 16-bit PNG stays uint16. EXIF rotation is ignored, as Slicer (ITK) ignores it too,
      so labels painted in Slicer line up with what is read here.
    - A folder of 2D images: one stack in natural order (img_2 before img_10); every file must
      have the same size and channel count.
    - A folder holding a DICOM series (no 2D images): the volume via GDCM, geometry kept. With
      several series, the one with the most files is read.
    - NRRD, NIfTI, MetaImage (and single DICOM files) via SimpleITK, with spacing, origin and
      direction; vector pixels become channels; a 2D file gives S=1; a 4D scalar file's 4th axis
      becomes channels (multi-modal MRI).

    Pixels keep their native dtype except float64/float16 -> float32 and bool -> uint8.
    Any failure raises ImageReadError naming the path and what is wrong.
    """
    if dims not in (None, 2, 3):
        raise ValueError(f"dims must be 2, 3 or None, got {dims!r}")
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise _fail(path, "file or folder not found")
    if path.is_dir():
        return _read_folder(path, dims)
    suffix = _suffix(path)
    if suffix in _TIFF_EXTENSIONS:
        array, spacing = _read_tiff(path, dims)
        geometry = Geometry.identity(spacing)
    elif suffix in _PILLOW_EXTENSIONS:
        array = _read_pillow(path)
        geometry = Geometry.identity()
    elif suffix in VOLUME_EXTENSIONS:
        array, geometry = _read_sitk(path)
    else:
        supported = ", ".join(PLANAR_EXTENSIONS + VOLUME_EXTENSIONS)
        raise _fail(path, f"unsupported file type '{suffix or path.name}' (supported: {supported}, "
                          "a folder of 2D images, or a DICOM series folder)")
    return ImageData(array, geometry, _stem(path), str(path))


def _read_tiff(path: Path, dims: int | None) -> tuple[np.ndarray, tuple[float, float, float]]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise _fail(path, "the TIFF file has no image data")
            parts = [_tiff_to_canonical(tf.series[0].asarray(), tf.series[0].axes, path)]
            for k, s in enumerate(tf.series[1:], start=1):
                part = _tiff_to_canonical(s.asarray(), s.axes, path)
                if part.shape[1:] != parts[0].shape[1:]:
                    raise _fail(path, f"its pages differ in size: series 0 is "
                                      f"{_size_text(parts[0])} but series {k} is "
                                      f"{_size_text(part)}; save them as separate files")
                parts.append(part)
            spacing = _tiff_spacing(tf, dims)
    except ImageReadError:
        raise
    except tifffile.TiffFileError as e:
        raise _fail(path, f"not a TIFF file ({e})") from None
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, MemoryError) as e:
        raise _fail(path, f"damaged or unsupported TIFF ({type(e).__name__}: {e})") from None
    array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    array = _canonical_dtype(np.ascontiguousarray(array), f"'{path}'")
    return array, spacing


def _tiff_to_canonical(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    axes = axes.upper()
    if arr.ndim != len(axes) or "Y" not in axes or "X" not in axes:
        raise _fail(path, f"TIFF layout '{axes}' has no Y and X axes")
    y, x = axes.index("Y"), axes.index("X")
    chan = [i for i, a in enumerate(axes) if a in "CS"]
    rest = [i for i in range(len(axes)) if i not in chan and i not in (y, x)]
    arr = np.transpose(arr, rest + [y, x] + chan)
    ny, nx = arr.shape[len(rest)], arr.shape[len(rest) + 1]
    n = int(np.prod(arr.shape[: len(rest)], dtype=np.int64))
    c = int(np.prod(arr.shape[len(rest) + 2:], dtype=np.int64))
    return arr.reshape(n, ny, nx, c)


def _tiff_spacing(tf, dims: int | None) -> tuple[float, float, float]:
    sz, sy, sx = 1.0, 1.0, 1.0
    try:
        ij = tf.imagej_metadata
        page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
        if ij and ij.get("unit"):
            xr = page.tags.get("XResolution")
            yr = page.tags.get("YResolution")
            if xr and xr.value[0] and xr.value[1]:
                sx = xr.value[1] / xr.value[0]
            if yr and yr.value[0] and yr.value[1]:
                sy = yr.value[1] / yr.value[0]
        if ij and ij.get("spacing"):
            sz = float(ij["spacing"])
        if tf.is_ome and tf.ome_metadata:
            import tifffile
            pixels = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]
            pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
            sx = float(pixels.get("PhysicalSizeX", sx))
            sy = float(pixels.get("PhysicalSizeY", sy))
            sz = float(pixels.get("PhysicalSizeZ", sz))
    except Exception:  # noqa: BLE001 - metadata is a nicety; odd tags must not block reading
        pass
    values = [v if (math.isfinite(v) and v > 0) else 1.0 for v in (sz, sy, sx)]
    if dims != 3:
        values[0] = 1.0
    return tuple(values)


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("1", "LA", "La"):
                im = im.convert("L")
            elif mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBa", "RGBX"):
                im = im.convert("RGB")
            arr = np.array(im)
    except Image.DecompressionBombError as e:
        raise _fail(path, f"too large for Pillow's safety limit ({e}); save it as TIFF") from None
    except UnidentifiedImageError as e:
        kind = path.suffix.lstrip(".").upper()
        raise _fail(path, f"not a recognised {kind} image ({e})") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:
        # Pillow signals truncated or damaged files with OSError/SyntaxError.
        raise _fail(path, f"damaged image ({type(e).__name__}: {e})") from None
    if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        # Older Pillow opens 16-bit grey PNG as 32-bit 'I'; keep the file's own 16-bit depth.
        arr = arr.astype(np.uint16)
    arr = _canonical_dtype(arr, f"'{path}'")
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None]
    else:
        raise _fail(path, f"unexpected pixel layout {arr.shape}")
    return np.ascontiguousarray(arr)


def _read_sitk(path: Path) -> tuple[np.ndarray, Geometry]:
    if _suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        kind = {".nrrd": "NRRD", ".nhdr": "NRRD", ".nii": "NIfTI", ".nii.gz": "NIfTI",
                ".mha": "MetaImage", ".mhd": "MetaImage", ".dcm": "DICOM"
                }.get(_suffix(path), "image")
        raise _fail(path, f"not a readable {kind} file ({_itk_reason(e)})") from None
    return _from_sitk(img, path)


def _check_nifti_complete(path: Path) -> None:
    """Raise ImageReadError if a NIfTI file holds fewer data bytes than its header promises.

    ITK's NIfTI reader zero-fills missing bytes without any error, so a half-copied file would
    otherwise train on (or be predicted as) black slices. Anything this parser does not
    recognise is left for SimpleITK to judge.
    """
    import gzip
    import struct

    gz = _suffix(path) == ".nii.gz"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(540)
    except (OSError, EOFError):
        return
    needed = None
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dim = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = struct.unpack(order + "f", head[108:112])[0]
        elif len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            dim = struct.unpack(order + "8q", head[16:80])
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            offset = struct.unpack(order + "q", head[168:176])[0]
        else:
            continue
        if not (1 <= dim[0] <= 7 and bitpix > 0 and math.isfinite(offset) and offset >= 0):
            return
        voxels = 1
        for n in dim[1:dim[0] + 1]:
            voxels *= max(int(n), 1)
        needed = int(offset) + voxels * bitpix // 8
        break
    if needed is None:
        return
    if not gz:
        have = path.stat().st_size
    else:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", f.read(4))[0]
        if isize == needed % 2**32:
            return   # the gzip trailer records a complete stream; skip decompressing twice
        have = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    have += len(chunk)
        except (OSError, EOFError) as e:
            raise _fail(path, f"the file is truncated or damaged ({e})") from None
    if have < needed:
        raise _fail(path, f"the file is truncated: it holds {have} bytes but its header needs "
                          f"{needed}")


def _from_sitk(img: sitk.Image, path) -> tuple[np.ndarray, Geometry]:
    dim = img.GetDimension()
    if dim not in (2, 3, 4):
        raise _fail(path, f"{dim}-dimensional images are not supported")
    if "complex" in img.GetPixelIDTypeAsString():
        raise _fail(path, "complex-valued pixels are not supported")
    ncomp = img.GetNumberOfComponentsPerPixel()
    if dim == 4 and ncomp > 1:
        raise _fail(path, "4D images with vector pixels are not supported")
    try:
        geometry = geometry_from_sitk(img)
    except ValueError as e:
        raise _fail(path, f"invalid geometry ({e})") from None
    arr = sitk.GetArrayFromImage(img)
    del img
    if dim == 2:
        arr = arr[None, ..., None] if ncomp == 1 else arr[None]
    elif dim == 3:
        if ncomp == 1:
            arr = arr[..., None]
    else:
        # (T, Z, Y, X): the 4th ITK axis holds modalities/channels in MSD-style NIfTI.
        arr = np.moveaxis(arr, 0, -1)
    arr = _canonical_dtype(np.ascontiguousarray(arr), f"'{path}'")
    return arr, geometry


def _read_folder(folder: Path, dims: int | None) -> ImageData:
    try:
        files = list_image_files(folder)
    except OSError as e:
        raise _fail(folder, f"cannot list folder ({e})") from None
    if not files:
        return _read_dicom_series(folder)
    stack = []
    first = None
    for f in files:
        part = read_image(f, dims=dims)
        if first is None:
            first = (f, part)
        elif part.array.shape[1:] != first[1].array.shape[1:]:
            raise ImageReadError(
                f"cannot read folder '{folder}': '{f.name}' is {_size_text(part.array)} but "
                f"'{first[0].name}' is {_size_text(first[1].array)}; all images in a folder must "
                "have the same size and number of channels")
        stack.append(part.array)
    dtype = np.result_type(*[a.dtype for a in stack])
    if dtype == np.float64:
        dtype = np.dtype(np.float32)
    array = np.concatenate([a.astype(dtype, copy=False) for a in stack], axis=0)
    return ImageData(array, first[1].geometry, folder.name, str(folder))


def _size_text(arr: np.ndarray) -> str:
    c = arr.shape[3]
    return f"{arr.shape[2]}x{arr.shape[1]} with {c} channel{'s' if c != 1 else ''}"


def _read_dicom_series(folder: Path) -> ImageData:
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as e:
        raise _fail(folder, f"cannot scan for DICOM files ({_itk_reason(e)})") from None
    if not series:
        raise _fail(folder, "the folder holds no supported images "
                            f"({', '.join(PLANAR_EXTENSIONS)}) and no DICOM series")
    best = max(series, key=lambda s: len(reader.GetGDCMSeriesFileNames(str(folder), s)))
    files = reader.GetGDCMSeriesFileNames(str(folder), best)
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise _fail(folder, f"DICOM series {best} is unreadable ({_itk_reason(e)})") from None
    array, geometry = _from_sitk(img, folder)
    return ImageData(array, geometry, folder.name, str(folder))


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------

def as_image_data(array, spacing=None, name: str = "image", dims: int = 2,
                  channels: int | None = None) -> ImageData:
    """Turn a user numpy array into a canonical (S, Y, X, C) ImageData.

    2D mode (``dims=2``):
      (Y, X) -> (1, Y, X, 1);
      (Y, X, C) with C in {1, 2, 3, 4} and C smaller than both Y and X -> (1, Y, X, C);
      any other 3-D array (N, Y, X) -> (N, Y, X, 1), a stack of N slices;
      (N, Y, X, C) is kept.
      With ``channels`` (the project's channel count) a 3-D array is read as (Y, X, C) when
      channels > 1 and as (N, Y, X) when channels == 1 (unless its last axis has length 1);
      with channels == 1 a (Y, X, C) array that would pass as a colour image (C in 2..4, smaller
      than Y and X) is refused rather than read as Y slices of X x C.
    3D mode (``dims=3``):
      (Z, Y, X) -> (Z, Y, X, 1); (Z, Y, X, C) kept; (Y, X) -> (1, Y, X, 1); with channels > 1
      a 3-D array whose last axis equals ``channels`` is one (Y, X, C) slice.
    If ``channels`` is given and the result has another channel count, ImageReadError.
    spacing: None -> (1, 1, 1); (y, x) -> (1, y, x); (z, y, x) as given. Origin is (0, 0, 0)
    and direction identity. Arrays with ndim outside 2..4, no pixels, or complex/bool/object
    pixels are rejected with ImageReadError naming ``name``. Dtype is kept (float64 and float16
    become float32); the result may share memory with ``array``.
    """
    if isinstance(array, ImageData):
        if channels is not None and array.array.shape[3] != channels:
            raise ImageReadError(f"image '{array.name}' has {array.array.shape[3]} channels but "
                                 f"the project has {channels}")
        return array
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    arr = np.asarray(array)
    if arr.dtype.kind not in "uif":
        raise ImageReadError(f"image '{name}' has unsupported pixel type {arr.dtype}; "
                             "use integer or floating-point pixels")
    if arr.ndim < 2 or arr.ndim > 4:
        raise ImageReadError(f"image '{name}' has {arr.ndim} dimensions {arr.shape}; "
                             "expected 2 to 4 (slices, y, x, channels)")
    if arr.size == 0:
        raise ImageReadError(f"image '{name}' is empty (shape {arr.shape})")
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        a, b, c = arr.shape
        if channels is not None and channels > 1:
            as_channels = c == channels
            if not as_channels:
                raise ImageReadError(
                    f"image '{name}' has shape {arr.shape} but the project has {channels} "
                    "channels; give a (Y, X, C) array with channels last")
        elif channels == 1:
            if dims == 2 and c in (2, 3, 4) and c < a and c < b:  # RGB into a grey project
                raise ImageReadError(
                    f"image '{name}' has shape {arr.shape}, a (Y, X, {c}) colour image, but "
                    f"the project's images have 1 channel (grey); convert it to grey first")
            as_channels = c == 1
        elif dims == 2:
            as_channels = c in (1, 2, 3, 4) and c < a and c < b
        else:
            as_channels = False
        arr = arr[None] if as_channels else arr[..., None]
    if channels is not None and arr.shape[3] != channels:
        raise ImageReadError(f"image '{name}' has {arr.shape[3]} channels but the project has "
                             f"{channels}")
    arr = _canonical_dtype(np.ascontiguousarray(arr), f"image '{name}'")
    return ImageData(arr, Geometry.identity(_spacing_tuple(spacing, name)), name, None)


def _spacing_tuple(spacing, name: str) -> tuple[float, float, float]:
    if spacing is None:
        return (1.0, 1.0, 1.0)
    try:
        values = [float(v) for v in spacing]
    except (TypeError, ValueError):
        raise ImageReadError(f"image '{name}': spacing {spacing!r} must be numbers") from None
    if len(values) == 2:
        values = [1.0] + values
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ImageReadError(f"image '{name}': spacing {spacing!r} must be 2 (y, x) or 3 (z, y, x) "
                             "positive numbers")
    return tuple(values)


def check_finite(array: np.ndarray, name: str) -> None:
    """Raise ImageReadError if a floating-point array holds NaN or Inf pixels."""
    array = np.asarray(array)
    if array.dtype.kind not in "fc":
        return
    # A float64 sum is finite exactly when every element is: any NaN/Inf propagates, and finite
    # float32 values cannot overflow float64. It streams without allocating a mask.
    with np.errstate(invalid="ignore", over="ignore"):
        if np.isfinite(np.sum(array, dtype=np.float64)):
            return
    bad = ~np.isfinite(array)
    count = int(np.count_nonzero(bad))
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), array.shape))
    raise ImageReadError(f"image '{name}' has {count} NaN/Inf pixels (first at index {first}); "
                         "fix or mask them before adding")


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------

def _to_sitk(array: np.ndarray, geometry: Geometry, vector: bool) -> sitk.Image:
    img = sitk.GetImageFromArray(array, isVector=vector)
    return geometry_to_sitk(img, geometry)


def _sitk_write(img: sitk.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), True)
        except RuntimeError as e:
            raise OSError(f"cannot write '{path}': {_itk_reason(e)}") from None


def write_image(path: str | os.PathLike, image: ImageData) -> None:
    """Write ``image`` atomically as a compressed NRRD (vector pixels for C > 1) with geometry.

    ``read_image`` gives back the same dtype, shape and geometry. The file is always 3D, so a
    single 2D image comes back as (1, Y, X, C) with its geometry intact.
    """
    path = Path(path)
    arr = np.ascontiguousarray(image.array)
    if arr.ndim != 4:
        raise ValueError(f"image '{image.name}' array must be (S, Y, X, C), got {arr.shape}")
    if _suffix(path) not in (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd"):
        raise ValueError(f"write_image writes NRRD/NIfTI/MetaImage, not '{path.name}'")
    if arr.dtype.kind == "f" and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    vector = arr.shape[3] > 1
    img = _to_sitk(arr if vector else arr[..., 0], image.geometry, vector)
    _sitk_write(img, path)


def _check_label_array(labels, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise LabelError(f"{what}: labels must be (S, Y, X), got shape {labels.shape}")
    if labels.dtype != np.uint8:
        if labels.dtype.kind not in "ui":
            raise LabelError(f"{what}: labels must be integers, got {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise LabelError(f"{what}: label values must be within 0..255, got "
                             f"{labels.min()}..{labels.max()}")
        labels = labels.astype(np.uint8)
    return np.ascontiguousarray(labels)


def write_labels(path: str | os.PathLike, labels: np.ndarray, geometry: Geometry) -> None:
    """Write an (S, Y, X) uint8 label map atomically.

    ``.tif``/``.tiff``: a (multi-page for S > 1) uint8 TIFF for 2D stacks, no geometry beyond
    pixels. Otherwise (``.nrrd`` is the usual choice, also NIfTI/MetaImage) a compressed 3D file
    via SimpleITK carrying ``geometry``.
    """
    path = Path(path)
    labels = _check_label_array(labels, f"'{path}'")
    suffix = _suffix(path)
    if suffix in _TIFF_EXTENSIONS:
        import tifffile
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, labels if labels.shape[0] > 1 else labels[0],
                             photometric="minisblack", compression="zlib")
        return
    if suffix not in (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd"):
        raise LabelError(f"cannot write labels to '{path}': use .nrrd, .nii.gz, .mha or .tif")
    _sitk_write(_to_sitk(labels, geometry, False), path)


def read_labels(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read a label map as (S, Y, X) uint8 and its geometry.

    Accepts any format ``read_image`` reads. Floating-point files are accepted only if every
    value is a whole number (some tools save label maps as float). LabelError names the file
    when it has several channels, non-integer values or values outside 0..255.
    """
    image = read_image(path)
    arr = image.array
    if arr.shape[3] != 1:
        raise LabelError(f"labels '{path}' have {arr.shape[3]} channels; a label map has one "
                         "integer value per pixel")
    arr = arr[..., 0]
    if arr.dtype.kind == "f":
        with np.errstate(invalid="ignore", over="ignore"):
            finite = np.isfinite(np.sum(arr, dtype=np.float64))
        if not finite or not np.array_equal(arr, np.round(arr)):
            raise LabelError(f"labels '{path}' are not an integer label map "
                             f"({arr.dtype} with fractional or NaN values)")
    if arr.dtype != np.uint8:
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi > 255:
            raise LabelError(f"labels '{path}' hold values {lo:g}..{hi:g}; label values must be "
                             "within 0..255")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr), image.geometry


def write_float_map(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> None:
    """Write an (S, Y, X) float map (e.g. uncertainty) atomically as float32 NRRD (or TIFF)."""
    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim != 3 or arr.dtype.kind != "f":
        raise ValueError(f"'{path}': float map must be a floating-point (S, Y, X) array, "
                         f"got {arr.dtype} {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if _suffix(path) in _TIFF_EXTENSIONS:
        import tifffile
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, arr if arr.shape[0] > 1 else arr[0],
                             photometric="minisblack", compression="zlib")
        return
    _sitk_write(_to_sitk(arr, geometry, False), path)
