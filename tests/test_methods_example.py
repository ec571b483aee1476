"""The new-method example of docs/methods.md is a working method: the block there, as written, trains one
``fast_dev_run`` step (its weights move, its loss is the linear data consistency) and predicts a volume
(masked chi on the scan's grid, closer to the field's chi than an untrained copy's)."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import torch
from _methods import VAL_SUBJECT, tiny_datamodule, tiny_dataset

from qsmlab.data.manifest import load_manifest
from qsmlab.methods import QSMMethod
from qsmlab.methods.predict import predict_volume

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def _example_class() -> type:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/methods.md should hold one python block: the example method"
    code = [ln for ln in blocks[0].splitlines() if ln.strip() and not ln.lstrip().startswith(("from ", "import "))]
    assert len(code) <= 16, f"the example should stay a dozen lines of method, it has {len(code)}"
    namespace: dict = {"__name__": "methods_doc_example"}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)  # noqa: S102 (our own documentation)
    return namespace["PlainUNetQSM"]


def test_documented_example_method_trains_one_step_and_predicts(tmp_path):
    cls = _example_class()
    assert issubclass(cls, QSMMethod)
    torch.manual_seed(0)
    model = cls(width=4, depth=2, log_images=False)
    before = copy.deepcopy(model.net.state_dict())
    manifest = tiny_dataset(tmp_path / "data")
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, tiny_datamodule(manifest))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert np.isfinite(metrics["train/loss"]) and metrics["train/loss"] == metrics["train/loss_dc"]
    assert np.isfinite(metrics["val/nrmse"]) and np.isfinite(model.scale)
    moved = [k for k, v in model.net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved, "one optimiser step changed no weight"

    row = next(r for r in load_manifest(manifest).rows if r.subject == VAL_SUBJECT)
    load = lambda p: np.asarray(nib.load(str(p)).dataobj, np.float32)  # noqa: E731
    field, mask = load(row.field), load(row.mask) > 0.5
    chi = predict_volume(model, field, mask, row.voxel_size, row.b0_dir)
    assert chi.shape == field.shape and np.all(np.isfinite(chi)) and np.all(chi[~mask] == 0)
    assert np.abs(chi[mask]).max() > 0
    # the numpy API and the Lightning predict step give the same full-volume chi
    dm = tiny_datamodule(manifest)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        via_step = model.eval().predict_step(batch, 0)["chi"][0, 0].numpy()
    np.testing.assert_allclose(via_step, chi, atol=1e-6)
