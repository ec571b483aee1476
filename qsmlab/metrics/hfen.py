"""High-frequency error norm (%), as in the 2016 QSM reconstruction challenge.

Langkammer et al., "QSM: report from the 2016 reconstruction challenge", MRM 2018, evaluation code
``compute_hfen.m`` (HFEN after Ravishankar & Bresler, IEEE TMI 2011): both maps multiplied by the
mask, filtered with a 15x15x15 Laplacian-of-Gaussian, sigma = 1.5 voxels
(``h = exp(-(x^2+y^2+z^2)/(2 sigma^2)); h /= sum(h); H = h (x^2+y^2+z^2 - 3 sigma^2)/sigma^4;
H -= mean(H)``; correlation, zero boundary, 'same' size = MATLAB ``imfilter`` default), then the
2016 RMSE of the filtered maps over the whole volume:

    HFEN = 100 * ||LoG(x*m) - LoG(ref*m)||_2 / ||LoG(ref*m)||_2

The filter is linear, so the numerator is computed as ``||LoG(x*m - ref*m)||`` (same value, less
cancellation in float32). Kernel details match the reference code; see :mod:`._filters`.
"""

from __future__ import annotations

import numpy as np
import torch

from qsmlab.metrics._filters import correlate_numpy, correlate_torch, log_kernel
from qsmlab.metrics._inputs import VOLUME_DIMS, check_numpy, check_torch

LOG_SIZE = 15
LOG_SIGMA = 1.5  # voxels


def hfen(pred, ref, mask) -> float:
    """HFEN (%) of the 2016 QSM challenge (``compute_hfen.m``, Langkammer et al., MRM 2018)."""
    x, r, m = check_numpy(pred, ref, mask)
    terms = log_kernel(LOG_SIZE, LOG_SIGMA)
    rm = r * m
    num = np.linalg.norm(correlate_numpy(x * m - rm, terms))
    den = np.linalg.norm(correlate_numpy(rm, terms))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(100.0 * num / den)


@torch.no_grad()
def hfen_torch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched :func:`hfen`: ``[B, 1, X, Y, Z]`` -> ``[B]`` (%)."""
    x, r, m = check_torch(pred, ref, mask)
    rm = r * m
    diff_log, ref_log = correlate_torch(torch.cat([x * m - rm, rm]), log_kernel(LOG_SIZE, LOG_SIGMA)).chunk(2)
    norm = torch.linalg.vector_norm
    return 100.0 * norm(diff_log, dim=VOLUME_DIMS) / norm(ref_log, dim=VOLUME_DIMS)
