"""QSMnet / QSMnet+: supervised losses with the authors' default weights, training, reload, linearity."""

from __future__ import annotations

import warnings

import pytest
import torch
from _methods import tiny_datamodule, tiny_dataset, tiny_trainer

from qsmlab.data.collate import collate_subjects
from qsmlab.data.manifest import load_manifest
from qsmlab.data.subjects import row_to_subject
from qsmlab.errors import QSMInputError
from qsmlab.methods import QSMnet, QSMnetPlus, load_method
from qsmlab.physics import physics_for_batch


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.getbasetemp() / "methods_data")


def test_default_weights_are_the_authors():
    q, p = QSMnet(width=4, depth=2), QSMnetPlus(width=4, depth=2)
    assert q.loss_fn.weights == {"chi": 1.0, "model": 1.0, "grad": 0.1}
    assert p.loss_fn.weights == {"chi": 1.0, "model": 0.5, "grad": 0.1}
    assert q.loss_fn.terms["model"].kind == "linear" and q.loss_fn.terms["model"].norm == "l1"
    assert q.loss_fn.terms["chi"].norm == "l1" and q.loss_fn.terms["grad"].norm == "l1"
    assert q.net.size_multiple == 4 and q.inputs == ("field",)


def test_loss_is_zero_at_the_truth_and_positive_away(tiny_manifest):
    """The three terms vanish for chi = the label on a noise-free pair and grow away from it."""
    rows = load_manifest(tiny_manifest).rows[:2]
    batch = collate_subjects([row_to_subject(r) for r in rows])
    physics = physics_for_batch(batch)
    batch.field = physics.A(batch.chi * batch.mask)  # an exact (chi, field) pair, as the model term assumes
    q = QSMnet(width=4, depth=2)
    total, parts = q.loss_fn({"chi": batch.chi * batch.mask}, batch, physics)
    assert float(total) < 1e-6
    total2, parts2 = q.loss_fn({"chi": 1.2 * batch.chi * batch.mask}, batch, physics)
    assert all(float(parts2[k]) > 1e-5 for k in ("loss_chi", "loss_model", "loss_grad"))


def test_qsmnet_trains_checkpoints_and_reloads(tiny_manifest, tmp_path):
    torch.manual_seed(0)
    m = QSMnet(width=4, depth=2, kernel_size=3, loss={"lambda_grad": 0.2})
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(m, tiny_datamodule(tiny_manifest))
    for k in ("train/loss", "train/loss_chi", "train/loss_model", "train/loss_grad", "val/nrmse", "val/loss"):
        assert k in trainer.callback_metrics, k
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    re = load_method(tmp_path / "q.ckpt", method="qsmnet")
    assert type(re) is QSMnet and float(re.field_scale) == float(m.field_scale)
    assert re.loss_fn.weights == {"chi": 1.0, "model": 1.0, "grad": 0.2}
    assert re.hparams.kernel_size == 3
    with pytest.raises(QSMInputError, match="checkpoint of method 'qsmnet', not 'uqsm'"):
        load_method(tmp_path / "q.ckpt", method="uqsm")


def test_qsmnet_plus_warns_without_linearity_and_not_with_it(tiny_manifest, tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="without the linearity augmentation"):
        tiny_trainer(tmp_path / "a", max_steps=1, logger=False, limit_val_batches=0).fit(
            QSMnetPlus(width=4, depth=2, kernel_size=3), tiny_datamodule(tiny_manifest))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*linearity augmentation.*")
        tiny_trainer(tmp_path / "b", max_steps=1, logger=False, limit_val_batches=0).fit(
            QSMnetPlus(width=4, depth=2, kernel_size=3),
            tiny_datamodule(tiny_manifest, augment={"linearity": {}}))


def test_supervised_training_needs_chi(tiny_manifest):
    rows = load_manifest(tiny_manifest).rows[:1]
    batch = collate_subjects([row_to_subject(r) for r in rows])
    batch.chi = None
    m = QSMnet(width=4, depth=2, field_scale=0.01)
    with pytest.raises(QSMInputError, match="supervised"):
        m.training_step(batch, 0)
