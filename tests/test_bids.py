"""qsmlab simulate --bids -> qsmlab bids -> derivatives + manifest; bad BIDS input, one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmlab.cli import main
from qsmlab.data.bids import build_name, find_acquisitions, inherited_metadata, parse_name
from qsmlab.errors import QSMInputError
from qsmlab.physics.geometry import b0_dir_from_affine

FAST = ["--inversion", "tkd", "--quiet"]  # the pipeline's cheapest inversion: these tests check files, not chi


# -- filenames ---------------------------------------------------------------------------------------------


def test_parse_and_build_names():
    n = parse_name("sub-01_ses-pre_acq-fast_run-2_echo-3_part-phase_MEGRE.nii.gz")
    assert n.ents == {"sub": "01", "ses": "pre", "acq": "fast", "run": "2", "echo": "3", "part": "phase"}
    assert (n.suffix, n.extension) == ("MEGRE", ".nii.gz")
    assert n.filename() == "sub-01_ses-pre_acq-fast_run-2_echo-3_part-phase_MEGRE.nii.gz"
    # BIDS order, whatever order the dict has
    assert build_name({"run": "1", "desc": "brain", "sub": "02", "ses": "1"}, "mask") == "sub-02_ses-1_run-1_desc-brain_mask.nii.gz"
    for bad in ("sub-01.nii.gz", "sub_01_MEGRE.nii.gz", "sub-01_run-1_run-2_MEGRE.nii.gz", "notes.txt",
                "sub-01_echo-1_part-phase_MEGRE.nii.gz.bak"):
        assert parse_name(bad) is None
    with pytest.raises(QSMInputError, match="alphanumeric"):
        build_name({"sub": "0_1"}, "MEGRE")


def test_sidecar_inheritance(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    img = anat / "sub-01_echo-1_part-phase_MEGRE.nii.gz"
    img.touch()
    (tmp_path / "MEGRE.json").write_text(json.dumps({"MagneticFieldStrength": 3, "Manufacturer": "X"}))
    (tmp_path / "part-phase_MEGRE.json").write_text(json.dumps({"Units": "arbitrary", "MagneticFieldStrength": 7}))
    (anat / "sub-01_echo-1_part-phase_MEGRE.json").write_text(json.dumps({"EchoTime": 0.005, "Units": "rad"}))
    (anat / "sub-01_echo-2_part-phase_MEGRE.json").write_text(json.dumps({"EchoTime": 0.010}))
    meta = inherited_metadata(img, tmp_path)
    # the closer, more specific sidecar wins; the other echo's sidecar does not apply
    assert meta == {"Units": "rad", "MagneticFieldStrength": 7, "EchoTime": 0.005, "Manufacturer": "X"}
    assert parse_name("MEGRE.json").entities == () and parse_name("sub-01.json") is None


# -- the synthetic dataset ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Two subjects at 4 mm: sub-01 with ses- and run- entities, sub-02 oblique (20 deg)."""
    root = tmp_path_factory.mktemp("bids") / "raw"
    assert main(["simulate", "--bids", str(root), "--scan", "sub=01,ses=1,run=1,seed=0",
                 "--scan", "sub=02,tilt=20,seed=1", "--voxel-size", "4", "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deriv") / "qsmlab"
    truth = raw / "derivatives" / "qsmlab-truth"
    assert main(["bids", str(raw), "-o", str(out), "--reference", str(truth), *FAST]) == 0
    return out


def test_simulate_bids_layout(raw):
    names = sorted(p.name for p in raw.rglob("*_MEGRE.nii.gz"))
    assert len(names) == 2 * 5 * 2  # subjects x echoes x (mag, phase)
    assert "sub-01_ses-1_run-1_echo-5_part-phase_MEGRE.nii.gz" in names
    assert (raw / "sub-02" / "anat" / "sub-02_echo-1_part-mag_MEGRE.nii.gz").is_file()
    desc = json.loads((raw / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["GeneratedBy"][0]["Name"] == "qsmlab"
    side = json.loads((raw / "sub-02" / "anat" / "sub-02_echo-3_part-phase_MEGRE.json").read_text())
    assert side["EchoTime"] == pytest.approx(0.014) and side["MagneticFieldStrength"] == 3.0 and side["Units"] == "rad"
    assert "B0_dir" not in side  # the oblique geometry is in the affine, as a scanner writes it
    aff = nib.load(raw / "sub-02" / "anat" / "sub-02_echo-1_part-phase_MEGRE.nii.gz").affine
    t = np.deg2rad(20.0)
    assert np.allclose(b0_dir_from_affine(aff), [0.0, np.sin(t), np.cos(t)], atol=1e-6)
    ph = np.asarray(nib.load(raw / "sub-02" / "anat" / "sub-02_echo-3_part-phase_MEGRE.nii.gz").dataobj)
    assert ph.min() >= -np.pi - 1e-6 and ph.max() <= np.pi + 1e-6 and ph.max() - ph.min() > 6.0  # wrapped
    acqs = find_acquisitions(raw)
    assert [a.key for a in acqs] == ["sub-01_ses-1_run-1", "sub-02"]
    assert acqs[0].te == pytest.approx((0.004, 0.009, 0.014, 0.019, 0.024)) and acqs[0].b0_tesla == 3.0


def test_bids_derivatives(raw, prepared):
    anat1 = prepared / "sub-01" / "ses-1" / "anat"
    chi_path = anat1 / "sub-01_ses-1_run-1_Chimap.nii.gz"
    for name in ("sub-01_ses-1_run-1_Chimap", "sub-01_ses-1_run-1_desc-local_fieldmap",
                 "sub-01_ses-1_run-1_desc-total_fieldmap", "sub-01_ses-1_run-1_desc-brain_mask",
                 "sub-01_ses-1_run-1_desc-valid_mask", "sub-01_ses-1_run-1_part-mag_desc-rss_MEGRE"):
        assert (anat1 / f"{name}.nii.gz").is_file() and (anat1 / f"{name}.json").is_file(), name
    assert (prepared / "sub-02" / "anat" / "sub-02_Chimap.nii.gz").is_file()
    # geometry and units: float32 on the source's (oblique) grid, chi and fields in ppm
    for _sub, src, out in (("01", raw / "sub-01/ses-1/anat/sub-01_ses-1_run-1_echo-1_part-phase_MEGRE.nii.gz", chi_path),
                          ("02", raw / "sub-02/anat/sub-02_echo-1_part-phase_MEGRE.nii.gz",
                           prepared / "sub-02/anat/sub-02_Chimap.nii.gz")):
        s, o = nib.load(src), nib.load(out)
        assert o.shape == s.shape and np.allclose(o.affine, s.affine) and o.get_data_dtype() == np.float32
    side = json.loads((anat1 / "sub-01_ses-1_run-1_Chimap.json").read_text())
    assert side["Units"] == "ppm" and side["Configuration"]["inversion"] == "tkd"
    assert side["Sources"][0].startswith("bids:raw:sub-01/ses-1/anat/")
    s2 = json.loads((prepared / "sub-02/anat/sub-02_Chimap.json").read_text())
    t = np.deg2rad(20.0)
    assert np.allclose(s2["B0_dir"], [0.0, np.sin(t), np.cos(t)], atol=1e-6)  # from the oblique affine
    assert json.loads((anat1 / "sub-01_ses-1_run-1_desc-local_fieldmap.json").read_text())["Units"] == "ppm"
    desc = json.loads((prepared / "dataset_description.json").read_text())
    gb = desc["GeneratedBy"][0]
    assert desc["DatasetType"] == "derivative" and gb["Name"] == "qsmlab" and gb["Version"]
    assert gb["Configuration"]["inversion"] == "tkd" and gb["Configuration"]["mask"] == "auto"
    # the local field is a field of in-vivo scale (ppm, not rad or Hz): compare with the truth
    truth = nib.load(raw / "derivatives/qsmlab-truth/sub-01/ses-1/anat/sub-01_ses-1_run-1_desc-local_fieldmap.nii.gz").get_fdata()
    local = nib.load(anat1 / "sub-01_ses-1_run-1_desc-local_fieldmap.nii.gz").get_fdata()
    valid = nib.load(anat1 / "sub-01_ses-1_run-1_desc-valid_mask.nii.gz").get_fdata() > 0
    assert valid.sum() > 1000
    # slope of the estimate on the truth: 1 in ppm (rad at the first echo would give 3.2, Hz 128)
    t_, l_ = truth[valid] - truth[valid].mean(), local[valid] - local[valid].mean()
    slope = float((t_ * l_).sum() / (t_**2).sum())
    assert 0.7 < slope < 1.3, slope
    brain = nib.load(raw / "derivatives/qsmlab-truth/sub-01/ses-1/anat/sub-01_ses-1_run-1_desc-brain_mask.nii.gz").get_fdata() > 0
    auto = nib.load(anat1 / "sub-01_ses-1_run-1_desc-brain_mask.nii.gz").get_fdata() > 0
    assert 2 * (auto & brain).sum() / (auto.sum() + brain.sum()) > 0.9  # the automatic mask of a head with skull


def test_bids_manifest(prepared, tmp_path, capsys):
    from qsmlab.data.manifest import load_manifest

    assert main(["manifest", "check", str(prepared / "manifest.csv")]) == 0
    assert "2 rows, 2 subjects, OK" in capsys.readouterr().out
    t = load_manifest(prepared / "manifest.csv")
    r1, r2 = t.rows
    assert (r1.subject, r1.session, r1.run, r1.source) == ("sub-01", "1", "run-1", "invivo")
    assert r1.chi is not None and r1.chi.name == "sub-01_ses-1_run-1_desc-truth_Chimap.nii.gz"
    assert r1.te == pytest.approx((0.004, 0.009, 0.014, 0.019, 0.024)) and r1.b0_tesla == 3.0
    assert r1.voxel_size == pytest.approx((4.0, 4.0, 4.0))
    assert r2.b0_dir == pytest.approx((0.0, np.sin(np.deg2rad(20)), np.cos(np.deg2rad(20))), abs=1e-6)


def test_bids_rerun_redoes_only_deleted(raw, prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    for p in (out / "sub-02" / "anat").iterdir():
        p.unlink()
    from qsmlab.data.bids_prepare import PrepareConfig, prepare_dataset

    _, done, failed = prepare_dataset(raw, out, PrepareConfig(inversion="tkd"), quiet=True,
                                      reference=raw / "derivatives" / "qsmlab-truth")
    assert done == ["sub-02"] and failed == []
    for p, t in before.items():
        if "sub-01" in p.name:
            assert p.stat().st_mtime_ns == t  # untouched
    assert (out / "sub-02" / "anat" / "sub-02_Chimap.nii.gz").is_file()
    # another configuration is not "finished": everything is redone
    _, done, _ = prepare_dataset(raw, out, PrepareConfig(inversion="tkd", bfr="sharp"), quiet=True, workers=2)
    assert sorted(done) == ["sub-01_ses-1_run-1", "sub-02"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Configuration"]["bfr"] == "sharp"


def test_bids_given_masks(raw, tmp_path):
    out = tmp_path / "o"
    truth = raw / "derivatives" / "qsmlab-truth"
    assert main(["bids", str(raw), "-o", str(out), "--mask", str(truth), "--participant-label", "02", *FAST]) == 0
    given = nib.load(truth / "sub-02/anat/sub-02_desc-brain_mask.nii.gz").get_fdata()
    used = nib.load(out / "sub-02/anat/sub-02_desc-brain_mask.nii.gz").get_fdata()
    assert np.array_equal(given, used)
    assert not (out / "sub-01").exists()


def test_bids_phase_arbitrary_units(tmp_path):
    """Vendor-integer phase (Units arbitrary) is rescaled to rad: same local field as the rad dataset."""
    args = ["--scan", "sub=01,seed=2", "--voxel-size", "5", "--quiet"]
    assert main(["simulate", "--bids", str(tmp_path / "r"), *args]) == 0
    assert main(["simulate", "--bids", str(tmp_path / "a"), "--phase-units", "arbitrary", *args]) == 0
    ph = nib.load(tmp_path / "a/sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz")
    assert ph.get_data_dtype() == np.int16
    for d in ("r", "a"):
        assert main(["bids", str(tmp_path / d), "-o", str(tmp_path / f"o{d}"), *FAST]) == 0
    f = [nib.load(tmp_path / f"o{d}/sub-01/anat/sub-01_desc-local_fieldmap.nii.gz").get_fdata() for d in ("r", "a")]
    v = nib.load(tmp_path / "or/sub-01/anat/sub-01_desc-valid_mask.nii.gz").get_fdata() > 0
    assert np.sqrt(np.mean((f[0] - f[1])[v] ** 2)) < 0.1 * np.std(f[0][v])


# -- bad input: one line naming the file -------------------------------------------------------------------


@pytest.fixture()
def small_raw(raw, tmp_path) -> Path:
    """A copy of sub-02 alone (cheap to break)."""
    root = tmp_path / "raw"
    (root / "sub-02").mkdir(parents=True)
    shutil.copytree(raw / "sub-02" / "anat", root / "sub-02" / "anat")
    shutil.copy(raw / "dataset_description.json", root)
    return root


def _fails(capsys, argv, pattern):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    lines = [e for e in err if "error" in e]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]
    return lines[0]


def test_bids_phase_without_magnitude(small_raw, tmp_path, capsys):
    (small_raw / "sub-02/anat/sub-02_echo-2_part-mag_MEGRE.nii.gz").unlink()
    line = _fails(capsys, ["bids", str(small_raw), "-o", str(tmp_path / "o"), *FAST], "sub-02_echo-2_part-phase_MEGRE.nii.gz")
    assert "no magnitude" in line


def test_bids_echoes_on_different_grids(small_raw, tmp_path, capsys):
    p = small_raw / "sub-02/anat/sub-02_echo-3_part-mag_MEGRE.nii.gz"
    img = nib.load(p)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), p)
    line = _fails(capsys, ["bids", str(small_raw), "-o", str(tmp_path / "o"), *FAST], "sub-02_echo-3_part-mag_MEGRE.nii.gz")
    assert "grid shape" in line


def test_bids_missing_echo_time(small_raw, tmp_path, capsys):
    for part in ("mag", "phase"):
        j = small_raw / f"sub-02/anat/sub-02_echo-4_part-{part}_MEGRE.json"
        meta = json.loads(j.read_text())
        meta.pop("EchoTime")
        j.write_text(json.dumps(meta))
    line = _fails(capsys, ["bids", str(small_raw), "-o", str(tmp_path / "o"), *FAST], "sub-02_echo-4_part-phase_MEGRE.nii.gz")
    assert "EchoTime" in line


def test_bids_unknown_phase_units(small_raw, tmp_path, capsys):
    j = small_raw / "sub-02/anat/sub-02_echo-1_part-phase_MEGRE.json"
    j.write_text(json.dumps({**json.loads(j.read_text()), "Units": "degrees"}))
    line = _fails(capsys, ["bids", str(small_raw), "-o", str(tmp_path / "o"), *FAST], "sub-02_echo-1_part-phase_MEGRE.nii.gz")
    assert "Units 'degrees'" in line


def test_bids_empty_dataset(tmp_path, capsys):
    (tmp_path / "empty" / "sub-01" / "anat").mkdir(parents=True)
    _fails(capsys, ["bids", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), *FAST], str(tmp_path / "empty"))


def test_bids_unknown_participant(small_raw, tmp_path, capsys):
    line = _fails(capsys, ["bids", str(small_raw), "-o", str(tmp_path / "o"), "--participant-label", "07", *FAST],
                  "--participant-label 07")
    assert str(small_raw) in line


def test_bids_one_failure_does_not_stop_the_others(raw, tmp_path, capsys):
    root = tmp_path / "raw"
    shutil.copytree(raw, root, ignore=shutil.ignore_patterns("derivatives"))
    (root / "sub-02/anat/sub-02_echo-2_part-mag_MEGRE.nii.gz").unlink()
    line = _fails(capsys, ["bids", str(root), "-o", str(tmp_path / "o"), *FAST], "sub-02_echo-2_part-phase")
    assert line.startswith("qsmlab bids: error: sub-02: ")
    assert (tmp_path / "o/sub-01/ses-1/anat/sub-01_ses-1_run-1_Chimap.nii.gz").is_file()
    assert "sub-01" in (tmp_path / "o/manifest.csv").read_text()


def test_hybrid_manifest_trains_uqsm_tv(prepared, tmp_path, monkeypatch):
    """qsmlab bids' manifest + a synthetic one -> manifest merge -> one fast_dev_run step of uqsm_tv, trained
    on the in-vivo fields without labels beside the synthetic rows."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _datasets import make_dataset

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    syn = make_dataset(tmp_path / "syn", n_subjects=1, shape=(24, 24, 24), voxel_size=(4.0, 4.0, 4.0),
                       sources=["synthetic"])
    hybrid = tmp_path / "hybrid.csv"
    assert main(["manifest", "merge", str(syn), str(prepared / "manifest.csv"), "-o", str(hybrid)]) == 0
    assert main(["manifest", "check", str(hybrid)]) == 0
    argv = ["fit", "uqsm_tv", "--data.manifest", str(hybrid), "--data.patch_size", "16",
            "--data.samples_per_volume", "1", "--data.queue_length", "2", "--data.batch_size", "2",
            "--data.train_subjects", "[sub-00, sub-01, sub-02]", "--data.val_subjects", "[]",
            "--trainer.fast_dev_run", "1", "--trainer.val_check_interval", "1", "--loggers", "csv"]
    assert main(argv) == 0


def test_bids_b0_dir_sidecar_wins(small_raw):
    """A B0_dir key (inherited from a top-level sidecar) overrides the affine's direction."""
    (small_raw / "part-phase_MEGRE.json").write_text(json.dumps({"B0_dir": [0, 0.6, 0.8]}))
    (acq,) = find_acquisitions(small_raw)
    assert acq.b0_dir == pytest.approx((0.0, 0.6, 0.8))
    (small_raw / "part-phase_MEGRE.json").unlink()
    (acq,) = find_acquisitions(small_raw)
    assert acq.b0_dir is None  # then the affine decides (test_bids_derivatives: the oblique sub-02)
