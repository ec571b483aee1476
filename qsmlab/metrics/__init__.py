"""Masked QSM metrics, one definition each, in numpy (one volume) and torch (a batch).

numpy: ``metric(pred, ref, mask) -> float`` with (X, Y, Z) arrays in ppm and a boolean/0-1 mask.
torch: ``metric_torch(pred, ref, mask) -> Tensor[B]`` with ``[B, 1, X, Y, Z]`` tensors, computed
without an autograd graph (validation metrics, not losses); they agree with numpy to 1e-5 in float64.
Bad shapes or an empty mask raise :class:`qsmlab.errors.QSMInputError` (a ``ValueError``).

Definitions and sources (see each module):

- ``nrmse``, ``hfen``, ``ssim``: 2016 QSM reconstruction challenge (Langkammer et al., MRM 2018).
- ``nrmse_demeaned``, ``nrmse_detrended``, ``xsim``: QSM challenge 2.0 (Bilgic et al., MRM 2021).
- ``psnr``: peak = data range of ``ref`` in the mask (torchmetrics convention), RMSE over the mask.
- ``corr``: Pearson correlation over the mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qsmlab.metrics.collection import VolumeMetrics
from qsmlab.metrics.correlation import corr, corr_torch
from qsmlab.metrics.hfen import hfen, hfen_torch
from qsmlab.metrics.nrmse import (
    nrmse,
    nrmse_demeaned,
    nrmse_demeaned_torch,
    nrmse_detrended,
    nrmse_detrended_torch,
    nrmse_torch,
)
from qsmlab.metrics.psnr import psnr, psnr_torch
from qsmlab.metrics.ssim import (
    challenge2016_rescale,
    ssim,
    ssim_map,
    ssim_map_torch,
    ssim_torch,
    xsim,
    xsim_torch,
)


class MetricInfo(NamedTuple):
    unit: str  # "" = dimensionless
    higher_is_better: bool
    definition: str


METRIC_INFO: dict[str, MetricInfo] = {
    "psnr": MetricInfo("dB", True, "20 log10((max-min of ref in mask) / RMSE over mask voxels)"),
    "nrmse": MetricInfo("%", False, "100 ||x*m - ref*m|| / ||ref*m|| (2016 challenge RMSE, not demeaned)"),
    "nrmse_demeaned": MetricInfo("%", False, "NRMSE of the maps demeaned over the mask (challenge 2.0)"),
    "nrmse_detrended": MetricInfo("%", False, "demeaned NRMSE of (x-b)/a, x = a ref + b fit in the mask (challenge 2.0)"),
    "hfen": MetricInfo("%", False, "2016 RMSE of the masked maps after a 15^3 LoG filter, sigma 1.5 voxels"),
    "ssim": MetricInfo("", True, "2016 challenge 3-D SSIM: maps shifted/rescaled to 0-255, 5^3 window, L=255"),
    "xsim": MetricInfo("", True, "challenge 2.0 3-D SSIM on native ppm maps: 7^3 window, K=(0.01,0.001), L=1"),
    "corr": MetricInfo("", True, "Pearson correlation of pred and ref over mask voxels"),
}

NUMPY_METRICS = {
    "psnr": psnr,
    "nrmse": nrmse,
    "nrmse_demeaned": nrmse_demeaned,
    "nrmse_detrended": nrmse_detrended,
    "hfen": hfen,
    "ssim": ssim,
    "xsim": xsim,
    "corr": corr,
}
TORCH_METRICS = {
    "psnr": psnr_torch,
    "nrmse": nrmse_torch,
    "nrmse_demeaned": nrmse_demeaned_torch,
    "nrmse_detrended": nrmse_detrended_torch,
    "hfen": hfen_torch,
    "ssim": ssim_torch,
    "xsim": xsim_torch,
    "corr": corr_torch,
}


def compute_all(pred, ref, mask) -> dict[str, float]:
    """Every metric of :data:`METRIC_INFO` for one (X, Y, Z) volume (numpy), in that order."""
    return {name: fn(pred, ref, mask) for name, fn in NUMPY_METRICS.items()}


def compute_all_torch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric of :data:`METRIC_INFO` for a ``[B, 1, X, Y, Z]`` batch: name -> ``[B]`` tensor."""
    return {name: fn(pred, ref, mask) for name, fn in TORCH_METRICS.items()}


__all__ = [
    "METRIC_INFO",
    "MetricInfo",
    "NUMPY_METRICS",
    "VolumeMetrics",
    "TORCH_METRICS",
    "challenge2016_rescale",
    "compute_all",
    "compute_all_torch",
    "corr",
    "corr_torch",
    "hfen",
    "hfen_torch",
    "nrmse",
    "nrmse_demeaned",
    "nrmse_demeaned_torch",
    "nrmse_detrended",
    "nrmse_detrended_torch",
    "nrmse_torch",
    "psnr",
    "psnr_torch",
    "ssim",
    "ssim_map",
    "ssim_map_torch",
    "ssim_torch",
    "xsim",
    "xsim_torch",
]
