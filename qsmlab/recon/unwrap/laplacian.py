"""Laplacian phase unwrapping (Schofield & Zhu, Opt. Lett. 28:1194, 2003).

For a wrapped phase φ the Laplacian of the *true* phase is a local quantity of sin φ and cos φ,

    ∇²φ_true = cos φ · ∇² sin φ − sin φ · ∇² cos φ,

so φ_true follows from one inverse Laplacian. Both Laplacians are taken in Fourier space with the
continuous symbol −4π²|k|² (k in cycles/mm, so anisotropic voxels are handled) on the *even* (mirror)
extension of the volume, i.e. with DCT-II transforms: the mirror extension is continuous across the FOV
boundary, whereas the periodic one would put a phase jump there and a spurious source in ∇²φ.

The inverse Laplacian loses what the Laplacian does not see: the result equals the true phase up to a
constant (and, with noise or phase singularities, a slowly varying harmonic error). With ``snap=True``
(default) the estimate ψ is turned into an exact unwrapping of the input: a global offset c is fitted
(circular mean of φ − ψ in the mask) and every voxel gets ``φ + 2π·round((ψ + c − φ)/2π)``; this is the
true phase up to one global 2π·n wherever |ψ + c − φ_true| < π, and it stays congruent to the input
modulo 2π (needed for temporal unwrapping and echo fitting). ``snap=False`` returns ψ itself.

The whole FOV enters ∇²; noise outside the mask adds a harmonic error inside it (the classical weakness
of this method). Use the region-growing unwrapper for noisy backgrounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft

from qsmlab.errors import QSMInputError
from qsmlab.recon.registry import register


def _laplacian_symbol(shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """−4π²|k|² on the DCT-II grid: index m of an axis of n samples is k = m / (2 n h) cycles/mm."""
    sym = np.zeros(tuple(shape))
    for ax, (n, h) in enumerate(zip(shape, voxel_size)):
        k = np.arange(n) / (2.0 * n * float(h))
        sh = [1, 1, 1]
        sh[ax] = n
        sym = sym - (2.0 * np.pi * k.reshape(sh)) ** 2
    return sym


def _lap(x: np.ndarray, sym: np.ndarray) -> np.ndarray:
    return scipy.fft.idctn(sym * scipy.fft.dctn(x, type=2, norm="ortho", workers=-1), type=2, norm="ortho",
                           workers=-1)


def laplacian_of_true_phase(phase: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """∇²φ_true (rad/mm²) of a wrapped phase (rad), shape (X, Y, Z), by the Schofield-Zhu identity."""
    sym = _laplacian_symbol(phase.shape, voxel_size)
    s, c = np.sin(phase), np.cos(phase)
    return c * _lap(s, sym) - s * _lap(c, sym)


def snap_to_wraps(phase: np.ndarray, estimate: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``phase + 2π·n`` closest to ``estimate + c``, with the global offset c fitted in ``mask`` (rad)."""
    m = np.ones(phase.shape, bool) if mask is None else mask
    c = np.angle(np.sum(np.exp(1j * (phase[m] - estimate[m]))))
    return phase + 2.0 * np.pi * np.round((estimate + c - phase) / (2.0 * np.pi))


@register("unwrap", "laplacian")
def unwrap_laplacian(
    phase: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    magnitude: np.ndarray | None = None,
    snap: bool = True,
) -> np.ndarray:
    """Laplacian unwrapping of one 3-D wrapped phase.

    Args:
        phase: wrapped phase (rad), (X, Y, Z).
        mask: optional boolean (X, Y, Z); the offset for ``snap`` is fitted here and the output is zero
            outside it. ∇² is always computed over the whole FOV.
        voxel_size: mm along (i, j, k).
        magnitude: unused (accepted for the registry's unwrap signature).
        snap: return ``phase + 2π·n`` (default True) instead of the smooth Laplacian estimate.
    Returns:
        Unwrapped phase (rad), (X, Y, Z), float64; defined up to a global constant (snap=False) or a
        global 2π·n (snap=True).
    """
    phase = np.asarray(phase, dtype=np.float64)
    if phase.ndim != 3:
        raise QSMInputError(f"laplacian unwrap: expected a 3-D phase (X, Y, Z), got shape {phase.shape}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if not mask.any():
            raise QSMInputError("laplacian unwrap: the mask is empty")
    sym = _laplacian_symbol(phase.shape, voxel_size)
    lap_true = laplacian_of_true_phase(phase, voxel_size)
    spec = scipy.fft.dctn(lap_true, type=2, norm="ortho", workers=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        spec = spec / sym
    spec[0, 0, 0] = 0.0  # the constant is invisible to ∇²
    est = scipy.fft.idctn(spec, type=2, norm="ortho", workers=-1)
    out = snap_to_wraps(phase, est, mask) if snap else est
    if mask is not None:
        out = out * mask
    return out
