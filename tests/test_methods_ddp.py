"""DDP on CPU (gloo, 2 processes): validation volumes are dealt to the ranks, and the logged metrics are
the mean over all volumes of both ranks (torchmetrics sums the states), not rank 0's share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _methods import tiny_datamodule, tiny_dataset, tiny_trainer

from qsmlab.methods import UQSM
from qsmlab.metrics import compute_all

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.getbasetemp() / "methods_data")


@pytest.mark.slow  # two spawned processes: ~25 s of CPU, over a minute on a loaded 2-core machine
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_ddp_validation_metrics_are_the_mean_over_both_ranks_volumes(tiny_manifest, tmp_path):
    torch.manual_seed(0)
    val = ["shape003", "shape004"]
    dm = tiny_datamodule(tiny_manifest, val_subjects=val, train_subjects=["shape001", "shape002"])
    model = UQSM(width=4, depth=2, loss={"dc": "weighted", "lambda_tv": 1e-4}, log_images=False)
    # validation after the last step, so the weights that come back are the weights that were scored
    trainer = tiny_trainer(tmp_path, max_steps=2, val_every=2, logger=False, devices=2, strategy="ddp_spawn")
    trainer.fit(model, dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged["val/n_volumes"] == 2.0  # each volume scored once, on one rank
    model.eval()
    per_volume = []
    dm1 = tiny_datamodule(tiny_manifest, val_subjects=val, train_subjects=["shape001", "shape002"])
    for batch in dm1.val_dataloader():
        with torch.no_grad():
            chi = model.predict_batch(batch)["chi"][0, 0].numpy()
        per_volume.append(compute_all(chi, batch.chi[0, 0].numpy(), batch.mask[0, 0].numpy() > 0.5))
    assert len(per_volume) == 2
    for k in ("nrmse", "psnr", "hfen", "ssim", "corr"):
        mean = float(np.mean([v[k] for v in per_volume]))
        assert logged[f"val/{k}"] == pytest.approx(mean, rel=2e-3, abs=1e-4), k
    # the two volumes score differently, so rank 0's volume alone would not pass
    assert abs(per_volume[0]["psnr"] - per_volume[1]["psnr"]) > 0.1
