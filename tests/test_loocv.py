"""qsmlab loocv on a 3-subject manifest: per-fold and aggregated tables, baselines on the same folds,
--fold and rerun skipping, and the one-subject manifest refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from _datasets import make_dataset
from _tiny_method import write_tiny_experiment

from qsmlab.cli import main
from qsmlab.errors import QSMInputError
from qsmlab.metrics import nrmse, psnr
from qsmlab.recon import registry


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("loo"), n_subjects=3, shape=(16, 16, 16), sources=["invivo"] * 3)


def test_loocv_three_subjects(tmp_path, manifest, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    exp = write_tiny_experiment(tmp_path, manifest, epochs=2, val=[])
    # one fold first (a cluster array job), then the whole batch: the finished fold is not rerun
    common = ["--manifest", str(manifest), "--loggers", "csv", "--tv-alphas", "1e-4,1e-3,1e-2"]
    assert main(["loocv", str(exp), *common, "--fold", "1"]) == 0
    out = tmp_path / "runs" / "loocv-tiny"
    done = out / "folds" / "loso-sub-01" / "result.csv"
    first_mtime = done.stat().st_mtime
    assert main(["loocv", str(exp), *common]) == 0
    assert done.stat().st_mtime == first_mtime
    assert "1 already done, running 2" in capsys.readouterr().out
    folds = pd.read_csv(out / "loocv_folds.csv")
    assert sorted(set(folds["subject"])) == ["sub-00", "sub-01", "sub-02"]
    assert sorted(set(folds["method"])) == ["TKD", "TV", "tiny"]
    assert len(folds) == 9 and folds[["psnr", "nrmse", "hfen", "ssim"]].notna().all().all()
    # each fold trained without its held-out subject, and the scores are those of the saved maps
    for s in ("sub-00", "sub-01", "sub-02"):
        fdir = out / "folds" / f"loso-{s}"
        info = json.loads((fdir / "train" / "run_info.json").read_text())
        assert info["held_out"] == [s] and info["status"] == "finished"
        pred = np.asarray(nib.load(fdir / "pred" / f"{s}_0_chi.nii.gz").dataobj)
        ref = np.asarray(nib.load(manifest.parent / s / "run-0" / "chi.nii.gz").dataobj)
        mask = np.asarray(nib.load(manifest.parent / s / "run-0" / "mask.nii.gz").dataobj) > 0
        field = np.asarray(nib.load(manifest.parent / s / "run-0" / "field.nii.gz").dataobj)
        mag = np.asarray(nib.load(manifest.parent / s / "run-0" / "magnitude.nii.gz").dataobj)
        row = folds[(folds["subject"] == s) & (folds["method"] == "tiny")].iloc[0]
        assert row["nrmse"] == pytest.approx(nrmse(pred, ref, mask), rel=1e-5)
        # TV's weight was chosen on the two training subjects only (its grid), then applied here
        tvrow = folds[(folds["subject"] == s) & (folds["method"] == "TV")].iloc[0]
        grid = pd.read_csv(out / "tv_grid.csv")
        assert sorted(grid["alpha"].unique()) == pytest.approx([1e-4, 1e-3, 1e-2]) and len(grid) == 9  # once each
        train = grid[~grid["key"].str.startswith(s)].groupby("alpha")["nrmse"].mean()
        assert tvrow["tv_alpha"] == pytest.approx(train.idxmin())
        tv = registry.get("inversion", "tv")(field, mask, magnitude=mag, alpha=tvrow["tv_alpha"], quiet=True)
        assert tvrow["nrmse"] == pytest.approx(nrmse(tv, ref, mask), rel=1e-4)
        tkd = registry.get("inversion", "tkd")(field, mask, quiet=True)
        tkrow = folds[(folds["subject"] == s) & (folds["method"] == "TKD")].iloc[0]
        assert tkrow["psnr"] == pytest.approx(psnr(tkd, ref, mask), rel=1e-4)
    table = pd.read_csv(out / "loocv_table.csv")
    assert list(table["method"]) == ["tiny", "TKD", "TV"] and (table["folds"] == 3).all()
    per = folds.groupby("method")["nrmse"]
    assert table.set_index("method")["nrmse_mean"]["TV"] == pytest.approx(per.mean()["TV"])
    assert table.set_index("method")["nrmse_sd"]["TV"] == pytest.approx(per.std()["TV"])
    md = (out / "loocv_table.md").read_text()
    assert "| tiny | 3 |" in md and "±" in md
    assert (out / "loocv_box.png").stat().st_size > 1000


def test_loocv_refuses_a_single_subject_manifest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    m = make_dataset(tmp_path / "one", n_subjects=1, shape=(12, 12, 12), sources=["invivo"])
    exp = write_tiny_experiment(tmp_path, m, val=[])
    assert main(["loocv", str(exp), "--manifest", str(m)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "at least 2 subjects, found 1 (sub-00)" in err
    assert not Path(tmp_path, "runs", "loocv-tiny", "folds").exists()


def _hybrid(root: Path) -> Path:
    """2 synthetic subjects (with chi) + 2 in-vivo subjects without a reference chi, merged by the CLI."""
    syn = make_dataset(root / "syn", n_subjects=2, shape=(16, 16, 16), sources=["synthetic"] * 2)
    iv = make_dataset(root / "iv", n_subjects=2, shape=(16, 16, 16), sources=["invivo"] * 2)
    df = pd.read_csv(iv, dtype=str, keep_default_na=False)
    df["subject"] = ["iv-a", "iv-b"]
    df["chi"] = ""
    df.to_csv(iv, index=False)
    out = root / "hybrid" / "hybrid.csv"
    assert main(["manifest", "merge", str(syn), str(iv), "-o", str(out)]) == 0
    return out


def test_manifest_merge(tmp_path, capsys):
    from qsmlab.data.manifest import load_manifest

    out = _hybrid(tmp_path)
    assert "4 rows (2 synthetic, 2 in-vivo), 4 subjects" in capsys.readouterr().out
    t = load_manifest(out)  # paths were rewritten relative to the merged file's folder
    assert [r.subject for r in t] == ["sub-00", "sub-01", "iv-a", "iv-b"]
    assert t.rows[0].field.resolve() == (tmp_path / "syn" / "sub-00" / "run-0" / "field.nii.gz").resolve()
    assert t.rows[2].chi is None and t.rows[2].source == "invivo"
    # the same scan in two inputs: one line naming both files
    assert main(["manifest", "merge", str(out), str(tmp_path / "syn" / "manifest.csv"), "-o", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hybrid.csv" in err and "also in" in err and "syn/manifest.csv" in err
    assert not (tmp_path / "x.csv").exists()


def test_loocv_hybrid_holds_out_invivo_without_reference(tmp_path, monkeypatch):
    """Only in-vivo subjects are held out; without a reference chi the table has data consistency and
    agreement with the classical default, never PSNR/NRMSE against a chi that does not exist."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    m = _hybrid(tmp_path)
    exp = write_tiny_experiment(tmp_path, m, epochs=1, val=[])
    assert main(["loocv", str(exp), "--manifest", str(m), "--loggers", "csv", "--tv-alphas", "1e-3,1e-2"]) == 0
    out = tmp_path / "runs" / "loocv-tiny"
    folds = json.loads((out / "folds.json").read_text())["folds"]
    assert [f["test"] for f in folds] == [["iv-a"], ["iv-b"]]
    assert all({"sub-00", "sub-01"} <= set(f["train"]) for f in folds)  # synthetic rows always train
    res = pd.read_csv(out / "loocv_folds.csv")
    assert sorted(set(res["method"])) == ["TKD", "TV", "tiny"]
    assert res[["dc", "nrmse_vs_classical", "corr_vs_classical"]].notna().all().all()
    assert "psnr" not in res or res["psnr"].isna().all()
    table = pd.read_csv(out / "loocv_table.csv")
    assert "dc_mean" in table and "psnr_mean" not in table
    # dc is what it says: 100 ||M (A chi - f)|| / ||M f|| of the saved prediction
    from qsmlab.physics import DipoleOperator

    d = m.parent.parent / "iv" / "sub-00" / "run-0"
    field = np.asarray(nib.load(d / "field.nii.gz").dataobj)
    mask = np.asarray(nib.load(d / "mask.nii.gz").dataobj) > 0
    pred = np.asarray(nib.load(out / "folds" / "loso-iv-a" / "pred" / "iv-a_0_chi.nii.gz").dataobj)
    r = (DipoleOperator((1.0, 1.0, 1.0), (0.0, 0.0, 1.0), pad_factor=2.0).A(pred * mask) - field * mask) * mask
    row = res[(res["subject"] == "iv-a") & (res["method"] == "tiny")].iloc[0]
    assert row["dc"] == pytest.approx(100 * np.linalg.norm(r) / np.linalg.norm(field * mask), rel=1e-3)
    # TKD of a noise-free field agrees with TV far better than an unrelated map would
    assert res[res["method"] == "TKD"]["corr_vs_classical"].min() > 0.5


def test_supervised_methods_train_only_on_rows_with_chi(tmp_path):
    """QSMDataModule on a hybrid manifest: a method whose loss requires chi gets only the rows with chi;
    a self-supervised one (uQSM) all of them."""
    from types import SimpleNamespace

    from qsmlab.data.datamodule import QSMDataModule

    m = _hybrid(tmp_path)
    for requires, expected in ((("chi",), ["sub-00", "sub-01"]), (("magnitude",), ["sub-00", "sub-01", "iv-a", "iv-b"])):
        dm = QSMDataModule(manifest=str(m), patch_size=8, val_subjects=[])
        dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(requires=requires))
        dm.setup("fit")
        assert [r.subject for r in dm.rows["train"]] == expected
    dm = QSMDataModule(manifest=str(m), patch_size=8, train_subjects=["iv-a", "iv-b"], val_subjects=[])
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(requires=("chi",)))
    with pytest.raises(QSMInputError, match="supervised"):
        dm.setup("fit")
