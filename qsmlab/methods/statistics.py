"""Normalisation statistics of a training set, stored in every checkpoint (buffers of the method).

- ``field_scale`` (ppm): robust standard deviation of the local field inside the brain mask, pooled over
  the training scans, ``1.4826 * median(|f - median(f)|)`` (the MAD, scaled to equal the standard
  deviation of a Gaussian). Robust so that a few veins or haemorrhages (fields ten times the tissue
  contrast) do not set the scale. Networks see ``field / field_scale`` and predict ``chi / field_scale``:
  the dipole model is linear, so one scale for input and output keeps a method scale-equivariant
  (a field twice as strong gives a chi twice as strong, as QSMnet+'s linearity argument requires).
- ``b0_dir``: the training scans' common B0 direction in voxel axes (sign-insensitive), or NaN when the
  scans disagree by more than 1 degree (a network trained on many orientations is not reoriented).
- ``voxel_size`` (mm): the per-axis median over the training scans.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

from qsmlab.methods.inference import ANGLE_TOL_DEG, b0_angle_deg, unit

MAD_TO_SD = 1.4826
MAX_VOXELS_PER_SCAN = 200_000
"""Voxels drawn per scan (deterministic stride): the median of 200k samples is within ~0.3 % of the full one."""


def robust_std(values: np.ndarray) -> float:
    """``1.4826 * MAD`` of a 1-D sample (ppm in, ppm out); 0 for an empty sample."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return 0.0
    return float(MAD_TO_SD * np.median(np.abs(v - np.median(v))))


def masked_sample(field: np.ndarray, mask: np.ndarray, max_voxels: int = MAX_VOXELS_PER_SCAN) -> np.ndarray:
    """Field values inside the mask, thinned by a fixed stride to at most ``max_voxels``."""
    v = np.asarray(field)[np.asarray(mask) > 0.5]
    stride = max(1, int(np.ceil(v.size / max_voxels)))
    return v[::stride]


def field_scale_of(fields: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Pooled robust std (ppm) of the fields inside their masks; ValueError if it is not positive."""
    pooled = np.concatenate([masked_sample(f, m) for f, m in zip(fields, masks)])
    s = robust_std(pooled)
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"field scale of the training data is {s} ppm: the fields are zero inside the masks")
    return s


def common_b0_dir(b0_dirs: Sequence[Sequence[float]], tol_deg: float = ANGLE_TOL_DEG) -> np.ndarray:
    """The shared B0 direction of the scans (sign-aligned mean), or NaNs if any is > ``tol_deg`` from it."""
    dirs = [unit(b) for b in b0_dirs]
    if not dirs:
        return np.full(3, np.nan)
    ref = dirs[0]
    aligned = np.array([d if np.dot(d, ref) >= 0 else -d for d in dirs])
    mean = unit(aligned.mean(axis=0))
    if max(b0_angle_deg(d, mean) for d in dirs) > tol_deg:
        return np.full(3, np.nan)
    return mean


def field_scale_of_rows(rows, column: str = "field") -> float:
    """Pooled robust std (ppm) of the rows' ``column`` images inside their masks (NIfTI read once each, with
    nibabel); ValueError naming the first row's file if it is not positive."""
    samples = []
    for r in rows:
        f = np.asarray(nib.load(str(getattr(r, column))).dataobj, dtype=np.float32)
        samples.append(masked_sample(f, np.asarray(nib.load(str(r.mask)).dataobj) > 0.5))
    s = robust_std(np.concatenate(samples))
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"field scale of the training rows' {column} is {s} ppm: the fields are zero inside the "
                         f"masks (first row: {getattr(rows[0], column)})")
    return s


def training_statistics(rows) -> dict[str, np.ndarray | float]:
    """``{"field_scale", "b0_dir", "voxel_size"}`` of manifest rows (:class:`qsmlab.data.manifest.Row`)."""
    rows = list(rows)
    if not rows:
        raise ValueError("no training rows to compute normalisation statistics from")
    return {
        "field_scale": field_scale_of_rows(rows),
        "b0_dir": common_b0_dir([r.b0_dir for r in rows]),
        "voxel_size": np.median(np.asarray([r.voxel_size for r in rows], dtype=np.float64), axis=0),
    }


def batch_statistics(batch) -> list:
    """``[field_scale, b0_dir, voxel_size]`` (plain lists, to broadcast across ranks) of one training batch."""
    scale = robust_std(batch.field[batch.mask > 0.5].detach().float().cpu().numpy())
    return [scale, common_b0_dir(batch.b0_dir.detach().float().cpu().numpy()).tolist(),
            np.median(batch.voxel_size.detach().float().cpu().numpy(), axis=0).tolist()]
