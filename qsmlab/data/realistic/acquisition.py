"""Acquisition as a scanner makes it: fine-grid signal, k-space crop, complex noise, echo fit, background removal.

1. **Fine grid, k-space crop.** The multi-echo complex signal ``S_e = M0 exp(-TE_e R2*) exp(i phi_e)`` is
   simulated on a grid ``factor`` (default 2) times finer than the scan's per axis, Fourier transformed, and
   the block of the scan's frequencies is kept (:func:`kspace_crop`): the scan sees the band-limited signal,
   so intravoxel dephasing (signal loss and phase bias where the field varies within a voxel: veins, air/
   tissue boundaries) and partial volume come out as a scanner makes them, not by point-sampling. A
   half-fine-voxel phase ramp puts the scan's samples at the centres of the fine voxel blocks (a scan voxel
   is the union of ``factor^3`` fine voxels). A band-limited input survives the crop unchanged
   (tests/test_realistic_acquisition.py). The fine field of view is the scan's plus a margin, with a cosine
   taper over the margin so the periodic DFT never joins brain to brain across the border.
2. **Noise** (:func:`add_noise`): complex Gaussian noise of sd ``sigma = mean first-echo brain magnitude /
   SNR`` on the *scan* grid (thermal noise is white at the acquired resolution); the magnitude comes from
   M0 and R2*, so the SNR is lowest where R2* is high (iron-rich nuclei, veins) and at late echoes. The field
   noise is then ``sigma / sqrt(sum_e m_e^2 (TE_e - TE_w)^2)`` per voxel
   (:func:`qsmlab.data.invivo_like.field_noise_ppm`); in-vivo 3 T fields carry ~1-3 ppb (the real scan of
   issue 15: 3.3 ppb from its high-pass content, which includes model error).
3. **Echo fit and background removal** (:func:`pipeline_local_field`): the phase is unwrapped against the
   band-limited noiseless phase (ideal unwrapping: unwrapping errors are not simulated), the field fitted
   by :func:`qsmlab.recon.echo_fit.fit_field` (magnitude^2-weighted, with intercept), and the local field is
   what the pipeline's default background removal (V-SHARP) makes of it on the brain mask, with its eroded
   valid mask. Its residue (low frequencies lost, a constant, errors near the mask edge) stays in the field a
   method receives, as on a real scan.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft
from scipy import ndimage

from qsmlab.physics.units import ppm_to_rad


def as_factor(factor: int | Sequence[int]) -> tuple[int, int, int]:
    f = (int(factor),) * 3 if np.isscalar(factor) else tuple(int(x) for x in factor)
    if len(f) != 3 or min(f) < 1:
        raise ValueError(f"factor must be one or three ints >= 1, got {factor!r}")
    return f


def fine_affine(affine: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """Affine of the fine grid: fine voxel ``i`` sits at coarse index ``(i - (f - 1) / 2) / f``."""
    f = np.asarray(as_factor(factor), dtype=np.float64)
    s = np.eye(4)
    s[:3, :3] = np.diag(1.0 / f)
    s[:3, 3] = -(f - 1.0) / (2.0 * f)
    return np.asarray(affine, dtype=np.float64) @ s


def upsample_nearest(x: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """Each coarse voxel becomes ``f0 x f1 x f2`` fine voxels of its value (the voxel as a uniform box)."""
    f = as_factor(factor)
    for ax in range(3):
        if f[ax] > 1:
            x = np.repeat(x, f[ax], axis=ax)
    return x


def upsample_smooth(x: np.ndarray, factor: Sequence[int], order: int = 3) -> np.ndarray:
    """Spline interpolation onto the fine grid (voxel-centre aligned, ``grid_mode``), float32."""
    f = as_factor(factor)
    if f == (1, 1, 1):
        return np.asarray(x, dtype=np.float32)
    out = np.empty(tuple(n * k for n, k in zip(x.shape, f)), dtype=np.float32)
    ndimage.zoom(np.asarray(x, dtype=np.float32), f, output=out, order=order, mode="nearest", grid_mode=True)
    return out


def _crop_index(n_fine: int, n: int) -> np.ndarray:
    """DFT indices of the ``n`` lowest frequencies of an ``n_fine`` spectrum (fftfreq order)."""
    return np.concatenate([np.arange(0, (n + 1) // 2), np.arange(n_fine - n // 2, n_fine)])


def kspace_crop(x: np.ndarray, factor: int | Sequence[int]) -> np.ndarray:
    """Keep the scan's block of frequencies of a fine-grid array (X f0, Y f1, Z f2) -> (X, Y, Z).

    Mean preserving (the DC sample is scaled by the voxel-count ratio); the result is sampled at the
    centres of the fine ``f^3`` blocks (a half-fine-voxel phase ramp, see :func:`fine_affine`). Complex
    input gives complex output; real input gives the real part (the even-size Nyquist sample is kept as a
    scanner keeps it, so the discarded imaginary part is that sample's).
    """
    f = as_factor(factor)
    if f == (1, 1, 1):
        return np.array(x)
    nf = x.shape[:3]
    if any(n % k for n, k in zip(nf, f)):
        raise ValueError(f"fine shape {nf} is not a multiple of the factor {f}")
    n = tuple(m // k for m, k in zip(nf, f))
    cdtype = np.complex64 if x.dtype in (np.float32, np.complex64) else np.complex128
    spec = scipy.fft.fftn(x, axes=(0, 1, 2), workers=-1).astype(cdtype, copy=False)
    spec = spec[np.ix_(_crop_index(nf[0], n[0]), _crop_index(nf[1], n[1]), _crop_index(nf[2], n[2]))]
    for ax in range(3):
        if f[ax] > 1:  # sample at fine position (f - 1)/2 within each block: x(t + s) <-> X(k) e^{2 pi i k s / N}
            k = np.fft.fftfreq(n[ax]) * n[ax]
            ramp = np.exp(2j * np.pi * k * ((f[ax] - 1) / 2.0) / nf[ax]).astype(cdtype)
            spec *= ramp.reshape([-1 if a == ax else 1 for a in range(spec.ndim)])
    out = scipy.fft.ifftn(spec, axes=(0, 1, 2), workers=-1)
    out *= np.prod(n) / np.prod(nf)
    return out if np.iscomplexobj(x) else out.real.astype(x.dtype, copy=False)


def taper_profiles(shape: Sequence[int], factor: Sequence[int], margin_lo: Sequence[int],
                   margin_hi: Sequence[int], width: int) -> list[np.ndarray]:
    """Per-axis cosine tapers on the fine grid (three 1-D float32 arrays; their outer product is the window).

    The coarse region has ``margin_lo/hi`` scan voxels around the output crop on each side; over the outer
    ``min(width, margin)`` voxels of a margin the window falls from 1 to 0 at the region's border, so the
    periodic DFT never joins tissue to tissue across it. A side without margin (the head's own edge, air)
    is left at 1.
    """
    f = as_factor(factor)
    out = []
    for n, k, lo, hi in zip(shape, f, margin_lo, margin_hi):
        c = (np.arange(n * k) - (k - 1) / 2.0) / k + 0.5  # coarse coordinate, 0 at the region's border
        p = np.ones(n * k, np.float64)
        for m, dist in ((lo, c), (hi, n - c)):
            w = min(int(width), int(m))
            if w > 0:
                t = np.clip(dist / w, 0.0, 1.0)
                p *= 0.5 - 0.5 * np.cos(np.pi * t)
        out.append(p.astype(np.float32))
    return out


def echo_signal(field: np.ndarray, m0: np.ndarray, r2star: np.ndarray, phase_offset: np.ndarray, te: float,
                b0_tesla: float) -> np.ndarray:
    """Noiseless complex signal of one echo (complex64): ``m0 exp(-te r2*) exp(i (phi0 + phase(field)))``."""
    mag = m0 * np.exp(-np.float32(te) * r2star)
    phi = phase_offset + np.float32(ppm_to_rad(1.0, te, b0_tesla)) * field
    s = np.empty(field.shape, np.complex64)
    s.real = mag * np.cos(phi)
    s.imag = mag * np.sin(phi)
    return s


def acquire(field: np.ndarray, m0: np.ndarray, r2star_3t: np.ndarray, phase_offset: np.ndarray,
            te: Sequence[float], b0_tesla: float, factor: Sequence[int],
            window: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Noiseless scan-grid signal (X, Y, Z, E) complex64 from fine-grid maps, one echo at a time.

    ``r2star_3t`` (1/s at 3 T) is scaled linearly to ``b0_tesla``; ``window`` (three 1-D profiles,
    :func:`taper_profiles`) multiplies the fine signal.
    """
    r2 = np.asarray(r2star_3t, np.float32) * np.float32(b0_tesla / 3.0)
    f = as_factor(factor)
    out = np.empty(tuple(n // k for n, k in zip(field.shape, f)) + (len(te),), np.complex64)
    for e, t in enumerate(te):
        s = echo_signal(field, m0, r2, phase_offset, float(t), b0_tesla)
        if window is not None:
            apply_window(s, window)
        out[..., e] = kspace_crop(s, f)
    return out


def apply_window(x: np.ndarray, window: Sequence[np.ndarray]) -> np.ndarray:
    """In place: ``x *= wx[:, None, None] * wy[None, :, None] * wz[None, None, :]``; returns x."""
    for ax, w in enumerate(window):
        x *= w.reshape([-1 if a == ax else 1 for a in range(3)])
    return x


def add_noise(signal: np.ndarray, snr: float | None, mask: np.ndarray, rng: np.random.Generator
              ) -> tuple[np.ndarray, float]:
    """Complex Gaussian noise, sd ``sigma = mean(|S_1|[mask]) / snr`` per channel; returns (noisy, sigma)."""
    if snr is None or not np.isfinite(snr):
        return signal.copy(), 0.0
    sigma = float(np.mean(np.abs(signal[..., 0])[mask])) / float(snr)
    noisy = signal.copy()
    noisy.real += np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    noisy.imag += np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    return noisy, sigma


def reference_unwrap(phase: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Unwrap each echo against a known unwrapped reference: ``ref + wrap(phase - ref)`` (rad, float32)."""
    d = phase - reference
    return (reference + (d - 2.0 * np.pi * np.round(d / (2.0 * np.pi)))).astype(np.float32)


def pipeline_local_field(signal: np.ndarray, reference_phase: np.ndarray, te: Sequence[float], b0_tesla: float,
                         mask: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float],
                         bfr: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(total field, local field, valid mask) as the pipeline makes them from a noisy multi-echo signal.

    Echo fit (:func:`qsmlab.recon.echo_fit.fit_field`, magnitude^2 weights) on the brain ``mask``, then the
    background removal ``bfr`` (default: the pipeline's, V-SHARP) -> local field (ppm, zero outside the
    valid mask) and its valid (eroded) mask.
    """
    from qsmlab.recon import registry
    from qsmlab.recon.echo_fit import fit_field
    from qsmlab.recon.pipeline import DEFAULT_BFR

    phase = reference_unwrap(np.angle(signal), reference_phase)
    fit = fit_field(phase, te, b0_tesla, np.abs(signal), mask)
    total = np.where(mask, fit.field, 0.0).astype(np.float32)
    fn = registry.get("background", bfr or DEFAULT_BFR)
    local, valid = fn(total, mask, voxel_size=tuple(float(v) for v in voxel_size),
                      b0_dir=tuple(float(v) for v in b0_dir), quiet=True)
    valid = np.asarray(valid, bool)
    return total, np.where(valid, local, 0.0).astype(np.float32), valid
