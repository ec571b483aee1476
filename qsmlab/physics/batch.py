"""The one place that builds the dipole operator from a batch's geometry (a dataclass batch or a mapping)."""

from __future__ import annotations

import numpy as np

from qsmlab.physics.operator import DipoleOperator


def _rows(t) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor (no torch import: the numpy physics must not need it)
        t = t.detach().cpu().numpy()
    a = np.asarray(t, dtype=np.float64)
    return a[None] if a.ndim == 1 else a


def _entry(batch, name: str):
    """``batch[name]`` or ``batch.name``; a one-line error naming the entry when it is absent."""
    value = batch.get(name) if hasattr(batch, "get") else getattr(batch, name, None)
    if value is None:
        raise ValueError(f"physics_for_batch needs the batch entry {name!r}, which this batch does not have")
    return value


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
    b0 = _rows(_entry(batch, "b0_dir"))
    vs = _rows(_entry(batch, "voxel_size"))
    if len(b0) > 1 and np.all(b0 == b0[:1]):
        b0 = b0[:1]
    if len(vs) > 1 and np.all(vs == vs[:1]):
        vs = vs[:1]
    # A single row is shared by every sample (DipoleOperator broadcasts it), so mixed cases work too.
    return DipoleOperator(voxel_size=vs, b0_dir=b0, pad_factor=pad_factor, kind=kind)
