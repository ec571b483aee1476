"""Physics contract: dipole kernel, forward operator (A / A_adjoint), units, B0 geometry.

Imports nothing from Lightning or the data layer.
"""

from qsmlab.physics.batch import physics_for_batch
from qsmlab.physics.geometry import (
    b0_dir_from_affine,
    b0_dir_from_sidecar,
    normalize_b0_dir,
    resolve_b0_dir,
    rotation_matrix,
    tilted_b0_dir,
    voxel_size_from_affine,
)
from qsmlab.physics.kernel import dipole_kernel, kspace_coords
from qsmlab.physics.operator import DipoleOperator, dipole_field, padded_shape
from qsmlab.physics.units import (
    GAMMA_BAR_MHZ_PER_T,
    hz_per_ppm,
    hz_to_ppm,
    hz_to_rad,
    phase_scale,
    ppm_to_hz,
    ppm_to_rad,
    rad_to_hz,
    rad_to_ppm,
)

__all__ = [
    "DipoleOperator", "dipole_field", "physics_for_batch", "dipole_kernel", "kspace_coords", "padded_shape",
    "b0_dir_from_affine", "b0_dir_from_sidecar", "normalize_b0_dir", "resolve_b0_dir",
    "rotation_matrix", "tilted_b0_dir", "voxel_size_from_affine",
    "GAMMA_BAR_MHZ_PER_T", "hz_per_ppm", "hz_to_ppm", "hz_to_rad", "phase_scale", "ppm_to_hz",
    "ppm_to_rad", "rad_to_hz", "rad_to_ppm",
]
