"""uQSM and uQSM-DIP: the ablation as configs, learning on real physics losses, DIP beats TKD, stop rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _methods import VAL_SUBJECT, tiny_datamodule, tiny_dataset, tiny_trainer

from qsmlab.data.collate import collate_subjects
from qsmlab.data.manifest import load_manifest
from qsmlab.data.nifti import load_nifti
from qsmlab.data.subjects import row_phase_scale, row_to_subject
from qsmlab.errors import QSMInputError
from qsmlab.lab.config import load_experiment
from qsmlab.methods import UQSM, UQSMDIP, UQSMLoss, load_method
from qsmlab.metrics import nrmse
from qsmlab.recon import registry


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.getbasetemp() / "methods_data")


def _row(manifest, subject):
    return next(r for r in load_manifest(manifest).rows if r.subject == subject)


def _volume(manifest, subject):
    r = _row(manifest, subject)
    return r, {k: load_nifti(getattr(r, k)).data for k in ("field", "mask", "chi", "magnitude")}


@pytest.mark.parametrize("exp, kind, tv", [("uqsm", "nonlinear", 0.0), ("uqsm_tv", "nonlinear", 2.6e-3),
                                            ("uqsm_ldi_tv", "linear", 2.6e-4), ("uqsm_wldi_tv", "weighted", 2.6e-4)])
def test_the_ablation_is_four_configs(exp, kind, tv, tiny_manifest, monkeypatch):
    """The paper's ablation rows differ only in YAML: data-consistency kind and TV weight (the quick profile's:
    the sweep's 2.6e-3 on realistic heads, 1/10 of it for the linear data terms)."""
    from lightning.pytorch.cli import LightningCLI

    from qsmlab.data.datamodule import QSMDataModule
    from qsmlab.methods import QSMMethod

    monkeypatch.setattr("sys.argv", ["qsmlab"])
    cfg = load_experiment(exp, "quick", overrides={"data.manifest": str(tiny_manifest),
                                                   "data.val_subjects": [VAL_SUBJECT], "data.patch_size": 16})
    cfg["trainer"].update(logger=False, callbacks=None, enable_checkpointing=False)
    cli = LightningCLI(QSMMethod, QSMDataModule, subclass_mode_model=True, args=cfg, run=False,
                       save_config_callback=None)
    m = cli.model
    assert type(m) is UQSM and m.loss_fn.terms["dc"].kind == kind
    assert m.loss_fn.weights["tv"] == pytest.approx(tv) and m.loss_fn.weights["dc"] == 1.0
    assert m.loss_fn.terms["dc"].weighted == (kind != "linear")
    assert cli.trainer.max_steps == 320 and m.hparams.prior == "tkd" and m.hparams.voxel_resampling == "never"
    assert cfg["trainer"]["precision"] == "bf16-mixed"  # the quick profile's bf16 steps (session 23)
    assert cfg["model"]["init_args"]["loss"]["support"] == "free" and m.hparams.lr == pytest.approx(3e-3)
    assert not cli.trainer._accelerator_connector.use_distributed_sampler


def test_free_support_lets_the_loss_see_chi_outside_the_mask():
    """support free: the training loss sees the network's unmasked output (chi outside the mask may explain
    the masked field) and TV over the whole patch; the default masks as at inference; a bad value is one line."""
    out = {"chi": torch.ones(1, 1, 8, 8, 8)}
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., 2:6, 2:6, 2:6] = 1
    free, masked = UQSM(depth=2, width=4, loss={"support": "free"}), UQSM(depth=2, width=4)
    assert torch.equal(free.training_outputs(out, mask)["chi"], out["chi"])
    assert torch.equal(masked.training_outputs(out, mask)["chi"], mask)
    assert free.loss_fn.terms["tv"].support == "grid" and masked.loss_fn.terms["tv"].support == "mask"
    with pytest.raises(QSMInputError, match="model.loss.support: expected 'mask' or 'free'"):
        UQSM(depth=2, width=4, loss={"support": "outside"})


def test_dc_weighted_false_drops_the_magnitude_weight():
    """loss.dc_weighted: None keeps the kind's weighting, False gives the unweighted data term (equal to the
    weighted one on a uniform magnitude, different on a varying one); a non-boolean value is one line."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 1, 8, 8, 8)
    batch = {"field": 0.02 * torch.randn(1, 1, 8, 8, 8, generator=g), "mask": mask, "phase_scale": torch.tensor([3.2]),
             "magnitude": torch.rand(1, 1, 8, 8, 8, generator=g) + 0.2,
             "voxel_size": torch.tensor([[1.0, 1.0, 1.0]]), "b0_dir": torch.tensor([[0.0, 0.0, 1.0]])}
    pred = {"chi": 0.05 * torch.randn(1, 1, 8, 8, 8, generator=g)}
    from qsmlab.physics import physics_for_batch

    physics = physics_for_batch(batch)
    default, unweighted = UQSM(depth=2, width=4), UQSM(depth=2, width=4, loss={"dc_weighted": False})
    assert default.loss_fn.terms["dc"].weighted and not unweighted.loss_fn.terms["dc"].weighted
    flat = {**batch, "magnitude": torch.full_like(batch["magnitude"], 0.7)}
    dc = {n: m.loss_fn.terms["dc"] for n, m in (("w", default), ("u", unweighted))}
    torch.testing.assert_close(dc["w"](pred, flat, physics), dc["u"](pred, flat, physics))
    assert abs(float(dc["w"](pred, batch, physics) - dc["u"](pred, batch, physics))) > 1e-4
    with pytest.raises(QSMInputError, match="model.loss.dc_weighted"):
        UQSM(depth=2, width=4, loss={"dc_weighted": "no"})


def test_uqsm_learns_from_physics_alone(tiny_manifest):
    """Twenty steps on one batch drive the self-supervised loss down (gradients reach the network through
    scaling, padding, masking and the dipole operator), with no chi in the batch."""
    torch.manual_seed(0)
    rows = load_manifest(tiny_manifest).rows[:2]
    batch = collate_subjects([row_to_subject(r) for r in rows])
    batch.chi = None
    m = UQSM(width=4, depth=2, loss=UQSMLoss(lambda_tv=1e-4), scheduler="none")
    m.set_statistics(0.01, (0, 0, 1), (2, 2, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        from qsmlab.physics import physics_for_batch

        pred = m.mask_outputs(m.infer_images(m.batch_images(batch), windows=False), batch.mask)
        total, parts = m.loss_fn(pred, batch, physics_for_batch(batch))
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(parts["loss_dc"].detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_uqsm_fit_checkpoint_reload(tiny_manifest, tmp_path):
    torch.manual_seed(1)
    m = UQSM(width=4, depth=2, loss={"dc": "weighted", "lambda_tv": 1e-5})
    trainer = tiny_trainer(tmp_path, max_steps=2, logger=False)
    trainer.fit(m, tiny_datamodule(tiny_manifest))
    trainer.save_checkpoint(tmp_path / "u.ckpt")
    re = load_method(tmp_path / "u.ckpt", method="uqsm")
    assert float(re.field_scale) == float(m.field_scale) and re.loss_fn.terms["dc"].kind == "weighted"
    assert re.loss_fn.lambda_tv == pytest.approx(1e-5)


def test_dip_beats_tkd_on_a_simulated_volume(tiny_manifest):
    """uQSM-DIP (random init, no training data) against thresholded k-space division, same volume."""
    r, v = _volume(tiny_manifest, VAL_SUBJECT)
    mask = v["mask"] > 0.5
    dip = UQSMDIP(width=4, depth=2, lr=1e-2, iterations=60, loss=UQSMLoss(dc="nonlinear", lambda_tv=2e-4))
    chi = dip.fit_volume(v["field"], mask, magnitude=v["magnitude"], voxel_size=r.voxel_size, b0_dir=r.b0_dir,
                         phase_scale=row_phase_scale(r))
    tkd = registry.get("inversion", "tkd")(v["field"], mask, voxel_size=r.voxel_size, b0_dir=r.b0_dir, quiet=True)
    e_dip, e_tkd = nrmse(chi, v["chi"], mask), nrmse(tkd, v["chi"], mask)
    assert np.all(chi[~mask] == 0) and dip.last_fit["iterations"] == 60
    assert e_dip < 0.85 * e_tkd, (e_dip, e_tkd)


def test_dip_stop_rules_and_reproducibility(tiny_manifest):
    r, v = _volume(tiny_manifest, VAL_SUBJECT)
    mask = v["mask"] > 0.5
    kw = dict(voxel_size=r.voxel_size, b0_dir=r.b0_dir, magnitude=v["magnitude"])
    loose = UQSMDIP(width=4, depth=2, iterations=50, noise_level=10.0, loss={"dc": "weighted"})
    loose.fit_volume(v["field"], mask, **kw)
    assert loose.last_fit["stopped_by"] == "noise_level" and loose.last_fit["iterations"] == 1
    flat = UQSMDIP(width=4, depth=2, iterations=50, tol=0.99, loss={"dc": "weighted"})
    flat.fit_volume(v["field"], mask, **kw)
    assert flat.last_fit["stopped_by"] == "tol" and flat.last_fit["iterations"] == 11
    a = UQSMDIP(width=4, depth=2, iterations=3, seed=5, loss={"dc": "weighted"}).fit_volume(v["field"], mask, **kw)
    b = UQSMDIP(width=4, depth=2, iterations=3, seed=5, loss={"dc": "weighted"}).fit_volume(v["field"], mask, **kw)
    assert np.allclose(a, b)
    with pytest.raises(QSMInputError, match="needs phase_scale"):
        UQSMDIP(width=4, depth=2, loss={"dc": "nonlinear"}).fit_volume(v["field"], mask, **kw)


def test_dip_free_support_fits_with_the_unmasked_output_and_returns_a_masked_map(tiny_manifest):
    """qsmlab dip --support free: the fit's loss sees the network's output outside the mask (the same seed
    then ends elsewhere than the masked fit), the result is masked all the same."""
    r, v = _volume(tiny_manifest, VAL_SUBJECT)
    mask = v["mask"] > 0.5
    kw = dict(voxel_size=r.voxel_size, b0_dir=r.b0_dir, magnitude=v["magnitude"])
    a = UQSMDIP(width=4, depth=2, iterations=5, seed=3, loss={"dc": "weighted"}).fit_volume(v["field"], mask, **kw)
    b = UQSMDIP(width=4, depth=2, iterations=5, seed=3, loss={"dc": "weighted", "support": "free"}).fit_volume(
        v["field"], mask, **kw)
    assert np.all(b[~mask] == 0) and np.all(a[~mask] == 0)
    assert np.abs(a - b)[mask].max() > 1e-4 * np.abs(a[mask]).max()
    # the learning curve: the snapshot after 2 of 5 iterations is the 2-iteration fit (same seed)
    two = UQSMDIP(width=4, depth=2, iterations=2, seed=3, loss={"dc": "weighted", "support": "free"})
    c = two.fit_volume(v["field"], mask, **kw)
    five = UQSMDIP(width=4, depth=2, iterations=5, seed=3, loss={"dc": "weighted", "support": "free"})
    five.fit_volume(v["field"], mask, snapshots=(2, 9), **kw)
    assert set(five.last_fit["snapshots"]) == {2} and np.allclose(five.last_fit["snapshots"][2], c, atol=1e-6)


def test_dip_lightning_path_stops_after_its_iterations(tiny_manifest, tmp_path):
    """The sweepable path: a one-volume datamodule whose patch is the whole volume."""
    torch.manual_seed(0)
    dm = tiny_datamodule(tiny_manifest, train_subjects=[VAL_SUBJECT], val_subjects=[VAL_SUBJECT],
                         patch_size=24, samples_per_volume=1, queue_length=1, batch_size=1)
    m = UQSMDIP(width=4, depth=2, iterations=3, loss={"dc": "nonlinear", "lambda_tv": 1e-4})
    trainer = tiny_trainer(tmp_path, max_steps=10, val_every=10, logger=False)
    trainer.fit(m, dm)
    assert trainer.global_step == 3 and m.last_fit["stopped_by"] == "iterations"


def test_dip_with_a_tkd_prior_starts_every_fit_at_tkd(tiny_manifest):
    """``prior="tkd"`` (``qsmlab dip --prior tkd``): each fit re-initialises the network with its output layer
    at zero, so the first map is TKD of the field (masked), and the fit moves it from there."""
    from qsmlab.physics import DipoleOperator

    r, v = _volume(tiny_manifest, VAL_SUBJECT)
    mask = v["mask"] > 0.5
    kw = dict(voxel_size=r.voxel_size, b0_dir=r.b0_dir, magnitude=v["magnitude"])
    dip = UQSMDIP(width=4, depth=2, iterations=1, lr=1e-9, prior="tkd", loss={"dc": "weighted"})
    assert dip.net.in_channels == 3
    for _ in range(2):  # a second fit starts at TKD again (reset_network re-zeroes the head)
        chi = dip.fit_volume(v["field"], mask, **kw)
        assert float(dip.net.head.weight.detach().abs().max()) < 1e-6
    op = DipoleOperator(r.voxel_size, r.b0_dir, pad_factor=2.0)
    tkd = op.A_dagger(torch.from_numpy(v["field"] * mask).double(), 0.19).numpy() * mask
    np.testing.assert_allclose(chi, tkd, atol=1e-4 * np.abs(tkd).max())
    moved = UQSMDIP(width=4, depth=2, iterations=5, lr=1e-2, prior="tkd", loss={"dc": "weighted"})
    assert np.abs(moved.fit_volume(v["field"], mask, **kw) - tkd)[mask].max() > 1e-3 * np.abs(tkd).max()
    dip.reset_network()
    assert float(dip.net.head.weight.detach().abs().max()) == 0.0
