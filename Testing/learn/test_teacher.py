"""The teacher forest: block-wise features and predictions equal the whole-image ones, the
forest re-fitted from its stored samples gives the same probabilities, Stop is seen between
tree chunks, and the block-wise path bounds what it holds."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from semsegloop.learn import teacher as T  # noqa: E402


def _volume(seed=0, shape=(12, 40, 36)):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, shape + (1,)).astype(np.float32)
    zz, yy, xx = np.indices(shape)
    ball = (zz - 6) ** 2 / 16 + (yy - 20) ** 2 / 100 + (xx - 18) ** 2 / 64 < 1
    x[ball, 0] += 1.0
    ref = np.where(ball, 1, 2).astype(np.uint8)
    lab = np.zeros(shape, np.uint8)
    lab[6, 18:23, 14:22] = 1
    lab[6, 2:5, 2:30] = 2
    lab[2, 30:34, 5:30] = 2
    return x, lab, ref


@pytest.mark.parametrize("dims", [2, 3])
def test_block_wise_features_equal_whole_image_features(dims):
    x, _, _ = _volume()
    spacing = (2.0, 1.0, 1.0)
    whole = T.whole_features(x, dims, spacing)
    got = np.full(whole.shape, np.nan, np.float32)
    n = 0
    for idx, f in T.feature_blocks(x, dims, spacing, block_voxels=300):
        got[idx] = f
        n += 1
    assert n > 4  # really cut into blocks
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5)


def test_block_wise_teacher_equals_the_whole_image_teacher(monkeypatch):
    x, lab, _ = _volume()
    whole = T.Teacher(2, 3, (1.0, 1.0, 1.0), n_trees=16, seed=3)
    Xw, (yw,) = whole.samples([x], [lab > 0], [[lab]])
    whole.fit(Xw, yw.astype(np.uint8))
    p_whole = whole.predict_proba(x)
    # No cache: features are computed block by block, for training and for prediction.
    monkeypatch.setattr(T.FEATURE_CACHE, "max_bytes", 0)
    monkeypatch.setattr(T, "BLOCK_VOXELS", 700)
    blocked = T.Teacher(2, 3, (1.0, 1.0, 1.0), n_trees=16, seed=3)
    Xb, (yb,) = blocked.samples([x], [lab > 0], [[lab]])
    np.testing.assert_allclose(Xb, Xw, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(yb, yw)
    blocked.fit(Xb, yb.astype(np.uint8))
    assert len(list(T._unit_blocks(x.shape[:3], T.BLOCK_VOXELS))) > 4
    p_blocked = blocked.predict_proba(x)
    np.testing.assert_allclose(p_blocked.astype(np.float32), p_whole.astype(np.float32), atol=2e-3)
    assert (np.argmax(p_blocked, 0) == np.argmax(p_whole, 0)).mean() > 0.999


def test_teacher_refit_from_its_stored_samples_predicts_the_same(tmp_path):
    x, lab, ref = _volume(seed=1)
    t = T.Teacher(2, 3, (1.0, 1.0, 1.0), n_trees=16, seed=0)
    X, (y,) = t.samples([x], [lab > 0], [[lab]])
    t.fit(X, y.astype(np.uint8))
    T.save_teacher(tmp_path, "round_001_teacher", t, {"vol": lab}, {"weight": 0.3})
    again, fusion, strokes = T.load_teacher(tmp_path, "round_001_teacher")
    assert fusion == {"weight": 0.3}
    np.testing.assert_array_equal(strokes["vol"], lab)
    np.testing.assert_array_equal(again.predict_proba(x), t.predict_proba(x))
    # And it learned something: the ball is found.
    pred = np.argmax(t.predict_proba(x), 0) + 1
    assert ((pred == 1) & (ref == 1)).sum() / (ref == 1).sum() > 0.6
    assert not any(p.suffix == ".pkl" for p in tmp_path.iterdir())


def test_stop_is_seen_between_tree_chunks():
    x, lab, _ = _volume()
    t = T.Teacher(2, 3, None, n_trees=4 * T.TREE_CHUNK)
    X, (y,) = t.samples([x], [lab > 0], [[lab]])
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2  # let two chunks through, then stop
    with pytest.raises(T.CancelledError):
        t.fit(X, y.astype(np.uint8), cancel)
    assert len(calls) == 3


def test_pseudo_labels_keep_strokes_and_leave_unsure_pixels_out():
    p = np.zeros((2, 1, 2, 2), np.float32)
    p[0] = [[[0.9, 0.6], [0.2, 0.5]]]
    p[1] = 1 - p[0]
    lab = np.array([[[0, 0], [0, 1]]], np.uint8)
    got = T.pseudo_from_proba(p, lab, confidence=0.75)
    np.testing.assert_array_equal(got, [[[1, 0], [2, 1]]])


def test_fixed_scale_images_are_rescaled_per_image_for_the_teacher():
    # Two RGB tiles of one scene, the second with a weaker stain: the project's scale 1/255
    # keeps them apart, the teacher's input puts them on one scale.
    rng = np.random.default_rng(0)
    tile = rng.integers(40, 220, size=(1, 32, 32, 3)).astype(np.uint8)
    faint = (tile.astype(np.float32) * 0.6 + 60).astype(np.uint8)
    spec = {"method": "scale", "factor": 1 / 255}
    a, b = T.teacher_input(tile, spec), T.teacher_input(faint, spec)
    assert np.abs(a - b).max() < 0.02
    # CT keeps its absolute window (HU mean the same in every image).
    ct = np.array([[[[-1000], [0]], [[40], [1000]]]], np.int16)
    assert np.allclose(T.teacher_input(ct, {"method": "ct", "window": [-1000, 1000]}).ravel(),
                       [-1, 0, 0.04, 1])


def test_a_teacher_stored_with_other_features_asks_for_a_new_round():
    from semsegloop.errors import CheckpointError

    rng = np.random.default_rng(1)
    X = rng.random((40, 5)).astype(np.float32)
    y = (X[:, 0] > 0.5).astype(np.uint8) + 1
    arrays, meta = T.Teacher(2, 2, None).fit(X, y).state()
    T.Teacher.from_state(arrays, meta)
    meta.pop("feature_version")
    with pytest.raises(CheckpointError, match="other features"):
        T.Teacher.from_state(arrays, meta)
