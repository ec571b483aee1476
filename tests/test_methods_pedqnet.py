"""PedQ-NET (self-supervised reconstruction + subcortical segmentation on the reconstructed chi) and
BrainMaskNet (magnitude -> mask): label mapping, Dice, the segmentation gradient reaching the
reconstruction, training on the data engine's labels, checkpoint round trip, ``qsmlab predict``."""

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
from qsmlab.data.phantoms.anatomical import LABEL_IDS
from qsmlab.data.recipe import ensure_dataset
from qsmlab.errors import QSMInputError
from qsmlab.losses import DiceCELoss
from qsmlab.methods import BrainMaskNet, PedQNet, load_method
from qsmlab.methods.patches import crop_windows, label_windows
from qsmlab.methods.pedqnet import dice_per_volume, label_lut
from qsmlab.methods.predict import predict_volume
from qsmlab.physics import physics_for_batch

# Same tiny hybrid dataset as tests/test_methods_nextqsm.py (one cache entry): two MNI anatomical
# subjects at 5 mm with the engine's seg labels, and a random-shape phantom (whose labels are shapes).
TINY_RECIPE = {
    "name": "methods-tiny", "seed": 11, "te": [0.004, 0.008], "snr": 100,
    "subjects": [
        {"kind": "anatomical", "count": 2, "voxel_size": [5.0, 5.0, 5.0], "veins": [1, 2]},
        {"kind": "shapes", "count": 1, "shape": [24, 24, 24], "voxel_size": [5.0, 5.0, 5.0]},
    ],
}
TINY_PED = dict(filters=[4, 8, 16], seg_img_size=16, seg_feature_size=4, seg_hidden_size=32, seg_mlp_dim=32,
                seg_num_heads=2, log_images=False)
TINY_MASK = dict(img_size=16, feature_size=4, hidden_size=32, mlp_dim=32, num_heads=2, log_images=False)


@pytest.fixture(scope="module")
def manifest():
    return ensure_dataset(TINY_RECIPE)


def _load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _fit(model, manifest, root, train=("anat001",), steps: int = 3, **data):
    dm = QSMDataModule(str(manifest), patch_size=16, samples_per_volume=2, queue_length=4, batch_size=2,
                       train_subjects=list(train), val_subjects=["anat002"], seed=0, **data)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False, val_check_interval=steps, check_val_every_n_epoch=None,
                        default_root_dir=str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
    return trainer


def test_anatomical_labels_map_to_subcortical_classes():
    lut = label_lut({"caudate": ["caudate"], "midbrain": ["red_nucleus", "substantia_nigra"], "gp": [6]})
    assert lut[LABEL_IDS["caudate"]] == 1
    assert lut[LABEL_IDS["red_nucleus"]] == lut[LABEL_IDS["substantia_nigra"]] == 2
    assert lut[LABEL_IDS["globus_pallidus"]] == 3  # by id
    for other in ("background", "csf", "wm", "cortical_gm", "vein", "putamen"):
        assert lut[LABEL_IDS[other]] == 0
    m = PedQNet(**TINY_PED)
    seg = torch.tensor([LABEL_IDS[n] for n in ("wm", "caudate", "putamen", "globus_pallidus", "thalamus",
                                                 "red_nucleus", "substantia_nigra", "dentate")])
    assert m.map_labels(seg).tolist() == [0, 1, 2, 3, 4, 5, 5, 6]
    with pytest.raises(QSMInputError, match="model.seg_classes.x: unknown label 'amygdala'"):
        label_lut({"x": ["amygdala"]})
    with pytest.raises(QSMInputError, match="not the data engine's anatomical labels"):
        m.map_labels(torch.tensor([0, 40]))


def test_dice_per_volume_matches_its_definition():
    ref = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    ref[0, 0, :4] = 1            # 256 voxels of class 1
    ref[0, 0, 6:, :2] = 2        # 32 voxels of class 2
    logits = torch.nn.functional.one_hot(ref[:, 0], 3).movedim(-1, 1).float()
    assert dice_per_volume(logits, ref).item() == pytest.approx(1.0)
    pred = torch.zeros_like(ref)
    pred[0, 0, 2:6] = 1          # class 1: 256 predicted, 128 overlap -> Dice 2 * 128 / 512 = 0.5
    pred[0, 0, 0, 0, 0] = 2      # class 2: 1 voxel predicted, none right -> Dice 0
    logits = torch.nn.functional.one_hot(pred[:, 0], 3).movedim(-1, 1).float()
    assert dice_per_volume(logits, ref).item() == pytest.approx((0.5 + 0.0) / 2)


def _batch(n=16, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(b, 1, n, n, n, dtype=torch.long)
    seg[:, :, 4:8, 4:8, 4:8] = LABEL_IDS["caudate"]
    seg[:, :, 9:13, 5:9, 6:10] = LABEL_IDS["globus_pallidus"]
    return QSMBatch(field=torch.randn(b, 1, n, n, n, generator=g) * 0.01, mask=torch.ones(b, 1, n, n, n),
                    b0_dir=torch.tensor([[0.0, 0.0, 1.0]] * b), voxel_size=torch.tensor([[2.0, 2.0, 2.0]] * b),
                    phase_scale=torch.full((b,), 3.2), affine=torch.eye(4, dtype=torch.float64).repeat(b, 1, 1),
                    magnitude=torch.rand(b, 1, n, n, n, generator=g) + 0.5, seg=seg, key=["a"] * b)


@pytest.mark.parametrize("detach", [False, True])
def test_segmentation_loss_reaches_the_reconstruction_net_unless_detached(detach):
    torch.manual_seed(0)
    m = PedQNet(**TINY_PED, detach_seg_input=detach, loss={"lambda_dc": 0.0, "lambda_seg": 1.0})
    m.set_statistics(0.01, [0, 0, 1], [2, 2, 2])
    loss = m.training_step(_batch(), 0)
    loss.backward()
    recon = sum(float(p.grad.abs().sum()) for p in m.net.parameters() if p.grad is not None)
    seg = sum(float(p.grad.abs().sum()) for p in m.seg_net.parameters() if p.grad is not None)
    assert seg > 0
    assert (recon == 0) if detach else (recon > 0)


def test_pedqnet_trains_checkpoints_and_predicts(manifest, tmp_path):
    torch.manual_seed(0)
    model = PedQNet(**TINY_PED)
    trainer = _fit(model, manifest, tmp_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key in ("train/loss_dc", "train/loss_seg", "val/nrmse", "val/dice"):
        assert np.isfinite(metrics[key]), key
    assert 0.0 <= metrics["val/dice"] <= 1.0
    ckpt = tmp_path / "pedqnet.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = load_method(ckpt, method="pedqnet")
    assert float(loaded.field_scale) == float(model.field_scale) and np.isfinite(float(model.field_scale))
    row = next(r for r in load_manifest(manifest).rows if r.subject == "anat002")
    field, affine = _load(row.field)
    mask = _load(row.mask)[0] > 0.5
    out = tmp_path / "chi.nii.gz"
    assert cli_main(["predict", "--ckpt", str(ckpt), "--field", str(row.field), "--mask", str(row.mask),
                     "--quiet", "-o", str(out)]) == 0
    chi, aff = _load(out)
    assert chi.shape == field.shape and np.allclose(aff, affine)
    assert np.all(np.isfinite(chi)) and np.all(chi[~mask] == 0) and np.abs(chi[mask]).max() > 0
    ref = predict_volume(model.eval(), field, mask, row.voxel_size, row.b0_dir)
    np.testing.assert_allclose(chi, ref, atol=1e-6)
    # predictions are chi only unless asked; then the full volume (38 x 45 x 40) is segmented by sliding
    # 16^3 UNETR windows over the whole reconstructed chi
    with pytest.raises(QSMInputError, match="output 'seg_logits'"):
        predict_volume(loaded, field, mask, row.voxel_size, row.b0_dir, output="seg_logits")
    loaded.segment_at_inference = True
    seg = predict_volume(loaded, field, mask, row.voxel_size, row.b0_dir, output="seg_logits")
    assert seg.shape == (len(loaded.seg_classes) + 1, *field.shape) and np.all(np.isfinite(seg))


def test_pedqnet_refuses_shape_phantoms_as_segmentation_labels(manifest, tmp_path):
    with pytest.raises(QSMInputError, match="random-shape phantoms"):
        _fit(PedQNet(**TINY_PED), manifest, tmp_path, train=("anat001", "shape001"), steps=1)


def test_brainmask_trains_checkpoints_and_predicts_a_mask(manifest, tmp_path):
    torch.manual_seed(0)
    model = BrainMaskNet(**TINY_MASK)
    trainer = _fit(model, manifest, tmp_path, sampler="uniform")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert np.isfinite(metrics["train/loss_seg"]) and 0.0 <= metrics["val/dice"] <= 1.0
    ckpt = tmp_path / "brainmask.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = load_method(ckpt, method="brainmask")
    row = next(r for r in load_manifest(manifest).rows if r.subject == "anat002")
    mag, affine = _load(row.magnitude)
    out = tmp_path / "mask.nii.gz"
    assert cli_main(["predict", "--ckpt", str(ckpt), "--field", str(row.field), "--mask", str(row.mask),
                     "--magnitude", str(row.magnitude), "--quiet", "-o", str(out)]) == 0
    pred, aff = _load(out)
    assert pred.shape == mag.shape and np.allclose(aff, affine)
    assert set(np.unique(pred)) <= {0.0, 1.0}
    ref = predict_volume(loaded, mag, np.ones_like(mag), row.voxel_size, row.b0_dir, magnitude=mag)
    np.testing.assert_array_equal(pred, ref)
    with pytest.raises(QSMInputError, match="magnitude"):
        predict_volume(loaded, mag, np.ones_like(mag), row.voxel_size, row.b0_dir)


def test_pedqnet_prior_tkd_is_added_once_and_segmented_with_chi(manifest):
    """``model.prior: tkd``: the recon net's output layer starts at zero, so an untrained PedQ-NET is TKD
    (the thresholded k-space division of the local field, :meth:`DipoleOperator.A_dagger`, masked) --
    added once, not twice -- and its UNETR segments that full chi (recon output + prior), so the
    segmentation loss trains the network that corrects TKD."""
    from qsmlab.physics import DipoleOperator

    torch.manual_seed(0)
    model = PedQNet(**TINY_PED, prior="tkd").eval()
    assert model.net.in_channels == 3 and float(model.net.head.weight.detach().abs().sum()) == 0.0
    row = next(r for r in load_manifest(manifest).rows if r.subject == "anat002")
    field = _load(row.field)[0]
    mask = _load(row.mask)[0] > 0.5
    scale = 0.01
    model.set_statistics(scale, row.b0_dir, row.voxel_size)
    got = predict_volume(model, field, mask, row.voxel_size, row.b0_dir)
    op = DipoleOperator(row.voxel_size, row.b0_dir, pad_factor=2.0)
    tkd = op.A_dagger(torch.from_numpy(field * mask).double(), 0.19).numpy() * mask
    np.testing.assert_allclose(got, tkd, atol=1e-5 * np.abs(tkd).max())
    # the UNETR sees chi = net + prior (here: the prior itself), in network units
    seen = []
    model.segment = lambda chi: seen.append(chi.detach().clone()) or torch.zeros(
        chi.shape[0], len(model.seg_classes) + 1, *chi.shape[2:])
    model.train()
    batch = _batch()
    model.training_step(batch, 0)
    prior = model.prior_map({"field": batch.field, "mask": batch.mask}, (batch.voxel_size, batch.b0_dir))
    assert float(prior.abs().max()) > 0
    torch.testing.assert_close(seen[0], prior.to(seen[0].dtype), atol=1e-5, rtol=1e-4)


def test_pedqnet_prior_tkd_trains_the_recon_net_through_the_zero_head():
    torch.manual_seed(0)
    m = PedQNet(**TINY_PED, prior="tkd", loss={"lambda_dc": 1.0, "lambda_seg": 0.01})
    m.set_statistics(0.01, [0, 0, 1], [2, 2, 2])
    loss = m.training_step(_batch(), 0)
    loss.backward()
    assert float(m.net.head.weight.grad.abs().sum()) > 0


def test_pedqnet_free_support_frees_only_the_loss():
    """``loss.support: free``: the same weights give the same prediction (masked) and the same segmentation
    (the UNETR sees the masked chi), while the training loss sees the recon output outside the mask too."""
    batch = _batch()
    batch = QSMBatch(**{**{k: getattr(batch, k) for k in batch.keys()}, "mask": torch.zeros_like(batch.mask)})
    batch.mask[:, :, 3:13, 3:13, 3:13] = 1.0
    models = {}
    for support in ("mask", "free"):
        torch.manual_seed(0)
        m = PedQNet(**TINY_PED, loss={"support": support, "lambda_tv": 1e-3})
        m.set_statistics(0.01, [0, 0, 1], [2, 2, 2])
        models[support] = m
    models["free"].load_state_dict(models["mask"].state_dict())
    images = {"field": batch.field, "mask": batch.mask}
    geometry = (batch.voxel_size, batch.b0_dir)
    with torch.no_grad():
        outs = {s: m.eval().infer_images(images, geometry, outputs=("chi", "seg_logits"), windows=False)
                for s, m in models.items()}
        torch.testing.assert_close(models["free"].mask_outputs(outs["free"], batch.mask)["chi"],
                                   models["mask"].mask_outputs(outs["mask"], batch.mask)["chi"])
        torch.testing.assert_close(outs["free"]["seg_logits"], outs["mask"]["seg_logits"])
        outside = (batch.mask < 0.5).expand_as(outs["free"]["chi"])
        assert float(outs["free"]["chi"][outside].abs().max()) > 0
        assert float(outs["mask"]["chi"][outside].abs().max()) == 0
        seen = {s: m.training_outputs(outs[s], batch.mask)["chi"] for s, m in models.items()}
    assert float(seen["free"][outside].abs().max()) > 0 and float(seen["mask"][outside].abs().max()) == 0
    assert models["free"].loss_fn.terms["tv"].support == "grid"
    with pytest.raises(QSMInputError, match="model.loss.support"):
        PedQNet(**TINY_PED, loss={"support": "everywhere"})


def test_label_windows_centre_half_on_labels_and_stay_inside_the_patch():
    labels = torch.zeros(2, 1, 32, 32, 24, dtype=torch.long)
    labels[0, 0, 3, 20, 22] = 2                      # one labelled voxel near two faces
    mask = torch.zeros(2, 1, 32, 32, 24)
    mask[0, 0, 10:20, 10:20, 10:20] = 1              # sample 1: no labels, empty mask (anywhere)
    g = torch.Generator().manual_seed(0)
    corners = label_windows(labels, mask, (16, 16, 16), 5, generator=g)
    assert [len(c) for c in corners] == [5, 5]
    for b, picks in enumerate(corners):
        for i, c in enumerate(picks):
            assert all(0 <= v <= a - 16 for v, a in zip(c, (32, 32, 24))), c
            if b == 0 and i < 3:                     # ceil(5 / 2) windows hold the labelled voxel
                assert all(v <= p < v + 16 for v, p in zip(c, (3, 20, 22))), c
            elif b == 0:                             # the others are centred in the mask
                assert all(lo <= v + 8 < hi for v, (lo, hi) in zip(c, ((10, 20),) * 3)), c
    t = torch.arange(2 * 3 * 32 * 32 * 24, dtype=torch.float32).reshape(2, 3, 32, 32, 24)
    crops = crop_windows(t, corners, (16, 16, 16))
    assert crops.shape == (10, 3, 16, 16, 16)
    x, y, z = corners[1][2]
    torch.testing.assert_close(crops[7], t[1, :, x:x + 16, y:y + 16, z:z + 16])
    with pytest.raises(QSMInputError, match="do not fit"):
        label_windows(labels, mask, (16, 16, 32), 1)


def test_windowed_segmentation_trains_the_unetr_on_random_windows_only():
    """``seg_train_windows``: one UNETR pass on n windows per patch (not the ~27 sliding windows of a 32^3 patch
    at 16^3), its loss the Dice + CE of those windows against the labels cropped alike, and its gradient reaches
    the reconstruction net."""
    batch = _batch(n=32, b=2)
    torch.manual_seed(0)
    m = PedQNet(**TINY_PED, prior="tkd", seg_train_windows=3, loss={"lambda_dc": 0.0, "lambda_seg": 1.0})
    m.set_statistics(0.01, [0, 0, 1], [2, 2, 2])
    calls = []
    m.seg_net.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape)))
    torch.manual_seed(5)
    loss = m.training_step(batch, 0)
    assert calls == [(6, 1, 16, 16, 16)]
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in m.net.parameters() if p.grad is not None) > 0
    # the same windows by hand
    m.zero_grad()
    prepared = m.prepare_batch(batch)
    physics = physics_for_batch(prepared, pad_factor=m.options.pad_factor)
    torch.manual_seed(5)
    with torch.no_grad():
        out = m.infer_images(m.batch_images(prepared), (prepared.voxel_size, prepared.b0_dir), ("chi",),
                             windows=False, physics=physics)
        corners = label_windows(prepared.seg, prepared.mask, (16, 16, 16), 3)
        logits = m.seg_net(crop_windows(out["chi"] * prepared.mask / m.scale, corners, (16, 16, 16)))
        expected = DiceCELoss()(({"seg_logits": logits}),
                                QSMBatch(**{**{k: getattr(prepared, k) for k in prepared.keys()},
                                            "seg": crop_windows(prepared.seg, corners, (16, 16, 16))}))
    torch.testing.assert_close(loss.detach(), expected)
    with pytest.raises(QSMInputError, match="seg_train_windows"):
        PedQNet(**TINY_PED, seg_train_windows=-1)
    with pytest.raises(QSMInputError, match="model.seg_train_windows: training patches .* smaller"):
        PedQNet(**TINY_PED, seg_train_windows=2).training_step(_batch(n=8), 0)


def test_quick_and_cpu_cosmos_profiles_train_windowed_and_unweighted():
    """The shipped whole-head profiles (session 24): 4 UNETR windows a step, the unweighted L1 data term (their
    training fields carry uniform noise), bf16; the model they build trains so."""
    from qsmlab.lab.config import load_experiment

    for profile, steps in (("quick", 300), ("cpu_cosmos", 900)):
        cfg = load_experiment("pedqnet", profile)
        args = cfg["model"]["init_args"]
        assert args["seg_train_windows"] == 4 and args["loss"]["dc_weighted"] is False
        assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["trainer"]["max_steps"] == steps
        m = PedQNet(**{**args, **TINY_PED})
        assert m.windowed_training and not m.loss_fn.terms["dc"].weighted
        assert m.loss_fn.weights["tv"] == pytest.approx(0.3) and m.loss_fn.weights["seg"] == pytest.approx(0.01)
