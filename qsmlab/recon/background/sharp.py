"""SHARP and V-SHARP background field removal.

SHARP (Schweser et al., NeuroImage 54:2789, 2011): the background field is harmonic inside the brain,
so the spherical-mean-value high-pass ``(delta - S_r)`` annihilates it on the mask eroded by the ball
radius. What remains is ``(delta - S_r) * local``; dividing by ``1 - S_r(k)`` in k-space (truncated SVD:
frequencies where ``|1 - S_r(k)| < threshold`` are set to zero) recovers the local field on the eroded
mask, up to its low frequencies (the truncation) and a constant.

V-SHARP (Li et al., NeuroImage 55:1645, 2011; Wu et al., MRM 67:137, 2012): each voxel is high-passed
with the largest ball of ``radii_mm`` that fits inside the mask, so the valid region reaches the
smallest radius from the boundary while the centre of the brain keeps the large, well-conditioned
kernel; the deconvolution uses the largest kernel (as in STI Suite and QSM.jl).

Both return the local field with its mean over the valid mask removed (the constant is unrecoverable).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmlab.errors import QSMInputError
from qsmlab.recon.background._spherical import SphericalMean, check_inputs, demean
from qsmlab.recon.registry import register


def _tsvd_deconvolve(highpassed: np.ndarray, smv: SphericalMean, threshold: float) -> np.ndarray:
    """``F^-1[ F[h] / (1 - S(k)) ]`` with ``1/(1 - S)`` set to 0 where ``|1 - S| < threshold``."""
    one_minus_s = 1.0 - smv.spectrum
    keep = np.abs(one_minus_s) >= threshold
    inv = np.zeros_like(one_minus_s)
    inv[keep] = 1.0 / one_minus_s[keep]
    return smv.irfft(smv.rfft(highpassed) * inv)


def _check_threshold(threshold: float, method: str) -> float:
    if not 0.0 < float(threshold) < 1.0:
        raise QSMInputError(f"{method}: threshold must be in (0, 1), got {threshold}")
    return float(threshold)


@register("background", "sharp")
def sharp(
    total_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    radius_mm: float = 5.0,
    threshold: float = 0.05,
    quiet: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """SHARP (Schweser et al. 2011).

    Args:
        total_field: unwrapped total field (ppm), shape (X, Y, Z); values outside ``mask`` are ignored.
        mask: brain mask (X, Y, Z), where the background is harmonic.
        voxel_size: mm per voxel. b0_dir: unused (the SMV kernel is isotropic in mm); kept for the
            family signature.
        radius_mm: SMV ball radius in mm (default 5).
        threshold: TSVD truncation of ``1 - S(k)`` (default 0.05).
        quiet: unused (not iterative).
    Returns:
        (local_field ppm, demeaned over and zero outside ``valid_mask``; ``valid_mask`` = mask eroded by
        the ball).
    """
    f, m, vs = check_inputs(total_field, mask, voxel_size, "sharp")
    threshold = _check_threshold(threshold, "sharp")
    smv = SphericalMean(f.shape, vs, radius_mm)
    valid = smv.erode(m)
    if not valid.any():
        raise QSMInputError(f"sharp: the mask eroded by radius_mm={radius_mm} is empty; use a smaller radius_mm")
    hp = np.where(valid, smv.highpass(f), 0.0)
    local = _tsvd_deconvolve(hp, smv, threshold)
    return demean(local, valid), valid


@register("background", "vsharp")
def vsharp(
    total_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    radii_mm: Sequence[float] = (12.0, 11.0, 10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0),
    threshold: float = 0.05,
    quiet: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """V-SHARP (Li et al. 2011, Wu et al. 2012): SHARP with radii shrinking towards the mask boundary.

    Args:
        total_field: unwrapped total field (ppm), shape (X, Y, Z).
        mask: brain mask (X, Y, Z).
        voxel_size: mm per voxel. b0_dir: unused (family signature).
        radii_mm: ball radii in mm, any order (sorted largest first); radii smaller than the smallest
            voxel size are dropped (default 12, 11, ..., 1 mm).
        threshold: TSVD truncation of ``1 - S_rmax(k)`` (default 0.05).
        quiet: unused (not iterative).
    Returns:
        (local_field ppm, demeaned over ``valid_mask``; ``valid_mask`` = mask eroded by the smallest
        radius used).
    """
    f, m, vs = check_inputs(total_field, mask, voxel_size, "vsharp")
    threshold = _check_threshold(threshold, "vsharp")
    radii = sorted({float(r) for r in np.ravel(radii_mm) if float(r) >= min(vs)}, reverse=True)
    if not radii:
        raise QSMInputError(f"vsharp: radii_mm {list(np.ravel(radii_mm))} are all smaller than the voxel "
                            f"size {min(vs)} mm")
    hp = np.zeros_like(f)
    done = np.zeros_like(m)
    first = None
    for r in radii:
        smv = SphericalMean(f.shape, vs, r)
        if first is None:
            first = smv
        eroded = smv.erode(m)
        new = eroded & ~done  # voxels whose largest fitting ball has radius r
        if new.any():
            hp[new] = smv.highpass(f)[new]
            done |= new
    if not done.any():
        raise QSMInputError(f"vsharp: the mask eroded by the smallest radius {radii[-1]} mm is empty")
    local = _tsvd_deconvolve(hp, first, threshold)
    return demean(local, done), done
