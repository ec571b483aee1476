"""Supervised voxel losses inside the mask: on chi (QSMnet's L1 term) and on a field output (NeXtQSM).

    L = sum_M |y_hat - y|^p / N_M       (p = 1: "l1", p = 2: "l2"; ppm^p)

N_M is the number of mask voxels of the batch, so the value is a per-voxel mean independent of the patch
size. Sources: Yoon J et al., "QSMnet", NeuroImage 2018 (L1 on chi); Cognolato F et al., "NeXtQSM - A
complete deep learning pipeline for data-consistent quantitative susceptibility mapping trained with
hybrid data", Medical Image Analysis 2023 (supervision of the background-removal net's local field and
of chi, trained end to end).
"""

from __future__ import annotations

import torch
from torch import nn

from qsmlab.losses._common import (
    _require,
    check_norm,
    check_shapes,
    like,
    mask_of,
    masked_mean,
    penalty,
    select,
)


class _MaskedVoxelLoss(nn.Module):
    _who = "MaskedVoxelLoss"

    def __init__(self, norm: str, output: str, target: str):
        super().__init__()
        self.norm = check_norm(norm, self._who)
        self.output = output
        self.target = target

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, output={self.output!r}, target={self.target!r}"

    def forward(self, pred, batch, physics=None) -> torch.Tensor:
        x = select(pred, self.output, self._who)
        y = like(_require(batch, self.target, self._who), x)
        mask = mask_of(batch, x)
        check_shapes(self._who, **{self.output: x, f"batch.{self.target}": y}, mask=mask)
        return masked_mean(penalty(x - y, self.norm), mask, mask.sum())


class ChiLoss(_MaskedVoxelLoss):
    """Masked L1/L2 between ``pred[output]`` and ``batch.chi`` (ppm). ``physics`` is unused."""

    _who = "ChiLoss"

    def __init__(self, norm: str = "l1", output: str = "chi", target: str = "chi"):
        super().__init__(norm, output, target)


class FieldLoss(_MaskedVoxelLoss):
    """Masked L1/L2 between a field output (default ``"local_field"``) and ``batch.field`` (ppm)."""

    _who = "FieldLoss"

    def __init__(self, norm: str = "l1", output: str = "local_field", target: str = "field"):
        super().__init__(norm, output, target)
