"""Truncated singular value decomposition (TSVD) dipole inversion.

Wharton, Schäfer and Bowtell, "Susceptibility mapping in the human brain using threshold-based
k-space division", MRM 2010. The periodic dipole convolution is diagonalised by the DFT, so its singular
values are ``|D(k)|`` and TSVD is the truncated pseudo-inverse: ``1/D`` where ``|D|`` is at least the
cut-off, 0 elsewhere.

How it differs from TKD (:mod:`.tkd`), as the SVD literature defines truncation:

- the cut-off is *relative* to the largest singular value, ``|D| < threshold * max|D|`` with
  ``max|D| = 2/3`` on any grid that contains the B0 axis direction, whereas TKD's threshold is an
  absolute value of ``|D|``; ``tsvd(threshold=t)`` equals ``tkd(mode="zero", threshold=t * max|D|)``;
- discarded components are set to zero (never clipped as in TKD's ``"sign"`` mode), so the result is
  the minimum-norm least-squares solution restricted to the kept singular vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmlab.errors import QSMInputError
from qsmlab.recon.inversion.tkd import kspace_inverse
from qsmlab.recon.registry import register


def tsvd_filter(D: np.ndarray, threshold: float) -> np.ndarray:
    """Truncated pseudo-inverse of the kernel: ``1/D`` where ``|D| >= threshold * max|D|``, else 0."""
    cut = threshold * float(np.abs(D).max())
    keep = np.abs(D) >= cut
    with np.errstate(divide="ignore"):
        inv = np.where(keep, 1.0 / np.where(keep, D, 1.0), 0.0)
    inv.flat[0] = 0.0  # DC: D(0) = 0, a zero singular value
    return inv


@register("inversion", "tsvd")
def tsvd(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    magnitude: np.ndarray | None = None,
    pad_factor: float = 1.0,
    threshold: float = 0.2,
    quiet: bool = False,
) -> np.ndarray:
    """TSVD dipole inversion (Wharton et al. 2010).

    Args:
        field: local field (ppm), (X, Y, Z).
        mask: brain mask (X, Y, Z); the output is zero outside it.
        voxel_size: mm (default 1 mm isotropic). b0_dir: unit B0 in voxel axes (default (0, 0, 1)).
        magnitude: unused (common inversion signature).
        pad_factor: zero padding per axis before the FFT (default 1.0 = periodic).
        threshold: singular values ``|D|`` below ``threshold * max|D|`` are discarded (relative,
            unitless, 0 < threshold < 1; default 0.2, i.e. |D| < 0.133).
        quiet: unused (closed form).
    Returns:
        chi (ppm), (X, Y, Z), zero outside the mask. Cost: one rfftn + irfftn pair.
    """
    if not (0.0 < threshold < 1.0):
        raise QSMInputError(f"threshold={threshold}: expected 0 < threshold < 1 (relative to max|D|)")
    return kspace_inverse(field, mask, lambda D, s, vs: tsvd_filter(D, threshold), "tsvd", (threshold,),
                          voxel_size, b0_dir, pad_factor)
