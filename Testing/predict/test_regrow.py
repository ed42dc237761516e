"""Regrowing the round's grow-from-seeds share for Refine: the box it grows in is bounded and
spacing-aware, a click in an object the round's growing missed moves exactly that share there,
and nothing outside the box changes; through Project.refine on a painted volume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from helpers_engine import tiny_models  # noqa: F401
from semsegloop.learn import seeded
from semsegloop.predict.refine import active_strokes
from semsegloop.predict.regrow import region, with_regrown_seeds

needs_growcut = pytest.mark.skipif(not seeded.available(),
                                   reason="Slicer's GrowCut (slicer-core) is not installed")


def test_the_box_is_the_whole_volume_when_it_fits_and_bounded_otherwise():
    active = np.zeros((20, 30, 30), bool)
    active[10, 15, 15] = True
    whole = region(active, (1.0, 1.0, 1.0), max_voxels=20 * 30 * 30)
    assert whole == (slice(0, 20), slice(0, 30), slice(0, 30))
    big = np.zeros((40, 60, 60), bool)
    big[20, 30, 31] = True
    box = region(big, (3.0, 1.0, 1.0), max_voxels=8000)
    sizes = [s.stop - s.start for s in box]
    assert np.prod(sizes) <= 8000 and min(sizes) >= 3
    assert all(s.start <= c < s.stop for s, c in zip(box, (20, 30, 31)))
    # The same margin in mm: a third as many 3 mm slices as 1 mm rows.
    assert sizes[0] < sizes[1] / 2
    assert np.prod(sizes) > 4000  # as large as the cap allows, not a token box
    assert region(np.ones((2, 30, 30), bool), (1.0, 1.0, 1.0)) is None


def _two_balls():
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:24, :48, :48]
    a = (z - 12) ** 2 + (y - 14) ** 2 + (x - 14) ** 2 <= 7 ** 2
    b = (z - 12) ** 2 + (y - 34) ** 2 + (x - 34) ** 2 <= 7 ** 2
    grey = ndi.gaussian_filter((a | b).astype(np.float32) * 100
                               + rng.normal(0, 5, a.shape).astype(np.float32), 1)
    strokes = np.zeros(a.shape, np.uint8)      # 1 = ball, 2 = background
    strokes[12, 12:17, 12:17] = 1              # ball A only
    strokes[12, 2:5, 2:46] = 2
    strokes[12, 43:46, 2:46] = 2
    return grey, a, b, strokes


@needs_growcut
def test_a_click_in_a_ball_the_growing_missed_moves_the_share_there_and_only_there():
    grey, a, b, strokes = _two_balls()
    grown = seeded.grow(grey, strokes, (1.0, 1.0, 1.0))
    assert (grown[b] == 2).mean() > 0.9           # the round's growing missed ball B
    w = 0.4
    other = np.stack([np.full(a.shape, 0.45, np.float32), np.full(a.shape, 0.55, np.float32)])
    onehot = np.stack([grown == 1, grown == 2]).astype(np.float32)
    probs = ((1 - w) * other + w * onehot).astype(np.float16)
    current = (np.argmax(probs, axis=0) + 1).astype(np.uint8)
    after = strokes.copy()
    after[12, 32:37, 32:37] = 1                   # a click in B
    act = active_strokes(after, current)
    out = with_regrown_seeds(probs, grown, grey, after, act, (1.0, 1.0, 1.0), w)
    assert ((np.argmax(out, axis=0) + 1)[b] == 1).mean() > 0.9
    diff = out - probs.astype(np.float32)
    moved = np.abs(diff).max(axis=0) > 1e-3
    # Exactly the share moves, from the old grown class to the new one.
    np.testing.assert_allclose(np.abs(diff[:, moved]), w, atol=2e-3)
    assert moved[b].mean() > 0.9 and not (moved & a).any()
    assert (moved & ~ndi.binary_dilation(b, iterations=3)).sum() < 0.02 * b.sum()
    # A bounded box: nothing outside it changes, and its faces keep the round's labels, so
    # background inside the box far from B stays background.
    small = with_regrown_seeds(probs, grown, grey, after, act, (1.0, 1.0, 1.0), w,
                               max_voxels=20 * 24 * 24)
    box = region(act, (1.0, 1.0, 1.0), max_voxels=20 * 24 * 24)
    outside = np.ones(a.shape, bool)
    outside[box] = False
    np.testing.assert_array_equal(small[:, outside], probs.astype(np.float32)[:, outside])
    assert ((np.argmax(small, axis=0) + 1)[b & ~outside] == 1).mean() > 0.9
    inside_bg = np.zeros(a.shape, bool)
    inside_bg[box] = True
    inside_bg &= ~ndi.binary_dilation(a | b, iterations=2)
    assert ((np.argmax(small, axis=0) + 1)[inside_bg] == 2).mean() > 0.98


@needs_growcut
def test_nothing_changes_without_a_share_or_grown_labels():
    grey, a, b, strokes = _two_balls()
    probs = np.full((2,) + a.shape, 0.5, np.float16)
    act = strokes > 0
    assert with_regrown_seeds(probs, None, grey, strokes, act, (1, 1, 1), 0.4) is probs
    assert with_regrown_seeds(probs, np.ones(a.shape, np.uint8), grey, strokes, act, (1, 1, 1),
                              0.0) is probs


@needs_growcut
def test_project_refine_of_a_painted_volume_uses_the_regrown_share(tmp_path, tiny_models):
    from semsegloop import Project
    from semsegloop.data.normalization import normalize
    from semsegloop.learn.teacher import teacher_input
    from semsegloop.predict.refine import refine_labels

    grey, a, b, strokes = _two_balls()
    proj = Project.create(tmp_path / "p", ["ball", "background"], dims=3, preset="tiny3d")
    vid = proj.add_image(grey, name="v")
    proj.set_labels(vid, strokes)
    proj.train(steps=4, device="cpu", seed=0)
    proj.close()
    # Whatever this tiny round chose, give grow from seeds a share (the round's record is
    # what prediction and Refine read).
    meta_path = tmp_path / "p" / "project.json"
    meta = json.loads(meta_path.read_text())
    meta["rounds"][-1]["fusion"]["seeded_weights"] = [0.3, 0.3, 0.4]
    meta_path.write_text(json.dumps(meta))
    proj = Project.open(tmp_path / "p")
    full = proj.predict_full(vid, device="cpu")
    grown = proj._grown[(proj.round, vid)][1]     # kept by the prediction for Refine
    click = np.zeros(a.shape, np.uint8)
    click[12, 32:37, 32:37] = 1
    labels = strokes.copy()
    labels[click > 0] = 1
    current = full.labels.copy()
    current[strokes > 0] = strokes[strokes > 0]
    raw = teacher_input(proj.image(vid).array, proj._meta["normalization"])
    expect_p = with_regrown_seeds(full.probabilities, grown, raw.mean(axis=-1), labels,
                                  active_strokes(labels, current), (1.0, 1.0, 1.0), 0.4)
    x = normalize(proj.image(vid).array, proj._meta["normalization"])
    expected = refine_labels(x, expect_p, current, labels, (1.0, 1.0, 1.0), 3)
    got = proj.refine(vid, click)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(expect_p - full.probabilities.astype(np.float32)).max() > 0.39  # it moved
    plain = refine_labels(x, full.probabilities, current, labels, (1.0, 1.0, 1.0), 3)
    # Regrown, the click fills more of ball B than Refine on the round's share (0.96 / 0.87).
    assert (got[b] == 1).mean() > (plain[b] == 1).mean() + 0.03
    assert (got[click > 0] == 1).all()
