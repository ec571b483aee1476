"""Dice + cross-entropy for a segmentation (or brain-mask) output, by MONAI's ``DiceCELoss``.

    L = lambda_dice * (1 - soft Dice) + lambda_ce * CE        (dimensionless)

PedQ-NET trains its subcortical segmentation (UNETR) with Dice + CE next to the reconstruction loss; the
same term trains a brain-masking net with ``target="mask"``. Multi-channel logits [B, C, X, Y, Z] use
softmax and one-hot labels (``to_onehot_y=True, softmax=True``); single-channel logits [B, 1, ...] are a
binary problem (sigmoid Dice + BCE-with-logits, which MONAI selects for one channel). Labels are the
batch's integer ``seg`` [B, 1, X, Y, Z] (or the 0/1 ``mask``). The loss covers the whole patch, not only
the brain mask: background is a class.
"""

from __future__ import annotations

import monai.losses
import torch
from torch import nn

from qsmlab.losses._common import _require, select


class DiceCELoss(nn.Module):
    """``monai.losses.DiceCELoss`` on ``pred[output]`` (logits) against ``batch[target]`` labels.

    Args:
        output: entry of a dict prediction with the logits (default ``"seg_logits"``).
        target: batch entry with the labels: ``"seg"`` (int labels 0..C-1) or ``"mask"`` (binary).
        include_background: count channel 0 in the Dice term (MONAI's option; CE always uses all).
        lambda_dice, lambda_ce: the weights of the two parts inside this term.
        **monai_kwargs: passed on to ``monai.losses.DiceCELoss`` (``smooth_nr``, ``squared_pred``,
            ``batch``, ``weight``, ``label_smoothing`` ...).
    ``physics`` is unused (the common loss signature).
    """

    def __init__(self, output: str = "seg_logits", target: str = "seg", include_background: bool = False,
                 lambda_dice: float = 1.0, lambda_ce: float = 1.0, **monai_kwargs):
        super().__init__()
        self.output = output
        self.target = target
        common = dict(lambda_dice=lambda_dice, lambda_ce=lambda_ce, **monai_kwargs)
        self.multiclass = monai.losses.DiceCELoss(include_background=include_background, to_onehot_y=True,
                                                  softmax=True, **common)
        # One channel = binary: there is no separate background channel to exclude.
        self.binary = monai.losses.DiceCELoss(include_background=True, sigmoid=True, **common)

    def extra_repr(self) -> str:
        return f"output={self.output!r}, target={self.target!r}"

    def forward(self, pred, batch, physics=None) -> torch.Tensor:
        logits = select(pred, self.output, "DiceCELoss")
        labels = _require(batch, self.target, "DiceCELoss").to(logits.device)
        if logits.ndim != 5 or labels.shape != (logits.shape[0], 1, *logits.shape[2:]):
            raise ValueError(f"DiceCELoss: expected logits [B, C, X, Y, Z] and labels [B, 1, X, Y, Z], got "
                             f"{tuple(logits.shape)} and batch.{self.target} {tuple(labels.shape)}")
        n_classes = logits.shape[1]
        if n_classes == 1:
            return self.binary(logits, (labels > 0.5).to(logits.dtype) if labels.is_floating_point()
                               else (labels > 0).to(logits.dtype))
        labels = labels.round().long() if labels.is_floating_point() else labels.long()
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(f"DiceCELoss: batch.{self.target} holds labels "
                             f"{int(labels.min())}..{int(labels.max())} but the output has {n_classes} channels")
        return self.multiclass(logits, labels)
