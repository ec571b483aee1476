"""What a validation or test epoch of a QSM method scores, as torchmetrics states (summed over DDP ranks).

:class:`EvaluationScores`: the metrics inside the mask (:class:`qsmlab.metrics.VolumeMetrics`: ``psnr``,
``nrmse``, ...), the data consistency :func:`data_consistency` (``dc``, %), the loss on the full volume
(``loss``) and the number of volumes scored (``n_volumes``).
"""

from __future__ import annotations

import torch
from monai.metrics import compute_dice
from torch import nn
from torchmetrics.aggregation import MeanMetric, SumMetric

from qsmlab.metrics import VolumeMetrics


def data_consistency(chi: torch.Tensor, batch, physics) -> torch.Tensor:
    """Per sample ``100 ||M (D chi - f)|| / ||M f||`` (%), chi and field [B, 1, X, Y, Z] in ppm."""
    m = (batch.mask > 0.5).to(chi.dtype)
    f = batch.field.to(chi.dtype)
    num = ((physics.A(chi) - f) * m).flatten(1).norm(dim=1)
    return 100.0 * num / (f * m).flatten(1).norm(dim=1).clamp_min(1e-12)


def dice_per_volume(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean Dice over the foreground classes present in each volume (MONAI ``compute_dice``), [B].

    ``logits`` [B, C, X, Y, Z]; ``labels`` [B, 1, X, Y, Z] int in 0..C-1. Classes absent from both the
    prediction and the labels are ignored (NaN in MONAI); a volume with no foreground class gives NaN.
    """
    n = logits.shape[1]
    pred = torch.nn.functional.one_hot(logits.argmax(1), n).movedim(-1, 1).float()
    ref = torch.nn.functional.one_hot(labels[:, 0].long().clamp(0, n - 1), n).movedim(-1, 1).float()
    d = compute_dice(pred, ref, include_background=False, ignore_empty=True)
    return torch.nanmean(d, dim=1)


class EvaluationScores(nn.Module):
    """The states of one stage (``val`` or ``test``); :meth:`compute` gives ``{"<stage>/<name>": value}``
    (NaN where no volume had what the value needs) and resets them."""

    def __init__(self, metrics: list[str]):
        super().__init__()
        self.metrics = VolumeMetrics(metrics)
        self.dc, self.loss, self.volumes = MeanMetric(), MeanMetric(), SumMetric()

    def update(self, chi: torch.Tensor, batch, physics, loss: torch.Tensor | None = None) -> None:
        """One evaluated batch: chi [B, 1, X, Y, Z] (ppm, masked); ``loss`` when the batch allows one."""
        self.volumes.update(float(len(batch)))
        self.dc.update(data_consistency(chi, batch, physics))
        if batch.chi is not None:
            self.metrics.update(chi, batch.chi.float(), batch.mask)
        if loss is not None:
            self.loss.update(loss.detach())

    def compute(self, stage: str) -> dict[str, torch.Tensor]:
        values = {f"{stage}/{k}": v for k, v in self.metrics.compute().items()}
        values[f"{stage}/dc"] = self.dc.compute()
        values[f"{stage}/loss"] = self.loss.compute()
        values[f"{stage}/n_volumes"] = self.volumes.compute()
        for m in (self.metrics, self.dc, self.loss, self.volumes):
            m.reset()
        return values
