"""Tests of the simulated annotator (semsegloop.measure.simulate): strokes drawn from a reference and
correction disks, as used by the demo and the benchmark.

All inputs are synthetic maps made here, so the tests need no data folder.
"""

import time

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from semsegloop.measure.simulate import default_slices, simulate_correction, simulate_strokes


def voronoi_map(shape=(256, 256), n_seeds=40, n_classes=5, seed=1) -> np.ndarray:
    """A (Y, X) map of convex cells, each of one class 1..n_classes, every class present."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, size=(n_seeds, 2)) * np.array(shape)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    _, nearest = cKDTree(pts).query(np.stack([yy.ravel(), xx.ravel()], axis=1))
    return (nearest.reshape(shape) % n_classes + 1).astype(np.uint8)


def membrane_map(shape=(256, 256), spacing=32, width=3) -> np.ndarray:
    """EM-like 2-class map: a grid of thin 'membrane' lines (class 1) around 'interiors' (2)."""
    ref = np.full(shape, 2, np.uint8)
    for o in range(spacing // 2, shape[0], spacing):
        ref[o:o + width, :] = 1
    for o in range(spacing // 2, shape[1], spacing):
        ref[:, o:o + width] = 1
    return ref


def class_counts(labels, k_max):
    return [int((labels == k).sum()) for k in range(1, k_max + 1)]


# ---------------------------------------------------------------------------- strokes


def test_same_seed_same_strokes_other_seed_other_strokes():
    ref = voronoi_map()[None]
    a = simulate_strokes(ref, 5, seed=3)
    b = simulate_strokes(ref, 5, seed=3)
    c = simulate_strokes(ref, 5, seed=4)
    assert a.dtype == np.uint8 and a.shape == ref.shape
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@pytest.mark.parametrize("n_classes,make", [(2, membrane_map), (5, voronoi_map)])
def test_about_the_requested_pixels_per_class(n_classes, make):
    ref = np.stack([make(), make()[::-1].copy()])
    labels = simulate_strokes(ref, n_classes, pixels_per_class=300, seed=0)
    for s in range(2):
        for k, n in enumerate(class_counts(labels[s], n_classes), start=1):
            assert 150 <= n <= 450, f"slice {s} class {k}: {n} pixels painted"
    # A person paints a sliver of the image, not most of it.
    assert (labels > 0).mean() < 0.05


def test_strokes_are_several_short_pieces_in_several_regions():
    ref = voronoi_map(shape=(384, 384), n_seeds=60)
    labels = simulate_strokes(ref, 5, pixels_per_class=300, seed=0)
    regions = np.zeros(ref.shape, np.int32)
    n = 0
    for k in range(1, 6):
        lab, m = ndi.label(ref == k)
        regions[lab > 0] = lab[lab > 0] + n
        n += m
    for k in range(1, 6):
        touched = np.unique(regions[labels == k])
        assert len(touched) >= 2, f"class {k} painted in only {len(touched)} region(s)"
        _, pieces = ndi.label(labels == k, structure=np.ones((3, 3)))
        assert pieces >= 2, f"class {k} painted as a single stroke"


def test_painted_pixels_match_reference_and_ignore_stays_unpainted():
    ref = voronoi_map()
    ref[100:160, :] = 0  # no ground truth here
    labels = simulate_strokes(ref, 5, seed=0)
    painted = labels > 0
    assert painted.any()
    np.testing.assert_array_equal(labels[painted], ref[painted])
    assert not painted[ref == 0].any()
    # A 2D input gives a 2D output of the same shape.
    assert labels.shape == ref.shape


def test_thin_structures_and_brush_radius():
    ref = membrane_map(width=2)
    labels = simulate_strokes(ref, 2, pixels_per_class=200, brush_radius=0, seed=0)
    np.testing.assert_array_equal(labels[labels > 0], ref[labels > 0])
    counts = class_counts(labels, 2)
    assert all(100 <= n <= 300 for n in counts), counts
    wide = simulate_strokes(ref, 2, pixels_per_class=200, brush_radius=2, seed=0)
    np.testing.assert_array_equal(wide[wide > 0], ref[wide > 0])
    # The 2-pixel membrane clips a radius-2 brush, so its count may fall short, never overshoot.
    assert 100 <= class_counts(wide, 2)[1] <= 300 and class_counts(wide, 2)[0] <= 300


def test_missing_class_and_tiny_regions():
    ref = np.full((64, 64), 1, np.uint8)
    ref[10, 10] = 2  # a one-pixel region: painted at that pixel, nothing else
    labels = simulate_strokes(ref, 3, pixels_per_class=300, seed=0)
    assert class_counts(labels, 3)[1:] == [1, 0]
    assert labels[10, 10] == 2


def test_3d_default_slices_paint_a_few_slices_that_show_the_classes():
    vol = np.ones((40, 64, 64), np.uint8)
    vol[10:30, 20:44, 16:40] = 2
    vol[14:26, 28:36, 24:32] = 3
    labels = simulate_strokes(vol, 3, pixels_per_class=100, dims=3, seed=0)
    painted = np.flatnonzero(labels.reshape(40, -1).any(axis=1))
    assert 2 <= len(painted) <= 3
    assert all(14 <= z < 26 for z in painted), painted
    assert painted.tolist() == default_slices(vol, 3)
    for z in painted:
        assert set(np.unique(labels[z])) == {0, 1, 2, 3}
    np.testing.assert_array_equal(labels[labels > 0], vol[labels > 0])


def test_3d_given_slices_only():
    vol = np.stack([voronoi_map(seed=s) for s in range(6)])
    labels = simulate_strokes(vol, 5, dims=3, slices=[1, 4], seed=0)
    painted = np.flatnonzero(labels.reshape(6, -1).any(axis=1))
    assert painted.tolist() == [1, 4]
    with pytest.raises(ValueError):
        simulate_strokes(vol, 5, dims=3, slices=[9])


def test_bad_inputs():
    with pytest.raises(ValueError):
        simulate_strokes(np.zeros((2, 2, 2, 2), np.uint8), 2)
    with pytest.raises(ValueError):
        simulate_strokes(np.zeros((8, 8), np.float32), 2)
    with pytest.raises(ValueError):
        simulate_strokes(np.zeros((8, 8), np.uint8), 2, dims=4)


def test_a_1024_slice_is_fast():
    ref = voronoi_map(shape=(1024, 1024), n_seeds=300)
    simulate_strokes(ref[:64, :64], 5)  # imports out of the timing
    t0 = time.perf_counter()
    labels = simulate_strokes(ref, 5, seed=0)
    elapsed = time.perf_counter() - t0
    assert all(n > 0 for n in class_counts(labels, 5))
    # Budget is ~0.3 s alone; the margin is for a loaded shared machine.
    assert elapsed < 3.0, f"{elapsed:.2f} s for one 1024^2 slice"


# ---------------------------------------------------------------------------- correction


def squares_case():
    """Reference all class 2 with class-1 squares; prediction misses six of them entirely."""
    ref = np.full((1, 200, 200), 2, np.uint8)
    sizes = [30, 24, 20, 16, 12, 6]
    corners = [(5, 5), (5, 60), (5, 120), (80, 5), (80, 60), (80, 120)]
    for (y, x), s in zip(corners, sizes):
        ref[0, y:y + s, x:x + s] = 1
    pred = np.full_like(ref, 2)
    return ref, pred, corners, sizes


def test_correction_disks_at_the_deepest_point_of_the_largest_error_regions():
    ref, pred, corners, sizes = squares_case()
    labels = np.zeros_like(ref)
    labels[0, 190:195, 10:100] = 2  # the slice is painted
    before = labels.copy()
    out = simulate_correction(labels, pred, ref, n_regions=5, radius=3, seed=0)
    np.testing.assert_array_equal(labels, before)  # input untouched
    added = (out != labels)
    assert added.any()
    # Added pixels: only at errors, with the reference class, never over painted labels.
    assert ((pred != ref) | ~added).all()
    np.testing.assert_array_equal(out[added], ref[added])
    assert (labels[added] == 0).all()
    np.testing.assert_array_equal(out[labels > 0], labels[labels > 0])
    # Five disks of radius 3 (29 pixels each) in the five largest squares, centred.
    for (y, x), s in zip(corners[:5], sizes[:5]):
        box = added[0, y:y + s, x:x + s]
        assert box.sum() == 29
        cy, cx = np.argwhere(box).mean(axis=0)
        assert abs(cy - (s - 1) / 2) <= 1 and abs(cx - (s - 1) / 2) <= 1
    y, x = corners[5]
    assert not added[0, y:y + sizes[5], x:x + sizes[5]].any()


def test_correction_ignores_unpainted_slices_in_2d_and_reference_zero():
    ref, pred, _, _ = squares_case()
    ref = np.concatenate([ref, ref])
    pred = np.concatenate([pred, pred])
    labels = np.zeros_like(ref)
    labels[1, 195, 195] = 2  # only slice 1 is a painted image
    ref[1, 5:35, 5:35] = 0  # no ground truth over the largest square of slice 1
    out = simulate_correction(labels, pred, ref)
    assert not (out[0] > 0).any()
    assert not (out[1, 5:35, 5:35] > 0).any()
    assert (out[1] > 0).sum() > 1


def test_correction_never_overwrites_and_skips_painted_errors():
    ref, pred, corners, sizes = squares_case()
    labels = np.zeros_like(ref)
    # The largest error square is already fully painted: it is not an error left to fix.
    labels[0, 5:35, 5:35] = 1
    out = simulate_correction(labels, pred, ref, n_regions=5)
    np.testing.assert_array_equal(out[0, 5:35, 5:35], 1)
    y, x = corners[5]
    assert out[0, y:y + sizes[5], x:x + sizes[5]].sum() > 0  # the sixth now makes the top five


def test_correction_is_deterministic_and_handles_no_errors():
    ref = voronoi_map()[None]
    labels = simulate_strokes(ref, 5, seed=0)
    rng = np.random.default_rng(0)
    pred = np.where(rng.random(ref.shape) < 0.3, rng.integers(1, 6, ref.shape), ref).astype(np.uint8)
    a = simulate_correction(labels, pred, ref, seed=1)
    b = simulate_correction(labels, pred, ref, seed=1)
    np.testing.assert_array_equal(a, b)
    assert (a != labels).sum() <= 5 * 29
    same = simulate_correction(labels, ref, ref)
    np.testing.assert_array_equal(same, labels)
    assert same is not labels


def test_correction_3d_uses_the_whole_volume_and_paints_in_plane():
    ref = np.full((20, 64, 64), 1, np.uint8)
    ref[5:15, 20:44, 20:44] = 2
    pred = np.ones_like(ref)
    labels = np.zeros_like(ref)
    labels[2, 5, 5] = 1
    out = simulate_correction(labels, pred, ref, n_regions=5, radius=3, dims=3)
    added = np.argwhere(out != labels)
    assert len(added) == 29  # one error region: one disk, on a single slice
    assert len(np.unique(added[:, 0])) == 1 and 5 <= added[0, 0] < 15
    assert (ref[tuple(added.T)] == 2).all()


def test_correction_shape_mismatch():
    with pytest.raises(ValueError):
        simulate_correction(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8),
                            np.zeros((4, 4), np.uint8))
