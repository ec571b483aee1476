"""Nonlinear dipole inversion (NDI) by gradient descent (Polak et al., NMR Biomed 2020), optional Tikhonov.

    min_chi  1/s^2 * 1/2 ||W (exp(i s A chi) - exp(i s f))||_2^2 + tikhonov/2 ||chi||_2^2

with ``s = phase_scale`` (rad/ppm), ``W`` the data weight (mask times magnitude / max, or the mask). The
``1/s^2`` factor makes the data term ``1/2 ||W (A chi - f)||^2`` for small residuals, so the step size
and ``tikhonov`` do not depend on TE or B0. Its gradient is ``A^T [W^2 / s * sin(s (A chi - f))]``; with
``W <= 1`` and ``|D| <= 2/3`` the Lipschitz constant is at most ``4/9``, so any ``step < 4.5`` is stable.
NDI is regularised mainly by early stopping: ``max_iter`` and ``tol`` matter (Polak et al. stop on the
relative update).

The local field comes from sources inside the mask, so each step is projected on that support
(``chi <- M (chi - step * grad)``): without it, sources outside the mask explain the masked field as well
and plain gradient descent stalls at about 45 % NRMSE even on noise-free data (48^3 test phantom). One
iteration is ``A chi`` and ``A^T r``: two rfftn + irfftn pairs (``FFT_PAIRS_PER_ITER = 2``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qsmlab.errors import QSMInputError
from qsmlab.recon.inversion.nltv import DEFAULT_PHASE_SCALE
from qsmlab.recon.inversion.tv import DTYPE, Monitor, check_iterations, check_positive, prepare, zeros
from qsmlab.recon.registry import register

FFT_PAIRS_PER_ITER = 2
last_info: dict = {}


@register("inversion", "ndi")
def ndi(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    magnitude: np.ndarray | None = None,
    pad_factor: float = 1.0,
    phase_scale: float = DEFAULT_PHASE_SCALE,
    step: float = 4.0,
    tikhonov: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-3,
    quiet: bool = False,
) -> np.ndarray:
    """Nonlinear dipole inversion by gradient descent (Polak et al., NMR Biomed 2020).

    Args:
        field: local field (ppm), (X, Y, Z); may be wrapped modulo ``2 pi / phase_scale``.
        mask: brain mask, same shape.
        voxel_size: mm along (i, j, k).
        b0_dir: unit B0 direction in voxel axes.
        magnitude: optional magnitude; ``W = mask * magnitude / max`` weights the data term.
        pad_factor: zero padding of the FFT grid per axis (1 = periodic, default).
        phase_scale: rad/ppm, default ``qsmlab.physics.units.phase_scale(0.02, 3.0)`` (TE 20 ms, 3 T).
        step: gradient step (default 4, stable below 4.5).
        tikhonov: Tikhonov weight on ``||chi||^2`` (default 0: plain NDI with early stopping).
        max_iter: maximum iterations (default 100).
        tol: stop when the relative update of chi falls below ``tol`` (default 1e-3).
        quiet: hide the progress bar.
    Returns:
        chi (ppm), (X, Y, Z) float32, zero outside the mask. ``last_info``: ``n_iter``, ``converged``,
        ``last_update``, ``objective`` (before the last update), ``fft_pairs``.
    """
    name = "ndi"
    s = check_positive("phase_scale", phase_scale, name)
    step = check_positive("step", step, name)
    if not np.isfinite(float(tikhonov)) or float(tikhonov) < 0:
        raise QSMInputError(f"{name}: parameter tikhonov must be >= 0, got {tikhonov}")
    tikhonov = float(tikhonov)
    max_iter, tol = check_iterations(max_iter, tol, name)
    p = prepare(field, mask, magnitude, voxel_size, b0_dir, pad_factor, name)

    # The loop runs on torch tensors (multi-threaded; see tv.RealFFT).
    T = torch.from_numpy
    w2_s, f = T(p.w2 / s), T(p.field)
    # chi stays 0 outside the support, so M (chi - step g) = chi - g * (step M): one fused pass.
    support = np.zeros(p.grid, DTYPE)
    n = p.shape
    support[: n[0], : n[1], : n[2]] = p.mask
    step_support = T(-step * support)
    keep = 1.0 - step * tikhonov
    chi, work = zeros(p.grid), zeros(p.grid)
    mon = Monitor(max_iter, tol, "NDI", quiet)
    for _ in mon:
        r = p.A(chi)
        torch.sub(r, f, out=r).mul_(s).sin_().mul_(w2_s)
        r = p.A(r)  # A^T = A
        chi_old, chi = chi, torch.addcmul(chi, r, step_support, out=r)
        if tikhonov:
            chi.add_(chi_old, alpha=keep - 1.0)
        if mon.converged(chi, chi_old, work):
            break
    chi = chi.numpy()
    res = p.A(chi) - p.field
    data = float(np.sum(p.w2 * (1.0 - np.cos(s * res)), dtype=np.float64) / s**2)
    last_info.clear()
    last_info.update(n_iter=mon.n_iter, converged=mon.last_update < mon.tol, last_update=mon.last_update,
                     objective=data + 0.5 * tikhonov * float(np.sum(chi * chi, dtype=np.float64)),
                     fft_pairs=FFT_PAIRS_PER_ITER * mon.n_iter)
    return p.crop(chi)
