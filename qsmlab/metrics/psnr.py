"""Peak signal-to-noise ratio (dB) inside the mask.

    PSNR = 20 * log10(peak / RMSE_m),   RMSE_m = sqrt(mean_{mask} (x - ref)^2),
    peak = max_{mask} ref - min_{mask} ref

i.e. the data range of the reference inside the mask, as ``data_range`` in torchmetrics'
``PeakSignalNoiseRatio`` / scikit-image's ``peak_signal_noise_ratio``; both statistics over mask
voxels only. This is *not* the 2016 challenge ``compute_psnr.m``, which first shifts and rescales
both maps to [0, 255]. ``x == ref`` in the mask gives ``inf``.
"""

from __future__ import annotations

import numpy as np
import torch

from qsmlab.metrics._inputs import VOLUME_DIMS, check_numpy, check_torch


def psnr(pred, ref, mask) -> float:
    """PSNR (dB) over mask voxels with peak = data range of ``ref`` in the mask (torchmetrics convention)."""
    x, r, m = check_numpy(pred, ref, mask)
    rv = r[m]
    rmse = np.sqrt(np.mean((x[m] - rv) ** 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(20.0 * np.log10((rv.max() - rv.min()) / rmse))


@torch.no_grad()
def psnr_torch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched :func:`psnr`: ``[B, 1, X, Y, Z]`` -> ``[B]`` (dB)."""
    x, r, m = check_torch(pred, ref, mask)
    mf = m.to(x.dtype)
    rmse = torch.sqrt(((x - r) ** 2 * mf).sum(VOLUME_DIMS) / mf.sum(VOLUME_DIMS))
    peak = r.masked_fill(~m, -torch.inf).amax(VOLUME_DIMS) - r.masked_fill(~m, torch.inf).amin(VOLUME_DIMS)
    return 20.0 * torch.log10(peak / rmse)
