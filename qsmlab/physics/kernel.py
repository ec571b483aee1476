"""The unit dipole kernel in k-space, for any grid, voxel size and B0 direction.

    D(k) = 1/3 - (k . b)^2 / |k|^2,   D(0) = 0,   k_i = fftfreq(n_i, d=voxel_size_i)  [cycles/mm]

``b`` is the unit B0 direction in voxel axes (see :mod:`qsmlab.physics.geometry`). k is *divided* by
the voxel size (``d=voxel_size``), which is what makes the kernel correct for anisotropic voxels: a
common bug scales k by the voxel size instead. D = -2/3 along B0, 1/3 perpendicular to it and 0 on the
magic-angle cone (k . b)^2 = |k|^2 / 3. D(0) = 0 fixes the mean of the field (the Lorentz-sphere
convention: a uniform chi produces no field).

Two variants (Milovic et al., "The 2016 QSM Challenge", MRM 2018, discussion of the discrete kernel):

- ``"continuous"`` (default): the continuous kernel sampled on the DFT grid. It is exact for
  band-limited chi. On a Nyquist plane of an even axis, +k_nyq and -k_nyq are one DFT sample; the
  kernel there is the average over both signs, so D stays even and flips with a negated b0 component
  are exact symmetries of the operator. **Limitation:** for chi with energy at the Nyquist frequency (sharp edges, e.g. a
  voxelised sphere) the sampled kernel is discontinuous across the Nyquist boundary when B0 is oblique,
  and the field of a sharp sphere with a 30 deg oblique B0 deviates by about 9 % from the analytic
  dipole field outside it (about 1-2 % for an erf-smoothed edge). Smooth the object or use a finer grid
  where that matters.
- ``"discrete"``: derivatives replaced by their finite-difference symbols, i.e. the kernel of
  ``1/3 * Lap - d_b^2`` over ``Lap`` on the voxel grid (Laplacian symbol ``sum_i (2cos(2 pi f_i) - 2)
  / h_i^2``; second derivatives along B0 from ``b^T H b`` with ``H_ii`` the same 1-D symbols and
  ``H_ij = -sin(2 pi f_i) sin(2 pi f_j) / (h_i h_j)`` for ``i != j``). It matches the continuous kernel
  at low k and is smooth (periodic) at Nyquist.

Kernels are cached per (shape, voxel size, b0_dir, kind, half-spectrum, dtype): building one costs
about as much as an FFT, and training calls the operator thousands of times on one geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from qsmlab.physics.geometry import normalize_b0_dir

KERNEL_KINDS = ("continuous", "discrete")


def _key(shape, voxel_size, b0_dir) -> tuple:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive ints, got {shape}")
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.shape != (3,) or not np.all(vs > 0):
        raise ValueError(f"voxel_size must be 3 positive numbers (mm), got {list(vs)}")
    b = normalize_b0_dir(b0_dir)
    # Rounded so that float noise in b0_dir or voxel_size still hits the cache.
    return shape, tuple(np.round(vs, 9)), tuple(np.round(b, 12))


def kspace_coords(shape: Sequence[int], voxel_size: Sequence[float], rfft: bool = False):
    """Broadcastable k-space coordinates (cycles/mm) ``(kx[:,None,None], ky[None,:,None], kz[None,None,:])``.

    With ``rfft=True`` the last axis is the half spectrum (``rfftfreq``), as produced by ``rfftn``.
    """
    nx, ny, nz = (int(n) for n in shape)
    hx, hy, hz = (float(v) for v in voxel_size)
    kx = np.fft.fftfreq(nx, d=hx)[:, None, None]
    ky = np.fft.fftfreq(ny, d=hy)[None, :, None]
    kz = (np.fft.rfftfreq(nz, d=hz) if rfft else np.fft.fftfreq(nz, d=hz))[None, None, :]
    return kx, ky, kz


@lru_cache(maxsize=32)
def _kernel_cached(shape, voxel_size, b0_dir, kind, rfft, dtype_str) -> np.ndarray:
    b = np.asarray(b0_dir)
    if kind == "continuous":
        k = kspace_coords(shape, voxel_size, rfft)
        # (k.b)^2 = sum_i b_i^2 k_i^2 + 2 sum_{i<j} b_i b_j k_i k_j. On a Nyquist plane (n_i even,
        # index n_i/2) k_i = +1/2h and -1/2h are the same DFT sample; averaging over both signs zeroes
        # the cross terms that contain k_i. This keeps the kernel even and the operator exactly
        # equivariant under flips with a negated b0 component (needed by flip augmentation).
        kt = [ki.copy() for ki in k]
        for i in range(3):
            n_i = shape[i]
            if n_i % 2 == 0:
                idx = [slice(None)] * 3
                idx[i] = n_i // 2
                if idx[i] < kt[i].shape[i]:
                    kt[i][tuple(idx)] = 0.0
        kb2 = sum(b[i] ** 2 * k[i] ** 2 for i in range(3))
        for i in range(3):
            for j in range(i + 1, 3):
                kb2 = kb2 + 2.0 * b[i] * b[j] * kt[i] * kt[j]
        k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            d = 1.0 / 3.0 - kb2 / k2
    elif kind == "discrete":
        # f_i in cycles/sample; symbols of the second (diagonal) and central first differences.
        f = kspace_coords(shape, (1.0, 1.0, 1.0), rfft)
        h = voxel_size
        second = [(2.0 * np.cos(2 * np.pi * f[i]) - 2.0) / h[i] ** 2 for i in range(3)]
        first = [np.sin(2 * np.pi * f[i]) / h[i] for i in range(3)]
        lap = second[0] + second[1] + second[2]
        bhb = sum(b[i] ** 2 * second[i] for i in range(3))
        for i in range(3):
            for j in range(i + 1, 3):
                bhb = bhb - 2.0 * b[i] * b[j] * first[i] * first[j]
        with np.errstate(divide="ignore", invalid="ignore"):
            d = 1.0 / 3.0 - bhb / lap
    else:
        raise ValueError(f"kernel kind must be one of {KERNEL_KINDS}, got {kind!r}")
    d = np.broadcast_to(d, (shape[0], shape[1], shape[2] // 2 + 1 if rfft else shape[2])).copy()
    d[0, 0, 0] = 0.0
    d = d.astype(dtype_str)
    d.setflags(write=False)
    return d


def dipole_kernel(
    shape: Sequence[int],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    kind: str = "continuous",
    rfft: bool = False,
    dtype=np.float64,
) -> np.ndarray:
    """Dipole kernel D(k) on the DFT grid of ``shape`` (read-only, cached).

    Args:
        shape: grid (nx, ny, nz) the kernel multiplies (the *padded* grid inside the operator).
        voxel_size: mm per voxel along (i, j, k).
        b0_dir: B0 direction in voxel axes (normalised here).
        kind: ``"continuous"`` or ``"discrete"`` (see module docstring).
        rfft: half spectrum along the last axis, shape (nx, ny, nz//2+1), for ``rfftn`` products.
        dtype: float32 or float64.
    Returns:
        Real array, unitless.
    """
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kernel kind must be one of {KERNEL_KINDS}, got {kind!r}")
    shape_t, vs_t, b_t = _key(shape, voxel_size, b0_dir)
    return _kernel_cached(shape_t, vs_t, b_t, kind, bool(rfft), np.dtype(dtype).str)
