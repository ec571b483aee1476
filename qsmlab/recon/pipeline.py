"""End-to-end classical QSM: multi-echo wrapped phase + magnitude -> total field -> local field -> chi.

Steps (each recorded with its method and effective parameters in ``provenance``):

1. **mask**: the given brain mask, or :func:`qsmlab.recon.masking.brain_mask` of the RSS-combined
   magnitude, refined by R2* (:func:`qsmlab.recon.masking.r2star_map`) with three echoes or more. It comes first because it only needs the magnitude and the unwrapper grows inside it.
2. **unwrap**: spatial unwrapper from the registry (``"region"`` default, or ``"laplacian"``) on the
   offset-free echo difference, then temporal unwrapping of every echo
   (:func:`qsmlab.recon.unwrap.unwrap_echoes`).
3. **echo fit**: magnitude²-weighted linear fit over TE with an intercept -> total field (ppm), phase
   offset (rad), fit residual (rad) (:func:`qsmlab.recon.echo_fit.fit_field`).
4. **background**: ``registry.get("background", bfr)`` -> local field (ppm) and the valid mask.
5. **inversion**: ``registry.get("inversion", inversion)`` on the valid mask -> chi (ppm). A weight left
   at ``auto`` (the default of every regularised method) is chosen from the data; for the discrepancy
   principle its noise level comes from the echo fit's residual (:func:`echo_fit_noise_std`, three echoes
   or more) unless ``noise_std`` is given. The chosen values, the noise level and any warning of the search
   are recorded in the step's provenance (``auto``, ``warnings``).

Units: phase rad, TE s, B0 T, fields and chi ppm; arrays in NIfTI voxel order (X, Y, Z[, E]); ``b0_dir``
a unit vector in voxel axes.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from qsmlab import __version__
from qsmlab.errors import QSMInputError
from qsmlab.physics import units
from qsmlab.physics.geometry import normalize_b0_dir
from qsmlab.recon import registry
from qsmlab.recon.echo_fit import combine_magnitude, correct_cycle_slips, cycle_ppm, fit_field
from qsmlab.recon.masking import brain_mask, r2star_map
from qsmlab.recon.unwrap import unwrap_echoes

DEFAULT_UNWRAP = "region"
DEFAULT_BFR = "vsharp"
DEFAULT_INVERSION = "tv"
# Tolerance on max - min for phase "in radians": 2π plus float32/rounding slack of vendor rescaling.
_RAD_TOL = 0.05


def check_phase_radians(phase: np.ndarray, name: str = "phase") -> None:
    """One-line error when ``phase`` cannot be wrapped radians (range wider than 2π)."""
    lo, hi = float(np.nanmin(phase)), float(np.nanmax(phase))
    if hi - lo > 2.0 * np.pi + _RAD_TOL:
        raise QSMInputError(
            f"{name}: values span [{lo:g}, {hi:g}], wider than 2π, so not wrapped radians (vendor integers?); "
            f"rescale first: phase_rad = (value - {lo:g}) / ({hi:g} - {lo:g}) * 2π - π, or value * π / 4096 for "
            f"-4096..4095 data")


def echo_fit_noise_std(residual: np.ndarray, magnitude: np.ndarray, te: Sequence[float], b0_tesla: float,
                       mask: np.ndarray) -> float | None:
    """Noise sd (ppm) of the fitted field from the echo fit's residual, or None with fewer than 3 echoes.

    :func:`qsmlab.recon.echo_fit.fit_field` weights echo n by ``w_n = m_n^2`` (phase noise sd ``s / m_n``)
    and reports ``rho = sqrt(sum w r^2 / sum w)``; with 2 parameters per voxel, ``sum w r^2 ~ (E - 2) s^2``,
    so ``s^2 ~ rho^2 sum w / (E - 2)``, and the slope's sd is ``s / sqrt(sum w (TE - TE_w)^2)`` (rad/s),
    converted to ppm. Returns the RMS over ``mask`` of that per-voxel sd, its top 1 % clipped (voxels whose
    phase is not linear in TE, e.g. flow, would otherwise decide the level for the whole brain).
    """
    te = np.asarray(te, dtype=np.float64)
    if te.size < 3 or not np.any(mask):
        return None
    w = np.asarray(magnitude, dtype=np.float64)[mask] ** 2
    sw = w.sum(-1)
    tw = (w * te).sum(-1) / np.maximum(sw, 1e-300)
    spread = (w * (te - tw[:, None]) ** 2).sum(-1)
    s2 = np.asarray(residual, dtype=np.float64)[mask] ** 2 * sw / (te.size - 2)
    sd = units.rad_to_ppm(np.sqrt(s2 / np.maximum(spread, 1e-300)), 1.0, b0_tesla)
    sd = sd[np.isfinite(sd)]
    if sd.size == 0:
        return None
    sd = np.minimum(sd, np.percentile(sd, 99))
    v = float(np.sqrt(np.mean(sd**2)))
    return v if v > 0 else None


def _resolve(family: str, name: str, params: dict | None) -> tuple:
    """Registered function, user parameters (checked and typed) and the effective parameters."""
    fn = registry.get(family, name)
    user = registry.check_params(family, name, params or {})
    effective = {**registry.parameters(fn), **user}
    return fn, user, effective


def _takes_quiet(fn) -> bool:
    return "quiet" in inspect.signature(fn).parameters


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def _as_echoes(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise QSMInputError(f"{what}: expected (X, Y, Z) or (X, Y, Z, echo), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise QSMInputError(f"{what}: contains NaN/Inf")
    return a


def run_pipeline(
    phase: np.ndarray,
    magnitude: np.ndarray,
    te: Sequence[float],
    b0_tesla: float,
    *,
    mask: np.ndarray | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    unwrap: str = DEFAULT_UNWRAP,
    unwrap_params: dict | None = None,
    temporal_reference: str = "difference",
    bfr: str = DEFAULT_BFR,
    bfr_params: dict | None = None,
    inversion: str = DEFAULT_INVERSION,
    inv_params: dict | None = None,
    mask_params: dict | None = None,
    quiet: bool = False,
) -> dict:
    """Run the classical QSM pipeline on one multi-echo GRE scan.

    Args:
        phase: wrapped phase (rad), (X, Y, Z, E) or (X, Y, Z) for one echo.
        magnitude: magnitude (a.u.), same shape as ``phase``.
        te: E echo times (s), increasing.
        b0_tesla: field strength (T).
        mask: optional boolean brain mask (X, Y, Z); computed from the magnitude when None.
        voxel_size: mm along (i, j, k).
        b0_dir: B0 direction in voxel axes (normalised here).
        unwrap / bfr / inversion: registered method names (``registry.names(family)``).
        unwrap_params / bfr_params / inv_params: their parameters (strings are converted to the
            default's type); unknown names raise :class:`QSMInputError`.
        temporal_reference: ``"difference"`` (default) or ``"first"``, see :mod:`qsmlab.recon.unwrap.temporal`.
        mask_params: keyword arguments of :func:`qsmlab.recon.masking.brain_mask`.
        quiet: no progress bars.
    Returns:
        dict with ``total_field``, ``local_field``, ``chi`` (ppm), ``mask``, ``valid_mask`` (bool),
        ``phase_offset``, ``fit_residual`` (rad), ``magnitude`` (RSS-combined) all (X, Y, Z), and
        ``provenance`` (JSON-serialisable dict of every step, parameter and the acquisition geometry).
    """
    phase = _as_echoes(phase, "phase")
    magnitude = _as_echoes(magnitude, "magnitude")
    if magnitude.shape != phase.shape:
        raise QSMInputError(f"magnitude shape {magnitude.shape} differs from phase shape {phase.shape}")
    te = np.asarray(te, dtype=np.float64).reshape(-1)
    if te.size != phase.shape[3]:
        raise QSMInputError(f"--te: {te.size} echo times for {phase.shape[3]} echoes")
    if np.any(te <= 0) or np.any(np.diff(te) <= 0):
        raise QSMInputError(f"--te: echo times must be positive and increasing, in seconds; got {te.tolist()}")
    if not float(b0_tesla) > 0:
        raise QSMInputError(f"--b0: field strength must be > 0 T, got {b0_tesla}")
    check_phase_radians(phase)
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.shape != (3,) or not np.all(vs > 0):
        raise QSMInputError(f"voxel_size: expected 3 positive numbers (mm), got {vs.tolist()}")
    b0_dir = normalize_b0_dir(b0_dir)

    # Resolve every method first: a typo fails before minutes of computation.
    un_fn, un_user, un_eff = _resolve("unwrap", unwrap, unwrap_params)
    bfr_fn, bfr_user, bfr_eff = _resolve("background", bfr, bfr_params)
    inv_fn, inv_user, inv_eff = _resolve("inversion", inversion, inv_params)
    mask_params = dict(mask_params or {})

    steps = []
    mag_comb = combine_magnitude(magnitude, te, "rss")
    with tqdm(total=5, desc="pipeline", disable=quiet, leave=False, dynamic_ncols=True) as bar:
        bar.set_postfix_str("mask")
        if mask is None:
            try:
                # R2* from three echoes or more: drops extra-cerebral tissue (qsmlab.recon.masking)
                r2 = r2star_map(magnitude, te) if te.size >= 3 and "r2star" not in mask_params else None
                brain = brain_mask(mag_comb, voxel_size=vs, r2star=r2, b0_tesla=float(b0_tesla), **mask_params)
            except TypeError as e:
                raise QSMInputError(f"mask parameters: {e}") from None
            steps.append({"step": "mask", "method": "brain_mask", "source": "magnitude (RSS over echoes)",
                          "params": {**registry.parameters(brain_mask), "b0_tesla": float(b0_tesla), **mask_params},
                          "r2star": "magnitude^2-weighted log-linear fit over TE" if r2 is not None else "none"})
        else:
            brain = np.asarray(mask) > 0.5
            if brain.shape != phase.shape[:3]:
                raise QSMInputError(f"--mask: shape {brain.shape} differs from the phase grid {phase.shape[:3]}")
            if not brain.any():
                raise QSMInputError("--mask: the mask is empty (no voxel set); expected a non-empty brain mask")
            steps.append({"step": "mask", "method": "given"})
        bar.update()

        bar.set_postfix_str(f"unwrap ({unwrap})")
        unwrapped = unwrap_echoes(phase, te, un_fn, brain, voxel_size=vs, magnitude=magnitude,
                                  reference=temporal_reference, **un_user)
        steps.append({"step": "unwrap", "method": unwrap, "params": un_eff,
                      "temporal": {"reference": temporal_reference if te.size > 1 else "none (one echo)"}})
        bar.update()

        bar.set_postfix_str("echo fit")
        fit = fit_field(unwrapped, te, b0_tesla, magnitude, brain)
        cycle = cycle_ppm(te, b0_tesla, temporal_reference)
        total, n_slips = correct_cycle_slips(fit.field, brain, cycle)
        steps.append({"step": "echo_fit", "method": "weighted linear least squares over TE with intercept",
                      "params": {"weights": "magnitude^2"},
                      "cycle_slip_correction": {"cycle_ppm": cycle, "voxels_corrected": n_slips}})
        bar.update()

        bar.set_postfix_str(f"background ({bfr})")
        extra = {"quiet": quiet} if _takes_quiet(bfr_fn) else {}
        local, valid = bfr_fn(total, brain, voxel_size=tuple(vs), b0_dir=tuple(b0_dir), **extra, **bfr_user)
        valid = np.asarray(valid, bool)
        if not valid.any():
            raise QSMInputError(f"background method {bfr!r} left no valid voxel; use a larger mask or smaller radius")
        steps.append({"step": "background", "method": bfr, "params": bfr_eff})
        bar.update()

        bar.set_postfix_str(f"inversion ({inversion})")
        from qsmlab.recon.inversion import auto

        extra = {"quiet": quiet} if _takes_quiet(inv_fn) else {}
        step = {"step": "inversion", "method": inversion, "params": inv_eff}
        uses_auto = any(registry.is_auto(inv_eff.get(k)) for k in registry.auto_parameters(inv_fn))
        if uses_auto and "noise_std" in inv_eff and inv_user.get("noise_std") is None:
            sd = echo_fit_noise_std(fit.residual, magnitude, te, b0_tesla, valid)
            if sd is not None:
                extra["noise_std"] = sd
                step["noise_std_ppm"] = {"value": sd, "source": "echo-fit residual"}
        auto.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", auto.AutoWarning)
            chi = inv_fn(local * valid, valid, voxel_size=tuple(vs), b0_dir=tuple(b0_dir), magnitude=mag_comb,
                         **extra, **inv_user)
        chi = np.asarray(chi, dtype=np.float64) * valid
        chosen = auto.last()
        if chosen:
            step["auto"] = [r.as_dict() for r in chosen]
            step["chosen"] = {r.parameter: r.value for r in chosen}
        auto_warnings = [str(w.message) for w in caught if issubclass(w.category, auto.AutoWarning)]
        if auto_warnings:
            step["warnings"] = auto_warnings
        for w in caught:  # the caller sees them too (the CLI prints each as one line)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        steps.append(step)
        bar.update()

    provenance = _jsonable({
        "qsmlab_version": __version__,
        "steps": steps,
        "te_s": te, "b0_tesla": float(b0_tesla), "voxel_size_mm": vs,
        "b0_dir": b0_dir + 0.0,  # + 0.0 turns -0.0 into 0.0 for the JSON
        "shape": list(phase.shape[:3]), "n_echoes": int(te.size),
        "units": {"phase": "rad", "te": "s", "b0": "T", "field": "ppm", "chi": "ppm"},
    })
    return {"total_field": total, "mask": brain, "local_field": local * valid, "valid_mask": valid,
            "chi": chi, "phase_offset": fit.phase_offset, "fit_residual": fit.residual,
            "magnitude": mag_comb, "provenance": provenance}
