"""Scale-space filter bank: Gaussian smoothing, gradient magnitude and Hessian eigenvalues (2D)
or Laplacian (3D) at several scales, the features the pseudo-label teacher classifies.

They are what an ilastik-style random forest separates classes with, computed with separable
1D filters in numpy (scipy); sigmas follow the voxel spacing so the filters are isotropic in
physical space. (Fed to the UNet as extra input channels they gave no gain in the benchmark,
so only the teacher uses them.)"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def _kernels(sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Discrete Gaussian, first- and second-derivative kernels (correlation order), scaled
    by sigma per derivative order (scale normalisation keeps feature ranges alike).

    Exact on polynomials: g0 sums to 1, g1 gives 1 on f(x) = x, g2 gives 1 on x^2 / 2.
    """
    sigma = max(float(sigma), 0.3)
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-k ** 2 / (2 * sigma ** 2))
    g0 = g / g.sum()
    g1 = k * g
    g1 = g1 / (k * g1).sum()
    g2 = (k ** 2 - sigma ** 2) * g
    g2 = g2 - g2.sum() / g.sum() * g
    g2 = g2 / ((k ** 2) * g2).sum() * 2
    return (g0.astype(np.float32), (g1 * sigma).astype(np.float32),
            (g2 * sigma ** 2).astype(np.float32))


# 3D features per sigma: smoothed, gradient magnitude and the three Hessian eigenvalues (as
# ilastik and scikit-image's multiscale features), or the Laplacian only when False (cheaper).
HESSIAN_3D = True


def features_per_sigma(dims: int) -> int:
    return 4 if dims == 2 else (5 if HESSIAN_3D else 3)


def feature_channels(dims: int, in_channels: int, sigmas) -> int:
    """Channels the network sees: the image's own plus the filter bank's."""
    if not sigmas:
        return in_channels
    return in_channels * (1 + features_per_sigma(dims) * len(sigmas))


def axis_sigmas(sigma: float, spacing) -> list[float]:
    """Sigma in voxels per axis; ``sigma`` is in voxels of the finest axis, so the filter is
    isotropic in physical space on anisotropic volumes."""
    finest = min(spacing)
    return [sigma * finest / s for s in spacing]


def add_features(x: np.ndarray, dims: int, sigmas, spacing=None) -> np.ndarray:
    """(*spatial, C) float32 -> (*spatial, C * (1 + F * len(sigmas))) float32, image first.

    ``spatial`` is (Y, X) for dims=2 and (Z, Y, X) for dims=3. 2D features per sigma and
    channel: smoothed intensity, gradient magnitude, the two Hessian eigenvalues (F = 4).
    3D: smoothed intensity, gradient magnitude, Laplacian (F = 3). Edges are extended
    ('nearest'), as the prediction's sliding window sees them.
    """
    from scipy.ndimage import correlate1d

    if not sigmas:
        return x
    sp = list(spacing[-dims:]) if spacing is not None else [1.0] * dims
    C = x.shape[-1]
    out = np.empty(x.shape[:-1] + (feature_channels(dims, C, sigmas),), np.float32)
    out[..., :C] = x
    col = C
    for c in range(C):
        img = np.ascontiguousarray(x[..., c], dtype=np.float32)
        for sigma in sigmas:
            ks = [_kernels(round(s, 4)) for s in axis_sigmas(sigma, sp)]

            def f(a, ax, order):
                return correlate1d(a, ks[ax][order], axis=ax, mode="nearest")
            if dims == 2:
                y0, y1, y2 = (f(img, 0, o) for o in (0, 1, 2))
                L, Lx, Lxx = (f(y0, 1, o) for o in (0, 1, 2))
                Ly, Lxy = f(y1, 1, 0), f(y1, 1, 1)
                Lyy = f(y2, 1, 0)
                half_tr = 0.5 * (Lxx + Lyy)
                disc = np.sqrt(0.25 * (Lxx - Lyy) ** 2 + Lxy ** 2)
                feats = (L, np.sqrt(Lx ** 2 + Ly ** 2), half_tr + disc, half_tr - disc)
            else:
                z0, z1, z2 = (f(img, 0, o) for o in (0, 1, 2))
                z0y0 = f(z0, 1, 0)
                L = f(z0y0, 2, 0)
                Lx = f(z0y0, 2, 1)
                Lxx = f(z0y0, 2, 2)
                Ly = f(f(z0, 1, 1), 2, 0)
                Lyy = f(f(z0, 1, 2), 2, 0)
                z1y0, z2y0 = f(z1, 1, 0), f(z2, 1, 0)
                Lz = f(z1y0, 2, 0)
                Lzz = f(z2y0, 2, 0)
                grad = np.sqrt(Lx ** 2 + Ly ** 2 + Lz ** 2)
                if HESSIAN_3D:
                    Lxy = f(f(z0, 1, 1), 2, 1)
                    Lxz = f(z1y0, 2, 1)
                    Lyz = f(f(z1, 1, 1), 2, 0)
                    feats = (L, grad) + _sym3_eigenvalues(Lzz, Lyy, Lxx, Lyz, Lxz, Lxy)
                else:
                    feats = (L, grad, Lxx + Lyy + Lzz)
            for feat in feats:
                out[..., col] = feat
                col += 1
    return out


def _sym3_eigenvalues(a, b, c, d, e, f):
    """Eigenvalues (descending) of the symmetric 3x3 matrices [[a, d, e], [d, b, f], [e, f, c]]
    given as arrays, in closed form (Smith 1961), float32 and elementwise: no (N, 3, 3) copy."""
    q = (a + b + c) / 3
    p1 = d * d + e * e + f * f
    aq, bq, cq = a - q, b - q, c - q
    p2 = aq * aq + bq * bq + cq * cq + 2 * p1
    p = np.sqrt(np.maximum(p2 / 6, 1e-30))
    det = (aq * (bq * cq - f * f) - d * (d * cq - f * e) + e * (d * f - bq * e))
    r = np.clip(det / (2 * p ** 3), -1.0, 1.0)
    phi = np.arccos(r) / 3
    l1 = q + 2 * p * np.cos(phi)
    l3 = q + 2 * p * np.cos(phi + 2 * np.pi / 3)
    l2 = 3 * q - l1 - l3
    return (l1.astype(np.float32), l2.astype(np.float32), l3.astype(np.float32))
