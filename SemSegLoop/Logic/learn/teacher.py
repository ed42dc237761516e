"""The teacher: a random forest on scale-space features fitted on the strokes (ilastik's pixel
classifier), computed block by block so whole volumes fit in bounded memory.

Why: a forest on filter-bank features reaches a sensible segmentation from strokes in seconds,
while a UNet needs thousands of steps to do as well. The student trains on the forest's
confident pixels (pseudo-labels, strokes always win), and the forest's probabilities are fused
with the student's at prediction time (learn/fusion.py), so a student that got only tens of
steps on a laptop CPU can never make the result worse than the forest alone.

Features are computed in blocks with a halo as wide as the widest kernel, so block-wise
features equal whole-image ones exactly; the training pixels are subsampled per class; the
forest is fitted in chunks of trees (Stop is checked between chunks) and kept as its training
samples (safetensors), from which it is re-fitted deterministically when a project is reopened
(no pickle). Feature arrays of recently used images are cached, so a second round on the same
images does not recompute them."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from typing import Callable, Iterator

import numpy as np

log = logging.getLogger("semsegloop")

# ilastik's default scales up to 16 px; sigma 16 lifted the CT organs case from 0.57 to 0.61
# mean Dice (bench, same strokes).
TEACHER_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
# Stored teachers hold features, so a change to the input or the scales needs a new round:
# 2 = per-image rescaled fixed-scale input (teacher_input) and scales in voxels.
FEATURE_VERSION = 2
# Scales in mm (True) or in voxels (False, see Teacher.__init__).
PHYSICAL_SIGMAS = False
MAX_SAMPLES_PER_CLASS = 20_000
N_TREES = 64
TREE_CHUNK = 16
# Voxels of one feature block (3D) or pixels of one tile (2D): ~13-25 float32 features each,
# so a block's features take a few hundred MB at most.
BLOCK_VOXELS = 4_000_000
# Whole feature arrays of recent images are kept up to this many bytes (second round, predict).
CACHE_BYTES = 1.0 * 2**30


def available() -> bool:
    try:
        import sklearn.ensemble  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------ features

# Fixed-scale inputs (8-bit RGB, raw) are rescaled per image for the teacher: see teacher_input.
PER_IMAGE_FOR = ("scale", "none")


def teacher_input(array: np.ndarray, spec: dict) -> np.ndarray:
    """The image as the teacher sees it: the project's normalisation (same offset and scale as
    the network's input) without its clipping.

    Why: percentile and CT-window clipping keep the network's inputs bounded, but they flatten
    the brightest and darkest structures (membranes on EM, bone and air on CT) that the filter
    bank separates classes with; on a synthetic membrane case the clipped input cost the forest
    0.18 mean Dice. Trees do not mind the range.

    Fixed-scale projects (8-bit RGB histology, raw) are rescaled per image and channel between
    its 0.5 and 99.5 percentiles instead: a forest's thresholds transfer between images only
    when their brightness and stain are aligned (H&E nuclei, 6 unseen tiles: teacher 0.64 ->
    0.72 mean Dice, the benchmark's forest anchor 0.71)."""
    from semsegloop.data.normalization import normalization_stats

    if spec.get("method") in PER_IMAGE_FOR:
        spec = {"method": "percentile"}
    out = np.empty(array.shape, np.float32)
    for c, (offset, scale) in enumerate(normalization_stats(array, spec)):
        o = out[..., c]
        o[...] = array[..., c]
        if offset != 0.0:
            o -= np.float32(offset)
        if scale != 1.0:
            o *= np.float32(scale)
    return out


def halo(dims: int, spacing, sigmas=None) -> list[int]:
    """Per spatial axis, how far a feature value reaches into the image (the widest kernel)."""
    from semsegloop.learn.features import axis_sigmas

    sigmas = sigmas or TEACHER_SIGMAS
    sp = list(spacing[-dims:]) if spacing is not None else [1.0] * dims
    r = [0] * dims
    for sigma in sigmas:
        for ax, s in enumerate(axis_sigmas(sigma, sp)):
            r[ax] = max(r[ax], max(1, int(math.ceil(3 * max(round(s, 4), 0.3)))))
    return r


def _unit_blocks(shape: tuple, block_voxels: int) -> list[tuple[slice, ...]]:
    """Cut a spatial ``shape`` into blocks of at most ``block_voxels`` (split the longest axis)."""
    blocks = [tuple(slice(0, n) for n in shape)]
    out = []
    while blocks:
        b = blocks.pop()
        size = [s.stop - s.start for s in b]
        if int(np.prod(size)) <= block_voxels or max(size) < 8:
            out.append(b)
            continue
        ax = int(np.argmax(size))
        mid = b[ax].start + size[ax] // 2
        lo, hi = list(b), list(b)
        lo[ax] = slice(b[ax].start, mid)
        hi[ax] = slice(mid, b[ax].stop)
        blocks += [tuple(hi), tuple(lo)]
    return sorted(out, key=lambda b: tuple(s.start for s in b))


def feature_blocks(x: np.ndarray, dims: int, spacing, block_voxels: int = BLOCK_VOXELS,
                   sigmas=None, where: np.ndarray | None = None
                   ) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """Yield (index into (S, Y, X), features of that block (..., F)) covering ``x``
    (S, Y, X, C). 2D: per slice (index (s, ys, xs)); 3D: (zs, ys, xs). ``where`` (S, Y, X bool)
    skips blocks with no True voxel (training needs features at strokes only)."""
    from semsegloop.learn.features import add_features

    sigmas = sigmas or TEACHER_SIGMAS
    S = x.shape[0]
    if dims == 2:
        h = halo(2, spacing, sigmas)
        for s in range(S):
            if where is not None and not where[s].any():
                continue
            for b in _unit_blocks(x.shape[1:3], block_voxels):
                if where is not None and not where[s][b].any():
                    continue
                ext = tuple(slice(max(0, sl.start - r), min(n, sl.stop + r))
                            for sl, r, n in zip(b, h, x.shape[1:3]))
                f = add_features(x[s][ext], 2, sigmas, spacing)
                inner = tuple(slice(sl.start - e.start, sl.stop - e.start) for sl, e in zip(b, ext))
                yield (slice(s, s + 1),) + b, f[inner][None]
    else:
        h = halo(3, spacing, sigmas)
        for b in _unit_blocks(x.shape[:3], block_voxels):
            if where is not None and not where[b].any():
                continue
            ext = tuple(slice(max(0, sl.start - r), min(n, sl.stop + r))
                        for sl, r, n in zip(b, h, x.shape[:3]))
            f = add_features(x[ext], 3, sigmas, spacing)
            inner = tuple(slice(sl.start - e.start, sl.stop - e.start) for sl, e in zip(b, ext))
            yield b, f[inner]


def whole_features(x: np.ndarray, dims: int, spacing, sigmas=None) -> np.ndarray:
    """(S, Y, X, F) features of the whole image in one go (reference for the block-wise path)."""
    from semsegloop.learn.features import add_features

    sigmas = sigmas or TEACHER_SIGMAS
    if dims == 2:
        return np.stack([add_features(x[s], 2, sigmas, spacing) for s in range(x.shape[0])])
    return add_features(x, 3, sigmas, spacing)


class _FeatureCache:
    """Feature arrays of recent images, keyed by a fingerprint of the image, LRU by bytes."""

    def __init__(self, max_bytes: float = CACHE_BYTES):
        self.max_bytes = max_bytes
        self.items: "OrderedDict[str, np.ndarray]" = OrderedDict()

    @staticmethod
    def key(x: np.ndarray, dims: int, spacing) -> str:
        from semsegloop.learn.features import features_per_sigma

        h = hashlib.sha1()
        h.update(repr((x.shape, str(x.dtype), dims, tuple(spacing or ()), TEACHER_SIGMAS,
                       features_per_sigma(dims))).encode())
        flat = x.reshape(-1)
        h.update(np.ascontiguousarray(flat[:: max(1, flat.size // 65536)]).tobytes())
        h.update(np.float64(flat.sum(dtype=np.float64)).tobytes())
        return h.hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        f = self.items.get(key)
        if f is not None:
            self.items.move_to_end(key)
        return f

    def put(self, key: str, f: np.ndarray) -> None:
        if f.nbytes > self.max_bytes:
            return
        self.items[key] = f
        while sum(v.nbytes for v in self.items.values()) > self.max_bytes:
            self.items.popitem(last=False)


FEATURE_CACHE = _FeatureCache()


def image_features(x: np.ndarray, dims: int, spacing) -> np.ndarray | None:
    """Whole (S, Y, X, F) features when they fit the cache (computed block-wise, then kept);
    None for images too large to hold, which are then handled block by block."""
    from semsegloop.learn.features import feature_channels

    nbytes = int(np.prod(x.shape[:3])) * feature_channels(dims, x.shape[-1], TEACHER_SIGMAS) * 4
    if nbytes > FEATURE_CACHE.max_bytes:
        return None
    key = FEATURE_CACHE.key(x, dims, spacing)
    f = FEATURE_CACHE.get(key)
    if f is None:
        f = np.empty(x.shape[:3] + (feature_channels(dims, x.shape[-1], TEACHER_SIGMAS),),
                     np.float32)
        for idx, fb in feature_blocks(x, dims, spacing):
            f[idx] = fb
        FEATURE_CACHE.put(key, f)
    return f


# ------------------------------------------------------------------------------ the forest

class CancelledError(Exception):
    """The teacher was stopped (the caller's cancel returned True)."""


class Teacher:
    """Random forest over the filter bank; fit on (features, class) samples, predict per block."""

    def __init__(self, n_classes: int, dims: int, spacing, n_trees: int = N_TREES, seed: int = 0,
                 n_jobs: int = 1):
        self.n_classes = n_classes
        self.dims = dims
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else None
        # The filter bank's scales are in voxels of each axis, as ilastik's are: on a volume of
        # 6.5 mm slices (pyradiomics brain1, 0.78 mm in-plane) scales made isotropic in mm
        # (no smoothing across slices) gave 0.521/0.578 mean Dice at rounds 0/1, voxel scales
        # 0.530/0.631, the benchmark's forest anchor 0.538/0.635. Isotropic volumes are alike.
        self.feature_spacing = self.spacing if PHYSICAL_SIGMAS else None
        self.n_trees = n_trees
        self.seed = seed
        self.n_jobs = n_jobs
        self.forest = None
        self.X: np.ndarray | None = None
        self.y: np.ndarray | None = None

    # -- samples
    def samples(self, images: list[np.ndarray], masks: list[np.ndarray | None],
                values: list[list[np.ndarray]], cancel: Callable[[], bool] | None = None
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Features at the True pixels of ``masks``, and per entry of ``values`` (each a list of
        per-image arrays on the image grid) the values at the same pixels, in the same order."""
        stop = cancel or (lambda: False)
        X, vals = [], [[] for _ in values]
        for n, (x, m) in enumerate(zip(images, masks)):
            if m is None or not m.any():
                continue
            if stop():
                raise CancelledError
            f = image_features(x, self.dims, self.feature_spacing)
            if f is not None:
                X.append(f[m])
                for j, v in enumerate(values):
                    vals[j].append(v[n][m])
                continue
            # Block by block, then back to the image's raster order (as with whole features).
            xs, vs, flat = [], [[] for _ in values], []
            for idx, fb in feature_blocks(x, self.dims, self.feature_spacing, where=m):
                if stop():
                    raise CancelledError
                mb = m[idx]
                xs.append(fb[mb])
                for j, v in enumerate(values):
                    vs[j].append(v[n][idx][mb])
                local = np.nonzero(mb)
                glob = tuple(c + sl.start for c, sl in zip(local, idx))
                flat.append(np.ravel_multi_index(glob, m.shape))
            order = np.argsort(np.concatenate(flat), kind="stable")
            X.append(np.concatenate(xs)[order])
            for j in range(len(values)):
                vals[j].append(np.concatenate(vs[j])[order])
        if not X:
            return np.zeros((0, 0), np.float32), [np.zeros(0) for _ in values]
        return np.concatenate(X), [np.concatenate(v) for v in vals]

    def fit(self, X: np.ndarray, y: np.ndarray, cancel: Callable[[], bool] | None = None
            ) -> "Teacher":
        """Fit on at most MAX_SAMPLES_PER_CLASS samples per class (a fixed-seed subsample), in
        chunks of TREE_CHUNK trees so a Stop is seen within one chunk."""
        from sklearn.ensemble import RandomForestClassifier

        stop = cancel or (lambda: False)
        rng = np.random.default_rng(self.seed)
        keep = []
        for k in np.unique(y):
            idx = np.flatnonzero(y == k)
            if len(idx) > MAX_SAMPLES_PER_CLASS:
                idx = np.sort(rng.choice(idx, MAX_SAMPLES_PER_CLASS, replace=False))
            keep.append(idx)
        keep = np.concatenate(keep) if keep else np.zeros(0, np.int64)
        self.X = np.ascontiguousarray(X[keep], dtype=np.float32)
        self.y = np.ascontiguousarray(y[keep], dtype=np.uint8)
        if len(np.unique(self.y)) < 2:
            self.forest = None
            return self
        # Strokes are weighted as painted (no class re-weighting): "balanced" weights cost
        # 0.03 mean Dice on the CT organs case, where small organs cannot give as many
        # stroke pixels as large ones, and the student's sampler balances classes anyway.
        forest = RandomForestClassifier(n_estimators=TREE_CHUNK, min_samples_leaf=2,
                                        n_jobs=self.n_jobs, random_state=self.seed,
                                        warm_start=True)
        n = 0
        while n < self.n_trees:
            if stop():
                raise CancelledError
            n = min(self.n_trees, n + TREE_CHUNK)
            forest.set_params(n_estimators=n)
            forest.fit(self.X, self.y)
        self.forest = forest
        return self

    def set_jobs(self, n_jobs: int) -> "Teacher":
        """Cores the forest predicts with (a forest fitted on one core beside the student
        predicts with all of them once training is over)."""
        self.n_jobs = n_jobs
        if self.forest is not None:
            self.forest.set_params(n_jobs=n_jobs)
        return self

    # -- prediction
    def proba_samples(self, F: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N, K) float32 probabilities over all K classes."""
        out = np.zeros((F.shape[0], self.n_classes), np.float32)
        if self.forest is None:
            if self.y is not None and len(self.y):  # one painted class: it is everywhere
                out[:, int(self.y[0]) - 1] = 1.0
            else:
                out[:] = 1.0 / self.n_classes
            return out
        cols = self.forest.classes_.astype(np.int64) - 1
        for a in range(0, F.shape[0], 1 << 18):  # bounded temporaries
            out[a:a + (1 << 18), cols] = self.forest.predict_proba(F[a:a + (1 << 18)])
        return out

    def predict_blocks(self, x: np.ndarray, cancel: Callable[[], bool] | None = None
                       ) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
        """Yield (index into (S, Y, X), (K, *block) float32 probabilities) covering ``x``."""
        stop = cancel or (lambda: False)
        f = image_features(x, self.dims, self.feature_spacing)
        blocks = ([(b, f[b]) for b in _blocks_of(x.shape[:3], self.dims)] if f is not None
                  else feature_blocks(x, self.dims, self.feature_spacing))
        for idx, fb in blocks:
            if stop():
                raise CancelledError
            p = self.proba_samples(fb.reshape(-1, fb.shape[-1]))
            yield idx, np.moveaxis(p.reshape(fb.shape[:-1] + (self.n_classes,)), -1, 0)

    def predict_proba(self, x: np.ndarray, cancel: Callable[[], bool] | None = None) -> np.ndarray:
        """(K, S, Y, X) float16 probabilities of a whole image."""
        out = np.empty((self.n_classes,) + x.shape[:3], np.float16)
        for idx, p in self.predict_blocks(x, cancel):
            out[(slice(None),) + tuple(idx)] = p
        return out

    # -- persistence (arrays + JSON; no pickle)
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"X": self.X if self.X is not None else np.zeros((0, 0), np.float32),
                  "y": self.y if self.y is not None else np.zeros(0, np.uint8)}
        meta = {"n_classes": self.n_classes, "dims": self.dims, "spacing": self.spacing,
                "n_trees": self.n_trees, "seed": self.seed, "sigmas": list(TEACHER_SIGMAS),
                "min_samples_leaf": 2, "class_weight": None,
                "features_per_sigma": _fps(self.dims), "feature_version": FEATURE_VERSION}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict, meta: dict, n_jobs: int = 1) -> "Teacher":
        """Re-fit the forest from its stored samples (same seed, same samples: same trees)."""
        if (list(meta.get("sigmas", [])) != list(TEACHER_SIGMAS)
                or meta.get("features_per_sigma") != _fps(int(meta["dims"]))
                or meta.get("feature_version", 1) != FEATURE_VERSION):
            from semsegloop.errors import CheckpointError
            raise CheckpointError("the teacher of this round was fitted on other features "
                                  f"(sigmas {meta.get('sigmas')}); train a new round")
        t = cls(int(meta["n_classes"]), int(meta["dims"]), meta.get("spacing"),
                n_trees=int(meta["n_trees"]), seed=int(meta["seed"]), n_jobs=n_jobs)
        X, y = np.asarray(arrays["X"], np.float32), np.asarray(arrays["y"], np.uint8)
        t.X, t.y = X, y
        if len(y) and len(np.unique(y)) >= 2:
            # The stored samples are already the subsample: fit() keeps them all.
            t.fit(X, y)
        return t


def _fps(dims: int) -> int:
    from semsegloop.learn.features import features_per_sigma
    return features_per_sigma(dims)


def _blocks_of(shape: tuple, dims: int) -> list[tuple[slice, ...]]:
    """The same block grid as feature_blocks, for cached whole-image features."""
    if dims == 2:
        return [(slice(s, s + 1),) + b for s in range(shape[0])
                for b in _unit_blocks(shape[1:3], BLOCK_VOXELS)]
    return _unit_blocks(shape, BLOCK_VOXELS)


def pseudo_from_proba(p: np.ndarray, labels: np.ndarray, confidence: float = 0.75) -> np.ndarray:
    """(K, S, Y, X) probabilities -> (S, Y, X) uint8 pseudo-labels: the class where the forest
    is at least ``confidence`` sure, else 0; painted pixels keep their class."""
    best = np.argmax(p, axis=0)
    sure = np.take_along_axis(p, best[None], axis=0)[0] >= confidence
    pseudo = np.where(sure, best + 1, 0).astype(np.uint8)
    pseudo[labels > 0] = labels[labels > 0]
    return pseudo


def teacher_pseudo_labels(images: list[np.ndarray], labels: list[np.ndarray], n_classes: int,
                          dims: int, spacing=None, confidence: float = 0.75,
                          n_trees: int = N_TREES, seed: int = 0, n_jobs: int = 1,
                          time_limit_s: float | None = None,
                          cancel=None) -> list[np.ndarray | None]:
    """Fit a forest on the painted pixels of ``images`` and label each image's confident pixels
    (kept for callers of the first teacher; the round uses Teacher directly).

    Returns per image an (S, Y, X) uint8 map (0 where the forest is less than ``confidence``
    sure) or None for images left out once ``time_limit_s`` ran out or ``cancel`` returned True.
    """
    t0 = time.perf_counter()
    stop = cancel or (lambda: False)
    teacher = Teacher(n_classes, dims, spacing, n_trees=n_trees, seed=seed, n_jobs=n_jobs)
    try:
        X, (y,) = teacher.samples(images, [lab > 0 for lab in labels], [labels], stop)
        y = y.astype(np.uint8)
        if not len(y):
            return [None] * len(images)
        teacher.fit(X, y, stop)
    except CancelledError:
        return [None] * len(images)
    out: list[np.ndarray | None] = []
    for x, lab in zip(images, labels):
        if stop() or (time_limit_s is not None and time.perf_counter() - t0 > time_limit_s):
            out.append(None)
            continue
        try:
            out.append(pseudo_from_proba(teacher.predict_proba(x, stop), lab, confidence))
        except CancelledError:
            out.append(None)
    log.info("teacher: %d trees on %d painted pixels, pseudo-labels for %d image(s) in %.1f s",
             n_trees, len(teacher.y), sum(o is not None for o in out), time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------ on disk

def save_teacher(directory, name: str, teacher: Teacher, strokes: dict[str, np.ndarray],
                 fusion: dict) -> None:
    """Write the forest's samples, the round's strokes (flat indices and classes of the painted
    pixels per image: the next round tells new strokes from old ones, and prediction seeds the
    region growing with them) and the fusion record as a safetensors + JSON checkpoint
    (learn/checkpoint.py: atomic, checksummed, no pickle)."""
    import torch

    from semsegloop.learn.checkpoint import save_checkpoint

    arrays, meta = teacher.state()
    tensors = {"X": torch.from_numpy(np.ascontiguousarray(arrays["X"], np.float32)),
               "y": torch.from_numpy(np.ascontiguousarray(arrays["y"], np.uint8))}
    ids = sorted(strokes)
    for n, i in enumerate(ids):
        flat = strokes[i].ravel()
        idx = np.flatnonzero(flat)
        tensors[f"strokes_{n}"] = torch.from_numpy(idx.astype(np.int64))
        tensors[f"classes_{n}"] = torch.from_numpy(flat[idx].astype(np.uint8))
    meta = {"teacher": meta, "fusion": fusion, "stroke_images": ids,
            "stroke_shapes": [list(strokes[i].shape) for i in ids]}
    save_checkpoint(directory, name, tensors, meta)


def load_teacher(directory, name: str, n_jobs: int = 1) -> tuple[Teacher, dict, dict]:
    """(Teacher re-fitted from its samples, fusion record, {image id: (S, Y, X) uint8 strokes})."""
    from semsegloop.learn.checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(directory, name)
    teacher = Teacher.from_state({"X": tensors["X"].numpy(), "y": tensors["y"].numpy()},
                                 meta["teacher"], n_jobs=n_jobs)
    strokes = {}
    for n, (i, shape) in enumerate(zip(meta["stroke_images"], meta["stroke_shapes"])):
        lab = np.zeros(int(np.prod(shape)), np.uint8)
        lab[tensors[f"strokes_{n}"].numpy()] = tensors[f"classes_{n}"].numpy()
        strokes[i] = lab.reshape(shape)
    return teacher, meta["fusion"], strokes
