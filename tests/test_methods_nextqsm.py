"""NeXtQSM method: end-to-end training on hybrid data (total field -> local field -> chi), checkpoint
round trip with its normalisation, ``qsmlab predict`` (from the total or a local field), the background
net alone, and the variational network's physics (each scan's own B0 and voxel size)."""

from __future__ import annotations

import warnings

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

from qsmlab.cli import main as cli_main
from qsmlab.data.collate import QSMBatch
from qsmlab.data.datamodule import QSMDataModule
from qsmlab.data.manifest import load_manifest
from qsmlab.data.recipe import ensure_dataset
from qsmlab.errors import QSMInputError
from qsmlab.methods import NeXtQSM, load_method
from qsmlab.methods.inference import Context
from qsmlab.methods.nextqsm import harmonic_residual, smv_kernel
from qsmlab.methods.predict import background_from_checkpoint, predict_volume
from qsmlab.methods.statistics import masked_sample, robust_std
from qsmlab.physics import DipoleOperator

# Two MNI anatomical subjects at 5 mm (38 x 45 x 40) and one random-shape phantom: hybrid data with
# total fields, chi and seg labels; generated once and cached by recipe hash (~15 s).
TINY_RECIPE = {
    "name": "methods-tiny", "seed": 11, "te": [0.004, 0.008], "snr": 100,
    "subjects": [
        {"kind": "anatomical", "count": 2, "voxel_size": [5.0, 5.0, 5.0], "veins": [1, 2]},
        {"kind": "shapes", "count": 1, "shape": [24, 24, 24], "voxel_size": [5.0, 5.0, 5.0]},
    ],
}
TINY_NET = dict(bg_width=4, bg_depth=2, steps=2, reg_width=4, reg_depth=1, log_images=False)


@pytest.fixture(scope="module")
def manifest():
    return ensure_dataset(TINY_RECIPE)


def _load(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _trainer(root, steps: int = 3) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     use_distributed_sampler=False, val_check_interval=steps, check_val_every_n_epoch=None,
                     default_root_dir=str(root))


@pytest.fixture(scope="module")
def trained(manifest, tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("nextqsm")
    dm = QSMDataModule(str(manifest), patch_size=16, samples_per_volume=2, queue_length=4, batch_size=2,
                       val_subjects=["anat002"], seed=0)
    model = NeXtQSM(**TINY_NET)
    trainer = _trainer(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
    ckpt = root / "nextqsm.ckpt"
    trainer.save_checkpoint(ckpt)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return model.eval(), ckpt, metrics, dm


def test_trains_on_both_outputs_and_reloads_with_its_normalisation(trained, manifest):
    model, ckpt, metrics, dm = trained
    for key in ("train/loss_field", "train/loss_chi", "train/loss_chi_local", "val/nrmse", "val/psnr",
                "val/nrmse_local_field", "val/loss"):
        assert np.isfinite(metrics[key]), key
    assert "train/loss_dc" not in metrics  # lambda_dc = 0: the term is not computed
    # the scales are the robust std of the training fields (local and total) inside the masks
    rows = dm.rows["train"]
    local = np.concatenate([masked_sample(_load(r.field)[0], _load(r.mask)[0]) for r in rows])
    total = np.concatenate([masked_sample(_load(r.total_field)[0], _load(r.mask)[0]) for r in rows])
    assert float(model.field_scale) == pytest.approx(robust_std(local), rel=1e-5)
    assert float(model.total_field_scale) == pytest.approx(robust_std(total), rel=1e-5)
    assert float(model.total_field_scale) > 5 * float(model.field_scale)  # why the total field has its own

    loaded = load_method(ckpt, method="nextqsm")
    assert isinstance(loaded, NeXtQSM)
    assert float(loaded.total_field_scale) == float(model.total_field_scale)
    assert float(loaded.field_scale) == float(model.field_scale)
    row = next(r for r in load_manifest(manifest).rows if r.subject == "anat002")
    f, t, m = _load(row.field)[0], _load(row.total_field)[0], _load(row.mask)[0]
    a = predict_volume(model, f, m, row.voxel_size, row.b0_dir, total_field=t)
    b = predict_volume(loaded, f, m, row.voxel_size, row.b0_dir, total_field=t)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a).max() > 0 and np.all(a[m < 0.5] == 0)


def test_predict_cli_from_total_or_local_field_keeps_input_geometry(trained, manifest, tmp_path):
    _, ckpt, _, _ = trained
    row = next(r for r in load_manifest(manifest).rows if r.subject == "anat002")
    field, affine = _load(row.field)
    mask = _load(row.mask)[0] > 0.5
    outs = {}
    for name, extra in (("total", ["--total-field", str(row.total_field)]), ("local", [])):
        out = tmp_path / f"chi_{name}.nii.gz"
        rc = cli_main(["predict", "--ckpt", str(ckpt), "--field", str(row.field), "--mask", str(row.mask),
                       "--method", "nextqsm", "--quiet", "-o", str(out), *extra])
        assert rc == 0
        chi, aff = _load(out)
        assert chi.shape == field.shape and np.allclose(aff, affine)
        assert nib.load(str(out)).get_data_dtype() == np.float32
        assert np.all(np.isfinite(chi)) and np.all(chi[~mask] == 0) and np.abs(chi[mask]).max() > 0
        outs[name] = chi
    # the total-field path runs the background net first, the local path skips it: different inputs
    assert not np.allclose(outs["total"], outs["local"])


def test_background_net_alone_is_the_chains_local_field(trained, manifest):
    model, ckpt, _, _ = trained
    row = next(r for r in load_manifest(manifest).rows if r.subject == "anat002")
    f, t, m = _load(row.field)[0], _load(row.total_field)[0], _load(row.mask)[0]
    local = background_from_checkpoint(ckpt, t, m, row.voxel_size, row.b0_dir)
    chain = predict_volume(model, f, m, row.voxel_size, row.b0_dir, total_field=t, output="local_field")
    assert local.shape == t.shape and np.all(local[m < 0.5] == 0)
    np.testing.assert_allclose(local, chain, atol=1e-6)
    # linear part of the normalisation: the output is in ppm, on the local field's scale, not the total's
    assert np.abs(local[m > 0.5]).std() < np.abs(t[m > 0.5]).std()
    with pytest.raises(QSMInputError, match="mask: grid"):
        background_from_checkpoint(ckpt, t, m[:-1], row.voxel_size, row.b0_dir)


def test_background_init_vsharp_starts_as_vsharp_and_trains(manifest, tmp_path):
    """``background_init="vsharp"``: the background net's output layer starts at zero and adds to the
    V-SHARP local field (TSVD), so the untrained chain's local field *is* V-SHARP's, with the background
    removed; training moves the correction away from zero."""
    from qsmlab.recon import registry

    torch.manual_seed(0)
    model = NeXtQSM(**TINY_NET, background_init="vsharp")
    assert float(model.net.background.head.weight.detach().abs().sum()) == 0.0
    row = next(r for r in load_manifest(manifest).rows if r.subject == "anat002")
    f, t, m = _load(row.field)[0], _load(row.total_field)[0], _load(row.mask)[0] > 0.5
    model.set_statistics(0.01, row.b0_dir, row.voxel_size)
    model.total_field_scale.fill_(0.5)
    local = background_from_checkpoint(model.eval(), t, m, row.voxel_size, row.b0_dir)
    ref, valid = registry.get("background", "vsharp")(t * m, m, voxel_size=row.voxel_size, solver="tsvd",
                                                      quiet=True)
    # the same V-SHARP as the recon's (float64 numpy) to the round-off of its float32 torch FFTs
    np.testing.assert_allclose(local, ref * valid * m, atol=1e-5 * np.abs(ref).max())
    # the background (here ~20x the local field) is gone: what is left is V-SHARP's error at 5 mm
    assert np.linalg.norm((local - f)[valid]) < 0.2 * np.linalg.norm((t - f)[valid])
    torch.manual_seed(0)
    trained = NeXtQSM(**TINY_NET, background_init="vsharp")
    dm = QSMDataModule(str(manifest), patch_size=16, samples_per_volume=2, queue_length=4, batch_size=2,
                       val_subjects=["anat002"], seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, steps=2).fit(trained, dm)
    assert float(trained.net.background.head.weight.detach().abs().sum()) > 0.0


def _ellipsoid(shape):
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return ((g[0] / 0.8) ** 2 + (g[1] / 0.7) ** 2 + (g[2] / 0.75) ** 2 <= 1.0).astype(np.float32)


@pytest.mark.parametrize("init", ["field", "tkd"])
@pytest.mark.parametrize("b0, vs", [((0.3, 0.2, 0.93), (1.0, 1.2, 2.0)), ((0.0, 0.0, 1.0), (1.0, 1.0, 1.0))])
def test_untrained_variational_net_is_projected_descent_in_the_scans_geometry(b0, vs, init):
    """With its regulariser at zero (the initial output layer), the variational network is K steps of
    chi <- M (chi - a_k A(M (A chi - f))) from chi_0 = M f (``varnet_init="field"``, the paper's) or from
    the TKD chi_0 = M A^dagger(M f) (``"tkd"``, thresholded k-space division at 0.19), with A the dipole
    operator of the scan's own B0 and voxel size: computed here by hand from ``DipoleOperator``."""
    torch.manual_seed(0)
    model = NeXtQSM(**{**TINY_NET, "steps": 3, "init_step": 1.5, "varnet_init": init}).eval()
    b0 = np.asarray(b0) / np.linalg.norm(b0)
    scale = 0.02
    model.set_statistics(scale, b0_dir=b0, voxel_size=vs)
    model.total_field_scale.fill_(1.0)
    shape = (16, 20, 16)
    m = _ellipsoid(shape)
    rng = np.random.default_rng(0)
    chi_true = (rng.normal(0, 0.05, shape) * m).astype(np.float32)
    op = DipoleOperator(vs, b0, pad_factor=1.0)
    f = (op.A(chi_true.astype(np.float64)) * m).astype(np.float32)

    got = predict_volume(model, f, m, vs, b0)  # no total field: the variational network alone
    alphas = torch.nn.functional.softplus(model.net.varnet.step_params).detach().numpy()
    fn = f / scale

    def start(o):
        if init == "field":
            return fn * m
        return o.A_dagger(torch.from_numpy(fn * m).double(), 0.19).numpy() * m

    chi = chi0 = start(op)
    for a in alphas:
        chi = m * (chi - a * op.A(m * (op.A(chi) - fn)))
    np.testing.assert_allclose(got, chi * scale, atol=1e-5 * np.abs(chi * scale).max())
    # and it is not the descent of another geometry (the test would pass if geometry were ignored)
    other = DipoleOperator((1.0, 1.0, 1.0), (1.0, 0.0, 0.0), pad_factor=1.0)
    chi_o = start(other)
    for a in alphas:
        chi_o = m * (chi_o - a * other.A(m * (other.A(chi_o) - fn)))
    assert np.abs(got - chi_o * scale).max() > 0.05 * np.abs(got).max()
    # data consistency improves over the initial chi = M f (what the steps are for)
    res = lambda c: np.linalg.norm(m * (op.A(c.astype(np.float64)) - f))  # noqa: E731
    assert res(got) < res(chi0 * scale)
    if init == "tkd":  # TKD is a susceptibility map already: far closer to the truth than the field is
        err = lambda c: np.linalg.norm((c - chi_true) * m)  # noqa: E731
        assert err(got) < 0.8 * err(f * m)


def test_harmonic_residual_removes_harmonic_fields_only_where_the_sphere_fits():
    """Mean value property: x, xy, x^2 - y^2 and a dipole field from a source outside the brain are
    harmonic in the brain, so their SHARP residual is ~0 on the eroded mask; a local field is not."""
    shape, vs = (32, 32, 32), (1.5, 1.5, 1.5)
    m = torch.from_numpy(_ellipsoid(shape))[None, None]
    g = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) * 1.5 - 24.0 for n in shape], indexing="ij")
    src = (g[0] - 40.0) ** 2 + (g[1] - 5.0) ** 2 + (g[2] + 3.0) ** 2  # a point source 16 mm outside the FOV
    dipole = (3 * (g[2] + 3.0) ** 2 - src) / src**2.5 * 1e3  # (3 cos^2 - 1) / r^3: harmonic away from it
    harm = (0.3 + 0.01 * g[0] + 2e-4 * g[0] * g[1] + 1e-4 * (g[0] ** 2 - g[1] ** 2) + dipole)[None, None]
    res = harmonic_residual(harm, m.double(), [vs], radius_mm=4.0)
    k = smv_kernel(4.0, vs)
    eroded = torch.nn.functional.conv3d(m, k, padding=[n // 2 for n in k.shape[-3:]]) > 1 - 1e-4
    assert k.shape[-3:] == (5, 5, 5) and eroded.sum() > 0.3 * m.sum()  # most of the brain is deep enough
    assert float(res.abs().max()) < 1e-3 * float(harm[m.bool()].abs().max())  # and the background is gone
    assert not (res != 0)[~eroded].any()  # nothing outside the eroded mask
    chi = torch.zeros(1, 1, *shape, dtype=torch.float64)
    chi[..., 14:18, 14:18, 14:18] = 0.1
    local = DipoleOperator(vs, (0, 0, 1)).A(chi) * m.double()
    r = harmonic_residual(local + harm, m.double(), [vs], radius_mm=4.0)
    assert float(r.abs().max()) > 0.3 * float(local.abs().max())  # the local field's high-pass stays
    np.testing.assert_allclose(r.numpy(), harmonic_residual(local, m.double(), [vs], 4.0).numpy(),
                               atol=1e-3 * float(local.abs().max()))


def test_teacher_forcing_trains_the_inversion_on_the_true_local_field_only_in_training(trained):
    model = NeXtQSM(**TINY_NET)
    model.set_statistics(0.01, (0, 0, 1), (5, 5, 5))
    model.total_field_scale.fill_(0.3)
    n = 16
    m = torch.from_numpy(_ellipsoid((n, n, n)))[None, None].repeat(2, 1, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    batch = QSMBatch(field=torch.randn(2, 1, n, n, n, generator=g) * 0.01 * m, mask=m,
                     b0_dir=torch.tensor([[0.0, 0.0, 1.0]] * 2), voxel_size=torch.full((2, 3), 5.0),
                     phase_scale=torch.full((2,), 3.2), affine=torch.eye(4, dtype=torch.float64).repeat(2, 1, 1),
                     chi=torch.randn(2, 1, n, n, n, generator=g) * 0.03 * m,
                     total_field=torch.randn(2, 1, n, n, n, generator=g) * 0.3 * m, key=["a", "b"])
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        model.training_step(batch, 0)
    assert set(model.last_loss_parts) == {"loss_field", "loss_chi", "loss_chi_local"}
    ctx = Context.of(batch.voxel_size, batch.b0_dir, inputs=model.inputs_for(set(batch.keys())))
    assert model.channel_names(ctx) == ["total_field", "harmonic", "mask", "true_local"]
    model.eval()
    with torch.no_grad():
        out = model.predict_batch(batch)
    ctx = Context.of(batch.voxel_size, batch.b0_dir, inputs=model.inputs_for(set(batch.keys())))
    assert set(out) == {"chi", "local_field"} and model.channel_names(ctx) == ["total_field", "harmonic", "mask"]


def test_bad_input_is_one_line_error(trained, manifest, tmp_path):
    _, ckpt, _, _ = trained
    with pytest.raises(QSMInputError, match="checkpoint of method 'nextqsm', not 'qsmnet'"):
        load_method(ckpt, method="qsmnet")
    with pytest.raises(QSMInputError, match="model.loss.lambda_chi"):
        NeXtQSM(loss={"lambda_chi": -1.0})
    with pytest.raises(QSMInputError, match=r"unknown key\(s\) \['lambda_tv'\]"):
        NeXtQSM(loss={"lambda_tv": 1.0})
    row = next(r for r in load_manifest(manifest).rows if r.subject == "anat002")
    f, m = _load(row.field)[0], _load(row.mask)[0]
    with pytest.raises(QSMInputError, match="total_field: grid"):
        predict_volume(ckpt, f, m, row.voxel_size, row.b0_dir, total_field=f[:, :-1])


def test_torch_vsharp_matches_the_recon_vsharp_per_sample():
    """:func:`vsharp_estimate` (torch, float32, batched) gives the recon's V-SHARP (TSVD, float64 numpy) for
    each sample with its own voxel size, on odd grids; an empty mask gives zeros, not an error."""
    from scipy import ndimage

    from qsmlab.methods.background_inputs import vsharp_estimate
    from qsmlab.recon import registry

    rng = np.random.default_rng(3)
    shape = (37, 42, 33)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    masks = [(g[0] ** 2 / 0.7 + g[1] ** 2 / 0.8 + g[2] ** 2 / 0.6 <= 1).astype(np.float32),
             (g[0] ** 2 / 0.5 + g[1] ** 2 / 0.9 + g[2] ** 2 / 0.8 <= 1).astype(np.float32),
             np.zeros(shape, np.float32)]
    vss = [(2.0, 2.0, 2.0), (1.5, 1.8, 2.4), (2.0, 2.0, 2.0)]
    fields = [(ndimage.gaussian_filter(rng.normal(size=shape), 3) + 0.3 * g[2] ** 2 + 0.1 * g[0]).astype(np.float32)
              * m for m in masks]
    est = vsharp_estimate(torch.from_numpy(np.stack(fields))[:, None], torch.from_numpy(np.stack(masks))[:, None],
                          torch.tensor(vss)).numpy()
    for i in range(2):
        ref, valid = registry.get("background", "vsharp")(fields[i], masks[i] > 0, voxel_size=vss[i],
                                                          solver="tsvd", quiet=True)
        assert valid.sum() > 100
        np.testing.assert_allclose(est[i, 0], ref * valid, atol=1e-5 * np.abs(ref).max())
    assert np.all(est[2] == 0)


def test_inference_pad_factor_applies_outside_training_only():
    """``varnet_inference_pad_factor``: the variational network's operator keeps the training padding while
    training and takes the inference one in eval mode (None: the training one); a factor below 1 is a
    one-line error naming the key."""
    model = NeXtQSM(**TINY_NET, varnet_pad_factor=2.0, varnet_inference_pad_factor=1.25)
    model.set_statistics(0.01, (0.0, 0.0, 1.0), (2.0, 2.0, 2.0))
    model.train()
    assert model.varnet_pad == 2.0 and model.varnet_operator().pad_factor == 2.0
    model.eval()
    assert model.varnet_pad == 1.25 and model.varnet_operator().pad_factor == 1.25
    # what eval mode runs: the periodic wrap of a 1.25-padded grid differs from the 2-padded one
    x = torch.zeros(1, 1, 24, 24, 24)
    x[..., 4:20, 4:20, 4:20] = torch.randn(1, 1, 16, 16, 16)
    a = model.varnet_operator().A(x)
    model.train()
    b = model.varnet_operator().A(x)
    assert 0 < float((a - b).abs().max()) < 0.2 * float(b.abs().max())
    assert NeXtQSM(**TINY_NET, varnet_pad_factor=2.0).eval().varnet_pad == 2.0
    with pytest.raises(QSMInputError, match="model.varnet_inference_pad_factor"):
        NeXtQSM(**TINY_NET, varnet_inference_pad_factor=0.5)


def test_quick_profile_trains_l2_with_the_teacher_term_x4_and_predicts_mirrored():
    """The shipped quick profile (session 25): L2 chi terms, the teacher-forced term weighted 4, mirrored one-scan
    predictions; the cpu profiles that share its network keep the L1 loss and one pass."""
    from qsmlab.lab.config import load_experiment

    args = load_experiment("nextqsm", "quick")["model"]["init_args"]
    m = NeXtQSM(**args)
    assert m.loss_fn.weights["chi_local"] == pytest.approx(4.0) and m.loss_fn.weights["chi"] == pytest.approx(1.0)
    assert m.loss_fn.terms["chi"].norm == "l2" and m.loss_fn.terms["chi_local"].norm == "l2"
    assert m.loss_fn.terms["field"].norm == "l1" and m.options.tta == "flips"
    # the L2 term is the masked mean of the squared error (a chi error of 0.1 ppm in half the mask: 0.005)
    mask = torch.zeros(1, 1, 4, 4, 4)
    mask[..., :2] = 1
    chi = torch.zeros(1, 1, 4, 4, 4)
    err = torch.zeros_like(chi)
    err[..., 0] = 0.1
    batch = QSMBatch(field=chi, mask=mask, b0_dir=torch.tensor([[0.0, 0.0, 1.0]]), voxel_size=torch.ones(1, 3),
                     phase_scale=torch.ones(1), affine=torch.eye(4)[None], chi=chi)
    assert float(m.loss_fn.terms["chi"]({"chi": err}, batch)) == pytest.approx(0.005, rel=1e-5)
    for profile in ("cpu", "cpu_cosmos"):
        other = load_experiment("nextqsm", profile)["model"]["init_args"]
        assert other.get("loss", {}).get("chi_norm", "l1") == "l1" and other.get("tta", "none") == "none"
        assert other["bg_width"] == args["bg_width"] and other["lr"] == pytest.approx(2e-3)
