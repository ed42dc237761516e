"""Fused prediction: the blend predict_full returns is exactly w * network + (1 - w) * teacher
(+ grow-from-seeds on painted images), each model alone is available, labels + uncertainty
can be had without keeping K probabilities, and a reopened project predicts the same."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

import semsegloop  # noqa: E402
from helpers_engine import copy_project, square_image, square_strokes, tiny_models  # noqa: E402,F401


@pytest.fixture(scope="module")
def fused_project(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("fused") / "p"
    proj = semsegloop.Project.create(path, ["square", "background"], dims=2, preset="tiny2d")
    a = proj.add_image(square_image(64, seed=0)[0], name="a")
    b = proj.add_image(square_image(64, seed=1)[0], name="b")
    proj.set_labels(a, square_strokes(64))
    proj.train(steps=20, device="cpu")
    return path, a, b


def test_fused_prediction_is_the_blend_of_its_parts(fused_project):
    path, a, b = fused_project
    proj = semsegloop.Project.open(path)
    rnd = proj.rounds[-1]
    assert rnd["teacher"] and "weight" in rnd["fusion"] and rnd["fusion"]["estimate"]
    w = rnd["fusion"]["weight"]
    # On the unpainted image b: network and teacher only.
    pn = proj.predict_full(b, save=False, component="network").probabilities.astype(np.float32)
    pt = proj.predict_full(b, save=False, component="teacher").probabilities.astype(np.float32)
    fused = proj.predict_full(b, save=False).probabilities.astype(np.float32)
    np.testing.assert_allclose(fused, w * pn + (1 - w) * pt, atol=2e-3)
    np.testing.assert_allclose(pt.sum(axis=0), 1.0, atol=2e-3)
    # On the painted image a, grow-from-seeds joins with the round's three-way weights.
    from semsegloop.learn import seeded
    if seeded.available() and rnd["fusion"].get("seeded_weights"):
        wa, wb, wc = rnd["fusion"]["seeded_weights"]
        pn = proj.predict_full(a, save=False, component="network").probabilities.astype(np.float32)
        pt = proj.predict_full(a, save=False, component="teacher").probabilities.astype(np.float32)
        ps = proj.predict_full(a, save=False, component="seeded").probabilities.astype(np.float32)
        got = proj.predict_full(a, save=False).probabilities.astype(np.float32)
        np.testing.assert_allclose(got, wa * pn + wb * pt + wc * ps, atol=3e-3)


def test_labels_and_uncertainty_without_probabilities_match_the_full_prediction(fused_project):
    path, _, b = fused_project
    proj = semsegloop.Project.open(path)
    full = proj.predict_full(b, save=False)
    lean = proj.predict_full(b, save=False, keep_probabilities=False)
    assert lean.probabilities is None
    np.testing.assert_array_equal(lean.labels, full.labels)
    np.testing.assert_allclose(lean.entropy.astype(np.float32), full.entropy.astype(np.float32),
                               atol=2e-3)
    # predict() of a (Y, X) image gives (Y, X) labels, the fused ones.
    np.testing.assert_array_equal(proj.predict(b, save=False), full.labels[0])
    assert proj.predict_proba(b).shape == (2, 64, 64)


def test_a_reopened_project_refits_the_same_teacher(fused_project, tmp_path):
    path, _, b = fused_project
    first = semsegloop.Project.open(path).predict_full(b, save=False, component="teacher")
    again = copy_project(path, tmp_path / "copy")
    second = again.predict_full(b, save=False, component="teacher")
    np.testing.assert_array_equal(first.probabilities, second.probabilities)
    assert not list((tmp_path / "copy").rglob("*.pkl"))


def test_an_image_painted_with_one_class_keeps_a_sharp_uncertainty_map(tmp_path, tiny_models):
    # Grow from seeds needs two classes: on an image painted with one, nothing grows, and the
    # network and teacher carry every pixel alone (their blend, renormalised).
    from semsegloop.learn import seeded

    if not seeded.available():
        pytest.skip("Slicer's GrowCut (slicer-core) is not installed")
    proj = semsegloop.Project.create(tmp_path / "p", ["square", "background"], dims=2,
                                     preset="tiny2d")
    a = proj.add_image(square_image(64, seed=0)[0], name="a")
    b = proj.add_image(square_image(64, seed=1)[0], name="b")
    proj.set_labels(a, square_strokes(64))
    one = np.zeros((64, 64), np.uint8)
    one[2:5, 2:40] = 2  # background only
    proj.set_labels(b, one)
    seeded.warm_up()
    proj.train(steps=10, device="cpu")
    rnd = proj.rounds[-1]
    if not rnd["fusion"].get("seeded_weights") or rnd["fusion"]["seeded_weights"][2] == 0:
        pytest.skip("this round gave grow from seeds no weight")
    wa, wb, wc = rnd["fusion"]["seeded_weights"]
    pn = proj.predict_full(b, save=False, component="network").probabilities.astype(np.float32)
    pt = proj.predict_full(b, save=False, component="teacher").probabilities.astype(np.float32)
    got = proj.predict_full(b, save=False)
    np.testing.assert_allclose(got.probabilities.astype(np.float32),
                               (wa * pn + wb * pt) / (wa + wb), atol=3e-3)


def test_the_painted_images_grown_in_the_round_are_the_ones_prediction_would_grow(tmp_path, tiny_models):
    # The round grows its painted images from all their strokes inside its budget and hands
    # them to prediction; a reopened project (nothing kept) grows them itself: same result.
    from semsegloop.learn import seeded

    if not seeded.available():
        pytest.skip("Slicer's GrowCut (slicer-core) is not installed")
    proj = semsegloop.Project.create(tmp_path / "p", ["square", "background"], dims=2,
                                     preset="tiny2d")
    # Two painted images: stroke components are held out, so grow from seeds is scored (a
    # collection of three holds out whole images and gives it no weight).
    ids = [proj.add_image(square_image(64, seed=i)[0], name=f"im{i}") for i in range(2)]
    for i in ids:
        proj.set_labels(i, square_strokes(64))
    proj.train(time_budget_s=6, device="cpu")
    rnd = proj.rounds[-1]
    if not rnd["fusion"].get("seeded_weights") or rnd["fusion"]["seeded_weights"][2] == 0:
        pytest.skip("this round gave grow from seeds no weight")
    r = rnd["round"]
    assert {i for (rr, i) in proj._grown if rr == r} == set(ids)
    reopened = copy_project(tmp_path / "p", tmp_path / "copy")
    for i in ids:
        grown = seeded.grow_from_seeds(_teacher_view(reopened, i), proj.labels(i)[None], 2,
                                       reopened.geometry(i).spacing)
        np.testing.assert_array_equal(proj._grown[(r, i)][1], grown)
        a = proj.predict_full(i, save=False, component="seeded")
        b = reopened.predict_full(i, save=False, component="seeded")
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(proj.predict_full(i, save=False).labels,
                                      reopened.predict_full(i, save=False).labels)
        # The reopened project keeps what it grew, for Refine and the next prediction.
        np.testing.assert_array_equal(reopened._grown[(r, i)][1], grown)


def _teacher_view(proj, image_id):
    from semsegloop.learn.teacher import teacher_input

    return teacher_input(proj.image(image_id).array, proj._meta["normalization"])
