"""`qsmlab evaluate`: table and JSON output; bad input gives exit 2 and one line naming the file."""

import json

import nibabel as nib
import numpy as np
import pytest

from qsmlab.cli import main
from qsmlab.metrics import compute_all


@pytest.fixture
def maps(tmp_path):
    rng = np.random.default_rng(3)
    ref = rng.normal(0, 0.05, (20, 20, 20))
    pred = ref + rng.normal(0, 0.01, ref.shape)
    mask = np.zeros(ref.shape, np.uint8)
    mask[4:16, 4:16, 4:16] = 1
    aff = np.diag([1.0, 1.0, 1.5, 1.0])
    paths = {}
    for name, arr in [("pred", pred), ("ref", ref), ("mask", mask)]:
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.float32 if name != "mask" else np.uint8), aff), paths[name])
    return paths, pred, ref, mask


def _args(p, **over):
    d = {"pred": p["pred"], "ref": p["ref"], "mask": p["mask"]} | over
    return ["evaluate", "--pred", str(d["pred"]), "--ref", str(d["ref"]), "--mask", str(d["mask"])]


def test_json_matches_metrics(maps, capsys):
    p, pred, ref, mask = maps
    assert main(_args(p) + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = compute_all(pred.astype(np.float32), ref.astype(np.float32), mask > 0)
    for k, v in expected.items():
        assert out[k] == pytest.approx(v, rel=1e-6)
    assert out["ssim"] < 1 and out["nrmse"] > 0


def test_table(maps, capsys):
    p, *_ = maps
    assert main(_args(p)) == 0
    out = capsys.readouterr().out
    for k in ("psnr", "nrmse", "hfen", "ssim", "xsim", "nrmse_detrended"):
        assert k in out


def _write(path, arr, aff):
    nib.save(nib.Nifti1Image(arr, aff), path)
    return path


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("qsmlab evaluate: error:") and needle in err, err


def test_mismatched_shape(maps, tmp_path, capsys):
    p, *_ = maps
    bad = _write(tmp_path / "small.nii.gz", np.zeros((10, 20, 20), np.float32), np.diag([1.0, 1.0, 1.5, 1.0]))
    assert main(_args(p, pred=bad)) == 2
    _one_line_error(capsys, "small.nii.gz")


def test_nan_in_prediction(maps, tmp_path, capsys):
    p, pred, *_ = maps
    arr = pred.astype(np.float32)
    arr[3, 3, 3] = np.nan
    bad = _write(tmp_path / "nan.nii.gz", arr, np.diag([1.0, 1.0, 1.5, 1.0]))
    assert main(_args(p, pred=bad)) == 2
    _one_line_error(capsys, "nan.nii.gz")


def test_empty_mask(maps, tmp_path, capsys):
    p, *_ = maps
    bad = _write(tmp_path / "empty.nii.gz", np.zeros((20, 20, 20), np.uint8), np.diag([1.0, 1.0, 1.5, 1.0]))
    assert main(_args(p, mask=bad)) == 2
    _one_line_error(capsys, "empty.nii.gz: mask is empty")


def test_missing_file(maps, tmp_path, capsys):
    p, *_ = maps
    assert main(_args(p, ref=tmp_path / "missing.nii.gz")) == 2
    _one_line_error(capsys, "missing.nii.gz: file not found")
