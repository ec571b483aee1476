"""The one place that builds the dipole operator from a batch's geometry."""

from __future__ import annotations

import numpy as np
import torch

from qsmlab.losses._common import _require
from qsmlab.physics import DipoleOperator


def _rows(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    a = np.asarray(t, dtype=np.float64)
    return a[None] if a.ndim == 1 else a


def physics_for_batch(batch, pad_factor: float = 2.0, kind: str = "continuous") -> DipoleOperator:
    """``DipoleOperator`` with each sample's ``b0_dir`` ([B, 3], unit, voxel axes) and ``voxel_size`` ([B, 3], mm).

    ``A`` of the result maps chi ``[B, 1, X, Y, Z]`` (ppm) to each sample's field (ppm) under its own
    geometry. When every sample shares one geometry (the usual single-orientation batch) the operator
    holds one row, so one cached kernel serves the whole batch instead of B stacked copies.

    Args:
        batch: anything with ``b0_dir`` and ``voxel_size`` (attribute or ``[]`` access).
        pad_factor: zero-padding factor per axis (1 = periodic, 2 = the default linear convolution).
        kind: ``"continuous"`` or ``"discrete"`` kernel (see :mod:`qsmlab.physics.kernel`).
    """
    b0 = _rows(_require(batch, "b0_dir", "physics_for_batch"))
    vs = _rows(_require(batch, "voxel_size", "physics_for_batch"))
    if len(b0) > 1 and np.all(b0 == b0[:1]):
        b0 = b0[:1]
    if len(vs) > 1 and np.all(vs == vs[:1]):
        vs = vs[:1]
    # A single row is shared by every sample (DipoleOperator broadcasts it), so mixed cases work too.
    return DipoleOperator(voxel_size=vs, b0_dir=b0, pad_factor=pad_factor, kind=kind)
