"""In-vivo-like synthetic subjects: a healthy head at 3 T as a clinical multi-echo GRE scan would see it.

One call, one subject, everything known: the MNI-based anatomy of :func:`anatomical_phantom` with healthy
adult susceptibilities (:data:`INVIVO_CHI_RANGES`, ppm relative to CSF: deep grey matter up to ~0.2,
white matter about -0.05, 20-40 veins of 0.25-0.45; no haemorrhage or calcification), its head model
(air, skull, tissue) as background sources, and a multi-echo acquisition with TE up to 24 ms, a smooth
receive phase offset and complex Gaussian noise (first-echo SNR 60 by default, ~40 at the last echo):

    local      = A(chi * mask)          the label of dipole inversion (exactly, on the output grid)
    background = V(chi_bg + chi * mask outside the output grid)    exact voxel-box field, harmonic
    total      = local + background
    S_e        = M0 exp(-TE_e R2*) exp(i [phi0 + 2 pi gamma B0 TE_e total]) + noise,   phase = angle(S_e)

(:mod:`qsmlab.data.simulate`, :mod:`qsmlab.data.voxel_field`). Measured (seed 0, 20 deg, a 96^3 crop at
1 mm and 192 x 192 x 48 at 0.5 x 0.5 x 2 mm): the local field's 1st/99th percentiles in the brain are
-0.030/+0.035 ppm (in-vivo 3 T local fields are +-0.03-0.05 ppm), the background's sd 0.23-0.27 ppm, the
SNR 60 -> 41 from the first to the last echo, the field noise 0.0015 ppm.

Geometry: ``tilt_deg`` pitches the head about the left-right (i) axis, so ``b0_dir = (0, sin t, cos t)``
in voxel axes (``orientation_b0_dirs([[t, 0, 0]])``, the same convention as a recipe's ``orientations``),
the common obliquity of axial slabs tilted to the AC-PC line. ``shape`` crops the field of view around the
brain's centre (e.g. 96^3 at 1 mm for a quick benchmark): the whole head is still simulated, and everything
outside the crop (skull, air, and brain tissue cut away) contributes to the background field, as it
does for a slab acquisition; ``local = A(chi * mask)`` holds exactly on the cropped grid.

Randomness: ``seed`` draws the anatomy (``SeedSequence(seed, spawn_key=(0,))``) and, separately, the
acquisition (phase offset and noise, ``spawn_key=(1,)``), so the same seed at another tilt is the same
head with the same noise realisation: a paired oblique-vs-axial comparison. The phantom of the last
``(seed, voxel_size, grid)`` is cached, so such pairs build the anatomy once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from qsmlab.data.phantoms import Phantom
from qsmlab.data.phantoms.anatomical import anatomical_phantom, output_grid
from qsmlab.data.simulate import (
    background_field,
    orientation_b0_dirs,
    simulate_gre,
    smooth_phase_offset,
    wrap_phase,
)
from qsmlab.physics import DipoleOperator
from qsmlab.physics.units import ppm_to_rad

INVIVO_CHI_RANGES: dict[str, tuple[float, float]] = {
    "csf": (-0.01, 0.01),
    "cortical_gm": (0.02, 0.05),
    "wm": (-0.06, -0.04),
    "caudate": (0.04, 0.09),
    "putamen": (0.03, 0.09),
    "globus_pallidus": (0.12, 0.20),
    "thalamus": (0.01, 0.05),
    "red_nucleus": (0.07, 0.14),
    "substantia_nigra": (0.08, 0.16),
    "dentate": (0.06, 0.14),
    "vein": (0.25, 0.45),
}
"""ppm relative to CSF; healthy adults at 3 T (Deistung et al., NeuroImage 2013; Lim et al., NeuroImage
2013; veins partial-volumed at 1 mm, Fan et al., MRM 2014). Grey/white contrast at the upper end of the
published values, so that the local field reaches in-vivo amplitudes (the phantom has no myelin
anisotropy, which adds to the grey/white frequency contrast in vivo)."""
INVIVO_VEINS = (20, 40)
"""Number of veins (thin tubes, 0.6-1.2 mm radius); in vivo, pial and medullary veins are many."""
INVIVO_TEXTURE_PPM = 0.015
"""sd (ppm) of the smooth within-tissue texture."""
INVIVO_TE: tuple[float, ...] = (0.004, 0.009, 0.014, 0.019, 0.024)
"""s; a 5-echo 3 T QSM protocol (first echo 4 ms, spacing 5 ms, last 24 ms)."""
INVIVO_SNR = 60.0
"""Mean first-echo magnitude in the brain over the noise sd (~40 at the last echo)."""
PHASE_OFFSET_RAD = 1.0
"""sd (rad) of the smooth receive phase offset phi0 (plus a random constant)."""


@dataclass
class InvivoLikeSubject:
    """One simulated scan; arrays (X, Y, Z) or (X, Y, Z, E), float32 unless noted.

    Attributes:
        chi: ppm relative to CSF, 0 outside ``mask``.  mask: brain, bool.  labels: int16 tissue labels
            (:data:`qsmlab.data.phantoms.LABELS`).
        local_field: ``A(chi * mask)`` (ppm, unmasked).  background_field: ppm, harmonic in the brain.
        total_field: local + background (ppm).
        magnitude, phase: per echo, (X, Y, Z, E); phase wrapped to (-pi, pi] (rad).
        phase_offset: phi0 (rad), echo-independent.
        te: echo times (s).  b0_tesla: T.  b0_dir: unit vector in voxel axes (float64).
        voxel_size: mm.  affine: voxel -> MNI world (mm).  tilt_deg: head pitch about i (deg).
        noise_sigma: complex noise sd per channel (signal units).
        snr_per_echo: mean magnitude in the brain over ``noise_sigma``, per echo.
        noise_std_ppm: median over the brain of the sd of the magnitude^2-weighted least-squares field
            estimate over TE (ppm), i.e. the noise floor of the total field a pipeline can reach.
        seed: the subject's seed.
    """

    chi: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    local_field: np.ndarray
    background_field: np.ndarray
    total_field: np.ndarray
    magnitude: np.ndarray
    phase: np.ndarray
    phase_offset: np.ndarray
    te: tuple[float, ...]
    b0_tesla: float
    b0_dir: np.ndarray
    voxel_size: tuple[float, float, float]
    affine: np.ndarray
    tilt_deg: float
    noise_sigma: float
    snr_per_echo: tuple[float, ...]
    noise_std_ppm: float
    seed: int


@lru_cache(maxsize=1)
def _phantom(seed: int, voxel_size: tuple, grid: tuple | None) -> Phantom:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    ph = anatomical_phantom(rng, voxel_size=voxel_size, shape=grid, chi_ranges=INVIVO_CHI_RANGES,
                            veins=INVIVO_VEINS, texture_ppm=INVIVO_TEXTURE_PPM, haemorrhage_probability=0.0,
                            calcification_probability=0.0)
    for a in (ph.chi, ph.mask, ph.labels, ph.m0, ph.r2star, ph.chi_bg):
        a.setflags(write=False)  # shared by the cache: callers get copies
    return ph


def field_noise_ppm(magnitude: np.ndarray, te: Sequence[float], b0_tesla: float, sigma: float) -> np.ndarray:
    """Per-voxel sd (ppm) of the weighted least-squares field over TE with intercept, weights m^2.

    Phase noise at echo e is ``sigma / m_e`` (rad, high SNR), so the fitted slope has variance
    ``sigma^2 / sum_e m_e^2 (TE_e - TE_w)^2`` (``TE_w`` the m^2-weighted mean TE); converted from rad/s
    to ppm with ``ppm_to_rad(1, 1 s, B0)``. ``magnitude`` (X, Y, Z, E); zero signal gives inf.
    """
    t = np.asarray(te, dtype=np.float64)
    w = np.asarray(magnitude, dtype=np.float64) ** 2
    sw = w.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tw = (w * t).sum(-1) / sw
        spread = (w * (t - tw[..., None]) ** 2).sum(-1)
        return (float(sigma) / np.sqrt(spread) / ppm_to_rad(1.0, 1.0, b0_tesla)).astype(np.float32)


def _crop_slices(full: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(full, shape))


def invivo_like_subject(
    seed: int,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    tilt_deg: float = 0.0,
    snr: float | None = INVIVO_SNR,
    te: Sequence[float] = INVIVO_TE,
    b0_tesla: float = 3.0,
    shape: Sequence[int] | None = None,
) -> InvivoLikeSubject:
    """One in-vivo-like subject (see module docstring).

    Args:
        seed: int >= 0; same seed, same head and noise (at any tilt).
        voxel_size: mm, any (an)isotropic value, e.g. (1, 1, 1) or (0.5, 0.5, 2).
        tilt_deg: head pitch about the i axis (deg); ``b0_dir = (0, sin t, cos t)``. Up to 30 is typical.
        snr: mean first-echo brain magnitude over the noise sd; None = noiseless.
        te: echo times (s), increasing.  b0_tesla: T (R2* scales linearly from 3 T).
        shape: output grid (X, Y, Z) around the brain's centre; None = the whole head (brain + 20 mm).
            A crop smaller than the head is cut from the whole-head simulation (see module docstring).
    Returns:
        :class:`InvivoLikeSubject`.
    """
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    vs = tuple(float(v) for v in voxel_size)
    if len(vs) != 3 or min(vs) <= 0:
        raise ValueError(f"voxel_size must be 3 positive numbers (mm), got {list(voxel_size)}")
    te = tuple(float(t) for t in te)
    if not te or te[0] <= 0 or any(b <= a for a, b in zip(te, te[1:])):
        raise ValueError(f"te must be positive, strictly increasing echo times (s), got {list(te)}")
    full, _ = output_grid(vs)
    grid = None
    if shape is not None:
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or min(shape) < 8:
            raise ValueError(f"shape must be 3 ints >= 8, got {list(shape)}")
        if any(s > n for s, n in zip(shape, full)):  # larger than the head's FOV: simulate a larger FOV
            grid = tuple(max(s, n) for s, n in zip(shape, full))
            full = grid
    ph = _phantom(int(seed), vs, grid)
    crop = _crop_slices(full, shape if shape is not None else full)
    b0 = orientation_b0_dirs([[float(tilt_deg), 0.0, 0.0]])[0]

    chi = np.array(ph.chi[crop])
    mask = np.array(ph.mask[crop])
    local = DipoleOperator(voxel_size=vs, b0_dir=b0, pad_factor=2.0).A(chi * mask).astype(np.float32)
    # Background sources: the head model, plus brain tissue the crop cut away (outside the output grid's
    # brain, so its field is part of the background there).
    sources = np.array(ph.chi_bg, dtype=np.float32)
    outside = np.ones(ph.shape, bool)
    outside[crop] = False
    sources[outside] += ph.chi[outside] * ph.mask[outside]
    background = background_field(sources, vs, b0)[crop]
    del sources
    total = local + background

    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1,)))
    phi0 = smooth_phase_offset(chi.shape, vs, rng, PHASE_OFFSET_RAD)
    sig, sigma = simulate_gre(total, ph.m0[crop], ph.r2star[crop], te, b0_tesla, rng, snr, phi0, mask)
    phase = wrap_phase(np.angle(sig)).astype(np.float32)
    magnitude = np.abs(sig).astype(np.float32)
    del sig
    m0_echoes = np.asarray(ph.m0[crop], np.float64)[..., None] * np.exp(
        -np.asarray(te) * np.asarray(ph.r2star[crop], np.float64)[..., None] * (b0_tesla / 3.0))
    if sigma > 0:
        snr_e = tuple(float(np.mean(m0_echoes[mask][:, e]) / sigma) for e in range(len(te)))
        noise_ppm = float(np.median(field_noise_ppm(m0_echoes[mask], te, b0_tesla, sigma)))
    else:
        snr_e, noise_ppm = tuple(float("inf") for _ in te), 0.0
    affine = np.array(ph.affine)
    affine[:3, 3] += affine[:3, :3] @ np.array([s.start for s in crop], dtype=np.float64)
    return InvivoLikeSubject(
        chi=chi, mask=mask, labels=np.array(ph.labels[crop]), local_field=local,
        background_field=np.ascontiguousarray(background), total_field=total.astype(np.float32),
        magnitude=magnitude, phase=phase, phase_offset=phi0, te=te, b0_tesla=float(b0_tesla), b0_dir=b0,
        voxel_size=vs, affine=affine, tilt_deg=float(tilt_deg), noise_sigma=float(sigma), snr_per_echo=snr_e,
        noise_std_ppm=noise_ppm, seed=int(seed))
