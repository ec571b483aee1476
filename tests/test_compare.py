"""qsmlab compare: tables from the CSV logs alone (no W&B files, no Optuna storage), side-by-side slices."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from qsmlab.cli import main
from qsmlab.data.nifti import save_nifti


def _run(folder, name, nrmse_curve, chi, paths):
    """A run folder as qsmlab writes it: Lightning CSV rows (train rows interleaved), run_info, prediction."""
    rows = []
    for i, v in enumerate(nrmse_curve):
        step = 10 * (i + 1) - 1
        rows.append({"epoch": i, "step": step, "train/loss": 1.0 / (i + 1)})
        rows.append({"epoch": i, "step": step, "val/nrmse": v, "val/psnr": 40 - v / 10, "val/hfen": v * 0.9,
                     "val/ssim": 1 - v / 200})
    run = folder / name
    run.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
    pred = save_nifti(run / "predictions" / "sub-09_chi.nii.gz", chi)
    (run / "run_info.json").write_text(json.dumps({
        "experiment": name, "prediction": {"subject": "sub-09", "path": str(pred), "reference": str(paths[0]),
                                           "mask": str(paths[1])}}))
    return run


def test_compare_from_csv_logs_alone(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 0.05, (12, 12, 12))
    mask = np.zeros((12, 12, 12))
    mask[2:10, 2:10, 2:10] = 1
    paths = (save_nifti(tmp_path / "ref.nii.gz", ref), save_nifti(tmp_path / "mask.nii.gz", mask))
    a = _run(tmp_path / "runs", "uqsm_tv", [80.0, 60.0, 65.0], ref + 0.02, paths)
    b = _run(tmp_path / "runs", "qsmnet", [90.0, 70.0, 50.0], ref * 0.5, paths)
    # a sweep folder: its trials table only
    sweep = tmp_path / "runs" / "uqsm_tv_sweep"
    sweep.mkdir()
    pd.DataFrame({"number": [0, 1, 2], "state": ["COMPLETE", "COMPLETE", "PRUNED"], "value": [70.0, 55.0, None],
                  "params.model.loss.lambda_tv": [1e-5, 1e-3, 1e-1], "last_intermediate": [None, None, 99.0],
                  "run_dir": [None, None, None]}).to_csv(sweep / "trials.csv", index=False)
    out = tmp_path / "report"
    assert main(["compare", str(a), str(b), str(sweep), "-o", str(out)]) == 0
    assert not list(tmp_path.rglob("*.wandb")) and not list(tmp_path.rglob("journal.log"))
    table = pd.read_csv(out / "runs.csv").set_index("run")
    assert table.loc["uqsm_tv", "val/nrmse"] == 65.0  # last validation, not the best
    assert table.loc["uqsm_tv", "best val/nrmse"] == 60.0 and table.loc["uqsm_tv", "best step"] == 19
    assert table.loc["qsmnet", "val/ssim"] == pytest.approx(0.75) and table.loc["qsmnet", "steps"] == 30
    md = (out / "report.md").read_text()
    assert "| qsmnet | 30 |" in md and "Sweep `uqsm_tv_sweep` (3 trials, 2 complete)" in md
    for f in ("slices.png", "curves.png", "uqsm_tv_sweep_objective_vs_params.png", "uqsm_tv_sweep_history.png"):
        assert (out / f).stat().st_size > 1000, f
    assert "![slices](slices.png)" in md
    assert "val/nrmse" in capsys.readouterr().out


def test_compare_rejects_a_folder_without_logs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty"), "-o", str(tmp_path / "r")]) == 2
    assert "holds no metrics.csv" in capsys.readouterr().err
