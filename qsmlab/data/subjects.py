"""Manifest rows -> TorchIO subjects (DESIGN.md section 3).

A :class:`~qsmlab.data.manifest.Row` becomes a ``tio.Subject`` with

- ``tio.ScalarImage``: ``field`` and whichever of ``chi``, ``magnitude``, ``total_field`` exist (ppm
  for fields and chi; magnitude in arbitrary units);
- ``tio.LabelMap``: ``mask`` and, if present, ``seg``;
- metadata: ``b0_dir`` (list of 3 floats, unit, voxel axes), ``voxel_size`` (list of 3 floats, mm),
  ``subject``, ``session``, ``run``, ``key`` (``subject/session/run``), ``source``
  (``synthetic``/``invivo``) and ``phase_scale`` (rad per ppm, or None).

``phase_scale = units.phase_scale(TE, B0)`` uses the **first echo** TE: it is the phase of an image the
scanner actually measured (single-echo data have only that one), and the smallest TE is the least
likely to wrap, which is what nonlinear (complex-exponential) losses need. None when ``te`` or
``b0_tesla`` is absent.

Images are read with nibabel, so voxel order is exactly NIfTI storage order (no reorientation; TorchIO's
default SimpleITK reader would also round-trip it, but nibabel is the project's reference reader).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio

from qsmlab.data.manifest import Row
from qsmlab.physics import units

SCALAR_KEYS = ("field", "chi", "magnitude", "total_field")
LABEL_KEYS = ("mask", "seg")


def read_nifti(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """TorchIO reader: ``(tensor [C, X, Y, Z] float32, affine)`` in nibabel's voxel order.

    Module-level (not a lambda) so subjects pickle into DataLoader workers and DDP spawn.
    """
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:  # (X, Y, Z, C) -> (C, X, Y, Z)
        data = np.moveaxis(data, -1, 0)
    else:
        raise ValueError(f"{path}: expected a 3-D or 4-D NIfTI, got shape {data.shape}")
    return torch.from_numpy(np.ascontiguousarray(data)), np.asarray(img.affine, dtype=np.float64)


def row_phase_scale(row: Row) -> float | None:
    """rad/ppm at the first echo time, or None without ``te``/``b0_tesla``."""
    if not row.te or row.b0_tesla is None:
        return None
    return float(units.phase_scale(row.te[0], row.b0_tesla))


def row_to_subject(row: Row) -> tio.Subject:
    """One manifest row as a lazily loaded ``tio.Subject`` (images read on first access)."""
    images: dict[str, tio.Image] = {}
    for k in SCALAR_KEYS:
        p = getattr(row, k)
        if p is not None:
            images[k] = tio.ScalarImage(p, reader=read_nifti)
    for k in LABEL_KEYS:
        p = getattr(row, k)
        if p is not None:
            images[k] = tio.LabelMap(p, reader=read_nifti)
    return tio.Subject(
        **images,
        b0_dir=[float(v) for v in row.b0_dir],
        voxel_size=[float(v) for v in row.voxel_size],
        subject=row.subject,
        session=row.session,
        run=row.run,
        key=row.key,
        source=row.source,
        phase_scale=row_phase_scale(row),
    )


def subjects_from_rows(rows: Iterable[Row]) -> list[tio.Subject]:
    """``row_to_subject`` for each row."""
    return [row_to_subject(r) for r in rows]
