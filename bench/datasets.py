"""Loaders for the benchmark's real labeled data in ../shared/data: images plus dense reference
label maps in the engine's conventions (classes 1..K), and which images get painted.

Each loader returns a :class:`Case`. Images are ``semsegloop.data.imageio.ImageData`` (canonical
(S, Y, X, C) arrays with geometry) so they go straight into ``Project.add_image``; references
are (S, Y, X) uint8 with values 1..K (0 would mean "no ground truth" and is not used here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

FOLDERS = {
    "isbi": "isbi2012_em_membranes",
    "nuclei": "miccai2015_he_nuclei_2d",
    "drosophila": "drosophila_vnc_sstem_5class",
    "hippocampus": "msd_task04_hippocampus_mri",
    "hippo3d": "msd_task04_hippocampus_mri",
    "brain1": "pyradiomics_mri_lesions_3d",
    "ctorgans": "totalsegmentator_example_ct_3d",
}
# Volumes are painted on this many axial slices (spread over the slices that show every class)
# and scored on all their voxels the person did not paint.
AXIAL_SLICES = 5


@dataclass
class Sample:
    name: str
    image: "object"            # semsegloop.data.imageio.ImageData, (S, Y, X, C)
    reference: np.ndarray      # (S, Y, X) uint8, 1..K


@dataclass
class Case:
    key: str
    title: str
    dims: int
    classes: list[str]
    samples: list[Sample]
    paint: list[int]           # indices into samples that get strokes
    predict: list[int]         # unseen indices, scored
    notes: list[str] = field(default_factory=list)
    # True for volume cases: the painted volumes are the scored ones (on unpainted voxels).
    score_painted: bool = False

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), away from the ends (centres of k equal bins)."""
    k = min(k, n)
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def _unseen(n: int, paint: list[int], limit: int | None) -> list[int]:
    rest = [i for i in range(n) if i not in paint]
    if limit is not None and limit < len(rest):
        rest = [rest[i] for i in spread(len(rest), limit)]
    return rest


def _image(array: np.ndarray, name: str, source: Path, spacing=(1.0, 1.0, 1.0)):
    from semsegloop.data.imageio import Geometry, ImageData

    arr = np.ascontiguousarray(array)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None]  # (Y, X, C) -> one slice
    return ImageData(arr, Geometry.identity(spacing), name, str(source))


def require(data: Path, key: str) -> Path:
    folder = Path(data) / FOLDERS[key]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found")
    return folder


def load_isbi(data: Path = DEFAULT_DATA, n_paint: int = 3, max_unseen: int | None = None) -> Case:
    """ISBI 2012 EM: 30 slices 512^2; label 0 (membrane) -> 1, 255 (interior) -> 2."""
    from semsegloop.data.imageio import read_image

    folder = require(data, "isbi")
    samples = []
    for img_path in sorted((folder / "image").glob("*.png")):
        image = read_image(img_path)
        lab = read_image(folder / "label" / img_path.name).array[..., 0]
        ref = np.where(lab > 127, 2, 1).astype(np.uint8)
        samples.append(Sample(f"isbi_{img_path.stem}", image, ref))
    paint = spread(len(samples), n_paint)
    return Case("isbi", "ISBI 2012 EM membranes", 2, ["membrane", "interior"], samples, paint,
                _unseen(len(samples), paint, max_unseen))


def load_nuclei(data: Path = DEFAULT_DATA, n_paint: int = 3, max_unseen: int | None = None) -> Case:
    """MICCAI 2015 H&E nuclei: 15 RGB tiles; instance id 0 -> background 1, > 0 -> nucleus 2."""
    import tifffile
    from semsegloop.data.imageio import read_image

    folder = require(data, "nuclei")
    samples = []
    for img_path in sorted((folder / "image").glob("image*.png")):
        image = read_image(img_path)
        inst = tifffile.imread(folder / "mask_instances" / f"{img_path.stem}_instances.tif")
        if inst.shape != image.array.shape[1:3]:
            raise ValueError(f"{img_path.name}: mask {inst.shape} vs image {image.array.shape[1:3]}")
        ref = np.where(inst > 0, 2, 1).astype(np.uint8)[None]
        samples.append(Sample(img_path.stem, image, ref))
    # Tiles 01-07 are 20x and 08-15 40x: the spread picks from both magnifications.
    paint = spread(len(samples), n_paint)
    return Case("nuclei", "MICCAI 2015 H&E nuclei (RGB)", 2, ["background", "nucleus"], samples,
                paint, _unseen(len(samples), paint, max_unseen))


def load_drosophila(data: Path = DEFAULT_DATA, n_paint: int = 3,
                    max_unseen: int | None = None) -> Case:
    """Drosophila VNC ssTEM: 20 slices 1024^2, 5 classes; values 0..4 -> 1..5."""
    import tifffile

    folder = require(data, "drosophila")
    raw = tifffile.imread(folder / "raw_20x1024x1024.tif")
    lab = tifffile.imread(folder / "labels5_20x1024x1024.tif")
    if raw.shape != lab.shape or lab.max() > 4:
        raise ValueError(f"{folder}: raw {raw.shape} / labels {lab.shape} max {lab.max()}")
    samples = [Sample(f"vnc_{i:02d}", _image(raw[i], f"vnc_{i:02d}", folder),
                      (lab[i].astype(np.uint8) + 1)[None]) for i in range(raw.shape[0])]
    paint = spread(len(samples), n_paint)
    return Case("drosophila", "Drosophila VNC EM (5 classes)", 2,
                ["intracellular", "membrane", "glia_extracellular", "mitochondria", "synapse"],
                samples, paint, _unseen(len(samples), paint, max_unseen))


def load_hippocampus(data: Path = DEFAULT_DATA, n_paint: int = 4, n_unseen: int = 20) -> Case:
    """MSD Task04 hippocampus T1 MRI, 3D ~35x50x35 at 1 mm; 0, 1, 2 -> 1, 2, 3.

    260 cases are far more than a CPU benchmark needs: ``n_paint`` painted cases and
    ``n_unseen`` scored ones, both spread over the sorted case list so neither is a block
    of neighbours.
    """
    import SimpleITK as sitk
    from semsegloop.data.imageio import read_image

    folder = require(data, "hippocampus")
    names = sorted(p.name for p in (folder / "imagesTr").glob("*.nii.gz"))
    n_total = min(len(names), n_paint + n_unseen)
    chosen = [names[i] for i in spread(len(names), n_total)]
    samples = []
    for name in chosen:
        image = read_image(folder / "imagesTr" / name)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / name)))
        # Two label files are stored as float32; their values are still 0, 1, 2.
        lab = np.rint(lab).astype(np.uint8)
        if lab.shape != image.array.shape[:3] or lab.max() > 2:
            raise ValueError(f"{name}: labels {lab.shape} max {lab.max()} vs image "
                             f"{image.array.shape}")
        samples.append(Sample(name.replace(".nii.gz", ""), image, lab + 1))
    paint = spread(len(samples), n_paint)
    return Case("hippocampus", "MSD hippocampus MRI (3D)", 3,
                ["background", "anterior", "posterior"], samples, paint,
                [i for i in range(len(samples)) if i not in paint])


def _volume(path: Path, name: str):
    from semsegloop.data.imageio import read_image

    return read_image(path)


def load_hippo3d(data: Path = DEFAULT_DATA, n_cases: int = 3) -> Case:
    """MSD hippocampus: a few whole cases in one project, each painted on AXIAL_SLICES axial
    slices and scored on its whole volume."""
    import SimpleITK as sitk

    folder = require(data, "hippo3d")
    names = sorted(p.name for p in (folder / "imagesTr").glob("*.nii.gz"))
    samples = []
    for name in [names[i] for i in spread(len(names), n_cases)]:
        image = _volume(folder / "imagesTr" / name, name)
        lab = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / name))))
        samples.append(Sample(name.replace(".nii.gz", ""), image, lab.astype(np.uint8) + 1))
    idx = list(range(len(samples)))
    return Case("hippo3d", "MSD hippocampus MRI, whole cases (3D)", 3,
                ["background", "anterior", "posterior"], samples, idx, idx, score_painted=True)


def load_brain1(data: Path = DEFAULT_DATA) -> Case:
    """pyradiomics brain1: T1 MRI 256x256x25 at 0.78x0.78x6.5 mm, lesion ROI vs background."""
    import nrrd

    folder = require(data, "brain1")
    image = _volume(folder / "brain1_image.nrrd", "brain1")
    from semsegloop.data.imageio import read_labels

    lab, _ = read_labels(folder / "brain1_label.nrrd")
    if lab.shape != image.array.shape[:3]:
        raise ValueError(f"brain1: label {lab.shape} vs image {image.array.shape}")
    del nrrd
    ref = np.where(lab > 0, 2, 1).astype(np.uint8)
    return Case("brain1", "pyradiomics brain1 lesion MRI (3D, anisotropic)", 3,
                ["background", "lesion"], [Sample("brain1", image, ref)], [0], [0],
                score_painted=True)


CT_ORGANS = 6  # the largest structures of the example segmentation, plus background


def load_ctorgans(data: Path = DEFAULT_DATA) -> Case:
    """TotalSegmentator example CT (122x101x30, 3 mm): its CT_ORGANS largest structures
    (liver, colon, spleen, the two autochthonous muscles, stomach) + background (the rest)."""
    import SimpleITK as sitk

    folder = require(data, "ctorgans")
    image = _volume(folder / "example_ct_sm.nii.gz", "example_ct")
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg.nii.gz"))).astype(np.int64)
    if seg.shape != image.array.shape[:3]:
        raise ValueError(f"example_seg {seg.shape} vs image {image.array.shape}")
    ids, counts = np.unique(seg[seg > 0], return_counts=True)
    top = ids[np.argsort(-counts, kind="stable")[:CT_ORGANS]]
    names_all = {}
    for line in (folder / "LABELS.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit():
            names_all.setdefault(int(parts[0]), parts[1])
    ref = np.ones(seg.shape, np.uint8)
    for n, i in enumerate(top):
        ref[seg == i] = n + 2
    return Case("ctorgans", f"TotalSegmentator example CT, {CT_ORGANS} largest organs (3D)", 3,
                ["background"] + [names_all.get(int(i), f"label{i}") for i in top],
                [Sample("example_ct", image, ref)], [0], [0], score_painted=True)


LOADERS = {
    "isbi": load_isbi,
    "nuclei": load_nuclei,
    "drosophila": load_drosophila,
    "hippocampus": load_hippocampus,
    "hippo3d": load_hippo3d,
    "brain1": load_brain1,
    "ctorgans": load_ctorgans,
}


def load(key: str, data: Path = DEFAULT_DATA, quick: bool = False,
         max_unseen: int | None = None) -> Case:
    """The benchmark's case ``key``; ``quick`` keeps few unseen images for a smoke run,
    ``max_unseen`` at most that many (spread) unseen images of a 2D collection."""
    if max_unseen is not None and key in ("isbi", "nuclei", "drosophila"):
        return LOADERS[key](data, max_unseen=max_unseen)
    if key not in LOADERS:
        raise KeyError(f"unknown case {key!r}; choose from {', '.join(LOADERS)}")
    if key == "hippocampus":
        return load_hippocampus(data, n_paint=2 if quick else 4, n_unseen=4 if quick else 20)
    if key == "hippo3d":
        return load_hippo3d(data, n_cases=2 if quick else 3)
    if key in ("brain1", "ctorgans"):
        return LOADERS[key](data)
    return LOADERS[key](data, max_unseen=3 if quick else None)
