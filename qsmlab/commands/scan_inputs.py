"""One scan's inputs from a command line (``qsmlab predict``, ``qsmlab dip``): the local field, the mask,
optional images on the same grid, and the geometry (``--b0-dir`` > sidecar ``B0_dir`` > affine; voxel size
from ``--voxel-size`` or the header). Each check is a one-line :class:`QSMInputError` naming the option."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qsmlab.data.nifti import Volume, check_finite, check_mask, check_ndim, check_same_grid, load_nifti
from qsmlab.errors import QSMInputError
from qsmlab.physics.geometry import normalize_b0_dir


@dataclass
class Scan:
    """``field`` (the loaded NIfTI: data in ppm, affine, header), ``mask`` (bool), ``images`` (the optional
    ones given, name -> (X, Y, Z) array), ``b0_dir`` (unit, voxel axes) and ``voxel_size`` (mm)."""

    field: Volume
    mask: np.ndarray
    images: dict[str, np.ndarray]
    b0_dir: np.ndarray
    voxel_size: np.ndarray


def output_path(args) -> str:
    """``-o``, which must name a NIfTI file."""
    out = str(args.output)
    if not (out.endswith(".nii") or out.endswith(".nii.gz")):
        raise QSMInputError(f"-o {out}: output must end in .nii or .nii.gz")
    return out


def load_scan(args, optional: Sequence[str] = ("magnitude",)) -> Scan:
    """``--field``, ``--mask`` and the ``optional`` images (``--magnitude``, ``--total-field``, ...) of ``args``."""
    field = load_nifti(args.field, what="--field")
    check_ndim(field, (3,), "field")
    check_finite(field)
    mvol = load_nifti(args.mask, what="--mask")
    check_same_grid(field, mvol)
    mask = check_mask(mvol)
    images = {}
    for key in optional:
        path = getattr(args, key, None)
        if path:
            v = load_nifti(path, what=f"--{key.replace('_', '-')}")
            check_ndim(v, (3,), key)
            check_finite(v)
            check_same_grid(field, v)
            images[key] = v.data
    b0 = normalize_b0_dir(args.b0_dir, what="--b0-dir") if args.b0_dir else field.b0_dir()
    if args.voxel_size is not None:
        vs = np.asarray(args.voxel_size, dtype=np.float64)
        if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
            raise QSMInputError(f"--voxel-size {args.voxel_size}: expected three positive numbers (mm)")
    else:
        vs = field.voxel_size
    return Scan(field, mask, images, b0, vs)
