"""Shared pieces of the engine tests: tiny network presets, synthetic images with strokes, and
project builders, so each test trains a real UNet in a second or two on a slow 2-core CPU."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

# Real presets read from $SEMSEGLOOP_MODELS_DIR (the engine's documented override). They are the
# shipped ones shrunk (fewer filters, smaller patch/batch) so a step takes ~0.1 s on 2 cores;
# the network, loss, sampler and checkpoint code they exercise is exactly the production path.
TINY_PRESETS = {
    "tiny2d": {"description": "test-only 2D UNet", "dims": 2, "network": "DynUNet",
               "filters": [8, 16, 32], "patch_size": [48, 48], "batch_size": 4,
               "learning_rate": 0.01, "norm": "instance"},
    "tiny3d": {"description": "test-only 3D UNet", "dims": 3, "network": "DynUNet",
               "filters": [8, 16, 32], "patch_size": [8, 32, 32], "batch_size": 2,
               "learning_rate": 0.01, "norm": "instance"},
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Make the tiny presets findable for the whole session (the shipped ones stay findable)."""
    d = tmp_path_factory.mktemp("models")
    for name, preset in TINY_PRESETS.items():
        (d / f"{name}.json").write_text(json.dumps({"name": name, **preset}), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEMSEGLOOP_MODELS_DIR", str(d))
        yield d


def square_image(size: int = 64, seed: int = 0, lo: int = 16, hi: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A bright square on dark noise (float32 (Y, X)) and its dense reference (1 square, 2 rest)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.2, 0.05, (size, size)).astype(np.float32)
    img[lo:hi, lo:hi] += 0.6
    ref = np.full((size, size), 2, np.uint8)
    ref[lo:hi, lo:hi] = 1
    return img, ref


def square_strokes(size: int = 64, lo: int = 16, hi: int = 48) -> np.ndarray:
    """A few short strokes: class 1 across the square's middle, class 2 in the dark margins."""
    lab = np.zeros((size, size), np.uint8)
    mid = (lo + hi) // 2
    lab[mid - 1:mid + 2, lo + 4:hi - 4] = 1
    lab[lo + 4:hi - 4, mid - 1:mid + 2] = 1
    lab[3:6, 4:size - 4] = 2
    lab[size - 6:size - 3, 4:size - 4] = 2
    lab[8:size - 8, 3:6] = 2
    return lab


def make_square_project(path: Path, preset: str = "tiny2d", size: int = 64, seed: int = 0,
                        classes=("square", "background")):
    """A 2D project holding one square image with strokes; returns (project, image_id, ref)."""
    import semsegloop

    proj = semsegloop.Project.create(path, list(classes), dims=2, preset=preset)
    img, ref = square_image(size, seed)
    image_id = proj.add_image(img, name="square")
    proj.set_labels(image_id, square_strokes(size))
    return proj, image_id, ref[None]


def blob_volume(shape=(8, 32, 32), seed: int = 0, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A bright ball in a noisy volume, (Z, Y, X[, C]) float32, with its reference (1 ball, 2 rest)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(np.float32)
    c = [(n - 1) / 2 for n in shape]
    r2 = ((z - c[0]) / (shape[0] / 3)) ** 2 + ((y - c[1]) / (shape[1] / 3)) ** 2 + \
         ((x - c[2]) / (shape[2] / 3)) ** 2
    ball = r2 < 1
    ref = np.where(ball, 1, 2).astype(np.uint8)
    chans = []
    for k in range(channels):
        v = rng.normal(0.0, 0.3, shape).astype(np.float32)
        v[ball] += 2.0 if k == 0 else -1.0   # channels carry different contrasts
        chans.append(v)
    img = chans[0] if channels == 1 else np.stack(chans, axis=-1)
    return img, ref


def volume_strokes(ref: np.ndarray) -> np.ndarray:
    """Strokes on the central slice and one off-centre slice: ball core and the corners."""
    lab = np.zeros(ref.shape, np.uint8)
    Z, Y, X = ref.shape
    for s in (Z // 2, max(0, Z // 2 - 2)):
        core = ref[s] == 1
        row = np.zeros_like(core)
        row[Y // 2 - 1:Y // 2 + 1, :] = True
        lab[s][core & row] = 1
        lab[s, 1:3, 1:X - 1] = 2
        lab[s, Y - 3:Y - 1, 1:X - 1] = 2
    return lab


def copy_project(src: Path, dst: Path):
    """An independent copy of a trained project (tests that modify it do not disturb others)."""
    import semsegloop

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("project.lock"))
    return semsegloop.Project.open(dst)


def dice(pred: np.ndarray, ref: np.ndarray, k: int) -> float:
    a, b = pred == k, ref == k
    return float(2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b)))


@contextlib.contextmanager
def read_only_folder(path: Path):
    """Make ``path`` a folder nobody may create files in, for real: mode 0555, or, for root
    (who ignores modes), the immutable attribute; skips the test where neither is possible."""
    import os
    import subprocess

    if os.name != "posix":
        pytest.skip("read-only folders are tested on POSIX")
    if os.geteuid() != 0:
        old = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(old)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: cannot make a folder read-only")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
