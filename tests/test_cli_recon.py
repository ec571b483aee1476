"""``qsmlab recon``: NIfTI in, float32 NIfTI + JSON sidecar out, one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from _phantom import head_phantom

from qsmlab.cli import main
from qsmlab.physics import DipoleOperator, tilted_b0_dir
from qsmlab.recon import registry
from qsmlab.recon.inversion import tkd

N = 24
AFFINE = np.array([[1.0, 0, 0, -12.0], [0, 1.0, 0, -14.0], [0, 0, 1.0, -10.0], [0, 0, 0, 1]])


def _save(path, data, affine=AFFINE, dtype=np.float32):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("recon")
    ph = head_phantom(N)
    m = ph["mask"]
    field = DipoleOperator(pad_factor=2.0).A(ph["chi"]) * m
    return {
        "dir": d,
        "field_arr": field.astype(np.float32),
        "mask_arr": m,
        "chi": ph["chi"],
        "field": _save(d / "field.nii.gz", field),
        "mask": _save(d / "mask.nii.gz", m, dtype=np.uint8),
        "mag": _save(d / "mag.nii.gz", ph["magnitude"]),
    }


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qsmlab recon: error:"), err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_tkd_writes_float32_with_input_affine_and_sidecar(case, tmp_path):
    out = tmp_path / "chi.nii.gz"
    rc = main(["recon", "tkd", "--field", case["field"], "--mask", case["mask"], "--param", "threshold=0.15",
               "--param", "mode=zero", "--quiet", "-o", str(out)])
    assert rc == 0
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, AFFINE)
    expected = tkd(case["field_arr"].astype(np.float64), case["mask_arr"], threshold=0.15, mode="zero")
    np.testing.assert_allclose(np.asarray(img.dataobj), expected, atol=1e-6)
    meta = json.loads((tmp_path / "chi.json").read_text())
    assert meta["method"] == "tkd"
    assert meta["params"] == {"pad_factor": 1.0, "threshold": 0.15, "mode": "zero", "correct": False}
    np.testing.assert_allclose(meta["B0_dir"], [0, 0, 1])
    np.testing.assert_allclose(meta["voxel_size"], [1, 1, 1])
    assert "qsmlab_version" in meta


def test_geometry_options_and_sidecar_priority(case, tmp_path):
    b = tilted_b0_dir(20, (1, 0, 0))
    field_json = case["dir"] / "field.json"
    try:
        # sidecar B0_dir beats the (axial) affine
        field_json.write_text(json.dumps({"B0_dir": list(b)}))
        rc = main(["recon", "cfl2", "--field", case["field"], "--mask", case["mask"], "--quiet",
                   "--voxel-size", "1", "1", "1.5", "-o", str(tmp_path / "a.nii")])
        assert rc == 0
        meta = json.loads((tmp_path / "a.json").read_text())
        np.testing.assert_allclose(meta["B0_dir"], b, atol=1e-12)
        np.testing.assert_allclose(meta["voxel_size"], [1, 1, 1.5])
        # explicit --b0-dir beats the sidecar
        rc = main(["recon", "cfl2", "--field", case["field"], "--mask", case["mask"], "--quiet",
                   "--b0-dir", "0", "0", "2", "-o", str(tmp_path / "b.nii")])
        assert rc == 0
        np.testing.assert_allclose(json.loads((tmp_path / "b.json").read_text())["B0_dir"], [0, 0, 1])
    finally:
        field_json.unlink()


def _all_single_field_methods():
    return [n for n in registry.names("inversion") if n != "cosmos"]


@pytest.mark.parametrize("method", _all_single_field_methods())
def test_every_registered_inversion_runs(case, tmp_path, method):
    params = registry.parameters(registry.get("inversion", method))
    extra = ["--param", "max_iter=3"] if "max_iter" in params else []
    out = tmp_path / f"{method}.nii.gz"
    rc = main(["recon", method, "--field", case["field"], "--mask", case["mask"], "--magnitude", case["mag"],
               "--quiet", *extra, "-o", str(out)])
    assert rc == 0
    chi = np.asarray(nib.load(str(out)).dataobj)
    assert chi.shape == (N, N, N) and np.all(np.isfinite(chi))
    assert np.all(chi[~case["mask_arr"]] == 0)
    assert np.abs(chi).max() > 0


def test_cosmos_from_several_fields(case, tmp_path):
    b0s = [(0.0, 0.0, 1.0), tuple(tilted_b0_dir(25, (1, 0, 0))), tuple(tilted_b0_dir(25, (0, 1, 0)))]
    m = case["mask_arr"]
    paths = [_save(tmp_path / f"f{i}.nii", DipoleOperator(b0_dir=b, pad_factor=2.0).A(case["chi"]) * m)
             for i, b in enumerate(b0s)]
    args = ["recon", "cosmos", "--field", *paths, "--mask", case["mask"], "--quiet"]
    for b in b0s:
        args += ["--b0-dir", *map(str, b)]
    assert main(args + ["-o", str(tmp_path / "cosmos.nii.gz")]) == 0
    meta = json.loads((tmp_path / "cosmos.json").read_text())
    assert meta["method"] == "cosmos" and len(meta["B0_dirs"]) == 3
    chi = np.asarray(nib.load(str(tmp_path / "cosmos.nii.gz")).dataobj)
    tkd_chi = tkd(np.asarray(nib.load(paths[0]).dataobj, dtype=np.float64), m)

    def err(x):  # demeaned: the field does not determine chi's mean
        d = (x - case["chi"])[m]
        return np.linalg.norm(d - d.mean())

    assert err(chi) < 0.6 * err(tkd_chi)


def test_help_lists_methods_and_params(capsys):
    with pytest.raises(SystemExit) as e:
        main(["recon", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("tkd", "tsvd", "cfl2", "lsqr", "cg", "cosmos"):
        assert f"  {name} " in out
    assert "threshold=0.19" in out and "--param" in out


@pytest.mark.parametrize(
    "args, needles",
    [
        (["recon", "tdk"], ["unknown inversion method 'tdk'", "tkd"]),
        (["recon", "tkd", "--param", "thresh=0.2"], ["unknown parameter 'thresh'", "threshold"]),
        (["recon", "tkd", "--param", "threshold"], ["--param", "NAME=VALUE"]),
        (["recon", "tkd", "--param", "threshold=abc"], ["threshold", "float"]),
        (["recon", "tkd", "--param", "threshold=0.9"], ["threshold=0.9"]),
        (["recon", "cosmos"], ["--field", "cosmos"]),
    ],
)
def test_bad_method_or_param_is_one_line_error(case, tmp_path, capsys, args, needles):
    rc = main(args + ["--field", case["field"], "--mask", case["mask"], "-o", str(tmp_path / "x.nii")])
    assert rc == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "x.nii").exists()


def test_bad_files_are_one_line_errors(case, tmp_path, capsys):
    base = ["recon", "tkd", "-o", str(tmp_path / "x.nii")]
    empty = _save(tmp_path / "empty.nii", np.zeros((N, N, N)), dtype=np.uint8)
    small = _save(tmp_path / "small.nii", np.ones((N, N, N - 1)), dtype=np.uint8)
    moved = AFFINE.copy()
    moved[0, 3] += 5.0  # same shape, shifted 5 mm: not the field's grid
    shifted = _save(tmp_path / "shifted.nii", case["mask_arr"], affine=moved, dtype=np.uint8)
    missing = str(tmp_path / "nope.nii.gz")
    cases = [
        (["--field", case["field"], "--mask", empty], [empty, "empty"]),
        (["--field", case["field"], "--mask", small], [small, "shape"]),
        (["--field", case["field"], "--mask", shifted], [shifted, "affine"]),
        (["--field", missing, "--mask", case["mask"]], ["--field", missing, "not found"]),
        (["--field", case["field"], "--mask", missing], ["--mask", missing, "not found"]),
        (["--field", case["field"], "--mask", case["mask"], "--magnitude", missing], ["--magnitude", missing]),
        (["--field", case["field"], case["field"], "--mask", case["mask"]], ["--field", "cosmos"]),
        (["--field", case["field"], "--mask", case["mask"], "--b0-dir", "0", "0", "0"], ["--b0-dir"]),
        (["--field", case["field"], "--mask", case["mask"], "--voxel-size", "1", "0", "1"], ["--voxel-size"]),
    ]
    for extra, needles in cases:
        assert main(base + extra) == 2, extra
        _one_line_error(capsys, *needles)
    assert not (tmp_path / "x.nii").exists()
