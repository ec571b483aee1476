"""The shared method base: geometry frames (physics), padding, normalisation statistics, full-volume
evaluation and its logged metrics, hyper-parameters through jsonargparse/LightningCLI and checkpoints."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from _methods import VAL_SUBJECT, tiny_datamodule, tiny_dataset, tiny_trainer
from scipy import ndimage

from qsmlab.methods import UQSM, UQSMLoss, load_method
from qsmlab.methods.inference import (
    b0_angle_deg,
    crop,
    make_frame,
    normalise_magnitude,
    pad_to_multiple,
    rotation_onto,
)
from qsmlab.methods.statistics import common_b0_dir, robust_std
from qsmlab.metrics import compute_all
from qsmlab.physics import DipoleOperator, physics_for_batch, tilted_b0_dir


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.getbasetemp() / "methods_data")


def _blob_chi(shape, seed=0):
    rng = np.random.default_rng(seed)
    chi = ndimage.gaussian_filter(rng.normal(size=shape), 2.5)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = (g[0] / 0.7) ** 2 + (g[1] / 0.75) ** 2 + (g[2] / 0.65) ** 2 <= 1
    return (0.1 * chi / np.abs(chi).max() * mask).astype(np.float64), mask


# -- padding and geometry ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(17, 20, 9), (16, 16, 16), (31, 8, 33)])
def test_pad_to_multiple_round_trip(shape):
    x = torch.randn(1, 2, *shape)
    for mode in ("constant", "replicate"):
        xp, pads = pad_to_multiple(x, 8, mode)
        assert all(n % 8 == 0 and n >= m for n, m in zip(xp.shape[-3:], shape))
        assert all(abs(a - b) <= 1 for a, b in pads)  # centred
        assert torch.equal(crop(xp, pads), x)


def test_rotation_onto_maps_b0_to_training_axis():
    t = np.array([0.0, 0.0, 1.0])
    for b in (tilted_b0_dir(30), tilted_b0_dir(75, axis=(1, 1, 0)), -tilted_b0_dir(10)):
        R = rotation_onto(b, t)
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(R), 1.0)
        assert abs(abs(R @ b @ t) - 1.0) < 1e-12
        assert b0_angle_deg(b, t) == pytest.approx(math.degrees(math.acos(abs(b @ t))))


def test_frame_rotation_is_the_physics_of_a_rotated_head():
    """The field of a head in an oblique B0, rotated into the frame, equals the axial-B0 field of the rotated
    head: the dipole model is rotation-covariant, so the network sees a field it was trained on."""
    shape, vs = (40, 40, 40), (1.0, 1.0, 1.0)
    chi, mask = _blob_chi(shape)
    b = tilted_b0_dir(30)
    field = DipoleOperator(vs, b).A(chi)
    frame = make_frame(shape, vs, b, train_b0_dir=(0, 0, 1), train_voxel_size=vs)
    assert frame is not None and frame.rotated and frame.angle_deg == pytest.approx(30, abs=1e-6)
    rot = frame.forward({"field": field, "chi": chi, "mask": mask})
    expected = DipoleOperator(frame.out_voxel_size, (0, 0, 1)).A(rot["chi"])
    inner = ndimage.binary_erosion(rot["mask"] > 0.5, iterations=3)
    err = np.linalg.norm((rot["field"] - expected)[inner]) / np.linalg.norm(expected[inner])
    assert err < 0.1, err
    # and the same comparison against the *unrotated* B0 is far off (the test can fail)
    wrong = DipoleOperator(frame.out_voxel_size, b).A(rot["chi"])
    assert np.linalg.norm((rot["field"] - wrong)[inner]) / np.linalg.norm(wrong[inner]) > 3 * err
    back = frame.backward(rot["chi"])
    core = ndimage.binary_erosion(mask, iterations=3)
    assert np.linalg.norm((back - chi)[core]) / np.linalg.norm(chi[core]) < 0.05


def test_frame_round_trip_keeps_detail_with_cubic_splines():
    """Rotating into the frame and back (B0 tilted 20 deg, as inference does around the network) with the
    default cubic splines keeps a 1 mm texture that linear interpolation, which smooths both ways, loses."""
    rng = np.random.default_rng(0)
    shape = (48, 48, 48)
    x = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)  # detail down to ~2 voxels, like a 1 mm map
    frame = make_frame(shape, (1.0, 1.0, 1.0), tilted_b0_dir(20), (0, 0, 1), (1.0, 1.0, 1.0))
    core = np.zeros(shape, bool)
    core[12:-12, 12:-12, 12:-12] = True
    err = {}
    for order in (1, 3):
        back = frame.backward(frame.forward({"chi": x}, order=order)["chi"], order=order)
        assert back.dtype == np.float32 and back.shape == shape
        err[order] = np.linalg.norm((back - x)[core]) / np.linalg.norm(x[core])
    assert err[3] < 0.5 * err[1] and err[3] < 0.1, err
    assert frame.forward({"mask": x > 0})["mask"].dtype == np.float32  # masks: nearest, still 0/1
    assert set(np.unique(frame.forward({"mask": (x > 0).astype(np.float32)})["mask"])) <= {0.0, 1.0}


def test_frame_with_the_mask_keeps_the_input_extent_and_every_mask_voxel():
    """With the scan's mask the rotated frame is the input's own size where the rotated head fits in it (an
    instance-normalised network sees the share of empty grid it sees on an axial scan), and grows only as far as a
    head reaching the grid's corners needs; every mask voxel survives the round trip either way."""
    shape, vs, b = (48, 48, 40), (1.0, 1.0, 1.0), tilted_b0_dir(20)
    c = (np.asarray(shape) - 1) / 2
    r = np.sqrt(sum(((np.indices(shape)[i] - c[i]) / (0.33 * shape[i])) ** 2 for i in range(3)))
    head = r < 1.0  # an ellipsoid, 8-10 voxels from every face
    box = make_frame(shape, vs, b, (0, 0, 1), vs)
    fitted = make_frame(shape, vs, b, (0, 0, 1), vs, mask=head)
    assert fitted.out_shape == shape and np.prod(box.out_shape) > 1.15 * np.prod(shape), (box.out_shape, fitted.out_shape)
    full = np.zeros(shape, bool)
    full[1:-1, 1:-1, 1:-1] = True  # a mask up to the faces: its rotated corners need the whole rotated box
    grown = make_frame(shape, vs, b, (0, 0, 1), vs, mask=full)
    assert all(g > n for g, n in zip(grown.out_shape, shape) if g != n) and grown.out_shape != shape
    assert all(g <= o for g, o in zip(grown.out_shape, box.out_shape))
    for m, f in ((head, fitted), (full, grown)):
        back = f.backward(f.forward({"mask": m.astype(np.float32)})["mask"], order=0) > 0.5
        inner = ndimage.binary_erosion(m, iterations=1)  # nearest neighbour both ways may move the surface by a voxel
        assert back[inner].all()


def test_frame_only_when_geometry_differs():
    shape = (20, 22, 18)
    assert make_frame(shape, (1, 1, 1), tilted_b0_dir(0.5), (0, 0, 1), (1, 1, 1)) is None
    assert make_frame(shape, (1.2, 1, 1), (0, 0, -1), (0, 0, 1), (1, 1, 1)) is None  # 20 %, sign of B0
    assert make_frame(shape, (1, 1, 1), tilted_b0_dir(20), (np.nan,) * 3, (1, 1, 1)) is None  # mixed training
    f = make_frame(shape, (1.5, 1.5, 1.5), (0, 0, 1), (0, 0, 1), (1, 1, 1))
    assert f.resampled and not f.rotated
    assert f.out_shape == tuple(int(np.ceil((n - 1) * 1.5)) + 1 for n in shape)


def test_robust_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.02, 200_000)
    assert robust_std(x) == pytest.approx(0.02, rel=0.02)
    x[:2000] = 5.0  # 1 % veins/haemorrhage: the MAD hardly moves, the std would triple
    assert robust_std(x) == pytest.approx(0.02, rel=0.05)
    assert np.allclose(common_b0_dir([(0, 0, 1), (0, 0, -1), (0, 1e-3, 1)]), (0, 0, 1), atol=1e-3)
    assert np.all(np.isnan(common_b0_dir([(0, 0, 1), tilted_b0_dir(15)])))


def test_normalise_magnitude_is_per_sample_and_robust():
    mag = torch.rand(2, 1, 10, 10, 10) * torch.tensor([1.0, 50.0]).view(2, 1, 1, 1, 1)
    mag[1, 0, 0, 0, 0] = 1e4  # one bright voxel does not set the scale
    n = normalise_magnitude(mag)
    q = torch.quantile(n.flatten(1), 0.5, dim=1)
    assert torch.allclose(q, torch.full((2,), 0.5), atol=0.08)


# -- normalisation, evaluation and checkpoints -----------------------------------------------------------

def test_scale_equivariance_of_the_normalisation():
    """field_scale enters as field / s and chi * s: scaling the field and the scale by k scales chi by k."""
    torch.manual_seed(0)
    a = UQSM(width=4, depth=2, field_scale=0.01).eval()
    b = UQSM(width=4, depth=2, field_scale=0.03).eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "field_scale"}, strict=False)
    f = torch.randn(1, 1, 16, 16, 16) * 0.01
    m = torch.ones_like(f)
    with torch.no_grad():
        ya, yb = a({"field": f, "mask": m})["chi"], b({"field": 3 * f, "mask": m})["chi"]
    assert torch.allclose(yb, 3 * ya, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(ya, torch.zeros_like(ya))


def test_fit_logs_full_volume_metrics_and_checkpoint_keeps_normalisation(tiny_manifest, tmp_path):
    torch.manual_seed(0)
    dm = tiny_datamodule(tiny_manifest)
    model = UQSM(width=4, depth=2, loss=UQSMLoss(lambda_tv=1e-3), lr=3e-3)
    trainer = tiny_trainer(tmp_path, max_steps=4)
    trainer.fit(model, dm)
    # statistics from the datamodule's training rows, not from a batch
    assert 1e-4 < float(model.field_scale) < 1.0
    assert torch.allclose(model.train_b0_dir, torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(model.train_voxel_size, torch.tensor([2.0, 2.0, 2.0]))
    logged = trainer.callback_metrics
    for k in ("train/loss", "train/loss_dc", "train/loss_tv", "val/nrmse", "val/psnr", "val/hfen", "val/ssim",
              "val/nrmse_demeaned", "val/dc", "val/loss"):
        assert k in logged and torch.isfinite(logged[k]), k
    # the logged validation metrics are the foundation's metrics of the full validation volume
    batch = next(iter(dm.val_dataloader()))
    model.eval()
    with torch.no_grad():
        chi = model.predict_batch(batch)["chi"][0, 0].numpy()
    ref = batch.chi[0, 0].numpy()
    mask = batch.mask[0, 0].numpy() > 0.5
    assert chi.shape == ref.shape and np.all(chi[~mask] == 0)
    expected = compute_all(chi, ref, mask)
    for k in ("nrmse", "psnr", "hfen", "ssim"):
        assert float(logged[f"val/{k}"]) == pytest.approx(expected[k], rel=1e-3, abs=1e-3), k
    # slice images went to the CSV logger's folder, once for the one validation
    pngs = list((tmp_path / "logs").rglob("images/*.png"))
    assert len(pngs) == 1
    # checkpoint: hyper-parameters plain, normalisation restored, identical predictions
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert ck["qsmlab"]["method"] == "uqsm" and ck["hyper_parameters"]["loss"]["lambda_tv"] == 1e-3
    re = load_method(path)
    assert isinstance(re, UQSM) and not re.training
    assert float(re.field_scale) == float(model.field_scale)
    assert re.loss_fn.lambda_tv == pytest.approx(1e-3)
    with torch.no_grad():
        assert np.allclose(re.predict_batch(batch)["chi"][0, 0].numpy(), chi, atol=1e-7)


def test_loss_weights_by_dotted_key_jsonargparse_and_lightningcli(tiny_manifest, tmp_path, monkeypatch, capsys):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.cli import LightningCLI

    from qsmlab.data.datamodule import QSMDataModule
    from qsmlab.methods import QSMMethod

    monkeypatch.setattr("sys.argv", ["qsmlab"])
    p = ArgumentParser()
    p.add_class_arguments(UQSM, "model")
    cfg = p.parse_args(["--model.loss.lambda_tv", "3e-3", "--model.loss.dc", "weighted", "--model.width", "4",
                        "--model.depth", "2", "--model.lr", "2e-3"])
    m = p.instantiate(cfg).model
    assert m.loss_fn.lambda_tv == pytest.approx(3e-3) and m.loss_fn.terms["dc"].kind == "weighted"
    assert m.hparams.lr == 2e-3 and m.hparams.loss["lambda_tv"] == 3e-3
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "use_distributed_sampler": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "qsmlab.methods.UQSM",
                  "init_args": {"width": 4, "depth": 2, "loss": {"lambda_tv": 5e-4, "dc": "linear"}}},
        "data": {"manifest": str(tiny_manifest), "patch_size": 16, "val_subjects": [VAL_SUBJECT]},
    }
    cli = LightningCLI(QSMMethod, QSMDataModule, subclass_mode_model=True, args=config, run=False,
                       save_config_callback=None)
    assert isinstance(cli.model, UQSM) and cli.model.loss_fn.lambda_tv == pytest.approx(5e-4)
    with pytest.raises(SystemExit):  # a key no model accepts: jsonargparse names it
        bad = {**config, "model": {"class_path": "qsmlab.methods.UQSM", "init_args": {"lamda_tv": 1.0}}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            LightningCLI(QSMMethod, QSMDataModule, subclass_mode_model=True, args=bad, run=False,
                         save_config_callback=None)
    assert "'lamda_tv' is not accepted" in capsys.readouterr().err


def test_sliding_windows_for_large_volumes():
    torch.manual_seed(0)
    m = UQSM(width=4, depth=2, field_scale=0.01, max_inference_voxels=16**3, sw_roi_size=16).eval()
    chi, mask = _blob_chi((28, 36, 20), seed=3)
    field = DipoleOperator().A(chi) * mask
    images = {"field": torch.from_numpy(field).float()[None, None], "mask": torch.from_numpy(mask).float()[None, None]}
    assert m.needs_windows((28, 36, 20))
    with torch.no_grad():
        tiled = m(images)["chi"]
        m.options = dataclasses.replace(m.options, max_inference_voxels=10**9)
        whole = m(images)["chi"]
    assert tiled.shape == whole.shape == (1, 1, 28, 36, 20)
    # Gaussian-blended windows approximate the whole-volume pass (BN in eval mode, receptive field 16^3)
    c = np.corrcoef(tiled.flatten().numpy(), whole.flatten().numpy())[0, 1]
    assert c > 0.9, c


def test_oblique_volume_is_reoriented_with_a_warning():
    torch.manual_seed(0)
    m = UQSM(width=4, depth=2, field_scale=0.01).eval()
    m.set_statistics(0.01, (0, 0, 1), (1, 1, 1))
    chi, mask = _blob_chi((24, 24, 24), seed=1)
    b = tilted_b0_dir(25)
    field = DipoleOperator((1, 1, 1), b).A(chi) * mask
    with pytest.warns(UserWarning, match="25.0 deg from the training direction"):
        out = m.infer_arrays({"field": field, "mask": mask.astype(np.float32)}, (1, 1, 1), b)["chi"]
    assert out.shape == (24, 24, 24) and np.all(out[~mask] == 0) and np.any(out[mask] != 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # axial: no frame, no warning
        m.infer_arrays({"field": field, "mask": mask.astype(np.float32)}, (1, 1, 1), (0, 0, 1))


@pytest.mark.parametrize("kind", ["cosine", "step", "exponential", "none"])
def test_schedulers(kind):
    m = UQSM(width=4, depth=2, scheduler=kind, scheduler_step_size=10, scheduler_gamma=0.5)
    out = m.configure_optimizers()
    opt = out if isinstance(out, torch.optim.Optimizer) else out["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    if kind != "none":
        assert out["lr_scheduler"]["interval"] == "step"


def test_bad_arguments_are_one_line_errors():
    from qsmlab.errors import QSMInputError

    with pytest.raises(QSMInputError, match="model.scheduler"):
        UQSM(scheduler="linear")
    with pytest.raises(QSMInputError, match="UQSMLoss: unknown key"):
        UQSM(loss={"lambda_tvv": 1.0})
    with pytest.raises(QSMInputError, match="model.loss.dc"):
        UQSM(loss={"dc": "quadratic"})
    with pytest.raises(QSMInputError, match="field_scale is not set"):
        UQSM(width=4, depth=2)({"field": torch.zeros(1, 1, 8, 8, 8), "mask": torch.ones(1, 1, 8, 8, 8)})


def test_patch_margin_limits_the_training_loss_to_the_patch_interior(tiny_manifest):
    import dataclasses

    from qsmlab.data.collate import collate_subjects
    from qsmlab.data.manifest import load_manifest
    from qsmlab.data.subjects import row_to_subject

    batch = collate_subjects([row_to_subject(r) for r in load_manifest(tiny_manifest).rows[:2]])
    batch = dataclasses.replace(batch, mask=torch.ones_like(batch.mask))  # a patch inside the brain
    m = UQSM(width=4, depth=2, patch_margin=3, field_scale=0.01)
    lb = m.loss_batch(batch)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert torch.equal(lb.mask[inner], batch.mask[inner]) and lb.mask.sum() < batch.mask.sum()
    shell = lb.mask.clone()
    shell[inner] = 0
    assert shell.sum() == 0 and batch.mask[..., :3, :, :].sum() > 0  # the input mask itself is untouched
    assert UQSM(width=4, depth=2).loss_batch(batch) is batch
    from qsmlab.errors import QSMInputError

    with pytest.raises(QSMInputError, match="patch_margin=12"):
        UQSM(width=4, depth=2, patch_margin=12).loss_batch(batch)


def test_outputs_are_float32_under_bf16_autocast():
    """Losses subtract ~0.05 ppm fields to get ~1e-3 ppm residuals: that must not happen in bfloat16."""
    m = UQSM(width=4, depth=2, field_scale=0.01)
    images = {"field": torch.randn(1, 1, 8, 8, 8) * 0.01, "mask": torch.ones(1, 1, 8, 8, 8)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.infer_images(images)
    assert out["chi"].dtype == torch.float32


# -- the TKD prior (model.prior: tkd) ---------------------------------------------------------------------

def test_untrained_network_with_tkd_prior_is_tkd_and_geometry_follows_the_input():
    from qsmlab.recon.inversion import tkd

    torch.manual_seed(0)
    chi, mask = _blob_chi((24, 20, 16), seed=4)
    b, vs = tilted_b0_dir(20), (1.0, 1.2, 1.5)
    field = DipoleOperator(vs, b).A(chi) * mask
    m = UQSM(width=4, depth=2, field_scale=0.01, prior="tkd").eval()
    m.set_statistics(0.01, b, vs)
    ref = tkd(field, mask, voxel_size=vs, b0_dir=b, pad_factor=2.0)
    out = m.infer_arrays({"field": field, "mask": mask.astype(np.float32)}, vs, b)["chi"]
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())
    # the prior uses the volume's own B0, not a fixed one: a different B0 gives a different (correct) TKD
    other = tilted_b0_dir(0)
    f2 = DipoleOperator(vs, other).A(chi) * mask
    with pytest.warns(UserWarning, match="from the training direction"):
        out2 = m.infer_arrays({"field": f2, "mask": mask.astype(np.float32)}, vs, other)["chi"]
    ref2 = tkd(f2, mask, voxel_size=vs, b0_dir=other, pad_factor=2.0)
    wrong = tkd(f2, mask, voxel_size=vs, b0_dir=b, pad_factor=2.0)  # TKD under the training B0: not this scan's
    # resampled there and back (linear interpolation, 20 deg), yet far closer to this scan's TKD
    assert compute_all(out2, ref2, mask)["nrmse"] < 0.75 * compute_all(wrong, ref2, mask)["nrmse"]


def test_tkd_prior_trains_checkpoints_and_reloads(tiny_manifest, tmp_path):
    dm = tiny_datamodule(tiny_manifest)
    m = UQSM(width=4, depth=2, prior="tkd", lr=3e-3, loss=UQSMLoss(lambda_tv=1e-4))
    assert m.net.in_channels == 3 and float(m.net.head.weight.abs().sum()) == 0.0
    trainer = tiny_trainer(tmp_path, max_steps=3)
    trainer.fit(m, datamodule=dm)
    assert float(m.net.head.weight.abs().sum()) > 0  # the output layer left zero and learned
    ck = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ck)
    back = load_method(ck)
    assert back.hparams.prior == "tkd" and back.net.in_channels == 3


def test_tkd_prior_needs_a_local_field_input():
    from qsmlab.errors import QSMInputError
    from qsmlab.methods import NeXtQSM

    with pytest.raises(QSMInputError, match="model.prior"):
        NeXtQSM(prior="tkd")
    with pytest.raises(QSMInputError, match="model.prior"):
        UQSM(prior="tikhonov")


def test_simulated_patch_fields_are_explained_by_the_patch():
    from qsmlab.data.collate import QSMBatch

    chi, mask = _blob_chi((20, 20, 20), seed=5)
    b = tilted_b0_dir(15)
    big = np.pad(chi, 8)  # the patch is cut from a larger head: its measured field has outside sources
    big[2:7, 8:-8, 8:-8] = 0.1  # a source just outside the patch
    full_field = DipoleOperator((1, 1, 1), b).A(big)[8:-8, 8:-8, 8:-8] * mask
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None, None]  # noqa: E731
    batch = QSMBatch(field=t(full_field), mask=t(mask), b0_dir=torch.tensor([b], dtype=torch.float32),
                     voxel_size=torch.ones(1, 3), phase_scale=torch.tensor([float("nan")]), affine=torch.eye(4)[None],
                     chi=t(chi))
    m = UQSM(width=4, depth=2, field_scale=0.01, patch_fields="simulate")
    out = m.training_batch(batch, physics_for_batch(batch))
    own = DipoleOperator((1, 1, 1), b).A(chi) * mask
    np.testing.assert_allclose(out.field[0, 0].numpy(), own, atol=1e-6)
    assert np.linalg.norm((full_field - own)[mask]) > 0.05 * np.linalg.norm(own[mask])  # it did change
    noisy = UQSM(width=4, depth=2, field_scale=0.01, patch_fields="simulate", patch_field_noise=0.01)
    torch.manual_seed(0)
    r = noisy.training_batch(batch, physics_for_batch(batch)).field[0, 0].numpy() - own
    assert np.all(r[~mask] == 0) and 0 < np.std(r[mask]) <= 0.01
    # default: the batch's own field; no chi (in-vivo rows): unchanged, with a warning
    assert UQSM(width=4, depth=2, field_scale=0.01).training_batch(batch, physics_for_batch(batch)) is batch
    invivo = dataclasses.replace(batch, chi=None)
    with pytest.warns(UserWarning, match="no chi"):
        assert m.training_batch(invivo, physics_for_batch(invivo)) is invivo
    with pytest.raises(Exception, match="patch_fields"):
        UQSM(patch_fields="resample")


def test_predict_volume_settings_are_per_call_so_one_cached_model_serves_concurrent_calls():
    """``voxel_resampling`` is an argument of the call, not a setting written onto the model: two threads
    predicting with one model and opposite settings get what each gets alone, and the model is unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    from qsmlab.methods.predict import predict_volume

    torch.manual_seed(0)
    m = UQSM(width=4, depth=2, prior="tkd").eval()
    m.set_statistics(0.01, (0, 0, 1), (2, 2, 2))  # trained at 2 mm; the scan below is 1 mm
    chi, mask = _blob_chi((24, 24, 24), seed=4)
    field = (DipoleOperator().A(chi) * mask).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = {r: predict_volume(m, field, mask, voxel_resampling=r) for r in ("auto", "never")}
        assert np.abs(alone["auto"] - alone["never"]).max() > 1e-4  # the setting matters here
        with ThreadPoolExecutor(4) as pool:
            jobs = [(r, pool.submit(predict_volume, m, field, mask, voxel_resampling=r))
                    for r in ("auto", "never", "never", "auto")]
            for r, job in jobs:
                np.testing.assert_array_equal(job.result(), alone[r])
    assert m.options.voxel_resampling == "auto" and m.hparams["voxel_resampling"] == "auto" and not m.training


@pytest.mark.parametrize("kind", ["cosine", "none"])
def test_warmup_ramps_the_learning_rate_then_hands_over_to_the_scheduler(kind):
    m = UQSM(width=4, depth=2, lr=1e-3, scheduler=kind, scheduler_step_size=12, warmup_steps=4)
    out = m.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs[:5], [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rtol=1e-6)  # linear from lr / 4
    if kind == "cosine":  # then a cosine over the 8 steps left: half-way at step 4 + 4, near 0 at the end
        np.testing.assert_allclose(lrs[8], 5e-4, rtol=1e-6)
        assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.05e-3
    else:
        assert lrs[4:] == [1e-3] * 8
    from qsmlab.errors import QSMInputError

    for bad in (-1, 2.5, True):
        with pytest.raises(QSMInputError, match="model.warmup_steps"):
            UQSM(width=4, depth=2, warmup_steps=bad)


def test_adam_eps_reaches_the_optimiser_and_decides_whether_tiny_gradients_are_normalised():
    """``model.adam_eps``: AdamW's epsilon. With gradients far below it (uQSM's ppm^2 losses: ~1e-9) the first
    step moves a weight by ``lr * g / eps`` (momentum SGD), with an eps far below them by ~``lr`` (Adam)."""
    from qsmlab.errors import QSMInputError

    steps = {}
    for eps in (1e-8, 1e-14):
        torch.manual_seed(0)
        m = UQSM(width=4, depth=2, lr=1e-3, scheduler="none", weight_decay=0.0, adam_eps=eps)
        opt = m.configure_optimizers()
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        assert opt.param_groups[0]["eps"] == eps
        p = next(m.parameters())
        before = p.detach().clone()
        p.grad = torch.full_like(p, 1e-10)
        for q in m.parameters():
            if q is not p:
                q.grad = torch.zeros_like(q)
        opt.step()
        steps[eps] = float((before - p.detach()).abs().max())
    # bias-corrected first step: lr * g / (|g| + eps)
    assert steps[1e-8] == pytest.approx(1e-3 * 1e-10 / (1e-10 + 1e-8), rel=1e-3)
    assert steps[1e-14] == pytest.approx(1e-3, rel=1e-3)
    for bad in (0, -1e-8, 1.0, float("nan"), True):
        with pytest.raises(QSMInputError, match="model.adam_eps"):
            UQSM(width=4, depth=2, adam_eps=bad)
