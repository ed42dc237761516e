"""Training patches drawn around painted pixels, class-balanced, with augmentation.

Strokes cover ~1% of the pixels, so uniform crops would mostly hold nothing to learn from;
each patch is centred (with jitter) on a painted pixel of a class drawn uniformly, so rare
classes are seen as often as common ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TrainingImage:
    """One image prepared for training: network input float32 (S, Y, X, C), painted labels
    (S, Y, X) and, optionally, pseudo-labels from the pixel-classifier teacher (0 = none)."""
    image: np.ndarray
    labels: np.ndarray
    name: str
    pseudo: np.ndarray | None = None


class PatchSampler:
    """Draws (image, labels) batches of ``patch_size`` from painted pixels.

    2D mode (dims=2): patches are (Y, X) crops of one slice. 3D mode: (Z, Y, X) crops.
    ``in_plane_aug_only`` restricts rotations to the Y/X plane, for anisotropic volumes.
    """

    def __init__(self, images: list[TrainingImage], n_classes: int, patch_size, dims: int,
                 seed: int = 0, augment: bool = True, in_plane_aug_only: bool = True,
                 image_channels: int | None = None):
        self.images = images
        self.n_classes = n_classes
        self.patch = tuple(int(p) for p in patch_size)
        self.dims = dims
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        self.in_plane_aug_only = in_plane_aug_only
        # Channels past these are derived features: they get the gain, not the brightness shift.
        self.image_channels = image_channels
        self.with_pseudo = any(ti.pseudo is not None for ti in images)
        # Targets as (S, Y, X, T): T = 1 (strokes) or 2 (strokes, pseudo-labels), cropped and
        # augmented together with the image.
        self.targets = []
        for ti in images:
            if self.with_pseudo:
                pseudo = ti.pseudo if ti.pseudo is not None else np.zeros_like(ti.labels)
                self.targets.append(np.stack([ti.labels, pseudo], axis=-1))
            else:
                self.targets.append(ti.labels[..., None])
        self.by_class = self._index([ti.labels for ti in images])
        self.classes = [k for k in range(1, n_classes + 1) if self.by_class[k]]
        if self.with_pseudo:
            self.by_class_pseudo = self._index([t[..., 1] for t in self.targets])
            self.classes_pseudo = [k for k in range(1, n_classes + 1) if self.by_class_pseudo[k]]

    def _index(self, maps) -> list[list[tuple[int, np.ndarray]]]:
        """Flat indices of labelled pixels per class per image: sampling is O(1) per patch."""
        by_class: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(self.n_classes + 1)]
        for i, m in enumerate(maps):
            flat = m.ravel()
            nz = np.flatnonzero(flat)
            vals = flat[nz]
            for k in np.unique(vals):
                by_class[int(k)].append((i, nz[vals == k]))
        return by_class

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, *patch) float32 and int64 targets (0 = unlabeled): (B, *patch) strokes, or
        (B, 2, *patch) strokes and pseudo-labels when the images carry pseudo-labels.

        With pseudo-labels, half the patches are centred on them (all over the images, where
        the strokes are not), half on the strokes."""
        xs, ys = [], []
        for _ in range(batch_size):
            if self.with_pseudo and self.classes_pseudo and self.rng.random() < 0.5:
                classes, by_class = self.classes_pseudo, self.by_class_pseudo
            else:
                classes, by_class = self.classes, self.by_class
            k = classes[self.rng.integers(len(classes))]
            entries = by_class[k]
            sizes = np.array([len(e[1]) for e in entries], dtype=np.float64)
            # Images are drawn by sqrt of their painted count: large strokes dominate less.
            p = np.sqrt(sizes)
            i, idx = entries[self.rng.choice(len(entries), p=p / p.sum())]
            flat = idx[self.rng.integers(len(idx))]
            ti = self.images[i]
            s, y, x = np.unravel_index(flat, ti.labels.shape)
            img, lab = self._crop(i, (s, y, x))
            if self.augment:
                img, lab = self._augment(img, lab)
            xs.append(img)
            ys.append(lab if self.with_pseudo else lab[0])
        return np.stack(xs).astype(np.float32, copy=False), np.stack(ys).astype(np.int64)

    def _crop(self, i: int, centre) -> tuple[np.ndarray, np.ndarray]:
        """(C, *patch) image and (T, *patch) targets around ``centre`` of image ``i``."""
        ti, tg = self.images[i], self.targets[i]
        if self.dims == 2:
            s = centre[0]
            img2, lab2 = ti.image[s], tg[s]                   # (Y, X, C), (Y, X, T)
            c = centre[1:]
            spatial = img2.shape[:2]
        else:
            img2, lab2 = ti.image, tg                         # (Z, Y, X, C), (Z, Y, X, T)
            c = centre
            spatial = img2.shape[:3]
        starts = []
        for ax, (cc, p, n) in enumerate(zip(c, self.patch, spatial)):
            jitter = int(self.rng.integers(-(p // 4), p // 4 + 1)) if p > 4 else 0
            starts.append(int(cc) - p // 2 + jitter)
        img = _crop_pad(img2, starts, self.patch)
        lab = _crop_pad(lab2, starts, self.patch)
        return np.moveaxis(img, -1, 0), np.moveaxis(lab, -1, 0)

    def _augment(self, img: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # img (C, *patch), lab (T, *patch): spatial axes start at 1 in both.
        nd = lab.ndim - 1
        plane = (nd - 2, nd - 1)  # Y, X
        for ax in range(nd):
            if (ax in plane or not self.in_plane_aug_only) and self.rng.random() < 0.5:
                img = np.flip(img, axis=ax + 1)
                lab = np.flip(lab, axis=ax + 1)
        if self.patch[plane[0]] == self.patch[plane[1]]:
            k = int(self.rng.integers(4))
            img = np.rot90(img, k, axes=(plane[0] + 1, plane[1] + 1))
            lab = np.rot90(lab, k, axes=(plane[0] + 1, plane[1] + 1))
        # Intensity jitter: contrast and brightness, as between scanner sessions or stains.
        # One gain for all channels keeps derived features consistent with the image.
        c = self.image_channels or img.shape[0]
        gain = np.float32(self.rng.uniform(0.85, 1.15))
        bias = self.rng.uniform(-0.1, 0.1, size=(c,) + (1,) * nd).astype(np.float32)
        img = img * gain
        img[:c] += bias
        return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def _crop_pad(arr: np.ndarray, starts, size) -> np.ndarray:
    """Crop ``size`` from the leading axes at ``starts``, reflect-padding outside the array."""
    nd = len(size)
    src, pads = [], []
    for st, sz, n in zip(starts, size, arr.shape[:nd]):
        a, b = max(st, 0), min(st + sz, n)
        src.append(slice(a, b))
        pads.append((a - st, st + sz - b))
    out = arr[tuple(src)]
    if any(p != (0, 0) for p in pads):
        pads += [(0, 0)] * (arr.ndim - nd)
        # Reflect needs the padding smaller than the axis; fall back to edge for tiny images.
        mode = "reflect" if all(p[0] < s and p[1] < s for p, s in zip(pads, out.shape)) else "edge"
        if arr.dtype.kind in "iu":
            out = np.pad(out, pads, mode="constant")  # labels: padding is unlabeled
        else:
            out = np.pad(out, pads, mode=mode)
    return out
