"""``auto``: a regularisation weight chosen from the data, without ground truth.

Three published criteria, each where its assumptions hold:

**Discrepancy principle** (Morozov, Soviet Math. Dokl. 1966; for QSM e.g. Liu et al. (MEDI),
NeuroImage 2012) for the methods that fit the field inside the mask (tv, nltv, medi, ndi, lsqr): the weight
is the one whose solution leaves a data misfit equal to the noise,

    mean_mask( W^2 (A chi_w - f)^2 ) = tau^2 * sigma^2 * mean_mask( W^2 ),    tau = 1,

with ``sigma`` the field's noise sd (ppm): given (``noise_std``, e.g. from the echo fit's residual in
:func:`qsmlab.recon.pipeline.run_pipeline`) or estimated from the field's high-pass content
(:func:`estimate_noise_std`: the median absolute deviation of its Laplacian; a local field is smooth
except at susceptibility edges, so the Laplacian is mostly noise). Why this one: the misfit is monotone
in the weight, so the target is bracketed by a walk from strong to weak regularisation and interpolated,
with no derivative of a noisy curve; on in-vivo-like fields the oracle weight's residual is 1.0-1.25
sigma. Measured (``benchmarks/results/compare_classical/summary.md``, 12 cases at 96^3): tv and nltv
within 1.7 % of the oracle NRMSE, medi within 8.2 %, lsqr's stop within 3.5 % except at SNR 100
(up to 11 % at 1 mm, 18 % at 0.5 x 0.5 x 2 mm: its misfit, like ndi's, is set by model error, and the stop
came at 6-11 iterations where 2-5 was best); it now stops at ``lsqr.AUTO_MAX_ITER`` = 4 at the latest
(see :mod:`qsmlab.recon.inversion.lsqr`). ndi: at SNR 100 its misfit never falls to the noise (its floor is the field's
model error: background-removal residue, white-matter anisotropy; the misfit curve is the same at SNR 40
and 100, and the oracle's misfit is 2.3-2.7x the true noise there, so a better noise estimate would not
help), and the old walk down to 1e-4 cost 9-13.5 %; it now stops at ``ndi.NDI_AUTO_MIN`` = 3e-3 (see
:mod:`qsmlab.recon.inversion.ndi`): within 0.9 % of the oracle at 1 mm, 2.5 % at 0.5 x 0.5 x 2 mm. The L-curve's maximum-curvature corner, tried first, over-regularises TV by 5-10x in weight
(15-30 % in NRMSE, as Milovic et al., MRM 2021, report), and its zero-curvature variant was unstable
(the curvature of TV L-curves of in-vivo-like fields stays positive over a decade on some subjects).

**The target accounts for model error** (issue 15): Morozov's target is the noise, but on a real scan the
misfit at the best weight is set by what a scalar dipole model cannot explain (white-matter anisotropy,
veins finer than a voxel, k-space truncation, background-removal residue), and there the noise target chose
TV/MEDI/NDI weights 4-5x too small while GCV was right. The target is the geometric mean of the noise and
``m_T``, the misfit of closed-form Tikhonov at its GCV weight (:func:`tikhonov_gcv`, one FFT pair and a pass
over the spectrum per GCV weight) measured with the method's own data term, when ``m_T`` is above the noise
(:data:`MODEL_ERROR_FACTOR` says why the geometric mean, with the measurements). GCV leaves in the residual
whatever a regularised dipole fit cannot explain, noise and model error alike, without a noise estimate.
Voxels whose Tikhonov residual is a gross error (:data:`OUTLIER_K`: a phase-unwrapping cycle slip) count
neither in ``m_T`` nor in the candidates' misfits. On exact-model fields ``m_T`` falls below the noise and
the noise rules, as before.

**Generalised cross-validation** (Golub, Heath & Wahba, Technometrics 1979) for the Tikhonov weight of
cfl2 (closed form, its default ``penalty="identity"``) and cg: ``||A chi - f||^2 / (N - trace H)^2``
over the whole periodic grid is exact and free in k-space
(:func:`qsmlab.recon.inversion.cfl2.cfl2_gcv`), needs no noise estimate, and its minimum (refined by a
parabola in log-log) is within 2.7 % of the oracle weight's NRMSE in all 16 in-vivo-like cases measured
(1 mm and 0.5 x 0.5 x 2 mm; with anisotropic voxels over the band every axis resolves, see the code).
cfl2 solves the periodic problem without a mask (the zero field outside the mask is data), so its
in-mask misfit is not monotone and never falls to the noise at SNR 100: the discrepancy principle does
not apply there. cg's data term is mask-weighted; GCV of the closed form is its cheap proxy.
Why Tikhonov and not the gradient penalty of Bilgic's CFL2 (and of cg before issue 9): at every weight
the gradient penalty lost to TKD on in-vivo-like fields (``|grad|^2`` vanishes at low frequency, so the
field's smooth errors near the cone are amplified without bound).

**L-curve corner** (Hansen, SIAM Review 1992) for ``cfl2(penalty="gradient")``: its whole-grid L-curve
``(log ||A chi - f||^2, log ||G chi||^2)`` is exact and free in k-space, and its maximum curvature is
the weight Bilgic et al. (MRM 2014) choose (curvature by cubic-spline derivatives, sign as in their and
FANSI's code: positive at the corner); within 1-3 % of that penalty's oracle on in-vivo-like fields
(where GCV chose 3-6x too weak a gradient weight), but it over-regularises the 48^3 analytic phantom of
the tests (lam 0.32: 65 % vs 24-35 % at the oracle).

Scale: every solver works on field / RMS(field) (:func:`qsmlab.recon.inversion.tv.field_scale`), the
grids are relative to it and the criteria are homogeneous (the noise estimate and the misfit scale with
the field), so multiplying the field by c multiplies chi and the chosen L1 weight by c and leaves an L2
weight (unitless) unchanged. Cost: each candidate is warm-started from the previous (stronger) one with a
few iterations, and the walk stops at the bracket; ``benchmarks/compare_classical.py`` prints auto's time
over one solve.

When the criterion cannot be met (the field is at the noise level already at the strongest weight, or
its misfit stays above the noise at the weakest one: a flat misfit curve; or an L-curve without corner),
a one-line :class:`AutoWarning` names the weight used instead, also kept in :attr:`AutoResult.note`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from qsmlab.errors import QSMInputError
from qsmlab.recon.registry import AUTO, is_auto

__all__ = ["AUTO", "AutoResult", "AutoWarning", "check_weight", "clear", "curvature", "discrepancy_search",
           "estimate_noise_std", "is_auto", "last", "lcurve_corner", "record"]

#: Smallest curvature that counts as an L-curve corner (a straight line has 0; CFL2's L-curves of
#: in-vivo-like fields peak at 0.15-0.2 in the sign convention used here).
MIN_CORNER_CURVATURE = 0.02


class AutoWarning(UserWarning):
    """``auto`` could not apply its criterion and used another weight (the message says which)."""


@dataclass
class AutoResult:
    """What an ``auto`` search tried and chose; JSON-serialisable through :meth:`as_dict`.

    ``weights`` and ``value`` are in the user's units (an L1 weight scales with the field: ppm; an L2
    weight is unitless); ``misfit`` is the in-mask RMS data residual (ppm) of each candidate and
    ``target`` the noise level it was compared with (discrepancy), or the L-curve terms (corner).
    """

    method: str
    parameter: str
    value: float
    criterion: str
    weights: list[float] = field(default_factory=list)
    misfit: list[float] = field(default_factory=list)
    target: float = float("nan")
    noise_std: float = float("nan")
    noise_source: str = ""
    reg_term: list[float] = field(default_factory=list)
    curvature: list[float] = field(default_factory=list)
    found: bool = True
    note: str = ""
    iterations: int = 0
    seconds: float = 0.0
    solver_value: float = float("nan")

    def as_dict(self) -> dict:
        """Plain dict; NaN (a field that does not apply to the criterion) becomes None, for strict JSON."""
        def clean(v):
            if isinstance(v, float) and not np.isfinite(v):
                return None
            return [clean(x) for x in v] if isinstance(v, list) else v

        return {k: clean(v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        """One line, e.g. ``alpha=3.1e-04 (auto: discrepancy principle, noise 0.0021 ppm, 6 weights, 4.2 s)``."""
        if not self.found:
            return f"{self.parameter}={self.value:.3g} (auto: {self.note}; {self.seconds:.1f} s)"
        if self.criterion == "discrepancy":
            how = f"discrepancy principle, noise {self.noise_std:.2g} ppm ({self.noise_source})"
        elif self.criterion == "gcv":
            how = "generalised cross-validation"
        else:
            how = f"L-curve {self.criterion}"
        return f"{self.parameter}={self.value:.3g} (auto: {how}, {len(self.weights)} weights, {self.seconds:.1f} s)"


_LAST: list[AutoResult] = []


def clear() -> None:
    """Forget the recorded choices (callers do this before an inversion, then read :func:`last`)."""
    _LAST.clear()


def record(result: AutoResult) -> AutoResult:
    _LAST.append(result)
    return result


def last() -> list[AutoResult]:
    """The ``auto`` choices made since the last :func:`clear`."""
    return list(_LAST)


def check_weight(value, name: str, method: str, allow_zero: bool = False) -> float | str:
    """``"auto"`` or a finite weight > 0 (>= 0 with ``allow_zero``); one-line error otherwise."""
    if is_auto(value):
        return AUTO
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise QSMInputError(f"{method}: parameter {name} must be a number or auto, got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise QSMInputError(f"{method}: parameter {name} must be {'>= 0' if allow_zero else '> 0'} "
                            f"or auto, got {value}")
    return v


def check_noise_std(noise_std, method: str) -> float | None:
    if noise_std is None:
        return None
    try:
        v = float(noise_std)
    except (TypeError, ValueError):
        raise QSMInputError(f"{method}: parameter noise_std must be a number (ppm), got {noise_std!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise QSMInputError(f"{method}: parameter noise_std must be > 0 ppm (or left unset to estimate it), "
                            f"got {noise_std}")
    return v


def estimate_noise_std(field: np.ndarray, mask: np.ndarray) -> float:
    """Robust sd (field units) of the white noise in a local field, from its high-pass content.

    ``1.4826 * MAD(L f) / sqrt(42)`` over the mask eroded by two voxels, ``L`` the 7-point discrete
    Laplacian (voxel units: ``sum of the 6 neighbours - 6 f``, which maps white noise of sd s to sd
    ``sqrt(42) s``). A local field is harmonic where chi is constant (its Laplacian is
    ``(1/3 lap - d_B^2) chi``), so ``L f`` is noise except at susceptibility edges, which the median
    ignores. Measured on in-vivo-like fields: 1.1-1.4 x the true noise sd (edges and texture leak in);
    the discrepancy principle's oracle residual is 1.0-1.25 x, so the bias is on the safe side. Not on the
    realistic whole heads of benchmarks/auto_whole_heads.py (160^3, 1.06 mm, sub-voxel veins): 1.45 x, and
    TV's auto weight there is 10.6-12 % off its best scaled weight (MEDI's is at its best). Why (measured on
    two 112 x 112 x 104 realistic heads at 1.06 mm, each against its noise-free twin:
    benchmarks/noise_estimate_twins.py): on the noise alone this
    estimate reads 1.70 ppb for a true 1.73 (the noise after echo fit and V-SHARP is white: neighbour
    correlation < 0.005); on the noisy field 2.31; the excess is the field's own voxel-scale content
    (texture, veins, anisotropy, k-space truncation), spread over most voxels, so no quantile removes it (the
    10th to 50th percentiles of |L f| all read 2.2-2.3). The mixed second difference ``d_xx d_yy d_zz`` (216 x
    the variance) over-reads less (1.91, 1.10 x; 1.22 x on the 160^3 heads) but was not adopted: it moves
    the whole heads' TV target by ~10 %, and their misfit curve is so flat (:data:`MODEL_ERROR_FACTOR`) that
    this is not what sets the 4 x weight error; and on the real scan of issue 15 the targets had to grow,
    not shrink.
    Homogeneous of degree 1 in the field. Returns 0 for a field without high-pass content.
    """
    f = np.where(mask, np.asarray(field, dtype=np.float64), 0.0)
    lap = -6.0 * f
    for ax in range(3):
        lap += np.roll(f, 1, ax) + np.roll(f, -1, ax)
    inner = ndimage.binary_erosion(mask, iterations=2)
    if inner.sum() < 27:
        inner = np.asarray(mask, bool)
    v = lap[inner]
    return float(1.4826 * np.median(np.abs(v - np.median(v))) / np.sqrt(42.0))


#: The discrepancy target accounts for model error (issue 15): with ``m_T`` the misfit, measured with the
#: method's own data term over the voxels that are not gross errors (:data:`OUTLIER_K`), of closed-form
#: Tikhonov at its GCV weight (:func:`tikhonov_gcv`), and ``s`` the noise sd, the target is
#:
#:     s                                             if m_T <= s (an exact-model field: the noise rules)
#:     s^(1 - MODEL_ERROR_EXPONENT) * m^MODEL_ERROR_EXPONENT,   m = MODEL_ERROR_FACTOR * m_T (capped, below)
#:
#: i.e. the geometric mean of the noise and the Tikhonov misfit. Why: on a real scan the misfit at the best
#: weight is set by model error (anisotropy, sub-voxel veins, background-removal residue), and the noise
#: alone chose TV/MEDI/NDI weights 4-5x too small, while GCV was right. GCV-Tikhonov's misfit counts that
#: model error without a noise estimate, but as a target it is right in one geometry and too strong in
#: another, because GCV's own weight is: on the realistic subjects (qsmlab.data.realistic, 6 cases per
#: geometry, seeds 0-2 x 0/20 deg; benchmarks/compare_classical.py --recipe realistic, results in
#: benchmarks/results/compare_classical_realistic/) GCV chose half the oracle Tikhonov weight at 1 mm and 1.7x
#: it at 0.5 x 0.5 x 2 mm. Worst case over the cases, auto's NRMSE over the oracle weight's (%, against the
#: scalar truth / the simulated COSMOS), for the target ``s`` (exponent 0), the geometric mean (0.5) and
#: ``m_T`` (1):
#:
#:     method  1 mm: 0 / 0.5 / 1                      0.5 x 0.5 x 2 mm: 0 / 0.5 / 1
#:     tv      1.0/3.1   0.0/0.6   0.4/0.3            4.5/9.4   7.2/5.8   19.3/23.7
#:     ndi     4.7/10.0  2.7/5.6   1.0/1.7            1.0/4.3   3.2/5.1   10.6/20.0
#:     medi    4.5/7.3   1.7/2.6   0.4/1.2            4.1/16.5  -1.2/7.2  0.7/4.1
#:     lsqr    1.2/0.3   1.2/0.3   1.2/0.3            0.5/0.0   2.1/4.4   4.4/15.1
#:
#: (These are 80^3 / 128 x 128 x 40 cases; on the 160^3 whole heads the noise estimate over-reads, see
#: :func:`estimate_noise_std`, and the misfit curve is flat: from TV's auto weight down to 1/8 of it the
#: weighted misfit falls only from 1.93 to 1.68 x the true noise on head 5 (1.82 to 1.56 on head 6) while the
#: NRMSE goes 49.3 -> 44.0 (best, at 1/4-1/3: misfit 1.71-1.74 x) -> 45.2; a target 13 % high is 4 x in weight.
#: benchmarks/auto_whole_heads.py --misfit.) Only the geometric mean keeps every method within 10 % of its oracle in both geometries (0.3 left NDI
#: 7.1 % off against COSMOS at 1 mm, 0.7 left TV 11.9 % off at 0.5 x 0.5 x 2 mm). On the 3 mm end-to-end
#: pipeline case (tests/test_end_to_end.py: unwrapping cycle slips at the air/bone edges) the target with
#: every voxel and exponent 1 gave 81 % NRMSE against 54 % with the noise alone; leaving out the gross
#: errors it gave 58.4 %, the geometric mean 55.5 % (TV's best fixed weight there 53.9-54.9 %). On an exact-model field
#: ``m_T`` is below the noise and nothing changes. 0 turns the model-error target off (the noise alone).
MODEL_ERROR_FACTOR = 1.0
#: The exponent of the target's model-error part (above): 0.5 = the geometric mean of noise and ``m_T``.
MODEL_ERROR_EXPONENT = 0.5
#: ``m`` is at most ``MODEL_ERROR_CAP`` times the noise (the larger of the given and the high-pass estimate):
#: a GCV-Tikhonov misfit far above the noise is not model error a regularisation weight should leave in the
#: residual (on the realistic subjects ``m_T`` is 1.7-2.5x the noise, and the oracle TV misfit 2-3x).
MODEL_ERROR_CAP = 3.0


#: A voxel whose (weighted) residual of GCV-Tikhonov lies more than ``OUTLIER_K`` robust sd (1.4826 x MAD)
#: from the median is a gross error, not model error: no dipole field explains it (a phase-unwrapping
#: cycle slip, 1.96 ppm at 3 T and 4 ms echo spacing; a background-removal failure at the mask edge). With
#: the model-error target both ``m_T`` and every candidate's misfit leave such voxels out
#: (:class:`qsmlab.recon.inversion.tv.TikhonovMisfit`). Why 3: a Gaussian residual loses 0.27 % of its voxels
#: and 1.4 % of its RMS. Measured on the 3 mm end-to-end case (tests/test_end_to_end.py): the Tikhonov
#: residual has RMS 7.2 ppb but robust sd 2.9 ppb (|r| 99.9th percentile 56 ppb, maximum 623 ppb); 3.2 % of
#: the voxels are out and the inliers' RMS is 2.9 ppb.
OUTLIER_K = 3.0


def inlier_weights(residual: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """``w2`` with 0 where ``sqrt(w2) * residual`` is a gross error (:data:`OUTLIER_K`); ``w2`` itself when the
    residual has no spread."""
    sel = w2 > 0
    wr = np.sqrt(w2, dtype=np.float64) * residual
    v = wr[sel]
    if v.size == 0:
        return w2
    med = np.median(v)
    sd = 1.4826 * np.median(np.abs(v - med))
    if not sd > 0:
        return w2
    return np.where(np.abs(wr - med) <= OUTLIER_K * sd, w2, 0).astype(w2.dtype)


def tikhonov_gcv(field: np.ndarray, mask: np.ndarray, voxel_size, b0_dir, pad_factor: float = 1.0
                 ) -> tuple[np.ndarray, float]:
    """Closed-form Tikhonov chi (ppm, masked) at its GCV weight, and that weight; nothing recorded.

    The GCV weight was measured right on a real scan (issue 15: cfl2 at GCV 60.8 % vs the best TV by hand
    62.7 %), where the noise-based discrepancy principle chose TV/MEDI/NDI weights 4-5x too small: GCV
    treats whatever a regularised dipole fit cannot explain -- noise *and* model error (anisotropy,
    sub-voxel veins, background-removal residue) -- as the error to leave in the residual.
    """
    from qsmlab.recon.inversion.cfl2 import (
        TIKHONOV_AUTO_FALLBACK,
        TIKHONOV_AUTO_GRID,
        cfl2_filter,
        cfl2_gcv,
        gcv_minimum,
    )
    from qsmlab.recon.inversion.tkd import kspace_inverse

    g = cfl2_gcv(field, mask, TIKHONOV_AUTO_GRID, voxel_size, b0_dir, pad_factor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutoWarning)
        lam = gcv_minimum("auto", "lam", TIKHONOV_AUTO_GRID, g, fallback=TIKHONOV_AUTO_FALLBACK).value
    chi = kspace_inverse(field, mask, lambda D, s, vs: cfl2_filter(D, s, vs, lam, "identity"), "cfl2",
                         (float(lam), "identity"), voxel_size, b0_dir, pad_factor)
    return chi, float(lam)


def noise_target(field: np.ndarray, mask: np.ndarray, noise_std: float | None, scale: float,
                 model_error: Callable[[], float] | None = None) -> tuple[float, str, float]:
    """(sigma in ppm, where it came from, sigma in the solver's units field / scale).

    ``model_error`` (optional) returns ``m_T`` in the solver's units (see :data:`MODEL_ERROR_FACTOR`); it is
    called only when the factor is > 0, and the target is the larger of the noise and the scaled ``m_T``.
    If it has an attribute ``used``, that is set to whether the target came from it (the caller then measures
    the misfit without the gross-error voxels ``m_T`` left out, :data:`OUTLIER_K`).
    """
    if noise_std is not None:
        s, source = float(noise_std), "given"
    else:
        s, source = estimate_noise_std(field, mask), "high-pass estimate"
    if model_error is not None and MODEL_ERROR_FACTOR > 0:
        m = MODEL_ERROR_FACTOR * float(model_error()) * scale
        hp = estimate_noise_std(field, mask) if source == "given" else s
        cap = MODEL_ERROR_CAP * max(s, hp)
        capped = m > cap
        m = min(m, cap)
        if hasattr(model_error, "used"):
            model_error.used = bool(m > s)
        if m > s:
            t = s ** (1.0 - MODEL_ERROR_EXPONENT) * m ** MODEL_ERROR_EXPONENT
            return t, (f"noise^{1 - MODEL_ERROR_EXPONENT:g} x ({MODEL_ERROR_FACTOR:g} x GCV-Tikhonov misfit "
                       f"{m:.2g} ppm{f', capped at {MODEL_ERROR_CAP:g} x the noise' if capped else ''})"
                       f"^{MODEL_ERROR_EXPONENT:g}; noise {s:.2g} ppm ({source})"), t / scale
    return s, source, s / scale


def discrepancy_search(method: str, parameter: str, weights: Sequence[float],
                       solve: Callable[[float], tuple[float, int]], *, sigma: float, sigma_ppm: float,
                       noise_source: str, scale: float, units: Callable[[float], float]) -> AutoResult:
    """Walk ``weights`` (solver units, strictly decreasing) until the misfit falls to ``sigma``; the
    chosen weight interpolates log weight linearly in log misfit between the bracketing candidates.

    Args:
        method, parameter: for messages and the record.
        solve: ``solve(w) -> (rms_misfit, iterations)``, the in-mask RMS of ``W (A chi - f)`` over the RMS
            of ``W`` (solver units); called in order, so it can warm-start from the previous call.
        sigma: the target (noise sd) in solver units; ``sigma_ppm``, ``noise_source``: for the record.
        scale: field scale (ppm); ``units``: solver weight -> user units.
    Returns:
        :class:`AutoResult` (``value`` in user units, ``solver_value`` in solver units, misfits in ppm).
    """
    t0 = time.perf_counter()
    w = np.asarray(weights, dtype=np.float64)
    mis, its, chosen, note = [], 0, None, ""
    for k, wk in enumerate(w):
        m, n = solve(float(wk))
        mis.append(m)
        its += n
        if m <= sigma:
            if k == 0:
                chosen = float(wk)
                note = (f"the misfit at the strongest {parameter} tried ({units(wk):.3g}) is already within the "
                        f"noise ({sigma_ppm:.2g} ppm, {noise_source}): the field is at the noise level; used "
                        f"{parameter}={units(wk):.3g}")
            else:
                # log-log interpolation between (w[k-1], mis[k-1]) above and (w[k], m) below the target
                x0, x1 = np.log(mis[k - 1]), np.log(max(m, 1e-300))
                t = (np.log(sigma) - x0) / (x1 - x0) if x1 != x0 else 1.0
                chosen = float(np.exp(np.log(w[k - 1]) + t * (np.log(wk) - np.log(w[k - 1]))))
            break
    found = chosen is not None and not note
    if chosen is None:
        chosen = float(w[-1])
        note = (f"the misfit stays above the noise ({sigma_ppm:.2g} ppm, {noise_source}) down to the weakest "
                f"{parameter} tried (flat misfit curve, or model error above the noise; minimum "
                f"{min(mis) * scale:.2g} ppm); used "
                f"{parameter}={units(chosen):.3g}")
    if note:
        warnings.warn(AutoWarning(f"{method}: {parameter}=auto: {note}"), stacklevel=3)
    return AutoResult(method=method, parameter=parameter, value=float(units(chosen)), criterion="discrepancy",
                      weights=[float(units(v)) for v in w[: len(mis)]], misfit=[float(v * scale) for v in mis],
                      target=float(sigma * scale), noise_std=float(sigma_ppm), noise_source=noise_source,
                      found=found, note=note, iterations=its, seconds=time.perf_counter() - t0,
                      solver_value=chosen)


def curvature(log_weights: Sequence[float], log_data: Sequence[float], log_reg: Sequence[float]) -> np.ndarray:
    """Curvature of the L-curve ``(log_data, log_reg)`` at each grid point, positive at its corner.

    Cubic-spline derivatives along ``log_weights`` (increasing), as in Bilgic's and FANSI's code:
    ``kappa = (D'' R' - R'' D') / (D'^2 + R'^2)^(3/2)`` with ``D``, ``R`` the log terms.
    """
    t = np.asarray(log_weights, dtype=np.float64)
    x = CubicSpline(t, np.asarray(log_data, dtype=np.float64))
    y = CubicSpline(t, np.asarray(log_reg, dtype=np.float64))
    dx, dy, ddx, ddy = x(t, 1), y(t, 1), x(t, 2), y(t, 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (ddx * dy - ddy * dx) / (dx * dx + dy * dy) ** 1.5


def lcurve_corner(method: str, parameter: str, weights: Sequence[float], data_term: Sequence[float],
                  reg_term: Sequence[float], *, fallback: float) -> AutoResult:
    """The weight of maximum L-curve curvature among the interior grid points (increasing ``weights``);
    ``fallback`` with an :class:`AutoWarning` when the curve has no corner (max curvature below
    :data:`MIN_CORNER_CURVATURE`: straight or flat)."""
    t0 = time.perf_counter()
    w = np.asarray(weights, dtype=np.float64)
    d, r = np.asarray(data_term, np.float64), np.asarray(reg_term, np.float64)
    ok = np.all(d > 0) and np.all(r > 0) and np.all(np.isfinite(d)) and np.all(np.isfinite(r))
    kappa = curvature(np.log(w), np.log(d), np.log(r)) if ok else np.full(w.size, np.nan)
    inner = kappa[1:-1]
    i = int(np.nanargmax(inner)) + 1 if np.isfinite(inner).any() else None
    found = bool(i is not None and kappa[i] >= MIN_CORNER_CURVATURE)
    note = ""
    if found:
        chosen = float(w[i])
    else:
        chosen = float(fallback)
        top = np.nanmax(inner) if np.isfinite(inner).any() else float("nan")
        note = (f"no L-curve corner for {parameter} in [{w[0]:.3g}, {w[-1]:.3g}] (flat curve, maximum curvature "
                f"{top:.2g} < {MIN_CORNER_CURVATURE}); used the fallback {parameter}={chosen:.3g}")
        warnings.warn(AutoWarning(f"{method}: {parameter}=auto: {note}"), stacklevel=3)
    return AutoResult(method=method, parameter=parameter, value=chosen, criterion="corner",
                      weights=[float(v) for v in w], misfit=[float(v) for v in d], reg_term=[float(v) for v in r],
                      curvature=[float(v) for v in kappa], found=found, note=note,
                      seconds=time.perf_counter() - t0, solver_value=chosen)
