"""Spherical mean value (SMV) kernel on the voxel grid, as an FFT multiplier on a padded grid.

The SMV property (Li & Leigh 2001; used by SHARP, Schweser et al. 2011): for a function ``b`` harmonic
in a ball, its mean over the sphere of radius r equals its value at the centre, so
``(delta - S_r) * b = 0`` wherever the ball of radius r around the voxel lies inside the region where
``b`` is harmonic. Background fields are harmonic inside the brain (their sources are outside it), so
``delta - S_r`` removes them and keeps a high-passed copy of the local field.

The kernel ``S_r`` is the indicator of the voxels whose *physical* offset (voxel index times voxel
size, mm) is within ``radius_mm`` of the centre, normalised to sum to one. It is built centred on the
origin of a periodic grid (negative offsets wrap to the end of each axis) so that its DFT is real and
even. Convolutions run on a grid padded by at least the kernel half-width on each axis, so that a voxel
near one face of the FOV never averages voxels from the opposite face.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import scipy.fft
from scipy import ndimage

from qsmlab.errors import QSMInputError


def _half_widths(voxel_size: Sequence[float], radius_mm: float) -> tuple[int, int, int]:
    """Kernel half-width in voxels along each axis: floor(r / h_i)."""
    return tuple(int(np.floor(radius_mm / float(h) + 1e-9)) for h in voxel_size)


def sphere_offsets(voxel_size: Sequence[float], radius_mm: float) -> np.ndarray:
    """Boolean ball (2w_i+1 voxels per axis, centred) of voxels within ``radius_mm`` (mm) of the centre."""
    w = _half_widths(voxel_size, radius_mm)
    g = np.meshgrid(*[np.arange(-w[i], w[i] + 1) * float(voxel_size[i]) for i in range(3)], indexing="ij")
    # 1e-9 so that voxels exactly on the sphere (r = integer multiples of h) are in, as in most toolboxes
    return (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) <= radius_mm**2 * (1 + 1e-9)


def padded_grid(shape: Sequence[int], voxel_size: Sequence[float], radius_mm: float) -> tuple[int, int, int]:
    """FFT grid for SMV convolutions: each axis padded by the kernel width, rounded to a fast FFT size."""
    w = _half_widths(voxel_size, radius_mm)
    return tuple(scipy.fft.next_fast_len(int(n) + 2 * wi + 1, real=True) for n, wi in zip(shape, w))


@lru_cache(maxsize=16)
def _smv_spectrum(grid: tuple, voxel_size: tuple, radius_mm: float) -> np.ndarray:
    ball = sphere_offsets(voxel_size, radius_mm)
    w = [(s - 1) // 2 for s in ball.shape]
    k = np.zeros(grid)
    idx = np.nonzero(ball)
    # centre the ball on voxel (0, 0, 0) of the periodic grid: negative offsets wrap around
    k[tuple((idx[i] - w[i]) % grid[i] for i in range(3))] = 1.0
    k /= k.sum()
    spec = scipy.fft.rfftn(k).real  # real up to round-off: the kernel is even
    spec.setflags(write=False)
    return spec


class SphericalMean:
    """Convolution with the normalised ball ``S_r`` of radius ``radius_mm`` (mm) for volumes of ``shape``.

    Args:
        shape: (X, Y, Z) of the volumes it will filter.
        voxel_size: mm per voxel along (i, j, k).
        radius_mm: ball radius in mm; must cover at least one neighbour (r >= min voxel size).

    Attributes:
        grid: padded FFT grid.
        spectrum: real half-spectrum of ``S_r`` on ``grid`` (``S(0) = 1``: the kernel integrates to one).
    """

    def __init__(self, shape: Sequence[int], voxel_size: Sequence[float], radius_mm: float):
        vs = tuple(float(v) for v in voxel_size)
        if not radius_mm >= min(vs):
            raise QSMInputError(f"SMV radius {radius_mm} mm is smaller than the smallest voxel size "
                                f"{min(vs)} mm; the kernel would be a single voxel")
        self.shape = tuple(int(n) for n in shape)
        self.voxel_size = vs
        self.radius_mm = float(radius_mm)
        self.grid = padded_grid(self.shape, vs, self.radius_mm)
        self.spectrum = _smv_spectrum(self.grid, vs, self.radius_mm)

    def rfft(self, x: np.ndarray) -> np.ndarray:
        """Half spectrum of ``x`` zero-padded to ``grid``."""
        return scipy.fft.rfftn(x, s=self.grid, workers=-1)

    def irfft_full(self, spec: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`rfft` on the whole padded ``grid``."""
        return scipy.fft.irfftn(spec, s=self.grid, workers=-1)

    def irfft(self, spec: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`rfft`, cropped back to ``shape``."""
        out = self.irfft_full(spec)
        n = self.shape
        return np.ascontiguousarray(out[: n[0], : n[1], : n[2]])

    def mean(self, x: np.ndarray) -> np.ndarray:
        """``S_r * x``: the mean of ``x`` over the ball around each voxel (zero outside the FOV)."""
        return self.irfft(self.rfft(x) * self.spectrum)

    def highpass(self, x: np.ndarray) -> np.ndarray:
        """``(delta - S_r) * x``: zero for harmonic ``x`` where the ball fits inside its harmonic region."""
        return x - self.mean(x)

    def erode(self, mask: np.ndarray) -> np.ndarray:
        """Voxels of ``mask`` whose whole ball lies in ``mask`` (binary erosion by the ball; several radii:
        :func:`boundary_distance` once, then :func:`eroded` per radius)."""
        return eroded(boundary_distance(mask, self.voxel_size), self.radius_mm)


def boundary_distance(mask: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to its nearest non-mask voxel (0 outside the mask).

    Exact and fast erosion by any ball: a voxel survives iff this distance exceeds r (outside the FOV
    counts as non-mask, hence the zero border). A morphological erosion with a 12 mm ball structure costs
    ~7000 operations per voxel; the distance transform is linear in the volume, and one serves every
    radius (V-SHARP erodes by twelve: one transform instead of twelve, 7.6 -> 0.6 s at 160^3).
    """
    m = np.pad(np.asarray(mask).astype(bool), 1, constant_values=False)
    return ndimage.distance_transform_edt(m, sampling=tuple(float(v) for v in voxel_size))[1:-1, 1:-1, 1:-1]


def eroded(distance: np.ndarray, radius_mm: float) -> np.ndarray:
    """The mask eroded by the ball of ``radius_mm``, from its :func:`boundary_distance`."""
    return distance > float(radius_mm) * (1 + 1e-9)


# -- input checks shared by every background method (kept here to stay within this package's files) --
def check_inputs(total_field, mask, voxel_size, method: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Validate and convert: float64 field (X, Y, Z), bool mask, voxel size (3 positive floats, mm).

    Raises:
        QSMInputError: one line naming ``method`` and the argument at fault.
    """
    f = np.asarray(total_field, dtype=np.float64)
    m = np.asarray(mask)
    if f.ndim != 3:
        raise QSMInputError(f"{method}: total_field must be 3-D (X, Y, Z), got shape {f.shape}")
    if m.shape != f.shape:
        raise QSMInputError(f"{method}: mask shape {m.shape} does not match total_field shape {f.shape}")
    m = m.astype(bool) if m.dtype == bool else np.asarray(m != 0)
    if not m.any():
        raise QSMInputError(f"{method}: mask is empty")
    if not np.all(np.isfinite(f[m])):
        raise QSMInputError(f"{method}: total_field has NaN/inf inside the mask")
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.shape != (3,) or not np.all(vs > 0) or not np.all(np.isfinite(vs)):
        raise QSMInputError(f"{method}: voxel_size must be 3 positive numbers (mm), got {list(np.ravel(voxel_size))}")
    # values outside the mask are meaningless (noise, wraps): zero them so no method can depend on them
    return np.where(m, f, 0.0), m, tuple(float(v) for v in vs)


def demean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x`` minus its mean over ``mask``, zero outside ``mask``."""
    if not mask.any():
        return np.zeros_like(x)
    return np.where(mask, x - x[mask].mean(), 0.0)
