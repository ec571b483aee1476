"""Nonlinear (complex-exponential) TV dipole inversion by ADMM (FANSI nonlinear, Milovic et al., MRM 2018).

    min_chi  1/s^2 * 1/2 ||W (exp(i s A chi) - exp(i s f))||_2^2 + alpha ||grad chi||_1

with ``s = phase_scale`` (rad/ppm). The data term compares unit phasors, so it is blind to 2 pi wraps of
``s f`` and, near a solution, weighs residuals as ``1/2 W^2 (A chi - f)^2`` like the linear model; the
``1/s^2`` factor keeps ``alpha`` in the units and scale of :func:`qsmlab.recon.inversion.tv.tv_admm`.
Since ``1/2 |exp(ia) - exp(ib)|^2 = 1 - cos(a - b)``, the split variable ``u = A chi`` has the voxel-wise
prox

    u = argmin_u  W^2 / s^2 (1 - cos(s (u - f))) + mu/2 (u - v)^2,

solved approximately, as FANSI does, by one Newton-like step per ADMM iteration; here a
majorise-minimise step from ``v`` (curvature bounded by ``W^2``), see :func:`nonlinear_prox`. Everything else (closed-form chi-update, soft
threshold) is the linear TV loop of :mod:`qsmlab.recon.inversion.tv`. ``FFT_PAIRS_PER_ITER = 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qsmlab.physics.units import phase_scale as _phase_scale
from qsmlab.recon.inversion.gradients import grad
from qsmlab.recon.inversion.tv import (
    DataProx,
    Problem,
    _check_alpha,
    _check_noise,
    check_iterations,
    check_positive,
    prepare,
    record,
    solve_tv_family,
)
from qsmlab.recon.registry import register

FFT_PAIRS_PER_ITER = 2
#: TE = 20 ms at 3 T: about 16.05 rad/ppm.
DEFAULT_PHASE_SCALE = _phase_scale(0.02, 3.0)
last_info: dict = {}


def nonlinear_prox(p: Problem, mu: float, s: float) -> DataProx:
    """Prox of ``W^2/s^2 (1 - cos(s(u - f)))``: one majorise-minimise step from ``v``, in dual form.

    ``u = v - W^2/s sin(s (v - f)) / (mu + W^2)``: the data term's curvature ``W^2 cos`` is at most
    ``W^2``, so this quadratic model majorises the prox objective and the step never increases it; for
    small residuals it is the exact linear prox ``(W^2 f + mu v) / (W^2 + mu)``. Writes ``s_u = v - u``.
    """
    coef = torch.from_numpy((p.w2 / (s * (mu + p.w2))).astype(p.w2.dtype))
    f = torch.from_numpy(p.field)

    def dual(s_u: torch.Tensor, v: torch.Tensor) -> None:
        # The step starts at v, not at the previous u: the data term is 2 pi / s periodic, and a step from
        # v stays in the period nearest v, so u follows A chi across phase wraps instead of keeping f's.
        torch.sub(v, f, out=s_u).mul_(s).sin_().mul_(coef)

    return dual


def nonlinear_misfit(p: Problem, chi: np.ndarray, s: float) -> float:
    """RMS of ``W |exp(i s A chi) - exp(i s f)| / s`` over the RMS of ``W`` in the mask (field units; the
    linear :func:`qsmlab.recon.inversion.tv.rms_misfit` for small residuals, blind to phase wraps)."""
    r = p.A(chi) - p.field
    return float(np.sqrt(2.0 * np.sum(p.w2 * (1.0 - np.cos(s * r)), dtype=np.float64)
                         / max(np.sum(p.w2, dtype=np.float64), 1e-30)) / s)


def nltv_objective(p: Problem, chi: np.ndarray, alpha: float, s: float) -> float:
    r = p.A(chi) - p.field
    return float(np.sum(p.w2 * (1.0 - np.cos(s * r)), dtype=np.float64) / s**2
                 + alpha * np.abs(grad(chi, p.voxel_size)).sum(dtype=np.float64))


@register("inversion", "nltv")
def nltv_admm(
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
    mu_grad: float | None = None,
    mu_field: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-3,
    quiet: bool = False,
) -> np.ndarray:
    """Nonlinear TV inversion by ADMM (FANSI nonlinear, Milovic et al., MRM 2018).

    Args:
        field: local field (ppm), (X, Y, Z); may be wrapped modulo ``2 pi / phase_scale``.
        mask: brain mask, same shape.
        voxel_size: mm along (i, j, k).
        b0_dir: unit B0 direction in voxel axes.
        magnitude: optional magnitude; ``W = mask * magnitude / max`` weights the data term.
        pad_factor: zero padding of the FFT grid per axis (1 = periodic, default).
        phase_scale: rad of phase per ppm of field, ``2 pi gamma_bar B0 TE``; default
            ``qsmlab.physics.units.phase_scale(0.02, 3.0)`` (TE 20 ms at 3 T, ~16.05 rad/ppm).
        alpha: TV weight (ppm, same scale as ``tv``) or ``"auto"`` (default; as ``tv``: the L-curve's
            discrepancy principle, on this method's own (nonlinear) data misfit).
        noise_std: noise sd of the field (ppm) for ``alpha="auto"``; default: estimated (as ``tv``).
        mu_grad: ADMM penalty of ``z = grad chi`` in the solver's units (default: as ``tv``).
        mu_field: ADMM penalty of ``u = A chi`` (default 1).
        max_iter: maximum ADMM iterations (default 100).
        tol: relative-update stopping tolerance on chi (default 1e-3).
        quiet: hide the progress bar.
    Returns:
        chi (ppm), (X, Y, Z) float32, zero outside the mask; ``last_info`` as in ``tv``.

    The solver works on field / RMS (:func:`qsmlab.recon.inversion.tv.field_scale`) with the phase scale
    times RMS, which is the same data term: a field in other units (times c, ``phase_scale`` / c) gives
    chi times c.
    """
    name = "nltv"
    s = check_positive("phase_scale", phase_scale, name)
    alpha = _check_alpha(alpha, name)
    noise_std = _check_noise(noise_std, name)
    if mu_grad is not None:
        check_positive("mu_grad", mu_grad, name)
    check_positive("mu_field", mu_field, name)
    max_iter, tol = check_iterations(max_iter, tol, name)
    p = prepare(field, mask, magnitude, voxel_size, b0_dir, pad_factor, name)
    sn = s * p.scale  # rad per normalised field unit
    chi, mon, a, found = solve_tv_family(
        p, lambda mu: nonlinear_prox(p, mu, sn), name, alpha, noise_std=noise_std, mu_grad=mu_grad,
        mu_field=mu_field, max_iter=max_iter, tol=tol, desc="NLTV-ADMM", quiet=quiet,
        misfit=lambda q, chi: nonlinear_misfit(q, chi, sn))
    record(mon, p.scale**2 * nltv_objective(p, chi, a, sn), last_info, FFT_PAIRS_PER_ITER * mon.n_iter)
    last_info.update(alpha=a * p.scale, scale=p.scale, **found)
    return p.crop(chi)
