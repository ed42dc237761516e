"""Suggest: a deliberately ambiguous image is ranked first; painted images and slices are left
out; slices of a volume are spread out."""

from __future__ import annotations

import numpy as np
import pytest

from helpers_engine import make_square_project, square_image, tiny_models  # noqa: F401
from semsegloop.errors import CheckpointError, ProjectError
from semsegloop.predict.suggest import Suggestion, slice_scores, top


def test_the_ambiguous_image_is_suggested_first_and_painted_ones_never(tmp_path, tiny_models):
    proj, painted_id, _ = make_square_project(tmp_path / "p")
    with pytest.raises(CheckpointError, match="no trained model"):
        proj.suggest(1)
    proj.train(steps=40, device="cpu", seed=0)
    clear_a = proj.add_image(square_image(64, seed=3)[0], name="clear_a")
    # Every pixel halfway between the square's and the background's intensity: nothing to go by.
    rng = np.random.default_rng(4)
    ambiguous = proj.add_image(rng.normal(0.5, 0.02, (64, 64)).astype(np.float32), name="ambiguous")
    clear_b = proj.add_image(square_image(64, seed=5, lo=8, hi=40)[0], name="clear_b")
    ranked = proj.suggest(3, device="cpu")
    assert [r["image_id"] for r in ranked][0] == ambiguous
    assert {r["image_id"] for r in ranked} == {clear_a, ambiguous, clear_b}    # not the painted one
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert all(r["slice"] is None for r in ranked)
    assert len(proj.suggest(1, device="cpu")) == 1
    with pytest.raises(ProjectError, match="n >= 1"):
        proj.suggest(0)


def test_unpainted_slices_of_a_volume_are_ranked_and_spread_out():
    entropy = np.zeros((20, 4, 4), np.float32)
    entropy[8:12] = 0.9                # a block of uncertain slices
    entropy[3] = 0.5
    labels = np.zeros((20, 4, 4), np.uint8)
    labels[15, 0, 0] = 1               # slice 15 is painted
    cands = slice_scores("vol", entropy, labels)
    assert 15 not in [c.slice for c in cands] and len(cands) == 19
    # Without a gap the three most uncertain are neighbours; with one they spread out, and keep
    # away from the painted slice.
    assert [c.slice for c in top(cands, 3)] == [8, 9, 10]
    assert [c.slice for c in top(cands, 3, min_gap=3, painted={"vol": {15}})] == [8, 11, 3]
    assert [c.slice for c in top(cands, 2, min_gap=5, painted={"vol": {15}})] == [8, 3]
    assert top([Suggestion("a", None, 0.2), Suggestion("b", None, 0.7)], 1)[0].image_id == "b"
