"""Geodesic maps on hand-checkable images (a corridor, a wall), both paths (GeodisTK and the
numpy raster scan) against the exact shortest paths of the same neighbour graph."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import ndimage as ndi, sparse
from scipy.sparse.csgraph import dijkstra

from semsegloop.predict.geodesic import geodesic_distance, geodistk_available

METHODS = ["numpy", pytest.param("geodistk", marks=pytest.mark.skipif(
    not geodistk_available(), reason="GeodisTK is not installed (optional; CI builds it)"))]


def exact_distance(img: np.ndarray, seeds: np.ndarray, spacing, lam: float) -> np.ndarray:
    """Dijkstra on the 26- (3D) / 8- (2D) neighbour graph with GeodisTK's local cost."""
    idx = np.arange(img.size).reshape(img.shape)
    rows, cols, w = [], [], []
    for off in np.ndindex(3, 3, 3):
        d = np.array(off) - 1
        if not d.any() or (img.shape[0] == 1 and d[0]):
            continue
        src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(d, img.shape))
        dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(d, img.shape))
        g = np.abs(img[src] - img[dst]).ravel()
        step = float(np.sqrt(((d * np.asarray(spacing)) ** 2).sum()))
        rows.append(idx[src].ravel())
        cols.append(idx[dst].ravel())
        w.append(step / ((1 - lam) + lam / (g + 1e-5)))
    graph = sparse.csr_matrix((np.concatenate(w), (np.concatenate(rows), np.concatenate(cols))),
                              shape=(img.size, img.size))
    return dijkstra(graph, indices=np.flatnonzero(seeds.ravel()), min_only=True).reshape(img.shape)


@pytest.mark.parametrize("method", METHODS)
def test_along_a_straight_corridor_the_distance_grows_linearly_with_spacing(method):
    img = np.full((1, 9, 60), 50.0, np.float32)
    img[0, 3:6, :] = 0.0                      # the corridor, walled in above and below
    seeds = np.zeros(img.shape, bool)
    seeds[0, 4, 0] = True
    d = geodesic_distance(img, seeds, spacing=(1.0, 1.0, 0.5), lam=0.0, method=method)
    np.testing.assert_allclose(d[0, 4], 0.5 * np.arange(60), rtol=1e-5)
    # Intensity-aware: with lam = 1 a step costs its length times the intensity change, so a
    # ramp of 0.1 per pixel along the corridor (steps of 0.5 mm) grows by 0.05 per pixel.
    ramp = img.copy()
    ramp[0, 3:6, :] = 0.1 * np.arange(60)
    d = geodesic_distance(ramp, seeds, spacing=(1.0, 1.0, 0.5), lam=1.0, method=method)
    np.testing.assert_allclose(d[0, 4], 0.05 * np.arange(60), atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_a_wall_of_high_intensity_makes_the_distance_jump(method):
    rng = np.random.default_rng(0)
    img = rng.normal(0.0, 0.05, (1, 40, 40)).astype(np.float32)
    img[0, :, 20] = 5.0                       # a bright wall from top to bottom
    seeds = np.zeros(img.shape, bool)
    seeds[0, :, 0] = True
    d = geodesic_distance(img, seeds, spacing=(1.0, 1.0, 1.0), lam=0.9, method=method)[0]
    before = np.diff(d[:, :20], axis=1).mean()          # cost per step on the seed side
    jump = (d[:, 21] - d[:, 19]).mean()
    assert jump > 20 * before and jump > 5.0
    # Past the wall it grows slowly again: the jump is the wall, not a change of slope.
    assert np.diff(d[:, 22:], axis=1).mean() < 2 * before + 1e-3
    # Euclidean (lam = 0) sees no wall.
    e = geodesic_distance(img, seeds, spacing=(1.0, 1.0, 1.0), lam=0.0, method=method)[0]
    np.testing.assert_allclose(e[:, 21] - e[:, 19], 2.0, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_anisotropic_3d_spacing_counts_in_millimetres(method):
    img = np.zeros((10, 12, 12), np.float32)
    seeds = np.zeros(img.shape, bool)
    seeds[0, 6, 6] = True
    d = geodesic_distance(img, seeds, spacing=(3.0, 0.5, 0.5), lam=0.0, method=method)
    np.testing.assert_allclose(d[:, 6, 6], 3.0 * np.arange(10), rtol=1e-5)
    np.testing.assert_allclose(d[0, 6, :6], 0.5 * np.arange(6, 0, -1), rtol=1e-5)


# Stated tolerance: after 4 iterations both raster scans are within 3% (mean relative error)
# of the exact shortest paths on smooth random images, and within 5% of each other.
@pytest.mark.parametrize("shape,spacing", [((1, 50, 60), (1.0, 0.7, 1.3)),
                                           ((16, 24, 20), (2.5, 1.0, 0.8))])
def test_both_paths_agree_with_the_exact_shortest_paths_and_each_other(shape, spacing):
    rng = np.random.default_rng(1)
    img = (ndi.gaussian_filter(rng.normal(size=shape), 2) * 5).astype(np.float32)
    seeds = np.zeros(shape, bool)
    seeds[tuple(n // 3 for n in shape)] = True
    seeds[tuple(2 * n // 3 for n in shape)] = True
    exact = exact_distance(img, seeds, spacing, 0.9)
    far = exact > 0
    ours = geodesic_distance(img, seeds, spacing, lam=0.9, iterations=4, method="numpy")
    assert np.mean(np.abs(ours - exact)[far] / exact[far]) < 0.03
    if geodistk_available():
        theirs = geodesic_distance(img, seeds, spacing, lam=0.9, iterations=4, method="geodistk")
        assert np.mean(np.abs(theirs - exact)[far] / exact[far]) < 0.05
        assert np.mean(np.abs(theirs - ours)[far] / exact[far]) < 0.05
    assert np.all(ours[seeds] == 0)


def test_no_seed_gives_infinity_and_bad_input_is_named():
    img = np.zeros((1, 5, 5), np.float32)
    assert np.isinf(geodesic_distance(img, np.zeros(img.shape, bool))).all()
    with pytest.raises(ValueError, match="seeds"):
        geodesic_distance(img, np.zeros((1, 4, 5), bool))
    with pytest.raises(ValueError, match="lam"):
        geodesic_distance(img, np.ones(img.shape, bool), lam=2.0)
    with pytest.raises(ValueError, match="spacing"):
        geodesic_distance(img, np.ones(img.shape, bool), spacing=(1, 0, 1))


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only CI must have built GeodisTK")
def test_ci_built_geodistk_so_both_paths_ran():
    assert geodistk_available(), "scripts/setup.sh builds GeodisTK under CI=true"
