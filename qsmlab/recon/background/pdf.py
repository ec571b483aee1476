"""PDF: projection onto dipole fields (Liu et al., NMR Biomed 24:1129, 2011).

The background field is modelled as the field of dipoles outside the brain mask M. Fitting it to the
total field inside M by weighted least squares,

    chi_out = argmin_chi || W M (f - A (1 - M) chi) ||^2,

is solved by conjugate gradients on the normal equations ``(1-M) A W^2 M A (1-M) chi = (1-M) A W^2 M f``
(``A`` = :class:`qsmlab.physics.DipoleOperator`, self-adjoint). Then ``background = A (1-M) chi_out``
and ``local = M (f - background)``. The field of sources inside M that is also producible by outside
dipoles (nearly orthogonal in practice, Liu et al.'s argument) is attributed to the background; that
is PDF's error, largest near the mask boundary. Sources outside the FOV are not modelled (Liu et al.
extend the FOV by zero padding for that); the operator's own padding only prevents circular wrap-around.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmlab.errors import QSMInputError
from qsmlab.physics import DipoleOperator, normalize_b0_dir
from qsmlab.recon.background.spherical import check_inputs
from qsmlab.recon.iterate import monitored_cg
from qsmlab.recon.registry import register


@register("background", "pdf")
def pdf(
    total_field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    magnitude: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    pad_factor: float = 2.0,
    quiet: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Projection onto dipole fields (Liu et al. 2011).

    Args:
        total_field: unwrapped total field (ppm), shape (X, Y, Z).
        mask: brain mask (X, Y, Z); background dipoles live on its complement within the FOV.
        voxel_size: mm per voxel. b0_dir: B0 direction in voxel axes (unit vector).
        magnitude: optional (X, Y, Z) magnitude used as the noise weight W (scaled to mean 1 in M);
            uniform weights when None.
        max_iter: CG iterations at most (default 100). tol: relative residual to stop at (default 1e-3).
        pad_factor: zero padding of the dipole operator (default 2: linear, not circular, convolution).
        quiet: hide the progress bar.
    Returns:
        (local_field ppm, ``M (f - background)``, not demeaned; ``valid_mask`` = ``mask``).
    """
    f, m, vs = check_inputs(total_field, mask, voxel_size, "pdf")
    if m.all():
        raise QSMInputError("pdf: mask covers the whole FOV; there is no room for background dipoles")
    w2 = m.astype(np.float64)
    if magnitude is not None:
        mag = np.asarray(magnitude, dtype=np.float64)
        if mag.shape != f.shape:
            raise QSMInputError(f"pdf: magnitude shape {mag.shape} does not match total_field shape {f.shape}")
        if not np.all(np.isfinite(mag[m])) or mag[m].mean() <= 0:
            raise QSMInputError("pdf: magnitude must be finite with a positive mean inside the mask")
        w2 = w2 * (np.clip(mag, 0.0, None) / mag[m].mean()) ** 2
    if not float(pad_factor) >= 1.0:
        raise QSMInputError(f"pdf: pad_factor must be >= 1, got {pad_factor}")
    op = DipoleOperator(vs, normalize_b0_dir(b0_dir, "pdf: b0_dir"), pad_factor=float(pad_factor))
    out = ~m
    shape = f.shape

    def normal(xflat):
        x = np.where(out, xflat.reshape(shape), 0.0)
        return np.where(out, op.A_adjoint(w2 * op.A(x)), 0.0).ravel()

    rhs = np.where(out, op.A_adjoint(w2 * f), 0.0).ravel()
    chi_out, _ = monitored_cg(normal, rhs, max_iter=int(max_iter), tol=float(tol), desc="PDF", quiet=quiet)
    background = op.A(np.where(out, chi_out.reshape(shape), 0.0))
    return np.where(m, f - background, 0.0), m
