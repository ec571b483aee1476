"""RESHARP: SHARP with Tikhonov-regularised deconvolution (Sun & Wilman, MRM 71:1151, 2014).

With ``C = delta - S_r`` (the SMV high-pass) and ``M`` the mask eroded by the ball, SHARP's data are
``M C f_total = M C f_local``. RESHARP solves

    min_x  || M C x - M C f_total ||^2 + tik * || x ||^2

over the padded grid by conjugate gradients on the normal equations ``(C M C + tik I) x = C M C f``
(C is real and symmetric), then keeps ``x`` on ``M`` with its mean removed. Unlike SHARP's truncated
inverse, the Tikhonov term acts on the whole solution, so the local field outside M (where there are
no data) is driven to zero instead of being implied by a periodic deconvolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmlab.errors import QSMInputError
from qsmlab.recon.background.spherical import SphericalMean, check_inputs, demean
from qsmlab.recon.iterate import monitored_cg
from qsmlab.recon.registry import register


@register("background", "resharp")
def resharp(
    total_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    radius_mm: float = 4.0,
    tik: float = 1e-4,
    max_iter: int = 200,
    tol: float = 1e-4,
    quiet: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """RESHARP (Sun & Wilman 2014).

    Args:
        total_field: unwrapped total field (ppm), shape (X, Y, Z).
        mask: brain mask (X, Y, Z).
        voxel_size: mm per voxel. b0_dir: unused (family signature).
        radius_mm: SMV ball radius in mm (default 4).
        tik: Tikhonov weight lambda on ||x||^2 (dimensionless: both terms are ppm^2; default 1e-4).
        max_iter: CG iterations at most (default 200). tol: relative residual to stop at (default 1e-4).
        quiet: hide the progress bar.
    Returns:
        (local_field ppm, demeaned over ``valid_mask``; ``valid_mask`` = mask eroded by the ball).
    """
    f, m, vs = check_inputs(total_field, mask, voxel_size, "resharp")
    if not float(tik) > 0:
        raise QSMInputError(f"resharp: tik must be > 0, got {tik}")
    smv = SphericalMean(f.shape, vs, radius_mm)
    valid = smv.erode(m)
    if not valid.any():
        raise QSMInputError(f"resharp: the mask eroded by radius_mm={radius_mm} is empty; use a smaller radius_mm")
    one_minus_s = 1.0 - smv.spectrum
    grid = smv.grid
    valid_p = np.zeros(grid, dtype=bool)
    valid_p[: f.shape[0], : f.shape[1], : f.shape[2]] = valid

    def highpass(x):  # C on the padded grid (periodic there; the padding keeps the FOV faces apart)
        return smv.irfft_full(smv.rfft(x) * one_minus_s)

    def normal(xflat):
        x = xflat.reshape(grid)
        return (highpass(np.where(valid_p, highpass(x), 0.0)) + tik * x).ravel()

    fp = np.zeros(grid)
    fp[: f.shape[0], : f.shape[1], : f.shape[2]] = f
    rhs = highpass(np.where(valid_p, highpass(fp), 0.0)).ravel()
    x, _ = monitored_cg(normal, rhs, max_iter=int(max_iter), tol=float(tol), desc="RESHARP", quiet=quiet)
    local = x.reshape(grid)[: f.shape[0], : f.shape[1], : f.shape[2]]
    return demean(local, valid), valid
