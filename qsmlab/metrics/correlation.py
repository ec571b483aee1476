"""Pearson correlation coefficient between ``pred`` and ``ref`` over mask voxels.

    corr = sum_m (x - mean_m x)(ref - mean_m ref) / sqrt(sum_m (x - mean_m x)^2 * sum_m (ref - mean_m ref)^2)

(Pearson's r, as reported with the QSM challenge 2.0 metrics, Bilgic et al., MRM 2021.) Invariant to
``x -> c*x + d`` for ``c > 0``; ``nan`` when either map is constant inside the mask.
"""

from __future__ import annotations

import numpy as np
import torch

from qsmlab.metrics._inputs import VOLUME_DIMS, check_numpy, check_torch
from qsmlab.metrics.nrmse import _demeaned_np, _demeaned_torch


def corr(pred, ref, mask) -> float:
    """Pearson correlation of ``pred`` and ``ref`` over mask voxels (dimensionless, -1..1)."""
    xd, rd = _demeaned_np(*check_numpy(pred, ref, mask))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.dot(xd, rd) / np.sqrt(np.dot(xd, xd) * np.dot(rd, rd)))


@torch.no_grad()
def corr_torch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched :func:`corr`: ``[B, 1, X, Y, Z]`` -> ``[B]``."""
    xd, rd = _demeaned_torch(*check_torch(pred, ref, mask))
    num = (xd * rd).sum(VOLUME_DIMS)
    return num / torch.sqrt((xd * xd).sum(VOLUME_DIMS) * (rd * rd).sum(VOLUME_DIMS))
