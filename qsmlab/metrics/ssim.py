"""Structural similarity for QSM: the 2016 challenge SSIM and the challenge 2.0 XSIM.

Both use one 3-D SSIM core (Wang, Bovik, Sheikh & Simoncelli, "Image quality assessment: from error
visibility to structural similarity", IEEE TIP 2004), local statistics from a normalised Gaussian
window (sigma = 1.5 voxels) by correlation with zero boundary, 'same' size (MATLAB ``convn(.., 'same')``):

    SSIM(p) = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (K1 L)^2, C2 = (K2 L)^2,  s_x^2 = G*(x^2) - mu_x^2,  s_xy = G*(xy) - mu_x mu_y.

- ``ssim`` -- 2016 QSM reconstruction challenge (Langkammer et al., MRM 2018; ``compute_ssim.m`` ->
  ``ssim_index3d.m``): both maps multiplied by the mask; ``min_img`` = min over both whole volumes;
  the *nonzero* voxels of each map shifted by ``-min_img``; both scaled by ``255 / max`` of the two
  shifted maps; window 5^3, K = (0.01, 0.03), L = 255; the SSIM map averaged over the nonzero voxels
  of the (shifted, scaled) reconstruction.
- ``xsim`` -- QSM challenge 2.0 (Bilgic et al., MRM 2021; Milovic et al., ``compute_xsim.m``): the
  masked maps in native ppm (no shift or rescale), window 7^3, K = (0.01, 0.001), L = 1; the map
  averaged over the mask voxels.

Notes against the public reference code: ``ssim_index3d.m`` (the 2016 core) uses ``convn(...,'same')``
(zero boundary), ``gkernel(1.5, [2 2 2])`` (5^3) and averages over ``find(img1 ~= 0)``, as here. The
2019 ``compute_xsim.m`` used the same ``convn`` core; its 2022 rewrite calls ``imgaussfilt3``, whose
default padding is 'replicate' -- this differs from the zero boundary used here only where the mask
touches the edge of the volume. ``compute_xsim.m`` with no mask argument averages over ``ref ~= 0``;
the challenge passes the evaluation mask, which is what ``xsim`` averages over. Degenerate inputs
(a reconstruction with no nonzero voxel after the shift) give ``nan``.
"""

from __future__ import annotations

import numpy as np
import torch

from qsmlab.metrics._filters import correlate_numpy, correlate_torch, gaussian_window
from qsmlab.metrics._inputs import VOLUME_DIMS, check_numpy, check_torch

SIGMA = 1.5  # voxels
SSIM_WINDOW, SSIM_K, SSIM_L = 5, (0.01, 0.03), 255.0  # 2016 challenge
XSIM_WINDOW, XSIM_K, XSIM_L = 7, (0.01, 0.001), 1.0  # challenge 2.0


def _ssim_formula(mu_x, mu_y, xx, yy, xy, k, data_range):
    c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    num = (2 * mu_xy + c1) * (2 * (xy - mu_xy) + c2)
    return num / ((mu_xx + mu_yy + c1) * ((xx - mu_xx) + (yy - mu_yy) + c2))


def ssim_map(x: np.ndarray, y: np.ndarray, window: int, k: tuple[float, float], data_range: float) -> np.ndarray:
    """3-D SSIM map (Wang et al. 2004) of two (X, Y, Z) arrays, Gaussian window sigma 1.5, zero boundary."""
    terms = gaussian_window(window, SIGMA)
    stats = [correlate_numpy(v, terms) for v in (x, y, x * x, y * y, x * y)]
    return _ssim_formula(*stats, k, data_range)


def ssim_map_torch(
    x: torch.Tensor, y: torch.Tensor, window: int, k: tuple[float, float], data_range: float
) -> torch.Tensor:
    """Batched :func:`ssim_map`: ``[B, 1, X, Y, Z]`` pairs -> ``[B, 1, X, Y, Z]`` map."""
    stats = correlate_torch(torch.cat([x, y, x * x, y * y, x * y]), gaussian_window(window, SIGMA))
    return _ssim_formula(*stats.chunk(5), k, data_range)


def challenge2016_rescale(pred_masked: np.ndarray, ref_masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2016-challenge SSIM preprocessing of masked maps: shift nonzero voxels by -min, scale to max 255."""
    lo = min(pred_masked.min(), ref_masked.min())
    xs = np.where(pred_masked != 0, pred_masked - lo, 0.0)
    ys = np.where(ref_masked != 0, ref_masked - lo, 0.0)
    hi = max(xs.max(), ys.max())
    scale = 255.0 / hi if hi > 0 else 1.0
    return xs * scale, ys * scale


def _challenge2016_rescale_torch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.minimum(x.amin(VOLUME_DIMS, keepdim=True), y.amin(VOLUME_DIMS, keepdim=True))
    xs = torch.where(x != 0, x - lo, torch.zeros_like(x))
    ys = torch.where(y != 0, y - lo, torch.zeros_like(y))
    hi = torch.maximum(xs.amax(VOLUME_DIMS, keepdim=True), ys.amax(VOLUME_DIMS, keepdim=True))
    scale = torch.where(hi > 0, 255.0 / hi, torch.ones_like(hi))
    return xs * scale, ys * scale


def ssim(pred, ref, mask) -> float:
    """2016 QSM challenge SSIM (``compute_ssim.m``; Langkammer et al., MRM 2018). Dimensionless, 1 = perfect."""
    x, r, m = check_numpy(pred, ref, mask)
    xs, ys = challenge2016_rescale(x * m, r * m)
    roi = xs != 0
    smap = ssim_map(xs, ys, SSIM_WINDOW, SSIM_K, SSIM_L)
    return float(smap[roi].mean()) if roi.any() else float("nan")


def xsim(pred, ref, mask) -> float:
    """QSM challenge 2.0 XSIM (``compute_xsim.m``; Bilgic et al., MRM 2021), averaged over the mask."""
    x, r, m = check_numpy(pred, ref, mask)
    return float(ssim_map(x * m, r * m, XSIM_WINDOW, XSIM_K, XSIM_L)[m].mean())


@torch.no_grad()
def ssim_torch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched :func:`ssim`: ``[B, 1, X, Y, Z]`` -> ``[B]``."""
    x, r, m = check_torch(pred, ref, mask)
    xs, ys = _challenge2016_rescale_torch(x * m, r * m)
    roi = (xs != 0).to(xs.dtype)
    smap = ssim_map_torch(xs, ys, SSIM_WINDOW, SSIM_K, SSIM_L)
    return (smap * roi).sum(VOLUME_DIMS) / roi.sum(VOLUME_DIMS)  # 0/0 = nan for an all-zero recon


@torch.no_grad()
def xsim_torch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched :func:`xsim`: ``[B, 1, X, Y, Z]`` -> ``[B]``."""
    x, r, m = check_torch(pred, ref, mask)
    mf = m.to(x.dtype)
    smap = ssim_map_torch(x * mf, r * mf, XSIM_WINDOW, XSIM_K, XSIM_L)
    return (smap * mf).sum(VOLUME_DIMS) / mf.sum(VOLUME_DIMS)
