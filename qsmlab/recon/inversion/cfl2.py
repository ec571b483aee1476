"""Closed-form L2 dipole inversion (CFL2): Tikhonov (default) or gradient regularisation.

Bilgic et al., "Fast quantitative susceptibility mapping with L1-regularization and automatic parameter
selection", MRM 2014 (the closed-form L2 solution, their eq. 2), with the penalty operator ``E``:

    chi = argmin ||D F chi - F field||^2 + lam * sum_i ||E_i F chi||^2
        = F^-1[ D F[field] / (D^2 + lam * sum_i |E_i|^2) ]

- ``penalty="identity"`` (default): ``E = I``, closed-form Tikhonov, ``D / (D^2 + lam)`` (the
  "Tikhonov" inversion of QSM toolboxes; a smooth version of TKD's truncation: the gain is at most
  ``1 / (2 sqrt(lam))`` at every frequency). ``lam="auto"``: generalised cross-validation (Golub, Heath &
  Wahba, Technometrics 1979), exact and free in k-space (:func:`cfl2_gcv`).
- ``penalty="gradient"``: ``E_i = (exp(2 pi i f_i) - 1) / h_i``, the forward difference along axis i
  (Bilgic's CFL2; ``sum_i |E_i|^2 = sum_i (2 - 2 cos(2 pi f_i)) / h_i^2``, mm^-2;
  :func:`qsmlab.recon.inversion.gradients.grad_symbol_sq`). ``lam="auto"``: the L-curve corner
  (:func:`cfl2_lcurve`).

Why identity by default (issue 9, ``benchmarks/results/compare_classical/summary.md``): on in-vivo-like
local fields (V-SHARP output with its eroded boundary, background-removal residue, white-matter
anisotropy) the gradient penalty loses to TKD at every weight (oracle 77.4 % vs TKD's 70.4 % demeaned
NRMSE, 12 cases; 52 % vs 43 % even without noise on a V-SHARP-masked field): ``|E|^2`` vanishes at low
frequency, so the field's smooth errors near the cone are amplified without bound, while TKD and
Tikhonov cap the gain everywhere. Tikhonov at its GCV weight (0.008-0.022; the oracle's 0.011-0.031)
beats TKD's default in all 16 cases (12 at 1 mm, 4 at 0.5 x 0.5 x 2 mm; by 1.2-5 points; mean 68.0 %
vs 70.4 % at 1 mm) and is within 2.7 % of the oracle's NRMSE. Because the data term is unweighted and periodic the solution
is one k-space division: one rfftn + irfftn pair.
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
#: ``lam="auto"`` with the identity penalty: GCV is evaluated on these weights (1/4 decade) and its minimum
#: taken; ``TIKHONOV_AUTO_FALLBACK`` when the minimum is at an end of the grid (no interior minimum).
TIKHONOV_AUTO_GRID = tuple(float(v) for v in np.logspace(-4.0, 0.0, 17))
TIKHONOV_AUTO_FALLBACK = 0.018
PENALTIES = ("identity", "gradient")
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


def cfl2_gcv(field: np.ndarray, mask: np.ndarray, lams: Sequence[float], voxel_size, b0_dir,
             pad_factor: float = 1.0) -> np.ndarray:
    """Generalised cross-validation of closed-form Tikhonov (Golub, Heath & Wahba 1979) in k-space:

        GCV(lam) = ||A chi_lam - f||^2 / (N - trace(H_lam))^2,   H_lam = D^2 / (D^2 + lam)

    over the (padded) grid's N frequencies that every axis resolves (all of them for isotropic voxels; see
    the code for why), by Parseval (one rfftn, then a pass over the half spectrum per weight; above 64^3
    over every second frequency per axis, as :func:`cfl2_lcurve`). The minimiser estimates the weight with the least predictive error without a noise
    estimate; on in-vivo-like fields it is the oracle's weight (0.018) in every case measured."""
    op = DipoleOperator(voxel_size, b0_dir, pad_factor)
    n = field.shape
    s = op.fft_shape(n)
    d2 = op.kernel(n).astype(np.float64) ** 2
    F2 = np.abs(scipy.fft.rfftn(np.where(mask, field, 0.0), s=s, workers=-1)) ** 2
    w = np.full(F2.shape[-1], 2.0)  # half-spectrum planes other than 0 and Nyquist stand for two
    w[0] = 1.0
    if s[-1] % 2 == 0:
        w[-1] = 1.0
    F2 = F2 * w
    F2.flat[0] = 0.0  # DC: chi's mean is not determined (and H = 0 there)
    wb = np.broadcast_to(w, F2.shape).astype(np.float32)
    # The band every axis resolves: |k_i| <= 1 / (2 max_j h_j). With anisotropic voxels the in-plane
    # frequencies past it are noise only; over the whole grid they dominate GCV, which then predicts the
    # field well and chi badly (0.5 x 0.5 x 2 mm: lam 0.18, 80 % NRMSE vs 72 % at the oracle's 0.015; in
    # the band, 0.018). Isotropic voxels: the whole grid. Against the realistic recipe's simulated COSMOS at
    # 0.5 x 0.5 x 2 mm this band's weight is 2-3x the oracle's (cfl2 10.7 %, cg 11.5 % over the oracle's NRMSE;
    # 1-3 % against the truth). Other bands tried there (2026-12-07, 6 cached cases of compare_classical.py
    # --recipe realistic): a ball of this radius, a box at the geometric / arithmetic mean voxel size, the whole
    # grid: each chose a larger weight (ball 12.4-24 %, whole grid 32-61 % against COSMOS), so this one stays.
    vs = op.voxel_size[0]
    kmax = 0.5 / float(max(vs)) * (1 + 1e-9)
    band = ((np.abs(np.fft.fftfreq(s[0], vs[0])) <= kmax)[:, None, None]
            & (np.abs(np.fft.fftfreq(s[1], vs[1])) <= kmax)[None, :, None]
            & (np.abs(np.fft.rfftfreq(s[2], vs[2])) <= kmax)[None, None, :])
    band = np.broadcast_to(band, F2.shape)
    if band.sum() > 64**3 // 2:  # a regular 1/8 sample of smooth sums, as in cfl2_lcurve: 8x less work
        sub = (slice(None, None, 2),) * 3
        F2, d2, wb, band = (a[sub] for a in (F2, d2, wb, band))
    F2, d2, wb = F2[band].astype(np.float32), d2[band].astype(np.float32), wb[band]
    out = []
    for lam in lams:
        g = np.float32(lam) / (d2 + np.float32(lam))  # 1 - H
        out.append(float(np.sum(F2 * g * g, dtype=np.float64)) / float(np.sum(wb * g, dtype=np.float64)) ** 2)
    return np.asarray(out)


def gcv_minimum(method: str, parameter: str, lams: Sequence[float], gcv: Sequence[float], *, fallback: float):
    """:class:`~qsmlab.recon.inversion.auto.AutoResult` of the GCV minimum over ``lams`` (increasing);
    ``fallback`` with an ``AutoWarning`` when the minimum is at an end of the grid (no interior minimum)."""
    import warnings

    from qsmlab.recon.inversion import auto

    t0 = time.perf_counter()
    g = np.asarray(gcv, np.float64)
    i = int(np.nanargmin(g)) if np.isfinite(g).any() else -1
    found = 0 < i < len(lams) - 1
    chosen, note = (float(lams[i]), "") if found else (float(fallback), "")
    if found:  # vertex of the parabola through the three points around the minimum (log lam, log GCV)
        x, y = np.log(np.asarray(lams[i - 1: i + 2], np.float64)), np.log(g[i - 1: i + 2])
        den = (x[0] - x[1]) * (x[0] - x[2]) * (x[1] - x[2])
        a = (x[2] * (y[1] - y[0]) + x[1] * (y[0] - y[2]) + x[0] * (y[2] - y[1])) / den
        b = (x[2] ** 2 * (y[0] - y[1]) + x[1] ** 2 * (y[2] - y[0]) + x[0] ** 2 * (y[1] - y[2])) / den
        if a > 0:
            chosen = float(np.exp(np.clip(-b / (2 * a), x[0], x[2])))
    if not found:
        note = (f"GCV has no minimum inside [{lams[0]:.3g}, {lams[-1]:.3g}] (flat or monotone curve); used the "
                f"fallback {parameter}={chosen:.3g}")
        warnings.warn(auto.AutoWarning(f"{method}: {parameter}=auto: {note}"), stacklevel=3)
    return auto.AutoResult(method=method, parameter=parameter, value=chosen, criterion="gcv",
                           weights=[float(v) for v in lams], misfit=[float(v) for v in g], found=found, note=note,
                           seconds=time.perf_counter() - t0, solver_value=chosen)


def cfl2_filter(D: np.ndarray, s: Sequence[int], voxel_size: Sequence[float], lam: float,
                penalty: str = "gradient") -> np.ndarray:
    """``D / (D^2 + lam * sum_i |E_i|^2)`` (``penalty="gradient"``) or ``D / (D^2 + lam)``
    (``"identity"``); 0 at DC (where both vanish)."""
    den = D * D + (lam if penalty == "identity" else lam * grad_symbol_sq(s, voxel_size, rfft=True))
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
    penalty: str = "identity",
    quiet: bool = False,
) -> np.ndarray:
    """Closed-form L2 inversion: Tikhonov (default) or gradient regularisation (Bilgic et al. 2014).

    Args:
        field: local field (ppm), (X, Y, Z).
        mask: brain mask (X, Y, Z); the output is zero outside it.
        voxel_size: mm (default 1 mm isotropic). b0_dir: unit B0 in voxel axes (default (0, 0, 1)).
        magnitude: unused (common inversion signature).
        pad_factor: zero padding per axis before the FFT (default 1.0 = periodic).
        lam: weight of the penalty (unitless in chi, so independent of the field's scale; mm^2 for the
            gradient) or ``"auto"`` (default): generalised cross-validation for ``penalty="identity"``
            (:func:`cfl2_gcv`), the corner of the L-curve for ``"gradient"`` (:func:`cfl2_lcurve`; Bilgic
            et al. 2014; :mod:`qsmlab.recon.inversion.auto` says why). ``last_info`` records the choice.
        penalty: ``"identity"`` (default, ``lam ||chi||^2``: closed-form Tikhonov) or ``"gradient"``
            (``lam ||grad chi||^2``: Bilgic's CFL2). The module docstring gives the measurement behind the
            default: the gradient penalty never beats TKD on in-vivo-like fields.
        quiet: unused (closed form).
    Returns:
        chi (ppm), (X, Y, Z), zero outside the mask. Cost: one rfftn + irfftn pair (plus one rfftn and
        a pass over the half spectrum per candidate weight with ``"auto"``).
    """
    from qsmlab.errors import QSMInputError
    from qsmlab.recon.inversion import auto

    if penalty not in PENALTIES:
        raise QSMInputError(f"cfl2: parameter penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")
    lam = auto.check_weight(lam, "lam", "cfl2")
    last_info.clear()
    res, t0 = None, time.perf_counter()
    if lam == auto.AUTO:
        f, m = check_inputs(field, mask)
        if penalty == "identity":
            g = cfl2_gcv(f, m, TIKHONOV_AUTO_GRID, voxel_size, b0_dir, pad_factor)
            res = gcv_minimum("cfl2", "lam", TIKHONOV_AUTO_GRID, g, fallback=TIKHONOV_AUTO_FALLBACK)
        else:
            data, reg = cfl2_lcurve(f, m, CFL2_AUTO_GRID, voxel_size, b0_dir, pad_factor)
            res = auto.lcurve_corner("cfl2", "lam", CFL2_AUTO_GRID, data, reg, fallback=CFL2_AUTO_FALLBACK)
        lam = res.value
    out = kspace_inverse(field, mask, lambda D, s, vs: cfl2_filter(D, s, vs, lam, penalty), "cfl2",
                         (float(lam), penalty), voxel_size, b0_dir, pad_factor)
    last_info.update(lam=float(lam), penalty=penalty)
    if res is not None:
        res.seconds = time.perf_counter() - t0
        last_info.update(auto=auto.record(res).as_dict())
    return out
