"""B0 direction and voxel size from NIfTI geometry.

``b0_dir`` is a unit 3-vector in *voxel axes* (i, j, k): the components of the scanner's B0 axis
(world +z of the NIfTI RAS+ frame, which is the magnet bore for scanner-based affines) along the unit
vectors of the voxel axes. With ``affine[:3, :3] = R @ diag(voxel_size)`` and ``R`` a rotation,
``b0_dir = R^T @ [0, 0, 1]``. Oblique acquisitions therefore give an oblique ``b0_dir`` and the dipole
kernel handles them; nothing is resampled. The sign of ``b0_dir`` is irrelevant to the kernel.

Priority (highest first): an explicit argument, a JSON sidecar key ``B0_dir``, the affine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qsmlab.errors import QSMInputError


def normalize_b0_dir(b0_dir: Sequence[float], what: str = "b0_dir") -> np.ndarray:
    """Return ``b0_dir`` as a float64 unit 3-vector; error names ``what`` if it is not a finite 3-vector."""
    v = np.asarray(b0_dir, dtype=np.float64).reshape(-1)
    if v.shape != (3,) or not np.all(np.isfinite(v)) or np.linalg.norm(v) < 1e-12:
        raise QSMInputError(f"{what}: expected a non-zero finite 3-vector, got {list(np.ravel(b0_dir))}")
    return v / np.linalg.norm(v)


def voxel_size_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) as the column norms of the affine's 3x3 part."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return np.sqrt((a**2).sum(axis=0))


def b0_dir_from_affine(affine: np.ndarray, b0_world: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Unit B0 direction in voxel axes from a NIfTI affine (scanner B0 along world ``b0_world``)."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    vs = voxel_size_from_affine(affine)
    if np.any(vs <= 0):
        raise QSMInputError("affine has a zero-length voxel axis; cannot derive b0_dir")
    rot = a / vs  # unit voxel-axis directions (columns) in world coordinates
    # Solve rot @ b = z rather than using rot.T: identical for rotations, correct for sheared affines too.
    b = np.linalg.solve(rot, np.asarray(b0_world, dtype=np.float64))
    return normalize_b0_dir(b)


def b0_dir_from_sidecar(path: str | Path) -> np.ndarray | None:
    """``B0_dir`` from a JSON sidecar, or None when the file or key is absent."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise QSMInputError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if "B0_dir" not in meta:
        return None
    return normalize_b0_dir(meta["B0_dir"], what=f"{p}: B0_dir")


def sidecar_path(nifti_path: str | Path) -> Path:
    """``x.nii.gz`` / ``x.nii`` -> ``x.json`` (BIDS convention)."""
    p = Path(nifti_path)
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return p.with_name(name[: -len(ext)] + ".json")
    return p.with_suffix(".json")


def resolve_b0_dir(
    affine: np.ndarray,
    explicit: Sequence[float] | None = None,
    nifti_path: str | Path | None = None,
) -> np.ndarray:
    """B0 direction in voxel axes: explicit argument > JSON sidecar ``B0_dir`` > affine."""
    if explicit is not None:
        return normalize_b0_dir(explicit)
    if nifti_path is not None:
        side = b0_dir_from_sidecar(sidecar_path(nifti_path))
        if side is not None:
            return side
    return b0_dir_from_affine(affine)


def rotation_matrix(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """Rotation about ``axis`` by ``angle_deg`` (Rodrigues); used to build oblique geometries."""
    k = normalize_b0_dir(axis, "axis")
    t = np.deg2rad(angle_deg)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * (K @ K)


def tilted_b0_dir(angle_deg: float, axis: Sequence[float] = (1.0, 0.0, 0.0)) -> np.ndarray:
    """[0, 0, 1] rotated by ``angle_deg`` about ``axis``: a convenient oblique B0 direction."""
    return rotation_matrix(axis, angle_deg) @ np.array([0.0, 0.0, 1.0])
