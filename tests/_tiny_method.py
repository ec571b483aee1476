"""A tiny real QSM method for platform tests: one 3^3 convolution of the masked field -> chi (ppm).

Loss = ||M (A chi - f)||^2 / |M| + lambda_tv * TV(chi) (the uQSM form with a linear data term), so
lambda_tv changes what is learned and the validation NRMSE depends on it. Validation scores the full
volume with the project's metrics (``val/nrmse``, ``val/psnr``, ...), like the real methods do.
``fail_at_step`` raises inside training (a failing trial); ``step_delay`` slows steps down so a test can
kill a run mid-way.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from qsmlab.metrics import compute_all_torch
from qsmlab.physics import DipoleOperator


class TinyQSM(L.LightningModule):
    def __init__(self, lambda_tv: float = 1e-3, lr: float = 1e-2, fail_at_step: int = -1,
                 step_delay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1)
        with torch.no_grad():  # start near chi = 3 * field (the inverse of the kernel's 1/3 mean)
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 1, 1, 1] = 3.0
            self.conv.bias.zero_()

    def forward(self, field: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.conv(field * mask) * mask

    @staticmethod
    def _op(batch) -> DipoleOperator:
        return DipoleOperator(batch.voxel_size.tolist()[0], batch.b0_dir.tolist()[0])

    def training_step(self, batch, batch_idx):
        if self.hparams.fail_at_step >= 0 and self.global_step >= self.hparams.fail_at_step:
            raise RuntimeError(f"TinyQSM: planned failure at step {self.global_step}")
        if self.hparams.step_delay:
            time.sleep(self.hparams.step_delay)
        chi = self(batch.field, batch.mask)
        m = batch.mask
        dc = ((m * (self._op(batch).A(chi) - batch.field)) ** 2).sum() / m.sum().clamp_min(1)
        tv = sum(torch.diff(chi, dim=d).abs().mean() for d in (2, 3, 4))
        loss = dc * 1e4 + self.hparams.lambda_tv * tv * 1e2
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch))
        self.log("train/loss_tv", tv, on_step=False, on_epoch=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch, batch_idx):
        chi = self(batch.field, batch.mask)
        for k, v in compute_all_torch(chi, batch.chi, batch.mask).items():
            self.log(f"val/{k}", v.mean(), on_epoch=True, batch_size=len(batch))

    def test_step(self, batch, batch_idx):
        chi = self(batch.field, batch.mask)
        for k, v in compute_all_torch(chi, batch.chi, batch.mask).items():
            self.log(f"test/{k}", v.mean(), on_epoch=True, batch_size=len(batch))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch.field, batch.mask)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


TINY_EXPERIMENT = """\
seed_everything: 0
trainer:
  max_epochs: {epochs}
  accelerator: cpu
  devices: 1
  use_distributed_sampler: false
  enable_model_summary: false
  enable_progress_bar: false
  log_every_n_steps: 1
  num_sanity_val_steps: 0
model:
  class_path: _tiny_method.TinyQSM
  init_args:
    lambda_tv: 0.001
    fail_at_step: -1
    step_delay: 0.0
data:
  manifest: {manifest}
  patch_size: 8
  samples_per_volume: 2
  queue_length: 4
  batch_size: 2
  val_subjects: {val}
profiles:
  quick:
    trainer: {{max_epochs: {epochs}}}
"""


def write_tiny_experiment(folder, manifest, epochs: int = 2, val=("sub-02",), name: str = "tiny"):
    """A tiny experiment YAML (TinyQSM on ``manifest``) in ``folder``; returns its path."""
    from pathlib import Path

    p = Path(folder) / f"{name}.yaml"
    p.write_text(TINY_EXPERIMENT.format(epochs=epochs, manifest=manifest, val=list(val)))
    return p
