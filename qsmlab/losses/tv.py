"""Anisotropic total variation of chi, mask-aware.

    TV(chi) = sum_{i=0..2} sum_{n: n, n+e_i in M} |chi[n + e_i] - chi[n]| / h_i   /  N_M      [ppm/mm]

Forward differences along the three voxel axes (``h_i`` = voxel size in mm when ``voxel_size_aware``,
else 1, giving ppm per voxel), counted only when both voxels are inside the brain mask M, and divided by
the number N_M of mask voxels of the batch (a per-voxel mean, independent of patch size). The anisotropic
(L1 of each gradient component) form is the one of TV-regularised QSM inversion (e.g. FANSI: Milovic et
al., "Fast nonlinear susceptibility inversion with variational regularization", MRM 2018) and of uQSM's
lambda_TV term. TV of a constant is zero.

``support="grid"`` counts every difference of the patch (still divided by ``N_M``): for a chi that may be
nonzero outside the mask (uQSM's ``support: free``), whose sources outside then pay their TV, and the jump at
the mask's edge counts, as in the classical TV solvers.
"""

from __future__ import annotations

import torch
from torch import nn

from qsmlab.losses._common import forward_differences, mask_of, select, spacing_of


class TVLoss(nn.Module):
    """Mask-aware anisotropic TV of ``pred[output]`` (ppm/mm; see the module docstring).

    Args:
        output: entry of a dict prediction (a Tensor prediction is used directly).
        voxel_size_aware: divide each difference by the batch's voxel size along its axis (mm).
        support: ``"mask"`` (differences with both voxels in the mask) or ``"grid"`` (every difference of
            the patch); either way divided by the number of mask voxels.
    ``physics`` is unused (the common loss signature).
    """

    def __init__(self, output: str = "chi", voxel_size_aware: bool = True, support: str = "mask"):
        super().__init__()
        if support not in ("mask", "grid"):
            raise ValueError(f"TVLoss: support must be 'mask' or 'grid', got {support!r}")
        self.output = output
        self.voxel_size_aware = bool(voxel_size_aware)
        self.support = support

    def extra_repr(self) -> str:
        return f"output={self.output!r}, voxel_size_aware={self.voxel_size_aware}, support={self.support!r}"

    def forward(self, pred, batch, physics=None) -> torch.Tensor:
        x = select(pred, self.output, "TVLoss")
        mask = mask_of(batch, x).expand_as(x)
        spacing = spacing_of(batch, x, "TVLoss") if self.voxel_size_aware else None
        pairs = torch.ones_like(x) if self.support == "grid" else mask
        total = sum((d.abs() * m).sum() for d, m in forward_differences(x, pairs, spacing))
        return total / mask.sum().clamp_min(1)
