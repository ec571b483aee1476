"""Sweep machinery overhead and throughput: what the platform adds to each trial, and trials per hour.

Runs a sweep file (default ``sweeps/uqsm_tv.yaml``, the real uQSM) twice as separate ``qsmlab sweep``
processes, with 1 and then 2 workers, shortened to ``--steps`` optimiser steps per trial and without
pruning (every trial runs the same work). From each study's ``trials.csv`` and the process wall time:

- trial time: a trial's wall clock in Optuna (``datetime_complete - datetime_start``);
- fit time: ``trainer.fit`` alone (measured inside :func:`qsmlab.lab.run.execute`);
- per-trial overhead = trial time - fit time (config parse and checks, model/data/trainer build,
  provenance, W&B run init/config/finish, storage writes, the final chi prediction and figure) plus the
  process overhead (interpreter and imports, dataset check, study creation, report) shared by its trials;
- overhead fraction = per-trial overhead / (per-trial overhead + fit time), in wall time and in CPU time
  (CPU: every process of the sweep, from ``getrusage(RUSAGE_CHILDREN)``, against the CPU time of the
  trainer calls; CPU time does not depend on what else the machine runs). Target <= 5 % for the default
  trial length: the fraction is also given scaled to the sweep file's own ``trainer.max_steps`` (the fixed
  overhead over the fit time of a full-length trial, from the measured time per step).

Then micro-timings of the parts: W&B offline run init + config + finish, journal storage operations of
one trial, and a cold ``import`` of the sweep stack. Prints a table; asserts nothing.

    .venv/bin/python benchmarks/bench_sweep.py [--sweep sweeps/uqsm_tv.yaml] [--trials 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(sweep: Path, workers: int, trials: int, steps: int, tag: str) -> dict:
    spec = yaml.safe_load(sweep.read_text())
    study = f"bench-{Path(sweep).stem}-{tag}-w{workers}"
    ov = dict(spec.get("overrides") or {})
    ov.update({"trainer.max_steps": steps, "trainer.val_check_interval": max(1, steps // 2)})
    spec.update(overrides=ov, n_trials=trials, workers=workers, pruner={"name": "none"}, study=study)
    if not Path(spec["experiment"]).is_absolute() and (sweep.parent / spec["experiment"]).is_file():
        spec["experiment"] = str((sweep.parent / spec["experiment"]).resolve())
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(spec, f)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "qsmlab.cli", "sweep", f.name], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_total = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    os.unlink(f.name)
    if r.returncode != 0:
        raise SystemExit(f"sweep with {workers} worker(s) failed:\n{r.stderr[-3000:]}")
    t = pd.read_csv(ROOT / "runs" / study / "trials.csv")
    t = t[t["state"] == "COMPLETE"]
    trial = t["wall_seconds"].mean()
    fit = t["fit_seconds"].mean()
    # process overhead: the part of (wall x workers) not spent inside trials, shared by the trials
    proc = max(0.0, wall * workers - t["wall_seconds"].sum()) / len(t)
    over = trial - fit + proc
    fit_cpu = t["fit_cpu_seconds"].sum()
    return {"workers": workers, "trials": len(t), "wall_s": wall, "trial_s": trial, "fit_s": fit,
            "cpu_s": t["cpu_seconds"].mean(), "trial_overhead_s": trial - fit, "process_overhead_s": proc,
            "overhead_%": 100 * over / (over + fit), "trials_per_hour": 3600 * len(t) / wall,
            "fit_s_per_step": fit / steps, "cpu_total_s": cpu_total, "fit_cpu_s": fit_cpu / len(t),
            "cpu_overhead_s": (cpu_total - fit_cpu) / len(t), "cpu_overhead_%": 100 * (1 - fit_cpu / cpu_total)}


def micro() -> dict:
    import optuna

    from qsmlab.lab.tracking import finish_wandb, make_loggers, wandb_run

    out = {}
    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("WANDB_MODE", "offline")
        times = []
        for i in range(4):
            t0 = time.perf_counter()
            lgs = make_loggers(Path(d) / f"r{i}", ["wandb"], wandb_kwargs={"name": f"trial-{i}", "group": "bench"})
            wandb_run(lgs).config.update({f"k{j}": j for j in range(60)})
            finish_wandb(lgs, summary={"val/nrmse": 1.0})
            times.append(time.perf_counter() - t0)
        out["wandb_first_s"], out["wandb_next_s"] = times[0], sum(times[1:]) / 3
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        st = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(f"{d}/j.log"))
        s = optuna.create_study(storage=st)
        t0 = time.perf_counter()
        for _ in range(10):
            tr = s.ask()
            tr.suggest_float("x", 1e-5, 1e-1, log=True)
            for k in ("qsmlab.worker", "run_dir", "metrics", "seconds", "fit_seconds", "cpu_seconds"):
                tr.set_user_attr(k, 1.0)
            for e in range(4):
                tr.report(1.0, e)
            s.tell(tr, 1.0)
        out["storage_s"] = (time.perf_counter() - t0) / 10
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import qsmlab.lab.sweep, qsmlab.lab.run, qsmlab.methods, optuna, wandb"],
                   check=True, cwd=ROOT)
    out["imports_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", default=str(ROOT / "sweeps" / "uqsm_tv.yaml"))
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    sweep = Path(args.sweep)
    tag = time.strftime("%H%M%S")
    full_steps = (yaml.safe_load(sweep.read_text()).get("overrides") or {}).get("trainer.max_steps")
    rows = [run_sweep(sweep, w, args.trials, args.steps, tag) for w in (1, 2)]
    m = micro()
    print(f"bench_sweep: {sweep.name}, {args.trials} trials of {args.steps} steps (pruning off), "
          f"{os.cpu_count()} CPU(s) visible, load average {os.getloadavg()[0]:.1f}")
    print("| workers | trials | wall s | trial s | fit s | trial overhead s | process overhead s/trial | overhead % "
          "(wall) | CPU s/trial (all processes) | fit CPU s/trial | overhead CPU s/trial | overhead % (CPU) | "
          "trials/hour |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['trials']} | {r['wall_s']:.0f} | {r['trial_s']:.1f} | {r['fit_s']:.1f} | "
              f"{r['trial_overhead_s']:.1f} | {r['process_overhead_s']:.1f} | {r['overhead_%']:.1f} | "
              f"{r['cpu_total_s'] / r['trials']:.1f} | {r['fit_cpu_s']:.1f} | {r['cpu_overhead_s']:.1f} | "
              f"{r['cpu_overhead_%']:.1f} | {r['trials_per_hour']:.0f} |")
    if full_steps:
        for r in rows:
            fit_full = r["fit_cpu_s"] / args.steps * full_steps
            over = r["cpu_overhead_s"]
            print(f"scaled to the sweep's {full_steps} steps/trial, {r['workers']} worker(s), CPU time: overhead "
                  f"{over:.1f} s of {over + fit_full:.0f} s = {100 * over / (over + fit_full):.1f} % (target <= 5 %)")
        r2 = rows[-1]
        print(f"idle 2-core estimate, 2 workers x 1 thread: {2 * 3600 / (r2['cpu_overhead_s'] + r2['fit_cpu_s'] / args.steps * full_steps):.0f} "
              f"trials/hour of {full_steps} steps (CPU time per trial, both cores busy)")
    print(f"parts: W&B offline run init+config+finish {m['wandb_first_s']:.2f} s first / {m['wandb_next_s']:.3f} s "
          f"after; journal storage per trial {1000 * m['storage_s']:.0f} ms; cold imports {m['imports_s']:.1f} s")


if __name__ == "__main__":
    main()
