"""The generalised (tensor) dipole kernel: the field of a susceptibility *tensor* chi(r), e.g. anisotropic
white matter (susceptibility tensor imaging, Liu, MRM 63:1471, 2010; Li et al., NeuroImage 59:2088, 2012).

For a weak tensor ``X(r)`` (3 x 3, symmetric, ppm) in B0 along the unit vector ``b`` (voxel axes), the
relative field along B0 (ppm, Lorentz-sphere corrected) is, per frequency ``k`` (cycles/mm),

    f(k) = (1/3) b^T X(k) b  -  (b . k) (k^T X(k) b) / |k|^2,        f(0) = 0,

with ``X(k)`` the Fourier transform of each tensor component. For an isotropic tensor ``X = chi I`` this is
exactly the scalar kernel ``D(k) chi(k)`` of :mod:`qsmlab.physics.kernel`; the same Nyquist convention is
used (cross terms ``k_i k_j``, ``i != j``, are zero on a Nyquist plane of an even axis) so that the identity
holds sample for sample. Computed from four real FFTs: ``s = b^T X b`` and ``v = X b``:

    f(k) = s(k) / 3  -  sum_j w_j(k) v_j(k),     w_j(k) = sum_i b_i k_i k_j / |k|^2.

Tensors are given as six component maps ``(xx, yy, zz, xy, xz, yz)``, shape ``(6, X, Y, Z)``, in the voxel
axes of the grid (the same axes as ``b0_dir``). numpy only (simulation); the learned methods never see it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import scipy.fft

from qsmlab.physics.geometry import normalize_b0_dir
from qsmlab.physics.kernel import kspace_coords
from qsmlab.physics.operator import padded_shape

TENSOR_COMPONENTS = ("xx", "yy", "zz", "xy", "xz", "yz")
_INDEX = {(0, 0): 0, (1, 1): 1, (2, 2): 2, (0, 1): 3, (1, 0): 3, (0, 2): 4, (2, 0): 4, (1, 2): 5, (2, 1): 5}


def isotropic_tensor(chi: np.ndarray) -> np.ndarray:
    """``chi I`` as six components ``(6, X, Y, Z)`` (ppm)."""
    chi = np.asarray(chi)
    z = np.zeros_like(chi)
    return np.stack([chi, chi, chi, z, z, z])


def cylindrical_tensor(chi_mean: np.ndarray, delta_chi: np.ndarray | float, fibre: np.ndarray) -> np.ndarray:
    """Cylindrically symmetric tensor with mean ``chi_mean`` and ``chi_par - chi_perp = delta_chi``.

    ``X = chi_perp I + delta_chi n n^T`` with ``chi_perp = chi_mean - delta_chi / 3``, so ``trace(X)/3 =
    chi_mean``. ``fibre``: unit vectors ``(3, X, Y, Z)`` (voxel axes); ``delta_chi`` scalar or (X, Y, Z).
    Returns ``(6, X, Y, Z)`` float32.
    """
    chi_mean = np.asarray(chi_mean, dtype=np.float32)
    d = np.asarray(delta_chi, dtype=np.float32)
    n = np.asarray(fibre, dtype=np.float32)
    perp = chi_mean - d / 3.0
    out = np.empty((6,) + chi_mean.shape, dtype=np.float32)
    for c, (i, j) in enumerate(((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))):
        out[c] = d * n[i] * n[j]
        if i == j:
            out[c] += perp
    return out


def tensor_contract(tensor: np.ndarray, b: Sequence[float]) -> tuple[np.ndarray, list[np.ndarray]]:
    """``s = b^T X b`` and ``v = X b`` (list of 3) from six components ``(6, X, Y, Z)``."""
    v = [sum(b[j] * tensor[_INDEX[(i, j)]] for j in range(3)) for i in range(3)]
    s = sum(b[i] * v[i] for i in range(3))
    return s, v


@lru_cache(maxsize=8)
def _weights(shape: tuple, voxel_size: tuple, b: tuple, dtype_str: str) -> tuple[np.ndarray, ...]:
    """``w_j(k) = sum_i b_i K_ij / |k|^2`` on the half spectrum (K_ij = k_i k_j, Nyquist cross terms 0)."""
    k = kspace_coords(shape, voxel_size, rfft=True)
    kt = [ki.copy() for ki in k]
    for i in range(3):  # same Nyquist convention as the scalar continuous kernel
        if shape[i] % 2 == 0:
            idx = [slice(None)] * 3
            idx[i] = shape[i] // 2
            if idx[i] < kt[i].shape[i]:
                kt[i][tuple(idx)] = 0.0
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    full = (shape[0], shape[1], shape[2] // 2 + 1)
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for j in range(3):
            acc = sum(b[i] * (k[i] * k[j] if i == j else kt[i] * kt[j]) for i in range(3))
            w = np.broadcast_to(acc / k2, full).copy()
            w[0, 0, 0] = 0.0
            w = w.astype(dtype_str)
            w.setflags(write=False)
            out.append(w)
    return tuple(out)


def tensor_dipole_field(tensor: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                        b0_dir: Sequence[float] = (0.0, 0.0, 1.0), pad_factor: float = 2.0) -> np.ndarray:
    """Field (ppm) of a susceptibility tensor (module docstring), zero-padded like the scalar operator.

    Args:
        tensor: ``(6, X, Y, Z)`` components ``(xx, yy, zz, xy, xz, yz)`` (ppm), voxel axes.
        voxel_size: mm. b0_dir: B0 in voxel axes (normalised). pad_factor: per-axis zero padding (1 = periodic).
    Returns:
        (X, Y, Z) array, the dtype of ``tensor`` (float32 or float64).
    """
    t = np.asarray(tensor)
    if t.ndim != 4 or t.shape[0] != 6:
        raise ValueError(f"tensor must be (6, X, Y, Z) components {TENSOR_COMPONENTS}, got shape {t.shape}")
    if not np.issubdtype(t.dtype, np.floating):
        t = t.astype(np.float64)
    n = t.shape[1:]
    vs = tuple(float(v) for v in np.asarray(voxel_size, dtype=np.float64).reshape(-1))
    if len(vs) != 3 or min(vs) <= 0:
        raise ValueError(f"voxel_size must be 3 positive numbers (mm), got {list(voxel_size)}")
    b = tuple(float(x) for x in np.round(normalize_b0_dir(b0_dir), 12))
    s_grid = padded_shape(n, pad_factor)
    w = _weights(s_grid, tuple(np.round(vs, 9)), b, np.dtype(t.dtype).str)
    s, v = tensor_contract(t, b)
    spec = scipy.fft.rfftn(s, s=s_grid, workers=-1)
    spec *= np.asarray(1.0 / 3.0, dtype=t.dtype)
    spec[0, 0, 0] = 0.0
    for j in range(3):
        vj = scipy.fft.rfftn(v[j], s=s_grid, workers=-1)
        vj *= w[j]
        spec -= vj
    del vj
    out = scipy.fft.irfftn(spec, s=s_grid, workers=-1)
    return np.ascontiguousarray(out[: n[0], : n[1], : n[2]]).astype(t.dtype, copy=False)
