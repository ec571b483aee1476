"""qsmlab sweep: trials in W&B (read back from the offline .wandb files), failures, pruning, a SIGKILL
mid-trial and a restart, two workers on one journal and on a real PostgreSQL server, bad input."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from _datasets import make_dataset
from _tiny_method import write_tiny_experiment

from qsmlab.cli import main
from qsmlab.lab.storage import open_storage
from qsmlab.lab.sweep import prepare, run_sweep
from qsmlab.lab.wandb_records import find_runs

TESTS = Path(__file__).resolve().parent
SPACE = {"model.lambda_tv": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sweepdata"), n_subjects=3, shape=(16, 16, 16),
                        sources=["invivo"] * 3)


@pytest.fixture()
def lab(tmp_path, manifest, monkeypatch):
    """A working folder with the tiny experiment; returns a function writing a sweep file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("WANDB_MODE", "offline")
    exp = write_tiny_experiment(tmp_path, manifest, epochs=2)

    def sweep(name="s", **kw):
        spec = {"experiment": str(exp), "search_space": SPACE, "objective": {"metric": "val/nrmse"},
                "sampler": {"name": "tpe", "seed": 1, "n_startup_trials": 10}, "pruner": {"name": "none"},
                "n_trials": 2, **kw}
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(spec))
        return p

    return sweep


def _study(name: str, storage: str | None = None):
    return optuna.load_study(study_name=name, storage=open_storage(storage, Path("runs") / name))


def test_two_trials_in_wandb_failure_recorded_study_continues(lab, capsys):
    space = {**SPACE, "model.fail_at_step": {"type": "categorical", "choices": [-1, 3]}}
    path = lab("s", search_space=space)
    spec, _, _, st = prepare(path)
    study = optuna.load_study(study_name="s", storage=st)
    study.enqueue_trial({"model.lambda_tv": 1e-3, "model.fail_at_step": 3})  # fails in its 2nd epoch
    study.enqueue_trial({"model.lambda_tv": 1e-2, "model.fail_at_step": -1})
    out = run_sweep(path)
    trials = _study("s").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert "planned failure at step 3" in trials[0].user_attrs["error"]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "] trial " in ln]
    assert len(lines) == 2 and "FAILED" in lines[0] and "best" in lines[1] and "val/nrmse=" in lines[1]
    # per-trial CSV logs and the report
    frame = pd.read_csv(out.study_dir / "trials.csv")
    assert frame.loc[1, "value"] == pytest.approx(trials[1].value)
    for n in (0, 1):
        m = pd.read_csv(out.study_dir / "trials" / f"trial-{n:04d}" / "metrics.csv")
        assert m["val/nrmse"].notna().sum() == 2 - (n == 0)
    for f in ("report.md", "objective_vs_params.png", "history.png"):
        assert (out.study_dir / f).stat().st_size > 200, f
    # one offline W&B run per trial, read back from the .wandb records
    runs = {r.name: r for r in find_runs(out.study_dir / "trials")}
    assert set(runs) == {"trial-0", "trial-1"}
    for n, t in enumerate(trials):
        r = runs[f"trial-{n}"]
        assert r.group == "s" and r.config["trial"] == n and r.config["study"] == "s"
        assert r.config["model.lambda_tv"] == pytest.approx(t.params["model.lambda_tv"])  # resolved config
        assert r.config["data.patch_size"] == 8 and r.config["trainer.max_epochs"] == 2
        assert len(r.series("val/nrmse")) == 2 - (n == 0)  # per-epoch history
    assert runs["trial-0"].exit_code == 1 and runs["trial-0"].summary["status"] == "failed"
    assert runs["trial-1"].exit_code == 0 and runs["trial-1"].summary["val/nrmse"] == pytest.approx(trials[1].value)
    assert runs["trial-1"].series("val/nrmse")[-1] == pytest.approx(trials[1].value)


def test_pruned_trial_with_lightning_pruning_callback(lab):
    path = lab("p", pruner={"name": "threshold", "upper": 1.0}, n_trials=1)  # NRMSE (%) > 1: prune
    run_sweep(path)
    (t,) = _study("p").trials
    assert t.state.name == "PRUNED" and list(t.intermediate_values) == [0]
    (r,) = find_runs("runs/p/trials")
    assert r.exit_code == 0 and r.summary["status"] == "pruned" and len(r.series("val/nrmse")) == 1
    # the run's last validation is reported but not pruned: a finished training keeps its result
    run_sweep(lab("p1", pruner={"name": "threshold", "upper": 1.0}, n_trials=1, overrides={"trainer.max_epochs": 1}))
    (t,) = _study("p1").trials
    assert t.state.name == "COMPLETE" and list(t.intermediate_values) == [0] and t.value > 1.0


def test_sigkill_mid_trial_then_restart_loses_and_duplicates_nothing(lab):
    path = lab("k", n_trials=3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "qsmlab.cli", "sweep", str(path), "--study", "k"]
    # slow steps (0.6 s, 4 per trial) so that the kill lands inside the second trial
    yaml_spec = yaml.safe_load(path.read_text())
    yaml_spec["overrides"] = {"model.step_delay": 0.6}
    path.write_text(yaml.safe_dump(yaml_spec))
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, before = time.time(), None
    while time.time() - t0 < 120:
        time.sleep(0.3)
        if not Path("runs/k/journal.log").is_file():
            continue
        trials = _study("k").trials
        running = [t for t in trials if t.state.name == "RUNNING"]
        if any(t.state.name == "COMPLETE" for t in trials) and running and \
                Path(running[0].user_attrs.get("run_dir", "-"), "metrics.csv").is_file():
            before = trials
            break
        assert p.poll() is None, "the sweep ended before the kill"
    assert before is not None, "no trial running after a finished one within 120 s"
    p.send_signal(signal.SIGKILL)
    p.wait()
    done_before = {t.number: (t.params, t.value, t.datetime_complete) for t in before if t.state.name == "COMPLETE"}
    crashed = next(t for t in before if t.state.name == "RUNNING")
    yaml_spec["overrides"] = {}
    path.write_text(yaml.safe_dump(yaml_spec))
    run_sweep(path, study="k")
    after = _study("k").trials
    for n, (params, value, finished) in done_before.items():  # finished trials intact
        t = after[n]
        assert (t.state.name, t.params, t.value, t.datetime_complete) == ("COMPLETE", params, value, finished)
    fail = after[crashed.number]
    assert fail.state.name == "FAIL" and fail.user_attrs["qsmlab.crashed"]
    retries = [t for t in after if t.user_attrs.get("qsmlab.retry_of") == crashed.number]
    assert len(retries) == 1 and retries[0].params == crashed.params and retries[0].state.name == "COMPLETE"
    complete = [t for t in after if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and len(after) == 4  # the budget: 3 finished trials, nothing run twice
    assert len({t.number for t in complete}) == 3


def _two_workers(lab, name: str, storage: str | None):
    path = lab(name, n_trials=4, overrides={"model.step_delay": 0.4})
    out = run_sweep(path, workers=2, storage=storage, study=name)
    trials = _study(name, storage).trials
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.number for t in trials}) == 4
    assert len({t.params["model.lambda_tv"] for t in trials}) == 4  # different seeds per worker
    assert len({t.user_attrs["qsmlab.worker"] for t in trials}) == 2  # both processes ran trials
    assert len(list(Path(out.study_dir, "trials").glob("trial-*/metrics.csv"))) == 4


def test_two_workers_share_one_journal(lab):
    _two_workers(lab, "w", None)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server (Debian's postgresql package), on a free local port."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2-binary is needed for PostgreSQL storage")
    import psycopg2

    root = Path(tempfile.mkdtemp(prefix="qsmlab-pg-", dir="/tmp"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: use the package's postgres user
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        shutil.chown(root, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(prefix + [initdb, "-D", str(data), "-A", "trust", "-U", "qsm"], check=True,
                   capture_output=True)
    subprocess.run(prefix + [pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                             f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        con = psycopg2.connect(host="127.0.0.1", port=port, user="qsm", dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE qsmlab")
        con.close()
        yield f"postgresql://qsm@127.0.0.1:{port}/qsmlab"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_postgresql(lab, postgres):
    _two_workers(lab, "pg", postgres)


def test_bad_input_fails_in_one_line_before_training(lab, capsys, tmp_path):
    cases = [
        (lab("b1", search_space={"model.lamda_tv": SPACE["model.lambda_tv"]}), [],
         "search_space key 'model.lamda_tv' does not exist", "closest: 'model.lambda_tv'"),
        (lab("b2", search_space={}), [], "search_space is empty", "model.loss.lambda_tv"),
        (lab("b3", objective={"metric": "val/accuracy"}), [], "objective metric 'val/accuracy'", "val/nrmse, "),
        (lab("b4"), ["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the study database",
         "127.0.0.1"),
        (lab("b5", overrides={"trainer.devices": 2}), [], "needs an RDB storage", "--storage"),
    ]
    for path, extra, msg, detail in cases:
        assert main(["sweep", str(path), *extra]) == 2, path
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err and detail in err, err
    assert not list(tmp_path.glob("runs/*/trials"))  # nothing trained


@pytest.mark.slow
def test_ddp_spawn_trial_with_rdb_storage_reports_to_the_study(lab, tmp_path):
    """devices=2 inside a trial: ddp_spawn on CPU (gloo), SQLite RDB storage, check_pruned() after fit."""
    path = lab("d", n_trials=1, overrides={"trainer.devices": 2}, pruner={"name": "median"})
    storage = f"sqlite:///{tmp_path / 'ddp.db'}"
    run_sweep(path, storage=storage)
    (t,) = _study("d", storage).trials
    assert t.state.name == "COMPLETE" and sorted(t.intermediate_values) == [0, 1]  # via check_pruned()
    cfg = yaml.safe_load(Path(t.user_attrs["run_dir"], "config.yaml").read_text())
    assert cfg["trainer"]["strategy"] == "ddp_spawn" and cfg["trainer"]["devices"] == 2
    (r,) = find_runs(t.user_attrs["run_dir"])
    assert r.exit_code == 0 and len(r.series("val/nrmse")) == 2


def test_seed_reruns_of_the_best_trial_are_run_with_other_seeds_and_reported(lab):
    """seed_reruns: 1 re-runs the best search trial once with seed offset 1 (seed_everything and data.seed),
    outside the budget; the report sets the spread against that seed noise."""
    path = lab("sr", seed_reruns=1, loggers=["csv"])
    out = run_sweep(path)
    trials = _study("sr").trials
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    search, rerun = trials[:2], trials[2]
    best = min(search, key=lambda t: t.value)
    assert rerun.user_attrs["qsmlab.seed_of"] == best.number and rerun.user_attrs["qsmlab.seed"] == 1
    assert rerun.params == best.params
    cfg = yaml.safe_load((Path(rerun.user_attrs["run_dir"]) / "config.yaml").read_text())
    base = yaml.safe_load((Path(best.user_attrs["run_dir"]) / "config.yaml").read_text())
    assert cfg["seed_everything"] == base["seed_everything"] + 1
    assert cfg["data"]["seed"] == base["data"]["seed"] + 1
    sp = out.report["spread"]
    assert sp["seed_values"][0] == pytest.approx(best.value) and sp["seed_values"][1] == pytest.approx(rerun.value)
    assert "Seed noise" in (out.study_dir / "report.md").read_text()
    # a second invocation finds the budget and the re-run done: nothing more runs
    run_sweep(path)
    assert len(_study("sr").trials) == 3


def test_spread_verdicts_on_known_values():
    from qsmlab.lab.report import spread_and_seed_noise

    def frame(values, lams, seed_vals=()):
        rows = [{"number": i, "state": "COMPLETE", "value": v, "params.lam": lam, "seed_of": None}
                for i, (v, lam) in enumerate(zip(values, lams))]
        best = min(range(len(values)), key=lambda i: values[i])
        rows += [{"number": len(rows) + k, "state": "COMPLETE", "value": v, "params.lam": lams[best], "seed_of": best}
                 for k, v in enumerate(seed_vals)]
        return pd.DataFrame(rows)

    sp = spread_and_seed_noise(frame([35.0, 34.0, 36.0], [1e-5, 1e-3, 1e-1], [34.2, 33.9]), "lam", "minimize")
    assert sp["verdict"] == "minimum" and sp["resolved"]
    assert sp["margins"] == {"smaller": {"nearest": 1.0, "largest": 1.0}, "larger": {"nearest": 2.0, "largest": 2.0}}
    assert sp["seed_range"] == pytest.approx(0.3) and sp["spread"] == pytest.approx(2.0)
    # the sweep of 2026-12-06: nearest larger neighbour within the noise, the curve still rises out of it
    sp = spread_and_seed_noise(frame([63.21, 66.27, 66.56, 64.6, 63.61], [4.1e-3, 4.7e-4, 2.9e-5, 7.6e-3, 5.3e-3],
                                     [64.21, 63.08]), "lam", "minimize")
    assert sp["verdict"] == "minimum" and not sp["resolved"]
    assert sp["margins"]["larger"]["nearest"] == pytest.approx(0.40) and sp["margins"]["larger"]["largest"] == pytest.approx(1.39)
    sp = spread_and_seed_noise(frame([34.8, 34.76, 34.82], [1e-5, 1e-4, 5e-4], [34.9, 34.7]), "lam", "minimize")
    assert sp["verdict"] == "flat"
    sp = spread_and_seed_noise(frame([34.8, 34.0, 36.0], [1e-5, 1e-3, 1e-1], [34.9, 34.1]), "lam", "minimize")
    assert sp["verdict"] == "within noise"  # the smaller side's 0.8 is within the 0.9 seed range
    sp = spread_and_seed_noise(frame([34.0, 35.0], [1e-5, 1e-3], [34.1]), "lam", "minimize")
    assert sp["verdict"] == "edge"
    sp = spread_and_seed_noise(frame([35.0, 34.0, 36.0], [1e-5, 1e-3, 1e-1]), "lam", "minimize")
    assert sp["verdict"] == "no seed noise"
    sp = spread_and_seed_noise(frame([-35.0, -34.0, -36.0], [1e-5, 1e-3, 1e-1], [-34.2]), "lam", "maximize")
    assert sp["best"] == -34.0 and sp["margins"]["smaller"]["nearest"] == 1.0 and sp["margins"]["larger"]["largest"] == 2.0
