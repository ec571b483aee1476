"""Gradient-difference loss of QSMnet: the error of the spatial gradient of chi.

    L_grad = sum_{i=0..2} sum_{n: n, n+e_i in M} |d_i chi_hat[n] - d_i chi[n]|^p  /  N_M

with ``d_i`` the forward difference along voxel axis i (per voxel, or per mm with ``voxel_size_aware``),
``p`` = 1 (L1, QSMnet's choice) or 2, both voxels of a difference inside the mask M, and N_M the number
of mask voxels of the batch. Source: Yoon J et al., "Quantitative susceptibility mapping using deep
neural network: QSMnet", NeuroImage 2018 (total loss = L1 + model loss + gradient loss). Units: ppm^p
(per voxel), or (ppm/mm)^p when voxel-size aware.
"""

from __future__ import annotations

import torch
from torch import nn

from qsmlab.losses._common import (
    _require,
    check_norm,
    check_shapes,
    forward_differences,
    like,
    mask_of,
    penalty,
    select,
    spacing_of,
)


class GradientDifferenceLoss(nn.Module):
    """``|grad chi_hat - grad chi|`` over the 3 axes, masked (QSMnet); target ``batch.chi`` (ppm).

    Args:
        output: entry of a dict prediction holding chi (a Tensor prediction is used directly).
        norm: ``"l1"`` (QSMnet) or ``"l2"``.
        target: batch entry with the reference chi (default ``"chi"``).
        voxel_size_aware: divide differences by the voxel size (mm); QSMnet uses plain voxel differences.
    """

    def __init__(self, output: str = "chi", norm: str = "l1", target: str = "chi",
                 voxel_size_aware: bool = False):
        super().__init__()
        self.output = output
        self.norm = check_norm(norm, "GradientDifferenceLoss")
        self.target = target
        self.voxel_size_aware = bool(voxel_size_aware)

    def extra_repr(self) -> str:
        return (f"output={self.output!r}, norm={self.norm!r}, target={self.target!r}, "
                f"voxel_size_aware={self.voxel_size_aware}")

    def forward(self, pred, batch, physics=None) -> torch.Tensor:
        x = select(pred, self.output, "GradientDifferenceLoss")
        ref = like(_require(batch, self.target, "GradientDifferenceLoss"), x)
        mask = mask_of(batch, x)
        check_shapes("GradientDifferenceLoss", **{self.output: x, self.target: ref}, mask=mask)
        spacing = spacing_of(batch, x, "GradientDifferenceLoss") if self.voxel_size_aware else None
        # The gradient of the difference equals the difference of the gradients (linearity) and costs
        # one set of differences instead of two.
        total = sum((penalty(d, self.norm) * m).sum()
                    for d, m in forward_differences(x - ref, mask, spacing))
        return total / mask.sum().clamp_min(1)
