"""Periodic forward differences, their adjoint (minus the divergence) and their Fourier symbols.

    (grad x)_i[n] = (x[n + e_i] - x[n]) / h_i          (periodic: the last sample wraps to the first)
    grad_adjoint(g) = sum_i (g_i[n - e_i] - g_i[n]) / h_i = -div(g)

``h`` is the voxel size (mm), so gradients are in ppm/mm for chi in ppm. The boundary is periodic on
purpose: it makes ``grad`` a circulant operator whose DFT symbol is ``E_i(f) = (exp(2 pi i f_i) - 1) / h_i``
(f in cycles/sample), so ``grad_adjoint(grad(x))`` is diagonal in k-space with symbol ``sum_i |E_i|^2 =
sum_i (2 - 2 cos(2 pi f_i)) / h_i^2``. That is what lets the ADMM chi-update of FANSI (Milovic et al.,
MRM 2018) be solved in closed form with one FFT. Solvers work on the zero-padded FFT grid, where the
wrap-around is between padding voxels.

Shapes: a volume is ``(X, Y, Z)``; a gradient field is ``(3, X, Y, Z)``. ``out=`` arguments let solvers
reuse buffers inside their loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qsmlab.physics.kernel import kspace_coords


def _sl(axis: int, s: slice) -> tuple:
    idx = [slice(None)] * 3
    idx[axis] = s
    return tuple(idx)


def grad(x: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
         out: np.ndarray | None = None) -> np.ndarray:
    """Periodic forward differences of ``x`` (X, Y, Z) -> (3, X, Y, Z), divided by the voxel size (mm)."""
    if out is None:
        out = np.empty((3,) + x.shape, dtype=x.dtype)
    for i in range(3):
        o = out[i]
        np.subtract(x[_sl(i, slice(1, None))], x[_sl(i, slice(None, -1))], out=o[_sl(i, slice(None, -1))])
        np.subtract(x[_sl(i, slice(0, 1))], x[_sl(i, slice(-1, None))], out=o[_sl(i, slice(-1, None))])
        if float(voxel_size[i]) != 1.0:
            o *= 1.0 / float(voxel_size[i])
    return out


def grad_adjoint(g: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                 out: np.ndarray | None = None, work: np.ndarray | None = None) -> np.ndarray:
    """Adjoint of :func:`grad`: (3, X, Y, Z) -> (X, Y, Z), equal to minus the (backward) divergence.

    ``work`` is an optional (X, Y, Z) scratch buffer (saves an allocation per call in solver loops).
    """
    shape = g.shape[1:]
    if out is None:
        out = np.empty(shape, dtype=g.dtype)
    if work is None:
        work = np.empty(shape, dtype=g.dtype)
    for i in range(3):
        gi = g[i]
        dst = out if i == 0 else work
        # dst[n] = (g[n-1] - g[n]) / h, periodic
        np.subtract(gi[_sl(i, slice(None, -1))], gi[_sl(i, slice(1, None))], out=dst[_sl(i, slice(1, None))])
        np.subtract(gi[_sl(i, slice(-1, None))], gi[_sl(i, slice(0, 1))], out=dst[_sl(i, slice(0, 1))])
        if float(voxel_size[i]) != 1.0:
            dst *= 1.0 / float(voxel_size[i])
        if i:
            out += work
    return out


def grad_symbols(shape: Sequence[int], voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                 rfft: bool = True) -> list[np.ndarray]:
    """Fourier symbols ``E_i = (exp(2 pi i f_i) - 1) / h_i`` of :func:`grad` (broadcastable, complex).

    With ``rfft=True`` the last axis is the half spectrum of ``rfftn``. ``F[grad(x)_i] = E_i * F[x]``.
    """
    f = kspace_coords(shape, (1.0, 1.0, 1.0), rfft)
    return [(np.exp(2j * np.pi * f[i]) - 1.0) / float(voxel_size[i]) for i in range(3)]


def grad_symbol_sq(shape: Sequence[int], voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                   rfft: bool = True, dtype=np.float64) -> np.ndarray:
    """``sum_i |E_i|^2 = sum_i (2 - 2 cos(2 pi f_i)) / h_i^2`` (1/mm^2): the symbol of ``grad_adjoint(grad(.))``.

    Returns the full broadcast array, shape ``(X, Y, Z//2+1)`` with ``rfft=True``.
    """
    f = kspace_coords(shape, (1.0, 1.0, 1.0), rfft)
    e2 = sum((2.0 - 2.0 * np.cos(2 * np.pi * f[i])) / float(voxel_size[i]) ** 2 for i in range(3))
    nz = int(shape[2]) // 2 + 1 if rfft else int(shape[2])
    return np.broadcast_to(e2, (int(shape[0]), int(shape[1]), nz)).astype(dtype)


# -- torch versions for solver loops --------------------------------------------------------------------
# Same operators on torch CPU tensors (typically ``torch.from_numpy`` views of the solver's numpy buffers,
# no copy): torch runs large elementwise ops on all intra-op threads, numpy on one, and the voxel-wise
# passes, not the FFTs, dominate an iteration in float32.

def grad_t(x: torch.Tensor, voxel_size: Sequence[float], out: torch.Tensor,
           add: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`grad` into ``out`` (3, X, Y, Z); with ``add``, returns ``grad(x) + add`` (fused)."""
    for i in range(3):
        o = out[i]
        torch.sub(x[_sl(i, slice(1, None))], x[_sl(i, slice(None, -1))], out=o[_sl(i, slice(None, -1))])
        torch.sub(x[_sl(i, slice(0, 1))], x[_sl(i, slice(-1, None))], out=o[_sl(i, slice(-1, None))])
        if float(voxel_size[i]) != 1.0:
            o.mul_(1.0 / float(voxel_size[i]))
        if add is not None:
            o.add_(add[i])
    return out


def grad_adjoint_t(g: torch.Tensor, voxel_size: Sequence[float], out: torch.Tensor,
                   accumulate: bool = False) -> torch.Tensor:
    """:func:`grad_adjoint` of ``g`` (3, X, Y, Z) into ``out`` (X, Y, Z), without scratch; with
    ``accumulate``, adds it to ``out``."""
    for i in range(3):
        gi = g[i]
        w = 1.0 / float(voxel_size[i])
        if i == 0 and not accumulate:
            torch.sub(gi[_sl(i, slice(None, -1))], gi[_sl(i, slice(1, None))], out=out[_sl(i, slice(1, None))])
            torch.sub(gi[_sl(i, slice(-1, None))], gi[_sl(i, slice(0, 1))], out=out[_sl(i, slice(0, 1))])
            if w != 1.0:
                out.mul_(w)
        else:
            # out[n] += w * (g[n - e_i] - g[n]), periodic
            out.sub_(gi, alpha=w)
            out[_sl(i, slice(1, None))].add_(gi[_sl(i, slice(None, -1))], alpha=w)
            out[_sl(i, slice(0, 1))].add_(gi[_sl(i, slice(-1, None))], alpha=w)
    return out
