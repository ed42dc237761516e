"""The accuracy floor end to end, one small synthetic case per dimension: what the person gets
from the same strokes is never worse than the ilastik-style forest of the benchmark (error
ratio (1 - Dice_engine) / (1 - Dice_forest) <= 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("skimage")

import semsegloop  # noqa: E402
from helpers_engine import blob_volume, tiny_models  # noqa: E402,F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from baseline_rf import RandomForestBaseline  # noqa: E402


def _mean_dice(pred, ref, K, where=None):
    where = np.ones(ref.shape, bool) if where is None else where
    d = []
    for k in range(1, K + 1):
        a, b = (pred == k) & where, (ref == k) & where
        if b.any():
            d.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    return float(np.mean(d))


def _cells(seed, size=96):
    """Textured cells (brighter, grainier) on a smooth noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = rng.normal(0.3, 0.1, (size, size)).astype(np.float32)
    ref = np.full((size, size), 2, np.uint8)
    for _ in range(6):
        cy, cx, r = rng.integers(14, size - 14), rng.integers(14, size - 14), rng.integers(7, 13)
        ref[np.hypot(yy - cy, xx - cx) < r] = 1
    grain = rng.normal(0, 0.25, (size, size)).astype(np.float32)
    img[ref == 1] += 0.25 + grain[ref == 1]
    return img, ref


def _strokes(ref, seed):
    from semsegloop.measure.simulate import simulate_strokes
    return simulate_strokes(ref[None], 2, pixels_per_class=120, seed=seed, dims=2)[0]


def test_2d_engine_is_never_worse_than_the_forest_on_unseen_images(tmp_path, tiny_models):
    data = [_cells(s) for s in range(5)]
    painted, unseen = [0, 1], [2, 3, 4]
    strokes = {i: _strokes(data[i][1], i) for i in painted}
    proj = semsegloop.Project.create(tmp_path / "p", ["cell", "background"], dims=2,
                                     preset="tiny2d")
    ids = {i: proj.add_image(data[i][0], name=f"im{i}") for i in range(5)}
    for i in painted:
        proj.set_labels(ids[i], strokes[i])
    res = proj.train(steps=30, device="cpu")
    assert res.estimate and "fused" in res.estimate
    rf = RandomForestBaseline(dims=2).fit([data[i][0][None, :, :, None] for i in painted],
                                          [strokes[i][None] for i in painted])
    ours = np.mean([_mean_dice(proj.predict(ids[i], save=False), data[i][1], 2) for i in unseen])
    forest = np.mean([_mean_dice(rf.predict(data[i][0][None, :, :, None])[0], data[i][1], 2)
                      for i in unseen])
    ratio = (1 - ours) / max(1 - forest, 1e-6)
    assert ratio <= 1.0, (ours, forest, ratio)


def test_3d_engine_is_never_worse_than_the_forest_on_the_painted_volume(tmp_path, tiny_models):
    img, ref = blob_volume((12, 40, 40), seed=3)
    rng = np.random.default_rng(0)
    img = img + rng.normal(0, 0.5, img.shape).astype(np.float32)   # a hard, noisy volume
    lab = np.zeros(ref.shape, np.uint8)
    for s in (3, 6, 8):
        core = ref[s] == 1
        ys, xs = np.nonzero(core)
        if len(ys):
            lab[s, int(ys.mean()), xs.min() + 2:xs.max() - 1] = 1
        lab[s, 2, 2:38] = 2
        lab[s, 37, 2:38] = 2
    proj = semsegloop.Project.create(tmp_path / "p", ["ball", "rest"], dims=3, preset="tiny3d")
    vid = proj.add_image(img, name="vol")
    proj.set_labels(vid, lab)
    proj.train(steps=10, device="cpu")
    unpainted = lab == 0
    ours = _mean_dice(proj.predict(vid, save=False, keep_strokes=False), ref, 2, unpainted)
    rf = RandomForestBaseline(dims=3).fit([img[..., None]], [lab])
    forest = _mean_dice(rf.predict(img[..., None]), ref, 2, unpainted)
    ratio = (1 - ours) / max(1 - forest, 1e-6)
    assert ratio <= 1.0, (ours, forest, ratio)
