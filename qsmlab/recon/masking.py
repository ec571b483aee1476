"""Brain mask from magnitude: threshold, morphology, hole filling, largest component, optional erosion.

Threshold: Otsu's between-class-variance maximum (Otsu, IEEE SMC 9:62, 1979), computed on a 256-bin
histogram of the finite non-zero voxels (the same algorithm as ``skimage.filters.threshold_otsu``, which
is not a dependency), or a fixed fraction of the robust maximum (99th percentile). Morphology uses
``scipy.ndimage``: an opening removes thin bright structures (vessels, skin) bridging to the brain, a
closing and hole filling restore dark structures inside it (veins, haemorrhages, ventricles in T2*),
and the largest 6-connected component is kept. The scalp of a GRE magnitude is bright and touches the
brain where the skull is thin or absent (the neck under the brainstem), so components are chosen after
an erosion by ``separate_mm`` and grown back by the same amount inside the thresholded image (a
geodesic reconstruction limited to that distance): on the embedded synthetic heads this raises the Dice
with the true brain mask from 0.68-0.78 to 0.85-0.89. Erosion, in voxels or mm, trims the unreliable rim.

R2* step (when an R2* map is given, as the pipeline does with three echoes or more): the thresholded
magnitude of a real head keeps the soft tissue that touches the brain (meninges, the neck under the
brainstem, muscle) because no dark skull separates it; a mask that reaches into it puts background
sources at the mask's edge, and background removal then fails there (on simulated heads with scalp and
skull the chi error inside the brain went from 46 % to 187 % with such a mask). Brain tissue at its
surface (cortex, CSF) has R2* ~ 15-25 /s at 3 T, extra-cerebral soft tissue and tissue next to air or
bone more (Yablonskiy et al., MRM 2013; Li et al., NeuroImage 2011), so voxels above ``r2star_max``
(default 30 /s at 3 T, scaled linearly with B0) are dropped, the largest component kept and holes filled
again (deep grey matter nuclei, R2* up to 50 /s, lie inside the brain and come back with the holes).
This is the magnitude + R2* two-pass masking that QSM tools use (e.g. QSMxT's threshold masks with
hole filling). For in-vivo data a dedicated brain extraction (e.g. FSL BET) given as ``--mask`` remains
the safer choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from qsmlab.errors import QSMInputError


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu threshold of a 1-D array of intensities."""
    v = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(v, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(centres[int(np.argmax(between))])


R2STAR_MAX_3T = 30.0
"""1/s at 3 T: above the cortex and CSF (15-25 /s), below extra-cerebral soft tissue next to the brain."""


def r2star_map(magnitude: np.ndarray, te: Sequence[float]) -> np.ndarray:
    """R2* (1/s, (X, Y, Z)) by a magnitude^2-weighted log-linear fit over TE (nan without signal).

    ``ln m_e = ln S0 - TE_e R2*``; weights ``m_e^2`` (the variance of ``ln m`` is ``sigma^2 / m^2``).
    ``magnitude``: (X, Y, Z, E); ``te``: E echo times in s.
    """
    m = np.abs(np.asarray(magnitude, dtype=np.float64))
    t = np.asarray(te, dtype=np.float64).reshape(-1)
    if m.ndim != 4 or m.shape[3] != t.size or t.size < 2:
        raise QSMInputError(f"r2star_map: expected (X, Y, Z, E) with E = {t.size} >= 2 echoes, got {m.shape}")
    w = m**2
    sw = w.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logm = np.log(np.maximum(m, 1e-30))
        tw = (w * t).sum(-1) / sw
        lw = (w * logm).sum(-1) / sw
        num = (w * (t - tw[..., None]) * (logm - lw[..., None])).sum(-1)
        den = (w * (t - tw[..., None]) ** 2).sum(-1)
        r2 = -num / den
    r2[~(sw > 0)] = np.nan
    return r2


def _largest(m: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(m)
    return lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1) if n > 1 else m


def _ball(radius_vox: Sequence[float]) -> np.ndarray:
    r = [max(int(np.ceil(x)), 0) for x in radius_vox]
    g = np.meshgrid(*[np.arange(-k, k + 1) for k in r], indexing="ij")
    return sum((gi / max(ri, 1e-9)) ** 2 for gi, ri in zip(g, radius_vox) if ri > 0) <= 1.0 + 1e-9


def brain_mask(
    magnitude: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    threshold: str | float = "otsu",
    opening: int = 1,
    closing: int = 2,
    fill_holes: bool = True,
    largest_component: bool = True,
    separate_mm: float = 6.0,
    erode_vox: int = 0,
    erode_mm: float | None = None,
    r2star: np.ndarray | None = None,
    r2star_max: float | None = None,
    b0_tesla: float = 3.0,
) -> np.ndarray:
    """Binary brain mask from a magnitude image.

    Args:
        magnitude: (X, Y, Z), or (X, Y, Z, E) from which echo 1 is used.
        voxel_size: mm along (i, j, k), for ``erode_mm``.
        threshold: ``"otsu"`` (default), or a float in (0, 1): fraction of the 99th percentile.
        opening: iterations of binary opening (6-connectivity) before component selection (default 1).
        closing: iterations of binary closing after it (default 2).
        fill_holes: fill enclosed holes (default True).
        largest_component: keep only the largest connected component (default True).
        separate_mm: erosion (mm) before choosing the component, undone afterwards inside the
            thresholded image; 0 disables it (default 6 mm).
        erode_vox: final erosion in voxels (default 0).
        erode_mm: final erosion in mm, an ellipsoidal element (overrides ``erode_vox`` when given).
        r2star: optional R2* map (1/s, (X, Y, Z), e.g. :func:`r2star_map`): enables the R2* step.
        r2star_max: R2* above which a voxel is not brain (1/s); None = ``R2STAR_MAX_3T * b0_tesla / 3``.
        b0_tesla: field strength (T), scales the default ``r2star_max``.
    Returns:
        Boolean mask (X, Y, Z).
    """
    mag = np.abs(np.asarray(magnitude, dtype=np.float64))
    if mag.ndim == 4:
        mag = mag[..., 0]
    if mag.ndim != 3:
        raise QSMInputError(f"brain_mask: expected a 3-D magnitude (X, Y, Z), got shape {mag.shape}")
    vals = mag[np.isfinite(mag) & (mag > 0)]
    if vals.size == 0:
        raise QSMInputError("brain_mask: the magnitude has no positive finite voxel")
    if threshold == "otsu":
        thr = otsu_threshold(vals)
    else:
        try:
            frac = float(threshold)
        except (TypeError, ValueError):
            raise QSMInputError(f"brain_mask: threshold must be 'otsu' or a fraction in (0, 1), got {threshold!r}") from None
        if not 0.0 < frac < 1.0:
            raise QSMInputError(f"brain_mask: threshold fraction must be in (0, 1), got {frac}")
        thr = frac * float(np.percentile(vals, 99))
    m = mag > thr
    if opening > 0:
        m = ndimage.binary_opening(m, iterations=opening)
    if largest_component and m.any():
        ball = _ball([separate_mm / float(h) for h in voxel_size]) if separate_mm > 0 else None
        core = ndimage.binary_erosion(m, structure=ball) if ball is not None else m
        if not core.any():  # the erosion removed everything: fall back to the plain components
            core, ball = m, None
        lab, n = ndimage.label(core)
        if n > 1:
            core = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
        m = ndimage.binary_dilation(core, structure=ball) & m if ball is not None else core
    if closing > 0:
        # pad so that the closing does not stick to the FOV border
        p = closing + 1
        m = ndimage.binary_closing(np.pad(m, p), iterations=closing)[p:-p, p:-p, p:-p]
    if fill_holes:
        m = ndimage.binary_fill_holes(m)
    if r2star is not None:
        r2 = np.asarray(r2star, dtype=np.float64)
        if r2.shape != m.shape:
            raise QSMInputError(f"brain_mask: r2star shape {r2.shape} differs from the magnitude's {m.shape}")
        limit = float(r2star_max) if r2star_max is not None else R2STAR_MAX_3T * float(b0_tesla) / 3.0
        kept = m & ~(r2 > limit)  # nan (no signal) stays: the magnitude already decided there
        if opening > 0:
            kept = ndimage.binary_opening(kept, iterations=opening)
        if kept.any():
            m = _largest(kept) if largest_component else kept
            if closing > 0:
                p = closing + 1
                m = ndimage.binary_closing(np.pad(m, p), iterations=closing)[p:-p, p:-p, p:-p]
            m = ndimage.binary_fill_holes(m) if fill_holes else m
    if erode_mm is not None and erode_mm > 0:
        m = ndimage.binary_erosion(m, structure=_ball([erode_mm / float(h) for h in voxel_size]))
    elif erode_vox > 0:
        m = ndimage.binary_erosion(m, iterations=int(erode_vox))
    if not m.any():
        raise QSMInputError("brain_mask: the mask is empty after thresholding/morphology; lower the threshold")
    return m
