"""Forward simulation of QSM data from a phantom: fields, multi-echo GRE signal, several orientations.

Fields (ppm; DESIGN §1, one operator for everything, :class:`qsmlab.physics.DipoleOperator`):

    local      = A(chi * mask)        chi relative to CSF, brain only   (the label of dipole inversion)
    background = V(chi_bg)            sources outside the brain (chi_bg relative to air, see
                                      qsmlab.data.phantoms.background)
    total      = local + background   (computed as the sum so ``local`` is exactly A(chi * mask))

``V`` (:func:`background_field`) is the exact field of the voxelised sources, each voxel a uniformly
magnetised box (:mod:`qsmlab.data.voxel_field`), not the sampled continuous kernel of ``A``: a voxel-sharp
9.4 ppm air/tissue step under ``A`` with an oblique B0 puts a non-harmonic field inside the brain (its
discrete Laplacian there was 5-9x the local field's at 15-30 deg), which no scanner measures. ``V`` is
harmonic wherever chi_bg is constant, so inside the brain, at any B0 direction and voxel size
(benchmarks/bench_background_harmonic.py). Sources that touch the FOV (the neck, or a head cut by a crop)
are continued beyond it by ``continue_mm`` (the face is repeated outwards), as the body continues beyond
a scanner's FOV; cut off at the face, the neck's end would put an unrealistically strong field into the
cerebellum. Beyond that, outside is air (chi_bg = 0), as around a real head.

Multi-echo GRE signal (complex, (X, Y, Z, E)) at echo times ``te`` (s) and field strength ``b0_tesla``:

    S_e = M0 exp(-TE_e R2*) exp(i [phi0 + ppm_to_rad(total, TE_e, B0)]) + n_e,
    n_e ~ CN(0, sigma^2),  sigma = mean_brain(|S_1|) / snr

with R2* scaled from 3 T linearly in B0 (R2* of iron-rich tissue is ~linear in B0; Yao et al. 2009) and
``phi0`` a smooth, echo-independent phase offset (transmit/receive phase). The stored phase is
``angle(S_e)`` wrapped to (-pi, pi]; the stored magnitude is the echo-combined RMS sqrt(mean_e |S_e|^2).

Orientations (COSMOS; Liu et al., MRM 2009): scanning the head rotated by R puts B0 along R^T z in the
head's frame. Rotating the object before simulation *is* that acquisition; registering each scan back
to the reference head gives fields on one grid, each with its own ``b0_dir``, which is what COSMOS
consumes. We simulate that co-registered form directly: chi stays on its grid and only ``b0_dir``
changes (:func:`orientation_b0_dirs`), so no interpolation blurs the labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from qsmlab.data.phantoms import Phantom
from qsmlab.data.voxel_field import voxel_dipole_field
from qsmlab.physics import DipoleOperator, normalize_b0_dir
from qsmlab.physics.units import ppm_to_rad


@dataclass
class Fields:
    """Simulated fields (ppm), (X, Y, Z) float32, unmasked."""

    local: np.ndarray
    background: np.ndarray
    total: np.ndarray


@dataclass
class Scan:
    """One simulated acquisition (one orientation) of a phantom.

    Attributes:
        b0_dir: unit B0 direction in voxel axes.
        fields: local / background / total field (ppm).
        phase: wrapped phase (rad), (X, Y, Z, E) float32 in (-pi, pi].
        magnitude: echo-combined RMS magnitude, (X, Y, Z) float32.
        te: echo times (s); b0_tesla: field strength (T); sigma: noise sd per channel.
    """

    b0_dir: np.ndarray
    fields: Fields
    phase: np.ndarray
    magnitude: np.ndarray
    te: tuple[float, ...]
    b0_tesla: float
    sigma: float


def wrap_phase(phi: np.ndarray) -> np.ndarray:
    """Wrap to (-pi, pi] (``np.angle`` may return -pi; this maps it to +pi)."""
    return np.pi - np.mod(np.pi - phi, 2.0 * np.pi)


CONTINUE_MM = 100.0
"""Default distance (mm) by which background sources touching the FOV are continued beyond it."""


CUT_FRACTION = 0.01
"""A face counts as cutting the body when at least this fraction of it holds sources."""


def continue_sources(chi_bg: np.ndarray, voxel_size: Sequence[float], continue_mm: float = CONTINUE_MM
                     ) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """``chi_bg`` with every face that cuts the body (>= :data:`CUT_FRACTION` of it sources) repeated
    outwards for ``continue_mm``, and the slices of the original FOV in the result. Faces of air, or
    grazed by a few voxels of scalp, are left alone (no cost, and one FFT grid for a whole dataset)."""
    pads = []
    for ax in range(3):
        n = int(round(max(float(continue_mm), 0.0) / float(voxel_size[ax])))
        lo = n if np.mean(np.take(chi_bg, 0, axis=ax) != 0) >= CUT_FRACTION else 0
        hi = n if np.mean(np.take(chi_bg, -1, axis=ax) != 0) >= CUT_FRACTION else 0
        pads.append((lo, hi))
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, chi_bg.shape))
    if not any(lo or hi for lo, hi in pads):
        return chi_bg, crop
    return np.pad(chi_bg, pads, mode="edge"), crop


def background_field(chi_bg: np.ndarray, voxel_size: Sequence[float],
                     b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
                     continue_mm: float = CONTINUE_MM) -> np.ndarray:
    """Field (ppm, float32 (X, Y, Z)) of background sources ``chi_bg`` (ppm relative to air, (X, Y, Z)).

    Exact for the voxelised sources (:func:`qsmlab.data.voxel_field.voxel_dipole_field`), so harmonic
    wherever ``chi_bg`` is constant; sources touching the FOV continue ``continue_mm`` beyond it
    (:func:`continue_sources`); air beyond that.
    """
    ext, crop = continue_sources(np.asarray(chi_bg, dtype=np.float32), voxel_size, continue_mm)
    return np.ascontiguousarray(voxel_dipole_field(ext, voxel_size, b0_dir)[crop])


def simulate_fields(chi: np.ndarray, mask: np.ndarray, chi_bg: np.ndarray | None,
                    voxel_size: Sequence[float], b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
                    pad_factor: float = 2.0, continue_mm: float = CONTINUE_MM) -> Fields:
    """Local, background and total field (ppm) of ``chi * mask`` and ``chi_bg`` (both ppm, (X, Y, Z)).

    ``local = A(chi * mask)`` with the operator's zero padding ``pad_factor`` (default 2); the background
    is :func:`background_field` (exact voxel-box field, sources at the FOV continued by ``continue_mm``).
    """
    op = DipoleOperator(voxel_size=tuple(float(v) for v in voxel_size), b0_dir=normalize_b0_dir(b0_dir),
                        pad_factor=pad_factor)
    local = op.A(np.asarray(chi * mask, dtype=np.float32))
    bg = (background_field(chi_bg, voxel_size, b0_dir, continue_mm) if chi_bg is not None
          else np.zeros_like(local))
    return Fields(local=local, background=bg, total=local + bg)


def smooth_phase_offset(shape: Sequence[int], voxel_size: Sequence[float], rng: np.random.Generator,
                        amplitude_rad: float = 1.0, sigma_mm: float = 30.0) -> np.ndarray:
    """Echo-independent phase offset phi0 (rad): random constant + smooth field of sd ``amplitude_rad``."""
    if amplitude_rad <= 0:
        return np.zeros(tuple(shape), dtype=np.float32)
    n = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)).astype(np.float32),
                                sigma=np.asarray(sigma_mm) / np.asarray(voxel_size), mode="reflect")
    n = (n - n.mean()) / max(float(n.std()), 1e-12)
    return (amplitude_rad * n + rng.uniform(-np.pi, np.pi)).astype(np.float32)


def simulate_gre(total_field: np.ndarray, m0: np.ndarray, r2star_3t: np.ndarray, te: Sequence[float],
                 b0_tesla: float, rng: np.random.Generator, snr: float | None = 100.0,
                 phase_offset: np.ndarray | None = None, mask: np.ndarray | None = None
                 ) -> tuple[np.ndarray, float]:
    """Complex multi-echo GRE signal (X, Y, Z, E) complex64 and the noise sd (see module docstring).

    Args:
        total_field: ppm; m0: a.u.; r2star_3t: 1/s at 3 T; te: echo times (s); b0_tesla: T.
        snr: mean first-echo magnitude in ``mask`` over the noise sd; None or inf = noiseless.
        phase_offset: phi0 (rad), echo-independent; None = 0.
    """
    te = tuple(float(t) for t in te)
    r2 = np.asarray(r2star_3t, dtype=np.float32) * np.float32(b0_tesla / 3.0)
    base = np.zeros_like(r2) if phase_offset is None else np.asarray(phase_offset, dtype=np.float32)
    sig = np.empty(tuple(total_field.shape) + (len(te),), dtype=np.complex64)
    for e, t in enumerate(te):
        mag = m0 * np.exp(-np.float32(t) * r2)
        phi = base + np.float32(ppm_to_rad(1.0, t, b0_tesla)) * total_field
        # real and imaginary parts in place: exp(1j * phi) would go through complex128 temporaries
        s_e = sig[..., e]
        s_e.real = mag * np.cos(phi)
        s_e.imag = mag * np.sin(phi)
    sigma = 0.0
    if snr is not None and np.isfinite(snr):
        region = mask if mask is not None and np.any(mask) else m0 > 0
        sigma = float(np.mean(np.abs(sig[..., 0])[region])) / float(snr)
        sig.real += np.float32(sigma) * rng.standard_normal(sig.shape, dtype=np.float32)
        sig.imag += np.float32(sigma) * rng.standard_normal(sig.shape, dtype=np.float32)
    return sig, sigma


def orientation_b0_dirs(rotations_deg: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """B0 in voxel axes for head rotations R (extrinsic x-y-z Euler angles, deg): b0 = R^T z."""
    z = np.array([0.0, 0.0, 1.0])
    return [Rotation.from_euler("xyz", r, degrees=True).as_matrix().T @ z for r in rotations_deg]


def simulate_scans(phantom: Phantom, rng: np.random.Generator, te: Sequence[float], b0_tesla: float = 3.0,
                   snr: float | None = 100.0, b0_dirs: Sequence[Sequence[float]] = ((0.0, 0.0, 1.0),),
                   pad_factor: float = 2.0, phase_offset_rad: float = 1.0,
                   continue_mm: float = CONTINUE_MM) -> list[Scan]:
    """Simulate one :class:`Scan` per ``b0_dir`` of ``phantom`` (co-registered orientations, see above)."""
    vs = phantom.voxel_size
    scans = []
    for b in b0_dirs:
        f = simulate_fields(phantom.chi, phantom.mask, phantom.chi_bg, vs, b, pad_factor, continue_mm)
        phi0 = smooth_phase_offset(phantom.shape, vs, rng, phase_offset_rad)
        sig, sigma = simulate_gre(f.total, phantom.m0, phantom.r2star, te, b0_tesla, rng, snr, phi0,
                                  phantom.mask)
        phase = wrap_phase(np.angle(sig)).astype(np.float32)
        mag = np.sqrt(np.mean(np.abs(sig) ** 2, axis=-1)).astype(np.float32)
        del sig
        scans.append(Scan(b0_dir=normalize_b0_dir(b), fields=f, phase=phase, magnitude=mag,
                          te=tuple(float(t) for t in te), b0_tesla=float(b0_tesla), sigma=sigma))
    return scans
