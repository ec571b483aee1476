"""White-matter susceptibility anisotropy: a cylindrical tensor per white-matter voxel.

    X(r) = chi_perp I + delta_chi n n^T,   chi_perp = chi(r) - delta_chi / 3,   trace(X) / 3 = chi(r)

``chi`` is the subject's scalar susceptibility (the truth every method is scored against is this mean);
``delta_chi = chi_par - chi_perp`` is drawn per subject from :data:`DELTA_CHI_PPM`, the in-vivo white-matter
anisotropy of susceptibility tensor imaging (Li et al., NeuroImage 59:2088, 2012: 0.01-0.02 ppm in the
major tracts at 7 T; Liu, MRM 63:1471, 2010). The field is the tensor field
(:func:`qsmlab.physics.tensor_kernel.tensor_dipole_field`), so a scalar model cannot explain it: at
``delta_chi`` = 0.015 ppm the white-matter frequency changes by up to ~0.005 ppm with fibre angle, the
order of the orientation dependence of white-matter frequency measured in vivo (Lee et al., PNAS
107:5130, 2010; Wharton & Bowtell, PNAS 109:18559, 2012: a few ppb between fibres parallel and
perpendicular to B0 at 7 T, i.e. a few percent of the +-0.03-0.05 ppm local-field range).

Fibre orientations ``n`` (:func:`fibre_orientation`): a geometric pattern plus a smooth random
perturbation: the radial direction from the brain's centre (the corona radiata's fan of projection
fibres) plus an isotropic Gaussian random vector field of unit sd per component smoothed over
``smooth_mm`` (default 8 mm, the scale of a tract), normalised. The pattern is not a tractogram; what
matters to a scalar-model inversion is that ``n`` varies across white matter over centimetres, as tracts do.

Optional microstructure term (``microstructure_ppm``, default 0 = off): a frequency offset
``a (sin^2 theta - 2/3)`` in white matter (theta the fibre angle to B0), the form of the hollow-cylinder
(myelin sheath) contribution of Wharton & Bowtell 2012; its in-vivo size is not checked here, so it is
off unless a caller sets it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

DELTA_CHI_PPM = (0.01, 0.02)
"""chi_par - chi_perp of white matter (ppm), per subject uniform (Li et al. 2012, see module docstring)."""
FIBRE_SMOOTH_MM = 8.0


def fibre_orientation(shape: Sequence[int], voxel_size: Sequence[float], affine: np.ndarray,
                      centre_mm: Sequence[float], rng: np.random.Generator,
                      smooth_mm: float = FIBRE_SMOOTH_MM, perturbation: float = 1.0) -> np.ndarray:
    """Unit fibre directions ``(3, X, Y, Z)`` float32 in voxel axes (see module docstring).

    Args:
        shape, voxel_size: the grid (mm). affine: voxel -> world (mm), axis-aligned.
        centre_mm: world point the radial pattern fans out from (the brain's centre).
        rng: draws the perturbation. smooth_mm: its Gaussian smoothing sd (mm). perturbation: its weight
            against the unit radial vector (0 = purely radial).
    """
    shape = tuple(int(n) for n in shape)
    vs = np.asarray(voxel_size, dtype=np.float64)
    a = np.asarray(affine, dtype=np.float64)
    c_vox = np.linalg.solve(a[:3, :3], np.asarray(centre_mm, dtype=np.float64) - a[:3, 3])
    axes = [((np.arange(n) - c_vox[i]) * vs[i]).astype(np.float32) for i, n in enumerate(shape)]
    r = [axes[i].reshape([-1 if j == i else 1 for j in range(3)]) for i in range(3)]
    norm = np.sqrt(r[0] ** 2 + r[1] ** 2 + r[2] ** 2) + np.float32(1e-3)
    n = np.empty((3,) + shape, dtype=np.float32)
    sigma = np.maximum(smooth_mm / vs, 0.5)
    for i in range(3):
        g = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=sigma, mode="reflect")
        g /= max(float(g.std()), 1e-12)
        n[i] = r[i] / norm + np.float32(perturbation) * g
    n /= np.maximum(np.sqrt((n**2).sum(0)), 1e-6)
    return n


def microstructure_shift(fibre: np.ndarray, b0_dir: Sequence[float], wm: np.ndarray, amplitude_ppm: float
                         ) -> np.ndarray:
    """``a (sin^2 theta - 2/3)`` in ``wm`` (ppm, float32; zero mean over orientations)."""
    b = np.asarray(b0_dir, dtype=np.float32)
    cos = b[0] * fibre[0] + b[1] * fibre[1] + b[2] * fibre[2]
    return np.where(wm, np.float32(amplitude_ppm) * (1.0 - cos**2 - np.float32(2.0 / 3.0)), 0).astype(np.float32)
