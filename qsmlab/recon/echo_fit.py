"""Total field from multi-echo unwrapped phase, and magnitude echo combination.

Field fit: per voxel, the weighted linear least squares of ``φ_n = φ_0 + ω·TE_n`` over echoes with
weights ``w_n = m_n²`` (the phase noise variance is σ²/m², so m² is the inverse-variance weight; the
magnitude-weighted fit of MEDI's ``Fit_ppm_complex`` linearised, Liu et al., MRM 69:467, 2013). The
intercept φ_0 absorbs the receiver phase offset (and any 2π jump common to all echoes). ω (rad/s) is
converted to ppm with :func:`qsmlab.physics.units.rad_to_ppm` (phase accrued in 1 s).

Reliability: the weighted RMS residual ``sqrt(Σ w r² / Σ w)`` (rad) of the fit; it is ~σ/m where the
signal is good and large where the phase is not linear in TE (noise, unwrapping errors, flow). With two
echoes the fit is exact and the residual is zero; with one echo there is no intercept (φ_0 = 0).

Magnitude combination: root-sum-of-squares, or T2*-weighted averaging with the CNR-optimal weights
``w_n = TE_n·exp(−TE_n/T2*)`` (Posse et al., MRM 42:87, 1999), T2* from a per-voxel log-linear fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qsmlab.errors import QSMInputError
from qsmlab.physics import units


@dataclass
class EchoFit:
    """Result of :func:`fit_field`; arrays (X, Y, Z)."""

    field: np.ndarray  # ppm
    phase_offset: np.ndarray  # rad, φ at TE = 0
    residual: np.ndarray  # rad, weighted RMS misfit


def _check(phase: np.ndarray, te: np.ndarray, name: str) -> None:
    if phase.ndim != 4 or phase.shape[3] != te.size:
        raise QSMInputError(f"{name}: expected (X, Y, Z, E) with E = {te.size} echoes, got shape {phase.shape}")
    if np.any(te <= 0):
        raise QSMInputError(f"{name}: echo times must be > 0 s, got {te.tolist()}")


def fit_field(
    phase: np.ndarray,
    te: Sequence[float],
    b0_tesla: float,
    magnitude: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> EchoFit:
    """Magnitude-weighted linear fit of unwrapped multi-echo phase over TE.

    Args:
        phase: unwrapped phase (rad), (X, Y, Z, E).
        te: E echo times (s).
        b0_tesla: field strength (T).
        magnitude: (X, Y, Z, E) magnitude (a.u.) for the weights m²; uniform weights when None.
        mask: optional boolean (X, Y, Z); outputs are zero outside.
    Returns:
        :class:`EchoFit` with field (ppm), phase_offset (rad) and residual (rad).
    """
    phase = np.asarray(phase, dtype=np.float64)
    te = np.asarray(te, dtype=np.float64).reshape(-1)
    _check(phase, te, "echo fit")
    if magnitude is None:
        w = np.ones_like(phase)
    else:
        w = np.asarray(magnitude, dtype=np.float64) ** 2
        if w.shape != phase.shape:
            raise QSMInputError(f"echo fit: magnitude shape {w.shape} differs from phase shape {phase.shape}")
    if te.size == 1:
        slope = phase[..., 0] / te[0]
        offset = np.zeros(phase.shape[:3])
        resid = np.zeros(phase.shape[:3])
    else:
        s0, s1, s2 = w.sum(-1), (w * te).sum(-1), (w * te**2).sum(-1)
        sy, sty = (w * phase).sum(-1), (w * te * phase).sum(-1)
        det = s0 * s2 - s1**2
        ok = det > 1e-12 * np.maximum(s0 * s2, 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(ok, (s0 * sty - s1 * sy) / det, 0.0)
            offset = np.where(ok, (s2 * sy - s1 * sty) / det, 0.0)
            r = phase - offset[..., None] - slope[..., None] * te
            resid = np.where(ok, np.sqrt((w * r**2).sum(-1) / s0), 0.0)
    field = units.rad_to_ppm(slope, 1.0, b0_tesla)  # slope is the phase accrued in 1 s
    if mask is not None:
        m = np.asarray(mask, bool)
        field, offset, resid = field * m, offset * m, resid * m
    return EchoFit(field=field, phase_offset=offset, residual=resid)


def combine_magnitude(magnitude: np.ndarray, te: Sequence[float] | None = None, method: str = "rss") -> np.ndarray:
    """Combine echoes of a (X, Y, Z, E) magnitude into one (X, Y, Z) image.

    Args:
        magnitude: (X, Y, Z, E) (a 3-D input is returned as is).
        te: echo times (s), needed for ``"t2star"``.
        method: ``"rss"`` (root-sum-of-squares) or ``"t2star"`` (Posse weights TE·exp(−TE/T2*)).
    """
    mag = np.abs(np.asarray(magnitude, dtype=np.float64))
    if mag.ndim == 3:
        return mag
    if mag.ndim != 4:
        raise QSMInputError(f"combine_magnitude: expected (X, Y, Z, E), got shape {mag.shape}")
    if method == "rss":
        return np.sqrt((mag**2).sum(-1))
    if method != "t2star":
        raise QSMInputError(f"combine_magnitude: method must be 'rss' or 't2star', got {method!r}")
    if te is None or len(te) != mag.shape[3]:
        raise QSMInputError("combine_magnitude: 't2star' needs one echo time (s) per echo")
    te = np.asarray(te, dtype=np.float64)
    if te.size < 2:
        return mag[..., 0]
    # log-linear fit ln m = ln S0 - TE/T2*, i.e. R2* = -slope; clipped to a physical range.
    logm = np.log(np.maximum(mag, 1e-12))
    tc = te - te.mean()
    r2s = -(logm * tc).sum(-1) / (tc**2).sum()
    r2s = np.clip(r2s, 1.0, 1000.0)  # 1/s: T2* between 1 ms and 1 s
    w = te * np.exp(-te * r2s[..., None])
    return (w * mag).sum(-1) / w.sum(-1)


def cycle_ppm(te: Sequence[float], b0_tesla: float, reference: str = "difference") -> float:
    """Field step (ppm) that one residual 2*pi error of temporal unwrapping leaves in the fitted field.

    With ``reference="difference"`` (the echo-difference image is unwrapped spatially) that is
    ``1 / (gamma_bar B0 dTE)`` with dTE the first echo spacing; with ``"first"`` (or one echo),
    ``1 / (gamma_bar B0 TE1)``.
    """
    te = np.sort(np.asarray(te, dtype=np.float64).ravel())
    dt = te[1] - te[0] if (reference == "difference" and te.size > 1) else te[0]
    return float(units.rad_to_ppm(2.0 * np.pi, dt, b0_tesla))


def correct_cycle_slips(field: np.ndarray, mask: np.ndarray, cycle: float, iterations: int = 3) -> tuple[np.ndarray, int]:
    """Snap voxels that sit a whole number of unwrapping cycles away from their neighbours.

    Where the phase difference between neighbours exceeds pi (steep background next to air, coarse
    voxels, the mask edge), a spatial unwrapper cannot know the jump, and the voxel keeps an error of
    exactly ``n * cycle`` ppm (1.96 ppm for 4 ms echo spacing at 3 T). Such spikes are harmless to the
    fit but ruin spherical-mean-value background removal, which spreads them over a ball. Each voxel is
    compared with the *median* of its 26 neighbours inside the mask (robust to a few wrong neighbours)
    and moved by ``round(difference / cycle)`` cycles; true fields differ from that median by far less
    than half a cycle. Returns (corrected field, number of voxels changed).
    """
    f = np.array(field, dtype=np.float64, copy=True)
    m = np.asarray(mask, bool)
    idx = np.nonzero(m)
    shape = np.array(m.shape)[:, None]
    offsets = [np.array(o)[:, None] for o in np.ndindex(3, 3, 3) if o != (1, 1, 1)]
    pos = np.stack(idx)
    nb = []  # for each mask voxel, the flat index of each neighbour (or -1 outside mask/FOV)
    for o in offsets:
        q = pos + o - 1
        inside = np.all((q >= 0) & (q < shape), axis=0)
        flat = np.full(pos.shape[1], -1, dtype=np.int64)
        qi = q[:, inside]
        ok = m[qi[0], qi[1], qi[2]]
        flat_in = np.ravel_multi_index(qi, m.shape)
        flat[np.flatnonzero(inside)[ok]] = flat_in[ok]
        nb.append(flat)
    nb = np.stack(nb, axis=1)  # (N, 26)
    has = nb >= 0
    changed = np.zeros(pos.shape[1], bool)
    ff = f.reshape(-1)
    own = np.ravel_multi_index(pos, m.shape)
    for _ in range(int(iterations)):
        vals = np.where(has, ff[np.where(has, nb, 0)], np.nan)
        with np.errstate(all="ignore"):
            med = np.nanmedian(vals, axis=1) if has.any() else np.full(own.size, np.nan)
        n = np.where(np.isfinite(med), np.round((ff[own] - med) / cycle), 0.0)
        if not n.any():
            break
        ff[own] -= n * cycle
        changed |= n != 0
    return f, int(changed.sum())
