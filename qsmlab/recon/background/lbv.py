"""LBV: Laplacian boundary value background removal (Zhou et al., NMR Biomed 27:312, 2014).

The background field b is harmonic inside the brain mask M. Assuming the local field is negligible on
the mask boundary, b is the solution of the Dirichlet problem

    Lap b = 0 in the interior of M,   b = f on the boundary of M,

and ``local = f - b``. The Laplacian is the 7-point stencil with the voxel sizes
(``sum_i (b[x+e_i] - 2 b[x] + b[x-e_i]) / h_i^2``) on the interior voxels (mask voxels whose six
face neighbours are all in M); the boundary voxels (mask voxels touching the outside, including the
FOV faces) carry the Dirichlet values. The symmetric positive definite system is solved with scipy's
conjugate gradients, preconditioned by the exact inverse of the same Laplacian on the mask's bounding
box with zero Dirichlet walls, which scipy's type-I discrete sine transform diagonalises (Zhou et al.
use full multigrid; this needs no hand-written solver and cuts CG from ~125 to ~17 iterations on the
64^3 head phantom). A sparse direct solve (SuperLU) is far slower here because of 3-D fill-in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft
import scipy.sparse as sp
from scipy import ndimage

from qsmlab.errors import QSMInputError
from qsmlab.recon.background.spherical import check_inputs
from qsmlab.recon.iterate import monitored_cg
from qsmlab.recon.registry import register


def dirichlet_laplacian(mask: np.ndarray, values: np.ndarray, voxel_size: Sequence[float]):
    """Negative 7-point Laplacian on the interior of ``mask`` with Dirichlet ``values`` on its boundary.

    Returns:
        (L, rhs, interior): sparse SPD matrix (N x N) over the N interior voxels (C order), right-hand
        side (mm^-2 * field units) carrying the boundary values, and the interior mask (X, Y, Z).
    """
    m = np.pad(mask, 1, constant_values=False)  # outside the FOV counts as outside the mask
    v = np.pad(values, 1)
    interior = m.copy()
    for ax in range(3):
        interior &= np.roll(m, 1, ax) & np.roll(m, -1, ax)
    n = int(interior.sum())
    index = np.full(m.shape, -1, dtype=np.int64)
    index[interior] = np.arange(n)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.full(n, sum(2.0 / h**2 for h in voxel_size))]
    rhs = np.zeros(n)
    for ax, h in enumerate(voxel_size):
        for shift in (1, -1):
            nb_index = np.roll(index, shift, ax)[interior]  # index of the neighbour at x - shift * e_ax
            nb_value = np.roll(v, shift, ax)[interior]
            inner = nb_index >= 0
            rows.append(np.nonzero(inner)[0])
            cols.append(nb_index[inner])
            vals.append(np.full(int(inner.sum()), -1.0 / h**2))
            rhs += np.where(inner, 0.0, nb_value) / h**2  # boundary neighbours: known values
    L = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return L, rhs, interior[1:-1, 1:-1, 1:-1]


def box_poisson_preconditioner(interior: np.ndarray, voxel_size: Sequence[float]):
    """``r -> R L_box^-1 R^T r``: the 7-point negative Laplacian inverted on the grid of ``interior``
    (zero Dirichlet walls outside it) with the type-I DST; ``R`` restricts to the interior voxels.
    SPD, so it is a valid CG preconditioner."""
    shape = interior.shape
    eig = np.zeros(shape)
    for ax, (n, h) in enumerate(zip(shape, voxel_size)):
        lam = (2.0 - 2.0 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1))) / h**2
        eig = eig + lam.reshape([-1 if i == ax else 1 for i in range(3)])

    def apply(r: np.ndarray) -> np.ndarray:
        z = np.zeros(shape)
        z[interior] = r
        z = scipy.fft.idstn(scipy.fft.dstn(z, type=1, workers=-1) / eig, type=1, workers=-1)
        return z[interior]

    return apply


@register("background", "lbv")
def lbv(
    total_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    max_iter: int = 500,
    tol: float = 1e-6,
    quiet: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Laplacian boundary value method (Zhou et al. 2014).

    Args:
        total_field: unwrapped total field (ppm), shape (X, Y, Z).
        mask: brain mask (X, Y, Z).
        voxel_size: mm per voxel (enters the Laplacian). b0_dir: unused (family signature).
        max_iter: CG iterations at most (default 500). tol: relative residual to stop at (default 1e-6).
        quiet: hide the progress bar.
    Returns:
        (local_field ppm, ``f - b`` on the interior, not demeaned; ``valid_mask`` = the mask with its
        one-voxel boundary peeled, where the local field is zero by construction).
    """
    f, m, vs = check_inputs(total_field, mask, voxel_size, "lbv")
    # work on the mask's bounding box: smaller sparse system and DSTs, same solution
    box = ndimage.find_objects(m.astype(np.int8))[0]
    L, rhs, interior = dirichlet_laplacian(m[box], f[box], vs)
    if not interior.any():
        raise QSMInputError("lbv: the mask has no interior voxels (every voxel touches its boundary)")
    # start from the mean boundary value: the constant part of b, which CG would otherwise diffuse slowly
    boundary = m[box] & ~interior
    x0 = np.full(L.shape[0], f[box][boundary].mean())
    x, _ = monitored_cg(L.dot, rhs, max_iter=int(max_iter), tol=float(tol), desc="LBV", quiet=quiet, x0=x0,
                        precond=box_poisson_preconditioner(interior, vs))
    full_interior = np.zeros_like(m)
    full_interior[box] = interior
    local = np.zeros_like(f)
    local[full_interior] = f[full_interior] - x
    return local, full_interior
