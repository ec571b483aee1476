"""Closed-form L2 dipole inversion with gradient regularisation (CFL2).

Bilgic et al., "Fast quantitative susceptibility mapping with L1-regularization and automatic parameter
selection", MRM 2014 (the closed-form L2 solution, their eq. 2):

    chi = argmin ||D F chi - F field||^2 + lam * sum_i ||E_i F chi||^2
        = F^-1[ D F[field] / (D^2 + lam * sum_i |E_i|^2) ]

with ``E_i = (exp(2 pi i f_i) - 1) / h_i`` the symbol of the forward difference along axis i
(``f_i`` in cycles/sample, ``h_i`` the voxel size in mm), so ``sum_i |E_i|^2 = sum_i (2 - 2 cos(2 pi
f_i)) / h_i^2`` (mm^-2; :func:`qsmlab.recon.inversion.gradients.grad_symbol_sq`). Because the data term
is unweighted and periodic the solution is one k-space division: one rfftn + irfftn pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmlab.errors import QSMInputError
from qsmlab.recon.inversion.gradients import grad_symbol_sq
from qsmlab.recon.inversion.tkd import kspace_inverse
from qsmlab.recon.registry import register


def cfl2_filter(D: np.ndarray, s: Sequence[int], voxel_size: Sequence[float], lam: float) -> np.ndarray:
    """``D / (D^2 + lam * sum_i |E_i|^2)``; 0 at DC (where both vanish)."""
    den = D * D + lam * grad_symbol_sq(s, voxel_size, rfft=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(den > 0, D / np.where(den > 0, den, 1.0), 0.0)
    h.flat[0] = 0.0
    return h


@register("inversion", "cfl2")
def cfl2(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    magnitude: np.ndarray | None = None,
    pad_factor: float = 1.0,
    lam: float = 0.01,
    quiet: bool = False,
) -> np.ndarray:
    """Closed-form L2 inversion with gradient regularisation (Bilgic et al. 2014).

    Args:
        field: local field (ppm), (X, Y, Z).
        mask: brain mask (X, Y, Z); the output is zero outside it.
        voxel_size: mm (default 1 mm isotropic). b0_dir: unit B0 in voxel axes (default (0, 0, 1)).
        magnitude: unused (common inversion signature).
        pad_factor: zero padding per axis before the FFT (default 1.0 = periodic).
        lam: weight of the gradient penalty (mm^2, default 0.01; larger = smoother).
        quiet: unused (closed form).
    Returns:
        chi (ppm), (X, Y, Z), zero outside the mask. Cost: one rfftn + irfftn pair.
    """
    if not lam > 0:
        raise QSMInputError(f"lam={lam}: expected a positive regularisation weight")
    return kspace_inverse(field, mask, lambda D, s, vs: cfl2_filter(D, s, vs, lam), "cfl2", (float(lam),),
                          voxel_size, b0_dir, pad_factor)
