"""Refine: one click fixes a known error region and nothing far from it changes (2D and 3D, both
geodesic paths); through the Project, old strokes passed again change nothing and bad input is
refused with a message."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

import semsegloop
from helpers_engine import copy_project, make_square_project, tiny_models  # noqa: F401
from semsegloop.errors import LabelError, ProjectError
from semsegloop.predict.geodesic import geodistk_available
from semsegloop.predict.refine import RefineSettings, refine_labels

METHODS = ["numpy", pytest.param("geodistk", marks=pytest.mark.skipif(
    not geodistk_available(), reason="GeodisTK is not installed (optional; CI builds it)"))]


def disks_case(missed=(180, 80, 12)):
    """Four bright disks on noise; the 'network' finds three and misses the one at ``missed``."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    ref = np.ones((1, 256, 256), np.uint8)
    for cy, cx, r in [(60, 60, 25), (60, 190, 30), missed, (190, 190, 22)]:
        ref[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 2
    img = ndi.gaussian_filter((ref == 2) + rng.normal(0, 0.25, ref.shape), (0, 1, 1))
    p = np.where(ref == 2, 0.9, 0.1).astype(np.float32)
    miss = np.zeros(ref.shape, bool)
    miss[0] = (yy - missed[0]) ** 2 + (xx - missed[1]) ** 2 <= missed[2] ** 2
    p[miss] = 0.08
    probs = np.stack([1 - p, p]).astype(np.float16)
    return img[..., None].astype(np.float32), probs, ref, miss


@pytest.mark.parametrize("method", METHODS)
def test_one_click_in_a_missed_disk_fixes_it_and_nothing_far_changes(method):
    img, probs, ref, miss = disks_case()
    current = (np.argmax(probs, axis=0) + 1).astype(np.uint8)
    click = np.zeros_like(ref)
    click[0, 178:183, 78:83] = 2
    out = refine_labels(img, probs, current, click, (1.0, 1.0, 1.0), 2, RefineSettings(method=method))
    assert (out[miss] == 2).mean() > 0.9
    near = ndi.binary_dilation(miss, iterations=3)
    assert not ((out != current) & ~near).any()        # the other disks and background untouched
    assert (out[click > 0] == 2).all()


@pytest.mark.parametrize("method", METHODS)
def test_a_click_on_one_slice_fixes_a_missed_ball_in_3d_with_anisotropic_spacing(method):
    rng = np.random.default_rng(2)
    z, y, x = np.mgrid[:20, :48, :48]
    ball = ((z - 10) * 2.0) ** 2 + (y - 24) ** 2 + (x - 24) ** 2 <= 12 ** 2
    other = (z - 10) ** 2 * 4.0 + (y - 8) ** 2 + (x - 40) ** 2 <= 5 ** 2
    img = ndi.gaussian_filter((ball | other) + rng.normal(0, 0.2, ball.shape), 1)[..., None]
    p = np.where(other, 0.9, 0.1).astype(np.float32)        # the network misses the ball
    probs = np.stack([1 - p, p]).astype(np.float16)
    current = (np.argmax(probs, axis=0) + 1).astype(np.uint8)
    click = np.zeros(ball.shape, np.uint8)
    click[10, 22:27, 22:27] = 2
    out = refine_labels(img.astype(np.float32), probs, current, click, (2.0, 1.0, 1.0), 3,
                        RefineSettings(method=method))
    assert (out[ball] == 2).mean() > 0.85
    assert (out[5] == 2).sum() > 0 and (out[15] == 2).sum() > 0    # it reached other slices
    far = ~ndi.binary_dilation(ball, iterations=2)
    assert not ((out != current) & far).any()


def test_strokes_that_agree_with_the_segmentation_change_nothing():
    img, probs, ref, _ = disks_case()
    current = (np.argmax(probs, axis=0) + 1).astype(np.uint8)
    agree = np.zeros_like(ref)
    agree[0, 55:65, 55:65] = 2
    np.testing.assert_array_equal(
        refine_labels(img, probs, current, agree, (1.0, 1.0, 1.0), 2), current)


# ------------------------------------------------------------------------------ through Project
@pytest.fixture(scope="module")
def predicted(tmp_path_factory, tiny_models):
    """A trained tiny project whose square image has a saved round-1 prediction."""
    path = tmp_path_factory.mktemp("refine") / "square"
    proj, image_id, ref = make_square_project(path)
    proj.train(steps=40, device="cpu", seed=0)
    proj.predict(image_id, device="cpu")
    proj.close()
    return path, image_id, ref


def _click_on_error(proj, image_id, ref):
    # (Y, X) image: predictions and labels come back (Y, X); the reference is (1, Y, X).
    pred = proj.saved_prediction(image_id).reshape(ref.shape)
    err = (pred != ref) & (proj.labels(image_id).reshape(ref.shape) == 0)
    click = np.zeros_like(ref)
    if err.any():
        z, yy, xx = np.nonzero(err)
        click[z[0], yy[0], xx[0]] = ref[z[0], yy[0], xx[0]]
    else:  # a perfect prediction: a stroke of the other class in the square's corner
        click[0, 20, 20] = 2
    return click


def test_refine_saves_the_refined_map_keeps_strokes_and_adds_them_to_the_labels(predicted, tmp_path):
    path, image_id, ref = predicted
    proj = copy_project(path, tmp_path / "p")
    before = proj.labels(image_id).reshape(ref.shape)
    click = _click_on_error(proj, image_id, ref)
    out = proj.refine(image_id, click)
    assert out.shape == ref.shape and out.dtype == np.uint8 and out.min() >= 1
    labels = proj.labels(image_id).reshape(ref.shape)
    painted = labels > 0
    np.testing.assert_array_equal(out[painted], labels[painted])
    assert (labels[click > 0] == click[click > 0]).all() and painted.sum() >= (before > 0).sum()
    np.testing.assert_array_equal(proj.refined_prediction(image_id), out)
    # A new prediction of the round starts again from the network.
    proj.predict(image_id, device="cpu")
    assert proj.refined_prediction(image_id) is None


def test_passing_the_whole_labels_gives_the_same_result_as_only_the_new_strokes(predicted, tmp_path):
    path, image_id, ref = predicted
    a = copy_project(path, tmp_path / "a")
    b = copy_project(path, tmp_path / "b")
    click = _click_on_error(a, image_id, ref)
    only_new = a.refine(image_id, click)
    whole = b.labels(image_id).reshape(ref.shape)
    whole[click > 0] = click[click > 0]
    np.testing.assert_array_equal(b.refine(image_id, whole), only_new)
    np.testing.assert_array_equal(a.labels(image_id), b.labels(image_id))


def test_refine_bad_input_is_refused_with_a_message(predicted, tmp_path, tiny_models):
    path, image_id, ref = predicted
    fresh, fid, _ = make_square_project(tmp_path / "fresh")
    click = np.zeros_like(ref)
    click[0, 30, 30] = 1
    with pytest.raises(ProjectError, match="no prediction of round 0.*train and predict"):
        fresh.refine(fid, click)
    proj = copy_project(path, tmp_path / "p")
    with pytest.raises(LabelError, match="strokes for image 'square' have shape"):
        proj.refine(image_id, click[:, :32])
    other = semsegloop.data.imageio.Geometry.identity((1.0, 2.0, 2.0))
    with pytest.raises(LabelError, match="different grid"):
        proj.refine(image_id, click, geometry=other)
    with pytest.raises(LabelError, match="value 3"):
        proj.refine(image_id, np.where(click > 0, 3, 0).astype(np.uint8))
    with pytest.raises(LabelError, match="empty"):
        proj.refine(image_id, np.zeros_like(ref))
    assert proj.refined_prediction(image_id) is None    # nothing was refined on the way


@pytest.mark.parametrize("method", METHODS)
def test_a_click_does_not_cross_a_high_intensity_wall(method):
    """The network calls everything class 1; a click of class 2 next to a bright wall fixes its
    side and leaves everything beyond the wall alone (the pull crossed walls when a strong
    edge's geodesic cost was capped at 20 steps, lam 0.95)."""
    rng = np.random.default_rng(1)
    img = rng.normal(0, 0.1, (1, 96, 96)).astype(np.float32)
    img[0, :, 46:50] += 5.0
    p2 = np.full((1, 96, 96), 0.3, np.float32)
    probs = np.stack([1 - p2, p2]).astype(np.float16)
    current = np.ones((1, 96, 96), np.uint8)
    click = np.zeros_like(current)
    click[0, 46:51, 38:43] = 2
    out = refine_labels(img[..., None], probs, current, click, (1.0, 1.0, 1.0), 2,
                        RefineSettings(method=method))
    assert (out[0, 38:59, 26:46] == 2).mean() > 0.8    # the clicked side is fixed around it
    assert (out[0, :, 50:] == 1).all()                 # nothing beyond the wall changed
    crossing = refine_labels(img[..., None], probs, current, click, (1.0, 1.0, 1.0), 2,
                             RefineSettings(method=method, lam=0.95))
    assert (crossing[0, :, 50:] == 2).any()            # the capped cost let it through


@pytest.mark.parametrize("method", METHODS)
def test_a_click_where_the_network_is_unsure_changes_a_round_patch_not_its_whole_region(method):
    """In a smooth region the geodesic cost is near zero however far, so a click's pull alone
    relabelled everything up to the border of the region refined, a box (ISBI: 4,480 of 5,900
    pixels wrong). The straight-line distance bounds it: the change is a disc about the click."""
    rng = np.random.default_rng(3)
    img = ndi.gaussian_filter(rng.normal(0, 0.05, (1, 200, 200)), (0, 1, 1)).astype(np.float32)
    p2 = np.full((1, 200, 200), 0.45, np.float32)           # the network is unsure everywhere
    probs = np.stack([1 - p2, p2]).astype(np.float16)
    current = np.ones((1, 200, 200), np.uint8)
    click = np.zeros_like(current)
    click[0, 98:103, 98:103] = 2
    st = RefineSettings(method=method, recalibrate=False)
    out = refine_labels(img[..., None], probs, current, click, (1.0, 1.0, 1.0), 2, st)
    yy, xx = np.nonzero(out[0] != current[0])
    r = np.hypot(yy - 100, xx - 100)
    # Where the network is unsure any pull flips a pixel: reach * ln(strength / min-pull level).
    bound = st.reach * np.log(1 / st.min_pull) + 3
    assert r.max() < min(bound, st.margin)              # round, inside the region refined
    assert (out[0][np.hypot(*np.mgrid[-100:100, -100:100]) < 0.5 * bound] == 2).all()
    flood = refine_labels(img[..., None], probs, current, click, (1.0, 1.0, 1.0), 2,
                          RefineSettings(method=method, recalibrate=False, spatial=0.0))
    box = flood[0] != current[0]
    assert box[100 - st.margin, 100] and box[100 - st.margin, 100 - st.margin]  # the old box
