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

import time
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
    tikhonov_misfit,
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


class _GaussNewton:
    """MEDI's Gauss-Newton loop on a prepared problem (normalised units), resumable at another weight."""

    def __init__(self, p: Problem, mg: np.ndarray, s: float, eps: float, cg_max_iter: int, cg_tol: float):
        T = torch.from_numpy
        self.p, self.s, self.eps = p, s, eps
        self.cg_max_iter, self.cg_tol = int(cg_max_iter), float(cg_tol)
        self.mgt, self.w2, self.w2_s, self.f = T(mg), T(p.w2), T(p.w2 / s), T(p.field)
        grid = p.grid
        self.gbuf = zeros((3,) + grid)
        self.weight = zeros((3,) + grid)  # alpha * M_G V M_G, refreshed each Gauss-Newton step
        self.chi, self.work = zeros(grid), zeros(grid)
        self.n_cg = 0

    def _add_reg(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out += alpha grad^T M_G V M_G grad x``."""
        vs = self.p.voxel_size
        torch.mul(grad_t(x, vs, out=self.gbuf), self.weight, out=self.gbuf)
        grad_adjoint_t(self.gbuf, vs, out=out, accumulate=True)

    def _hessian(self, x: torch.Tensor) -> torch.Tensor:
        out = self.p.A(self.p.A(x).mul_(self.w2))
        self._add_reg(x, out)
        return out

    def _count(self) -> None:
        self.n_cg += 1

    def run(self, alpha: float, mon: Monitor) -> None:
        p, vs = self.p, self.p.voxel_size
        for _ in mon:
            g = grad_t(self.chi, vs, out=self.gbuf).mul_(self.mgt)
            torch.mul(g, g, out=self.weight).add_(self.eps).sqrt_()
            torch.div(self.mgt, self.weight, out=self.weight).mul_(alpha)  # M_G^2 = M_G
            r = p.A(self.chi)
            torch.sub(r, self.f, out=r).mul_(self.s).sin_().mul_(self.w2_s)
            rhs = p.A(r)
            self._add_reg(self.chi, rhs)
            rhs.neg_()
            dx = conjugate_gradient(self._hessian, rhs, rtol=self.cg_tol, maxiter=self.cg_max_iter,
                                    callback=self._count)
            chi_old, self.chi = self.chi, dx.add_(self.chi)
            if mon.converged(self.chi, chi_old, self.work):
                break


#: ``alpha="auto"``: candidate weights relative to the field's RMS (as ``tv``'s) and Gauss-Newton steps
#: per candidate, warm-started from the previous one.
MEDI_AUTO_GRID = tuple(float(v) for v in np.logspace(-0.5, -4.0, 11))
AUTO_GN_STEPS = 2


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
    alpha: float | str = "auto",
    noise_std: float | None = None,
    edge_fraction: float = 0.3,
    eps: float = 1e-2,
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
        alpha: TV weight (ppm, scale of ``tv``) or ``"auto"`` (default): the discrepancy principle
            (:mod:`qsmlab.recon.inversion.auto`) on MEDI's nonlinear misfit, by continuation with
            ``AUTO_GN_STEPS`` Gauss-Newton steps per candidate.
        noise_std: noise sd of the field (ppm) for ``alpha="auto"``; default: estimated from the field.
        edge_fraction: fraction of mask voxels (per gradient component) treated as edges, 0..1 (default 0.3).
        eps: TV smoothing in the lagged diffusivity, in (field RMS / mm)^2 so that it scales with the
            field (default 1e-2: 1e-6 (ppm/mm)^2 for a field of RMS 0.01 ppm).
        cg_max_iter: CG iterations per Gauss-Newton step (default 20).
        cg_tol: CG relative residual tolerance (default 0.01).
        max_iter: Gauss-Newton steps (default 10).
        tol: stop when ``||dx|| / ||chi|| < tol`` (default 0.01, MEDI uses 0.1).
        quiet: hide the progress bar.
    Returns:
        chi (ppm), (X, Y, Z) float32, zero outside the mask. ``last_info``: ``alpha`` (ppm), ``scale``,
        ``n_iter`` (Gauss-Newton steps), ``n_cg`` (CG iterations in total), ``converged``, ``last_update``,
        ``objective`` (ppm^2), ``fft_pairs`` and, with ``"auto"``, ``auto`` (the search).
    """
    from qsmlab.recon.inversion import auto
    from qsmlab.recon.inversion.nltv import nonlinear_misfit
    from qsmlab.recon.inversion.tv import _check_alpha, _check_noise

    name = "medi"
    s = check_positive("phase_scale", phase_scale, name)
    alpha = _check_alpha(alpha, name)
    noise_std = _check_noise(noise_std, name)
    check_positive("eps", eps, name)
    if not 0.0 <= float(edge_fraction) < 1.0:
        raise QSMInputError(f"{name}: parameter edge_fraction must be in [0, 1), got {edge_fraction}")
    if int(cg_max_iter) < 1:
        raise QSMInputError(f"{name}: parameter cg_max_iter must be >= 1, got {cg_max_iter}")
    check_positive("cg_tol", cg_tol, name)
    max_iter, tol = check_iterations(max_iter, tol, name)
    p = prepare(field, mask, magnitude, voxel_size, b0_dir, pad_factor, name)
    sn = s * p.scale  # rad per normalised field unit
    mg = edge_mask(p, magnitude, float(edge_fraction))
    gn = _GaussNewton(p, mg, sn, float(eps), cg_max_iter, cg_tol)
    extra = {}
    if alpha == auto.AUTO:
        t0 = time.perf_counter()
        n = p.shape
        me = tikhonov_misfit(p, lambda q, x: nonlinear_misfit(q, x, sn))
        sigma_ppm, source, sigma = auto.noise_target(p.field[: n[0], : n[1], : n[2]] * p.scale, p.mask,
                                                     noise_std, p.scale, me)
        pm = me.problem  # without the gross-error voxels when the model-error target was measured

        def solve(a: float) -> tuple[float, int]:
            before = gn.n_cg
            gn.run(a, Monitor(AUTO_GN_STEPS, 0.0, "MEDI", True))
            return nonlinear_misfit(pm, gn.chi.numpy(), sn), gn.n_cg - before

        res = auto.discrepancy_search(name, "alpha", MEDI_AUTO_GRID, solve, sigma=sigma, sigma_ppm=sigma_ppm,
                                      noise_source=source, scale=p.scale, units=lambda a: a * p.scale)
        a = res.solver_value
    else:
        a = float(alpha) / p.scale
    n_cg0 = gn.n_cg
    mon = Monitor(max_iter, tol, "MEDI", quiet)
    gn.run(a, mon)
    if alpha == auto.AUTO:
        res.iterations += gn.n_cg - n_cg0
        res.seconds = time.perf_counter() - t0
        extra["auto"] = auto.record(res).as_dict()
    chi = gn.chi.numpy()
    res_ = p.A(chi) - p.field
    g = grad(chi, p.voxel_size)
    g *= mg
    objective = float(np.sum(p.w2 * (1.0 - np.cos(sn * res_)), dtype=np.float64) / sn**2
                      + a * np.abs(g).sum(dtype=np.float64))
    n_cg = gn.n_cg - n_cg0
    last_info.clear()
    last_info.update(n_iter=mon.n_iter, n_cg=n_cg, converged=mon.last_update < mon.tol,
                     last_update=mon.last_update, objective=p.scale**2 * objective,
                     fft_pairs=FFT_PAIRS_PER_ITER * n_cg + 2 * mon.n_iter, alpha=a * p.scale, scale=p.scale,
                     **extra)
    return p.crop(chi)
