"""``qsmlab predict`` and ``qsmlab dip``: outputs in the input geometry, oblique/resampled inputs, and
one-line errors for a wrong checkpoint, a missing file or a grid mismatch."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from _datasets import ellipsoid_mask, oblique_affine, smooth_chi
from _methods import VAL_SUBJECT, run_cli, tiny_datamodule, tiny_dataset, tiny_trainer

from qsmlab.data.manifest import load_manifest
from qsmlab.data.nifti import save_nifti
from qsmlab.errors import QSMInputError
from qsmlab.methods import UQSM, QSMnet
from qsmlab.methods.predict import predict_volume
from qsmlab.physics import DipoleOperator, b0_dir_from_affine


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A uQSM and a QSMnet checkpoint, each trained two steps on the tiny dataset (2 mm, axial B0)."""
    root = tmp_path_factory.mktemp("predict_ckpts")
    manifest = tiny_dataset(tmp_path_factory.getbasetemp() / "methods_data")
    out = {"manifest": manifest}
    for name, model in (("uqsm", UQSM(width=4, depth=2)), ("qsmnet", QSMnet(width=4, depth=2, kernel_size=3))):
        torch.manual_seed(0)
        trainer = tiny_trainer(root / name, max_steps=2, logger=False, limit_val_batches=0)
        trainer.fit(model, tiny_datamodule(manifest))
        trainer.save_checkpoint(root / f"{name}.ckpt")
        out[name] = root / f"{name}.ckpt"
    return out


def _scan(tmp_path, shape=(20, 22, 18), voxel_size=(2.0, 2.0, 2.0), tilt=0.0):
    affine = oblique_affine(voxel_size, tilt)
    mask = ellipsoid_mask(shape)
    chi = smooth_chi(shape, 3) * mask
    field = DipoleOperator(voxel_size, b0_dir_from_affine(affine)).A(chi) * mask
    paths = {}
    for name, arr in (("field", field), ("mask", mask), ("chi", chi), ("magnitude", np.where(mask, 1.0, 0.0))):
        paths[name] = save_nifti(tmp_path / f"{name}.nii.gz", arr, affine=affine)
    return paths, affine


def test_predict_writes_chi_in_the_input_geometry(ckpts, tmp_path):
    paths, affine = _scan(tmp_path)
    out = tmp_path / "out" / "chi.nii.gz"
    rc, stdout, err = run_cli(["predict", "--ckpt", str(ckpts["uqsm"]), "--field", str(paths["field"]),
                               "--mask", str(paths["mask"]), "-o", str(out)])
    assert rc == 0, err
    img = nib.load(str(out))
    assert img.shape == (20, 22, 18) and np.allclose(img.affine, affine)
    assert img.get_data_dtype() == np.float32
    chi = np.asarray(img.dataobj)
    mask = np.asarray(nib.load(str(paths["mask"])).dataobj) > 0.5
    assert np.all(chi[~mask] == 0) and np.any(chi[mask] != 0) and np.all(np.isfinite(chi))
    side = json.loads((tmp_path / "out" / "chi.json").read_text())
    assert side["method"] == "uqsm" and side["units"] == "ppm" and side["B0_dir"] == pytest.approx([0, 0, 1])
    # the command and the Python API (the pipeline's ckpt:PATH inversion) agree
    f = np.asarray(nib.load(str(paths["field"])).dataobj)
    api = predict_volume(ckpts["uqsm"], f, mask, voxel_size=(2, 2, 2), b0_dir=(0, 0, 1))
    assert np.allclose(api, chi, atol=1e-6)


def test_predict_oblique_b0_and_other_voxel_size_warn_and_keep_geometry(ckpts, tmp_path):
    paths, affine = _scan(tmp_path, voxel_size=(1.0, 1.0, 1.0), tilt=30.0)
    out = tmp_path / "chi_oblique.nii"
    with pytest.warns(UserWarning) as rec:
        rc, _, err = run_cli(["predict", "--ckpt", str(ckpts["qsmnet"]), "--field", str(paths["field"]),
                              "--mask", str(paths["mask"]), "-o", str(out)])
    assert rc == 0, err
    msgs = " ".join(str(w.message) for w in rec)
    assert "30.0 deg from the training direction" in msgs and "resampled to it" in msgs
    img = nib.load(str(out))
    assert img.shape == (20, 22, 18) and np.allclose(img.affine, affine)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["B0_dir"] == pytest.approx(b0_dir_from_affine(affine).tolist())
    assert side["train_voxel_size"] == pytest.approx([2, 2, 2])



def test_voxel_resampling_never_runs_on_the_scans_grid_and_still_rotates(ckpts, tmp_path):
    """``--voxel-resampling never`` (or the checkpoint's ``model.voxel_resampling``): a 1 mm scan through a
    2 mm checkpoint keeps its own grid (no resampling warning; the network, its prior and physics run at
    1 mm), an oblique B0 is still rotated; the sidecar records the choice; a bad value is an argparse error."""
    import warnings

    from qsmlab.methods.predict import method_from

    paths, affine = _scan(tmp_path, voxel_size=(1.0, 1.0, 1.0), tilt=30.0)
    out = tmp_path / "chi_native.nii.gz"
    with pytest.warns(UserWarning) as rec:
        rc, _, err = run_cli(["predict", "--ckpt", str(ckpts["qsmnet"]), "--field", str(paths["field"]),
                              "--mask", str(paths["mask"]), "--voxel-resampling", "never", "-o", str(out)])
    assert rc == 0, err
    msgs = " ".join(str(w.message) for w in rec)
    assert "30.0 deg from the training direction" in msgs and "resampled" not in msgs
    img = nib.load(str(out))
    assert img.shape == (20, 22, 18) and np.allclose(img.affine, affine)
    assert json.loads((tmp_path / "chi_native.json").read_text())["voxel_resampling"] == "never"
    # the frame: rotation only, the scan's voxel size kept; "auto" resamples to the training 2 mm
    model = method_from(ckpts["qsmnet"])
    mask = np.asarray(nib.load(str(paths["mask"])).dataobj) > 0.5
    f = np.asarray(nib.load(str(paths["field"])).dataobj)
    b0 = b0_dir_from_affine(affine)
    frame = model.inference_frame(mask.shape, (1.0, 1.0, 1.0), b0, voxel_resampling="never")
    assert frame.rotated and not frame.resampled and np.allclose(frame.out_voxel_size, 1.0)
    assert model.inference_frame(mask.shape, (1.0, 1.0, 1.0), model.train_b0_dir.numpy(), "never") is None
    assert model.inference_frame(mask.shape, (1.0, 1.0, 1.0), b0).resampled
    # the API's per-call override equals the command, and leaves the checkpoint's setting as it was
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api = predict_volume(model, f, mask, voxel_size=(1, 1, 1), b0_dir=b0, voxel_resampling="never")
    assert np.allclose(api, np.asarray(img.dataobj), atol=1e-6)
    assert model.hparams["voxel_resampling"] == "auto" and model.options.voxel_resampling == "auto"
    with pytest.raises(QSMInputError, match="voxel_resampling"):
        predict_volume(model, f, mask, voxel_size=(1, 1, 1), b0_dir=b0, voxel_resampling="sometimes")
    import contextlib
    import io

    from qsmlab.cli import main as cli_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:  # argparse's own one-line error
        cli_main(["predict", "--ckpt", str(ckpts["qsmnet"]), "--field", str(paths["field"]),
                  "--mask", str(paths["mask"]), "--voxel-resampling", "sometimes", "-o", str(out)])
    assert exc.value.code == 2 and "--voxel-resampling" in err.getvalue()

def test_tta_flips_on_the_command_line_equals_the_api_and_is_recorded(ckpts, tmp_path):
    """``--tta flips``: the mirrored mean (8 flips on an axial scan), the same map as the API call, recorded in
    the sidecar; without the option the checkpoint's ``model.tta`` ("none"); a bad value is argparse's error."""
    import contextlib
    import io

    from qsmlab.cli import main as cli_main
    from qsmlab.methods.predict import method_from

    paths, _ = _scan(tmp_path)
    outs = {}
    for tta in ("flips", None):
        out = tmp_path / f"chi_{tta}.nii.gz"
        rc, _, err = run_cli(["predict", "--ckpt", str(ckpts["uqsm"]), "--field", str(paths["field"]),
                              "--mask", str(paths["mask"]), "-o", str(out)] + (["--tta", tta] if tta else []))
        assert rc == 0, err
        outs[tta] = np.asarray(nib.load(str(out)).dataobj)
        assert json.loads((tmp_path / f"chi_{tta}.json").read_text())["tta"] == (tta or "none")
    model = method_from(ckpts["uqsm"])
    f = np.asarray(nib.load(str(paths["field"])).dataobj)
    mask = np.asarray(nib.load(str(paths["mask"])).dataobj) > 0.5
    api = predict_volume(model, f, mask, voxel_size=(2, 2, 2), b0_dir=(0, 0, 1), tta="flips")
    np.testing.assert_allclose(outs["flips"], api, atol=1e-6)
    assert np.abs(outs["flips"] - outs[None]).max() > 0  # a trained network is not flip-equivariant
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        cli_main(["predict", "--ckpt", str(ckpts["uqsm"]), "--field", str(paths["field"]),
                  "--mask", str(paths["mask"]), "--tta", "mirror", "-o", str(tmp_path / "x.nii.gz")])
    assert exc.value.code == 2 and "--tta" in err.getvalue()


def test_dip_command(tmp_path):
    paths, affine = _scan(tmp_path, shape=(16, 16, 16))
    out = tmp_path / "dip.nii.gz"
    rc, stdout, err = run_cli(["dip", "--field", str(paths["field"]), "--mask", str(paths["mask"]),
                               "--magnitude", str(paths["magnitude"]), "--iterations", "3", "--depth", "2",
                               "--width", "4", "--quiet", "-o", str(out)])
    assert rc == 0, err
    img = nib.load(str(out))
    assert img.shape == (16, 16, 16) and np.allclose(img.affine, affine)
    side = json.loads((tmp_path / "dip.json").read_text())
    # no sidecar with echo time: the default data consistency is the weighted linear one
    assert side["dc"] == "weighted" and side["fit"]["iterations"] == 3 and side["prior"] == "none"
    # --prior tkd: recorded in the sidecar; the map differs from the paper's random start
    out2 = tmp_path / "dip_tkd.nii.gz"
    rc, _, err = run_cli(["dip", "--field", str(paths["field"]), "--mask", str(paths["mask"]), "--iterations", "3",
                          "--depth", "2", "--width", "4", "--prior", "tkd", "--quiet", "-o", str(out2)])
    assert rc == 0, err
    assert json.loads((tmp_path / "dip_tkd.json").read_text())["prior"] == "tkd"
    assert not np.allclose(nib.load(str(out2)).get_fdata(), img.get_fdata())
    rc, _, err = run_cli(["dip", "--field", str(paths["field"]), "--mask", str(paths["mask"]), "--dc",
                          "nonlinear", "-o", str(out)])
    assert rc == 2 and "needs phase_scale" in err and len(err.strip().splitlines()) == 1


def _one_line_error(argv, *needles):
    rc, _, err = run_cli(argv)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_bad_inputs_are_one_line_errors(ckpts, tmp_path):
    paths, _ = _scan(tmp_path)
    base = ["predict", "--field", str(paths["field"]), "--mask", str(paths["mask"]), "-o", str(tmp_path / "o.nii")]
    _one_line_error(base + ["--ckpt", str(tmp_path / "nope.ckpt")], "nope.ckpt", "file not found")
    _one_line_error(base + ["--ckpt", str(ckpts["uqsm"]), "--method", "qsmnet"],
                    "uqsm.ckpt", "checkpoint of method 'uqsm', not 'qsmnet'")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    _one_line_error(base + ["--ckpt", str(junk)], "junk.ckpt", "not a readable PyTorch checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, foreign)
    _one_line_error(base + ["--ckpt", str(foreign)], "foreign.ckpt", "not a qsmlab method checkpoint")
    other = save_nifti(tmp_path / "mask_small.nii.gz", np.ones((10, 10, 10)), affine=np.eye(4))
    _one_line_error(["predict", "--ckpt", str(ckpts["uqsm"]), "--field", str(paths["field"]), "--mask", str(other),
                     "-o", str(tmp_path / "o.nii")], "mask_small.nii.gz", "grid shape")
    _one_line_error(["predict", "--ckpt", str(ckpts["uqsm"]), "--field", str(tmp_path / "missing.nii.gz"),
                     "--mask", str(paths["mask"]), "-o", str(tmp_path / "o.nii")], "missing.nii.gz", "not found")
    _one_line_error(["predict", "--ckpt", str(ckpts["uqsm"]), "--field", str(paths["field"])], "--mask")


def test_predict_on_a_training_subject_matches_validation_inference(ckpts):
    """The file path and the Lightning evaluation path run the same full-volume inference."""
    from qsmlab.methods import load_method

    m = load_method(ckpts["uqsm"])
    dm = tiny_datamodule(ckpts["manifest"])
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        via_batch = m.predict_batch(batch)["chi"][0, 0].numpy()
    r = next(r for r in load_manifest(ckpts["manifest"]).rows if r.subject == VAL_SUBJECT)
    field = np.asarray(nib.load(str(r.field)).dataobj)
    mask = np.asarray(nib.load(str(r.mask)).dataobj)
    via_file = predict_volume(m, field, mask, voxel_size=r.voxel_size, b0_dir=r.b0_dir)
    assert np.allclose(via_file, via_batch, atol=1e-6)
