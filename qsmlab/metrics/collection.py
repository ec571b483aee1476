"""A torchmetrics ``Metric`` that averages the per-volume QSM metrics over an epoch (DDP-safe).

``update(pred, ref, mask)`` scores each volume of a ``[B, 1, X, Y, Z]`` batch with the ``*_torch``
functions of this package; ``compute()`` returns ``{name: mean over volumes}``. Sums and counts are
synchronised across processes by torchmetrics (``dist_reduce_fx="sum"``), so under DDP every rank logs
the mean over all validation volumes. Non-finite per-volume values (e.g. PSNR of a perfect map) are
excluded from the mean and counted in ``n_nonfinite_<name>``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class VolumeMetrics(Metric):
    """Epoch means of QSM metrics; ``names`` picks a subset of :data:`qsmlab.metrics.METRIC_INFO`."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, names: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        from qsmlab.metrics import TORCH_METRICS

        self.names = list(names or TORCH_METRICS)
        unknown = [n for n in self.names if n not in TORCH_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(TORCH_METRICS)}")
        self._fns = {n: TORCH_METRICS[n] for n in self.names}
        for n in self.names:
            self.add_state(f"sum_{n}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"count_{n}", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"nonfinite_{n}", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
        for n, fn in self._fns.items():
            v = fn(pred, ref, mask).to(torch.float64)
            ok = torch.isfinite(v)
            setattr(self, f"sum_{n}", getattr(self, f"sum_{n}") + v[ok].sum())
            setattr(self, f"count_{n}", getattr(self, f"count_{n}") + ok.sum())
            setattr(self, f"nonfinite_{n}", getattr(self, f"nonfinite_{n}") + (~ok).sum())

    def compute(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.names:
            c = getattr(self, f"count_{n}")
            out[n] = getattr(self, f"sum_{n}") / c if c > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        return out
