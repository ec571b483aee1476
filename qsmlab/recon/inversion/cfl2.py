"""Closed-form L2 dipole inversion with gradient regularisation (CFL2).

Bilgic et al., "Fast quantitative susceptibility mapping with L1-regularization and automatic parameter
selection", MRM 2014 (the closed-form L2 solution, their eq. 2):

    chi = argmin ||D F chi - F field||^2 + lam * sum_i ||E_i F chi||^2
        = F^-1[ D F[field] / (D^2 + lam * sum_i |E_i|^2) ]

with ``E_i = (exp(2 pi i f_i) - 1) / h_i`` the symbol of the forward difference along axis i
(``f_i`` in cycles/sample, ``h_i`` the voxel size in mm), so ``sum_i |E_i|^2 = sum_i (2 - 2 cos(2 pi
f_i)) / h_i^2`` (mm^-2; :func:`qsmlab.recon.inversion.gradients.grad_symbol_sq`). Because the data term
is unweighted and periodic the solution is one k-space division: one rfftn + irfftn pair.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import scipy.fft

from qsmlab.physics import DipoleOperator
from qsmlab.recon.inversion.gradients import grad_symbol_sq
from qsmlab.recon.inversion.tkd import check_inputs, kspace_inverse
from qsmlab.recon.registry import register

#: ``lam="auto"``: the L-curve is evaluated on these weights (1/4 decade; unitless, so the same for any
#: field scale) and its corner chosen; ``CFL2_AUTO_FALLBACK`` is used when it has none (the median corner
#: on in-vivo-like fields).
CFL2_AUTO_GRID = tuple(float(v) for v in np.logspace(-4.0, 1.0, 21))
CFL2_AUTO_FALLBACK = 0.03
last_info: dict = {}


def cfl2_lcurve(field: np.ndarray, mask: np.ndarray, lams: Sequence[float], voxel_size, b0_dir,
                pad_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The L-curve of CFL2 in k-space (Bilgic et al. 2014): for each ``lam``, the squared data residual
    ``||A chi - f||^2 = sum |F|^2 (lam E^2 / (D^2 + lam E^2))^2`` and the squared penalty
    ``||G chi||^2 = sum E^2 D^2 |F|^2 / (D^2 + lam E^2)^2`` over the whole (padded) grid, by Parseval:
    one rfftn and a few passes over the half spectrum per weight, no inverse transform. DC is left out
    (chi's mean is not determined). Above 64^3 the sums run over every second frequency per axis: a
    regular 1/8 sample of smooth sums (a constant factor in both terms, which the log-log curvature
    ignores), 8x less work per weight."""
    op = DipoleOperator(voxel_size, b0_dir, pad_factor)
    n = field.shape
    s = op.fft_shape(n)
    D = op.kernel(n).astype(np.float64)
    e2 = grad_symbol_sq(s, op.voxel_size[0], rfft=True)
    F2 = np.abs(scipy.fft.rfftn(np.where(mask, field, 0.0), s=s, workers=-1)) ** 2
    w = np.full(F2.shape[-1], 2.0)  # half-spectrum planes other than 0 and Nyquist stand for two
    w[0] = 1.0
    if s[-1] % 2 == 0:
        w[-1] = 1.0
    F2 *= w
    F2.flat[0] = 0.0
    d2 = D * D
    if np.prod(s) > 64**3:
        sub = (slice(None, None, 2),) * 3
        F2, d2, e2 = (np.ascontiguousarray(a[sub]) for a in (F2, d2, e2))
    F2, d2, e2 = F2.astype(np.float32), d2.astype(np.float32), e2.astype(np.float32)
    data, reg = [], []
    f2e2 = F2 * e2
    for lam in lams:
        den = d2 + np.float32(lam) * e2
        den.flat[0] = 1.0
        h = f2e2 / (den * den)
        data.append(float(lam * lam) * float(np.sum(h * e2, dtype=np.float64)))
        reg.append(float(np.sum(h * d2, dtype=np.float64)))
    return np.asarray(data), np.asarray(reg)


def cfl2_filter(D: np.ndarray, s: Sequence[int], voxel_size: Sequence[float], lam: float) -> np.ndarray:
    """``D / (D^2 + lam * sum_i |E_i|^2)``; 0 at DC (where both vanish)."""
    den = D * D + lam * grad_symbol_sq(s, voxel_size, rfft=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(den > 0, D / np.where(den > 0, den, 1.0), 0.0)
    h.flat[0] = 0.0
    return h


@register("inversion", "cfl2")
def cfl2(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    magnitude: np.ndarray | None = None,
    pad_factor: float = 1.0,
    lam: float | str = "auto",
    quiet: bool = False,
) -> np.ndarray:
    """Closed-form L2 inversion with gradient regularisation (Bilgic et al. 2014).

    Args:
        field: local field (ppm), (X, Y, Z).
        mask: brain mask (X, Y, Z); the output is zero outside it.
        voxel_size: mm (default 1 mm isotropic). b0_dir: unit B0 in voxel axes (default (0, 0, 1)).
        magnitude: unused (common inversion signature).
        pad_factor: zero padding per axis before the FFT (default 1.0 = periodic).
        lam: weight of the gradient penalty (mm^2; larger = smoother; unitless in chi, so independent of
            the field's scale) or ``"auto"`` (default): the corner of CFL2's L-curve, computed exactly in
            k-space (:func:`cfl2_lcurve`; Bilgic et al. 2014; :mod:`qsmlab.recon.inversion.auto` says why
            not the discrepancy principle here). ``last_info`` records the choice.
        quiet: unused (closed form).
    Returns:
        chi (ppm), (X, Y, Z), zero outside the mask. Cost: one rfftn + irfftn pair (plus one rfftn and
        21 passes over the half spectrum with ``"auto"``).
    """
    from qsmlab.recon.inversion import auto

    lam = auto.check_weight(lam, "lam", "cfl2")
    last_info.clear()
    if lam == auto.AUTO:
        t0 = time.perf_counter()
        f, m = check_inputs(field, mask)
        data, reg = cfl2_lcurve(f, m, CFL2_AUTO_GRID, voxel_size, b0_dir, pad_factor)
        res = auto.lcurve_corner("cfl2", "lam", CFL2_AUTO_GRID, data, reg, fallback=CFL2_AUTO_FALLBACK)
        lam = res.value
        out = kspace_inverse(field, mask, lambda D, s, vs: cfl2_filter(D, s, vs, lam), "cfl2", (float(lam),),
                             voxel_size, b0_dir, pad_factor)
        res.seconds = time.perf_counter() - t0
        last_info.update(lam=lam, auto=auto.record(res).as_dict())
        return out
    last_info.update(lam=float(lam))
    return kspace_inverse(field, mask, lambda D, s, vs: cfl2_filter(D, s, vs, lam), "cfl2", (float(lam),),
                          voxel_size, b0_dir, pad_factor)
