"""MEDI-style nonlinear inversion: morphology-weighted TV, Gauss-Newton with CG (Liu et al., MRM 2012).

    min_chi  1/s^2 * 1/2 ||W (exp(i s A chi) - exp(i s f))||_2^2 + alpha ||M_G grad chi||_1

as in the nonlinear MEDI of Liu et al. (MRM 2012, "Morphology enabled dipole inversion ... nonlinear
formulation") with our scaling: ``s = phase_scale`` (rad/ppm) and the ``1/s^2`` factor keep ``alpha`` on
the scale of :func:`qsmlab.recon.inversion.tv.tv_admm`. ``W`` is the data weight (mask times magnitude /
max: the field noise is ~ 1/magnitude, MEDI's ``m = 1/N_std``). ``M_G`` is MEDI's edge mask: per gradient
component, the ``edge_fraction`` of mask voxels with the largest magnitude gradient are edges and are
*not* penalised (MEDI's ``gradient_mask`` with ``percentage = 0.9`` over the three components is 30 %
per component); without a magnitude, ``M_G = 1`` and this is nonlinear TV.

Each Gauss-Newton step linearises ``exp(i s A (chi + dx))`` and lags the TV diffusivity
(``V = 1 / sqrt(|M_G grad chi|^2 + eps)``, per component), then solves with conjugate gradients

    (A^T W^2 A + alpha grad^T M_G V M_G grad) dx = -(A^T [W^2/s sin(s (A chi - f))] + alpha grad^T M_G V M_G grad chi)

One CG iteration applies ``A^T W^2 A``: two rfftn + irfftn pairs (``FFT_PAIRS_PER_ITER = 2`` counts pairs
per *inner CG iteration*, the unit MEDI repeats; ``last_info['n_cg']`` is their total).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qsmlab.errors import QSMInputError
from qsmlab.recon.inversion.gradients import grad, grad_adjoint_t, grad_t
from qsmlab.recon.inversion.lsqr import conjugate_gradient
from qsmlab.recon.inversion.nltv import DEFAULT_PHASE_SCALE
from qsmlab.recon.inversion.tv import (
    DTYPE,
    Monitor,
    Problem,
    check_iterations,
    check_positive,
    prepare,
    zeros,
)
from qsmlab.recon.registry import register

FFT_PAIRS_PER_ITER = 2
last_info: dict = {}


def edge_mask(p: Problem, magnitude: np.ndarray | None, edge_fraction: float) -> np.ndarray:
    """MEDI gradient mask ``M_G`` (3, *grid): 0 on edges, 1 elsewhere.

    Edges are the ``edge_fraction`` largest gradient components of the masked magnitude, the quantile taken
    over all three components of the mask voxels pooled (as MEDI's ``gradient_mask``).
    """
    mg = np.ones((3,) + p.grid, DTYPE)
    if magnitude is None or edge_fraction == 0:
        return mg
    n = p.shape
    mag = np.zeros(p.grid, DTYPE)
    mag[: n[0], : n[1], : n[2]] = np.where(p.mask, np.asarray(magnitude, dtype=np.float64), 0.0)
    g = np.abs(grad(mag, p.voxel_size))
    inside = np.zeros(p.grid, dtype=bool)
    inside[: n[0], : n[1], : n[2]] = p.mask
    thr = np.quantile(g[:, inside], 1.0 - edge_fraction)
    mg[g > thr] = 0.0
    return mg


@register("inversion", "medi")
def medi(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    magnitude: np.ndarray | None = None,
    pad_factor: float = 1.0,
    phase_scale: float = DEFAULT_PHASE_SCALE,
    alpha: float = 5e-5,
    edge_fraction: float = 0.3,
    eps: float = 1e-6,
    cg_max_iter: int = 20,
    cg_tol: float = 0.01,
    max_iter: int = 10,
    tol: float = 0.01,
    quiet: bool = False,
) -> np.ndarray:
    """MEDI-style nonlinear morphology-weighted TV inversion (Liu et al., MRM 2012).

    Args:
        field: local field (ppm), (X, Y, Z); may be wrapped modulo ``2 pi / phase_scale``.
        mask: brain mask, same shape.
        voxel_size: mm along (i, j, k).
        b0_dir: unit B0 direction in voxel axes.
        magnitude: magnitude image: data weight ``W = mask * magnitude / max`` and the edge mask.
        pad_factor: zero padding of the FFT grid per axis (1 = periodic, default).
        phase_scale: rad/ppm, default ``qsmlab.physics.units.phase_scale(0.02, 3.0)`` (TE 20 ms, 3 T).
        alpha: TV weight (scale of ``tv``; default 5e-5).
        edge_fraction: fraction of mask voxels (per gradient component) treated as edges, 0..1 (default 0.3).
        eps: TV smoothing (ppm/mm)^2 in the lagged diffusivity (default 1e-6).
        cg_max_iter: CG iterations per Gauss-Newton step (default 20).
        cg_tol: CG relative residual tolerance (default 0.01).
        max_iter: Gauss-Newton steps (default 10).
        tol: stop when ``||dx|| / ||chi|| < tol`` (default 0.01, MEDI uses 0.1).
        quiet: hide the progress bar.
    Returns:
        chi (ppm), (X, Y, Z) float32, zero outside the mask. ``last_info``: ``n_iter`` (Gauss-Newton steps),
        ``n_cg`` (CG iterations in total), ``converged``, ``last_update``, ``objective``, ``fft_pairs``.
    """
    name = "medi"
    s = check_positive("phase_scale", phase_scale, name)
    check_positive("alpha", alpha, name)
    check_positive("eps", eps, name)
    if not 0.0 <= float(edge_fraction) < 1.0:
        raise QSMInputError(f"{name}: parameter edge_fraction must be in [0, 1), got {edge_fraction}")
    if int(cg_max_iter) < 1:
        raise QSMInputError(f"{name}: parameter cg_max_iter must be >= 1, got {cg_max_iter}")
    check_positive("cg_tol", cg_tol, name)
    max_iter, tol = check_iterations(max_iter, tol, name)
    p = prepare(field, mask, magnitude, voxel_size, b0_dir, pad_factor, name)
    mg = edge_mask(p, magnitude, float(edge_fraction))
    # The loops run on torch tensors (multi-threaded; see tv.RealFFT).
    T = torch.from_numpy
    vs, grid, w2, f = p.voxel_size, p.grid, T(p.w2), T(p.field)
    mgt, w2_s = T(mg), T(p.w2 / s)
    gbuf = zeros((3,) + grid)
    weight = zeros((3,) + grid)  # alpha * M_G V M_G, refreshed each Gauss-Newton step

    def add_reg(x: torch.Tensor, out: torch.Tensor) -> None:
        """``out += alpha grad^T M_G V M_G grad x``."""
        torch.mul(grad_t(x, vs, out=gbuf), weight, out=gbuf)
        grad_adjoint_t(gbuf, vs, out=out, accumulate=True)

    def hessian(x: torch.Tensor) -> torch.Tensor:
        out = p.A(p.A(x).mul_(w2))
        add_reg(x, out)
        return out

    chi, work = zeros(grid), zeros(grid)
    n_cg = 0

    def count() -> None:
        nonlocal n_cg
        n_cg += 1

    mon = Monitor(max_iter, tol, "MEDI", quiet)
    for _ in mon:
        g = grad_t(chi, vs, out=gbuf).mul_(mgt)
        torch.mul(g, g, out=weight).add_(eps).sqrt_()
        torch.div(mgt, weight, out=weight).mul_(alpha)  # M_G^2 = M_G
        r = p.A(chi)
        torch.sub(r, f, out=r).mul_(s).sin_().mul_(w2_s)
        rhs = p.A(r)
        add_reg(chi, rhs)
        rhs.neg_()
        dx = conjugate_gradient(hessian, rhs, rtol=float(cg_tol), maxiter=int(cg_max_iter), callback=count)
        chi_old, chi = chi, dx.add_(chi)
        if mon.converged(chi, chi_old, work):
            break
    chi = chi.numpy()
    res = p.A(chi) - p.field
    g = grad(chi, vs)
    g *= mg
    objective = float(np.sum(p.w2 * (1.0 - np.cos(s * res)), dtype=np.float64) / s**2
                      + alpha * np.abs(g).sum(dtype=np.float64))
    last_info.clear()
    last_info.update(n_iter=mon.n_iter, n_cg=n_cg, converged=mon.last_update < mon.tol,
                     last_update=mon.last_update, objective=objective,
                     fft_pairs=FFT_PAIRS_PER_ITER * n_cg + 2 * mon.n_iter)
    return p.crop(chi)
