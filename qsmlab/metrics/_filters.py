"""3-D Gaussian and Laplacian-of-Gaussian (LoG) kernels, and 'same'-size correlation with zero boundary.

Filtering is correlation (MATLAB ``imfilter`` default; ``convn`` with these symmetric kernels is the
same), output the size of the input, values outside the volume taken as zero: ``scipy.ndimage``
(``mode='constant'``) for numpy, ``torch.nn.functional.conv3d`` (zero padding) for torch.

Kernels are held as a short sum of separable (rank-1) terms ``w * kx (x) ky (x) kz``, each applied
as three 1-D passes. That is exactly the dense kernel (up to rounding), and turns the 15^3 LoG of the
2016 challenge HFEN (3375 taps per voxel) into 12 passes of 15 taps:

- Gaussian window, size n, sigma s: ``g(t) = exp(-t^2 / (2 s^2))``, t = -(n-1)/2 .. (n-1)/2,
  normalised so the 3-D window sums to 1 (one term ``g/sum(g)`` on each axis).
- LoG (2016 challenge ``compute_hfen.m``, Langkammer et al., MRM 2018):
  ``h = g(x) g(y) g(z) / sum(...)``, ``H = h (x^2 + y^2 + z^2 - 3 s^2) / s^4``, ``H -= mean(H)``.
  Splitting ``x^2 + y^2 + z^2 - 3 s^2`` per axis gives three terms ``(t^2 - s^2) g`` along one axis
  times ``g`` along the others (each a 1-D second derivative of a Gaussian, which avoids summing
  large terms of opposite sign), plus a constant box term for the zero-mean correction.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

Term = tuple[float, tuple[np.ndarray, np.ndarray, np.ndarray]]


def _grid_and_gauss(size: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    if size < 1 or size % 2 != 1:
        raise ValueError(f"kernel size {size} must be a positive odd integer")
    if sigma <= 0:
        raise ValueError(f"kernel sigma {sigma} must be positive")
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2
    return t, np.exp(-(t**2) / (2.0 * sigma**2))


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)  # cached: never let a caller modify a shared kernel
    return arrays


@lru_cache(maxsize=16)
def gaussian_window(size: int, sigma: float) -> tuple[Term, ...]:
    """Normalised 3-D Gaussian window (sum 1), size ``size``^3, as one separable term."""
    _, g = _grid_and_gauss(size, sigma)
    (g,) = _frozen(g / g.sum())
    return ((1.0, (g, g, g)),)


@lru_cache(maxsize=16)
def log_kernel(size: int = 15, sigma: float = 1.5) -> tuple[Term, ...]:
    """Zero-mean 3-D LoG of the 2016 QSM challenge HFEN (``compute_hfen.m``) as separable terms."""
    t, g = _grid_and_gauss(size, sigma)
    d2 = (t**2 - sigma**2) * g
    c = 1.0 / (g.sum() ** 3 * sigma**4)
    mean = 3.0 * c * d2.sum() * g.sum() ** 2 / size**3  # mean of the LoG before the correction
    g, d2, box = _frozen(g.copy(), d2, np.ones(size))
    return ((c, (d2, g, g)), (c, (g, d2, g)), (c, (g, g, d2)), (-mean, (box, box, box)))


def dense_kernel(terms: tuple[Term, ...]) -> np.ndarray:
    """The dense 3-D kernel a term list stands for (for inspection and tests)."""
    return sum(w * np.einsum("i,j,k->ijk", kx, ky, kz) for w, (kx, ky, kz) in terms)


def correlate_numpy(vol: np.ndarray, terms: tuple[Term, ...]) -> np.ndarray:
    """'same'-size correlation of a 3-D float array with a separable kernel, zero boundary."""
    out = np.zeros(vol.shape, dtype=np.float64)
    for w, kernels in terms:
        acc = vol
        for axis, k in enumerate(kernels):
            acc = ndimage.correlate1d(acc, k, axis=axis, mode="constant", cval=0.0)
        out += w * acc
    return out


def correlate_torch(vol: torch.Tensor, terms: tuple[Term, ...]) -> torch.Tensor:
    """'same'-size correlation of ``[N, 1, X, Y, Z]`` with a separable kernel, zero boundary (conv3d)."""
    out = torch.zeros_like(vol)
    for w, kernels in terms:
        acc = vol
        for axis, k in enumerate(kernels):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = k.size
            pad = [0, 0, 0]
            pad[axis] = k.size // 2
            weight = torch.tensor(k.tolist(), dtype=vol.dtype, device=vol.device).reshape(shape)
            acc = F.conv3d(acc, weight, padding=tuple(pad))
        out = out + w * acc
    return out
