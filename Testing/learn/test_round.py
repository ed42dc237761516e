"""A training round on arrays: strokes held out and scored, the fusion record and self-estimate
filled in, and a warm-started round whose network scores worse on held-out strokes keeps the
previous network."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from helpers_engine import TINY_PRESETS, square_image, square_strokes  # noqa: E402
from semsegloop.learn.round import RoundImage, RoundSettings, run_round  # noqa: E402


def _images(n=2):
    out = []
    for i in range(n):
        img, _ = square_image(64, seed=i)
        lab = square_strokes(64)
        out.append(RoundImage(f"im{i}", img[None, :, :, None], lab[None]))
    return out


def _settings(round_index, lr=0.01, steps=40):
    preset = {"name": "tiny2d", **TINY_PRESETS["tiny2d"], "learning_rate": lr}
    return RoundSettings(n_classes=2, dims=2, channels=1, spacing=(1.0, 1.0, 1.0),
                         preset=preset, round_index=round_index, steps=steps, device="cpu",
                         class_names=["square", "background"])


def test_a_round_holds_out_strokes_and_reports_its_own_accuracy():
    out = run_round(_images(), _settings(1))
    f = out.extra["fusion"]
    assert f["held_out_pixels"] > 0 and 0.0 <= f["weight"] <= 1.0
    est = f["estimate"]
    assert set(est) >= {"fused", "network", "teacher"}
    assert set(est["fused"]) == {"square", "background"}
    # The fused estimate is never below either model alone (same held-out pixels).
    assert np.mean(list(est["fused"].values())) >= np.mean(list(est["teacher"].values())) - 1e-9
    assert out.extra["teacher"] is not None
    # Refitted on one core beside the student, it predicts with every core after the round.
    from semsegloop.learn.training import cpu_threads
    assert out.extra["teacher"].forest.n_jobs == cpu_threads()


def test_an_image_held_out_whole_is_unseen_by_the_student():
    """A collection holds out whole images; such an image must get no pseudo-labels (the
    student would learn it from the teacher and then be scored on it)."""
    from semsegloop.learn.fusion import holdout_masks

    images = _images(4)
    held = holdout_masks([im.labels for im in images], 2, 2, seed=1)
    whole = [n for n, (im, h) in enumerate(zip(images, held))
             if h.any() and not (im.labels * ~h).any()]
    assert whole, "the test needs an image held out whole"
    events = []
    out = run_round(images, _settings(1, steps=5), log=events.append)
    teacher = [e for e in events if e.get("event") == "teacher"][0]
    assert teacher["pseudo_images"] == len(images) - len(whole)
    assert out.extra["fusion"]["held_out_pixels"] == int(sum(h.sum() for h in held))


def test_a_regressing_warm_started_round_keeps_the_previous_model():
    """The round's decision step with real models: the previous round's trained network
    against a new one that lost what it knew (freshly initialised), scored with a real teacher
    on held-out strokes of real images."""
    import copy

    from semsegloop.learn import training as tr
    from semsegloop.learn.fusion import holdout_masks
    from semsegloop.learn.networks import build_network
    from semsegloop.learn.round import _fuse, plan_for
    from semsegloop.learn.teacher import Teacher

    settings = _settings(2)
    first = run_round(_images(), _settings(1, steps=30))
    previous = copy.deepcopy(first.model).eval()
    images = _images()
    held = holdout_masks([im.labels for im in images], 2, 2, seed=1)
    train = [np.where(h, 0, im.labels).astype(np.uint8) for im, h in zip(images, held)]
    t = Teacher(2, 2, (1.0, 1.0, 1.0))
    X, (y, h) = t.samples([im.image for im in images], [im.labels > 0 for im in images],
                          [[im.labels for im in images], held])
    h = h.astype(bool)
    t.fit(X[~h], y[~h].astype(np.uint8))
    p_teacher, y_h = t.proba_samples(X[h]), y[h].astype(np.uint8)
    plan = plan_for(settings, [im.labels.shape for im in images])
    tr.seed_everything(5)
    regressed = build_network(plan).eval()
    stop = lambda: False  # noqa: E731
    record, keep = _fuse(images, train, held, regressed, previous, plan, first.device,
                         p_teacher, y_h, settings, ["square", "background"], stop, None)
    assert keep is True and record["kept_previous"] is True
    assert record["candidates"]["previous"] > record["candidates"]["new"]
    # The other way round the new network stays.
    record, keep = _fuse(images, train, held, previous, regressed, plan, first.device,
                         p_teacher, y_h, settings, ["square", "background"], stop, None)
    assert keep is False and "kept_previous" not in record


def test_a_warm_round_that_improves_keeps_its_new_model():
    first = run_round(_images(), _settings(1, steps=5))
    start = {k: v.clone() for k, v in first.model.state_dict().items()}

    def warm(model):
        model.load_state_dict(start)
        return "checkpoints/round_001"
    out = run_round(_images(), _settings(2, steps=30), warm_start=warm)
    assert out.extra["kept_previous"] is False
    changed = any(not np.array_equal(v.numpy(), start[k].numpy())
                  for k, v in out.model.state_dict().items())
    assert changed


def test_a_round_scores_every_painted_image_unseen_and_records_the_unit_noise():
    """Three painted images, one held out: k-fold forests score each image unseen, and the
    spread of those scores is the standard error the network's share has to beat."""
    images = _images(3)
    for n, im in enumerate(images):    # brighter and brighter: a forest fitted on the others
        im.image = im.image + np.float32(0.3 * n)    # is wrong on part of each, unevenly
    out = run_round(images, _settings(1, steps=3))
    f = out.extra["fusion"]
    assert len(f["unit_scores"]) == 3 and f["held_units"] == 1
    assert f["unit_se"] == pytest.approx(np.std(f["unit_scores"], ddof=1), abs=1e-3)
    assert f["unit_se"] > 0.01, f["unit_scores"]


def test_grow_from_seeds_gets_no_weight_where_held_out_strokes_cannot_score_it():
    """A collection holding out whole images has no held-out pixel on an image with training
    strokes, so nothing grows where it is scored: it gets no weight (and is not grown). With
    two painted images stroke components are held out, next to training strokes: it is
    scored and weighted."""
    from semsegloop.learn import seeded

    if not seeded.available():
        pytest.skip("Slicer's GrowCut (slicer-core) is not installed")
    seeded.warm_up()
    loading = seeded._loading.get("thread")
    if loading is not None:
        loading.join()                  # imported before the rounds, as in a long session
    whole = run_round(_images(3), _settings(1, steps=3))
    assert "seeded_weights" not in whole.extra["fusion"] and whole.extra["grown"] == {}
    assert "seeded" not in whole.extra["fusion"]["estimate"]
    parts = run_round(_images(2), _settings(1, steps=3))
    assert len(parts.extra["fusion"]["seeded_weights"]) == 3
    # Components held out beside training strokes: one unit's noise does not apply.
    assert parts.extra["fusion"]["unit_se"] == 0.0
    assert set(parts.extra["grown"]) == {"im0", "im1"}
