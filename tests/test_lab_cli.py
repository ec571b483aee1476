"""qsmlab fit through QSMLabCLI: layered config + overrides, provenance saved, W&B/CSV logs, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from _datasets import make_dataset
from _tiny_method import write_tiny_experiment

from qsmlab.cli import main
from qsmlab.data.manifest import manifest_hash
from qsmlab.lab.wandb_records import find_runs

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("labcli"), n_subjects=3, shape=(16, 16, 16),
                        sources=["invivo"] * 3)


def test_fit_saves_config_provenance_logs_and_prediction(tmp_path, manifest, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exp = write_tiny_experiment(tmp_path, manifest, epochs=2)
    assert main(["fit", str(exp), "--model.lambda_tv", "3e-3", "--trainer.limit_val_batches", "1"]) == 0
    run = tmp_path / "runs" / "tiny" / "quick" / "version_0"
    assert str(run) in str(tmp_path / capsys.readouterr().out.split("-> ")[1].split()[0])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["init_args"]["lambda_tv"] == pytest.approx(3e-3)  # the override
    assert cfg["trainer"]["limit_val_batches"] == 1  # a class default passed through to LightningCLI
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "finished" and info["seed"] == 0
    assert info["manifest_sha256"] == manifest_hash(manifest)
    assert info["git"]["commit"] == "unknown" or len(info["git"]["commit"]) == 40
    assert info["packages"]["torch"] == torch.__version__ and info["packages"]["lightning"]
    # CSV: one validation per epoch, with the project's metrics
    m = pd.read_csv(run / "metrics.csv")
    assert m["val/nrmse"].notna().sum() == 2 and info["metrics"]["val/nrmse"] == pytest.approx(
        m["val/nrmse"].dropna().iloc[-1], rel=1e-5)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # W&B offline run in the run folder, with the resolved config and the metrics
    (wb,) = find_runs(run / "wandb")
    assert wb.config["model.lambda_tv"] == pytest.approx(3e-3) and wb.exit_code == 0
    assert len(wb.series("val/nrmse")) == 2 and wb.summary["status"] == "finished"
    # chi of the validation volume, on the input's grid
    pred = run / "predictions" / "sub-02_0_chi.nii.gz"
    ref = nib.load(manifest.parent / "sub-02" / "run-0" / "field.nii.gz")
    img = nib.load(pred)
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
    assert (run / "final_chi.png").stat().st_size > 1000


def test_bad_override_is_one_line_and_leaves_no_run(tmp_path, manifest, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exp = write_tiny_experiment(tmp_path, manifest)
    assert main(["fit", str(exp), "--model.lamda_tv", "1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "closest: 'model.lambda_tv'" in err, err
    assert not (tmp_path / "runs" / "tiny" / "quick" / "version_0").exists()
    assert main(["fit", "no_such_experiment_xyz"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_patch_larger_than_a_volume_is_one_line_and_leaves_no_run(tmp_path, manifest, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exp = write_tiny_experiment(tmp_path, manifest)
    assert main(["fit", str(exp), "--data.patch_size", "32"]) == 2  # the volumes are 16^3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exceeds the grid (16, 16, 16)" in err, err
    assert not (tmp_path / "runs").exists()


def _env():
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return env


def _epoch(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, weights_only=False)["epoch"])
    except Exception:  # absent or being written
        return -1


def test_fit_resumes_from_last_ckpt_after_sigkill(tmp_path, manifest):
    exp = write_tiny_experiment(tmp_path, manifest, epochs=5)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "qsmlab.cli", "fit", str(exp), "--run_dir", str(run), "--loggers", "csv"]
    # slow steps (1 s; 2 steps per epoch) so the kill lands mid-run, after an epoch's checkpoint
    p = subprocess.Popen(cmd + ["--model.step_delay", "1.0"], env=_env(), cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    t0 = time.time()
    while time.time() - t0 < 90:
        if _epoch(last) >= 1:
            break
        assert p.poll() is None, "fit ended before it could be killed"
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_epoch = torch.load(last, weights_only=False)["epoch"]
    assert killed_epoch < 4
    r = subprocess.run(cmd + ["--ckpt_path", "last"], env=_env(), cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Restoring states from the checkpoint path" in r.stderr + r.stdout
    final = torch.load(last, weights_only=False)
    assert final["epoch"] == 4 and final["global_step"] == 5 * 2  # 3 scans x 2 patches / batch 2 -> 2 steps
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "finished" and info["ckpt_path"] == "last"
    m = pd.read_csv(run / "metrics.csv")
    # the epochs trained before the kill were not trained again: one train-epoch row each
    per_epoch = m.dropna(subset=["train/loss_epoch"]).groupby("epoch").size()
    assert per_epoch.max() == 1 and 0 in per_epoch.index and 4 in per_epoch.index, per_epoch


def test_wandb_offline_only_without_credentials(tmp_path, monkeypatch):
    from qsmlab.lab.tracking import ensure_wandb_mode

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login a password b\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert ensure_wandb_mode() == "offline" and os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert ensure_wandb_mode() == "online" and "WANDB_MODE" not in os.environ  # logged in: W&B decides
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert ensure_wandb_mode() == "disabled"  # the user's choice wins


def test_git_commit_unknown_outside_a_checkout(tmp_path):
    from qsmlab.lab.provenance import git_commit

    assert git_commit(tmp_path) == {"commit": "unknown", "dirty": None}
