"""NIfTI I/O that keeps geometry, writes float32 atomically, and validates inputs.

Arrays keep nibabel's voxel order (i, j, k[, echo]); nothing is transposed or reoriented. Every map we
write is float32 with the reference image's affine and header (so it overlays on the input in any
viewer), written to a temporary file in the destination folder and renamed into place, so a crash never
leaves a half-written map and an existing file is only replaced by a complete one.

Validators raise :class:`~qsmlab.errors.QSMInputError` with one line that names the file at fault.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmlab.errors import QSMInputError
from qsmlab.physics.geometry import resolve_b0_dir, voxel_size_from_affine

NIFTI_EXTS = (".nii", ".nii.gz")


def _default_mode() -> int:
    """Permissions a plain ``open()`` would give (mkstemp makes 0600 files, which others cannot read)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@dataclass
class Volume:
    """A loaded NIfTI: data (float array, voxel order as stored), affine, header and source path."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def voxel_size(self) -> np.ndarray:
        return voxel_size_from_affine(self.affine)

    @property
    def shape3(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[:3])

    def b0_dir(self, explicit: Sequence[float] | None = None) -> np.ndarray:
        """B0 in voxel axes: explicit > sidecar ``B0_dir`` > affine."""
        return resolve_b0_dir(self.affine, explicit, self.path)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<array>"


def _is_nifti(path: Path) -> bool:
    return any(path.name.endswith(e) for e in NIFTI_EXTS)


def load_nifti(path: str | Path, dtype=np.float64, what: str | None = None) -> Volume:
    """Load a NIfTI file as a :class:`Volume` (scaled data as ``dtype``).

    ``what`` (e.g. ``"--phase"``) is added to error messages so the user knows which argument failed.
    """
    p = Path(path)
    label = f"{what} {p}" if what else str(p)
    if not p.exists():
        raise QSMInputError(f"{label}: file not found")
    if not p.is_file() or not _is_nifti(p):
        raise QSMInputError(f"{label}: expected a NIfTI file (.nii or .nii.gz)")
    try:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise QSMInputError(f"{label}: cannot read NIfTI ({type(e).__name__}: {e})") from None
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header.copy(), path=p)


def save_nifti(
    path: str | Path,
    data: np.ndarray,
    like: Volume | None = None,
    affine: np.ndarray | None = None,
    header: nib.Nifti1Header | None = None,
    dtype=np.float32,
) -> Path:
    """Write ``data`` as a NIfTI (float32 by default) with ``like``'s (or the given) affine and header.

    The write is atomic: a temporary file in the same folder, then ``os.replace``. Returns the path.
    """
    p = Path(path)
    if not _is_nifti(p):
        raise QSMInputError(f"{p}: output must end in .nii or .nii.gz")
    if affine is None:
        affine = like.affine if like is not None else np.eye(4)
    if header is None and like is not None:
        header = like.header
    arr = np.asarray(data)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    arr = arr.astype(dtype, copy=False)
    hdr = header.copy() if header is not None else nib.Nifti1Header()
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=hdr)
    img.set_data_dtype(arr.dtype)
    # Data are stored unscaled (slope 1, intercept 0): the input's scaling must not reapply on read.
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if p.name.endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=f".tmp{suffix}", dir=str(p.parent))
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file (JSON sidecar, CSV, manifest) atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(p.parent))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


# -- validators --------------------------------------------------------------------------------------


def check_finite(vol: Volume) -> None:
    """No NaN or Inf anywhere."""
    bad = ~np.isfinite(vol.data)
    if bad.any():
        raise QSMInputError(f"{vol.name}: {int(bad.sum())} non-finite values (NaN/Inf); expected finite data")


def check_ndim(vol: Volume, allowed: Sequence[int] = (3,), what: str = "volume") -> None:
    """3-D (X, Y, Z) or 4-D with echoes last (X, Y, Z, E); a trailing singleton 4th/5th axis is dropped."""
    while vol.data.ndim > 3 and vol.data.shape[-1] == 1 and vol.data.ndim not in allowed:
        vol.data = vol.data[..., 0]
    if vol.data.ndim not in allowed:
        exp = " or ".join(f"{d}-D" + (" (X, Y, Z, echo)" if d == 4 else " (X, Y, Z)") for d in allowed)
        raise QSMInputError(f"{vol.name}: {what} is {vol.data.ndim}-D with shape {vol.data.shape}; expected {exp}")


def check_same_grid(ref: Volume, other: Volume, atol: float = 1e-3) -> None:
    """Same 3-D shape and same affine (within ``atol`` mm / unitless rotation)."""
    if ref.shape3 != other.shape3:
        raise QSMInputError(f"{other.name}: grid shape {other.shape3} does not match {ref.name} {ref.shape3}")
    if not np.allclose(ref.affine, other.affine, atol=atol):
        raise QSMInputError(f"{other.name}: affine differs from {ref.name} by up to "
                            f"{np.abs(ref.affine - other.affine).max():.3g} (tolerance {atol}); resample first")


def check_mask(vol: Volume) -> np.ndarray:
    """A binary (0/1 or boolean) non-empty 3-D mask; returns it as bool."""
    check_ndim(vol, (3,), "mask")
    d = vol.data
    if not np.all(np.isfinite(d)):
        raise QSMInputError(f"{vol.name}: mask contains NaN/Inf")
    u = np.unique(d)
    if not np.all(np.isin(u, (0, 1))):
        raise QSMInputError(f"{vol.name}: mask is not binary (values {u[:5].tolist()}...); expected 0/1")
    m = d > 0.5
    if not m.any():
        raise QSMInputError(f"{vol.name}: mask is empty (no voxel set); expected a non-empty brain mask")
    return m
