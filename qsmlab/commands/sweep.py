"""``qsmlab sweep``: tune an experiment with Optuna, one W&B run per trial (see :mod:`qsmlab.lab.sweep`)."""

from __future__ import annotations

import argparse

HELP = "Optuna study over an experiment's config keys (journal or PostgreSQL storage, W&B per trial, resumable)"

DESCRIPTION = """\
Run an Optuna study described by a sweep file (sweeps/<name>.yaml: base experiment, search space over any
key of the resolved config, objective metric and direction, sampler, pruner, budget). Every trial trains
the experiment with the proposed values in runs/<study>/trials/trial-<n>/ (CSV log, checkpoints, one W&B
run: group = study, name = trial-<n>; offline unless you are logged in or set WANDB_MODE=online). One line
is printed per finished trial; at the end the best parameters and their metrics, runs/<study>/report.md,
trials.csv, objective_vs_params.png and history.png.

The study is stored in runs/<study>/journal.log unless --storage gives an SQLAlchemy URL. Rerunning a
killed sweep continues it: finished trials stay, the trial that was running is re-queued, and only the
missing trials run. A trial that raises is recorded as FAIL with its error and the study continues.

Several machines, one study (PostgreSQL): start the same command on every host with
  --storage postgresql://USER:PASSWORD@DBHOST:5432/qsmlab
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", metavar="SWEEP", help="sweep file (sweeps/<name>.yaml) or its name, e.g. uqsm_tv")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local worker processes on the study (default: the file's, else 1); torch threads "
                        "per worker = cores // N")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="SQLAlchemy URL (postgresql://..., sqlite:///...) or a journal file path "
                        "(default runs/<study>/journal.log)")
    p.add_argument("--n-trials", type=int, default=None, metavar="K",
                   help="trials the study should hold when done (default: the file's n_trials)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="start no new trial after S seconds (running ones finish)")
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default: the file's, else its stem)")


def run(args: argparse.Namespace) -> int:
    from qsmlab.lab.sweep import run_sweep

    run_sweep(args.sweep, storage=args.storage, n_trials=args.n_trials, timeout=args.timeout,
              workers=args.workers, study=args.study)
    return 0
