"""``qsmlab compare``: comparison report from run/sweep/LOO folders' CSV logs (see :mod:`qsmlab.lab.compare`)."""

from __future__ import annotations

import argparse

HELP = "compare runs, sweeps and LOO batches from their CSV logs alone: tables, curves, side-by-side slices"

DESCRIPTION = """\
Build a comparison report from the CSV logs qsmlab writes next to every run (no W&B or Optuna needed):

  run folders (metrics.csv)        last validation metrics, best val/nrmse and its step, validation curves,
                                   and the same slices of each run's saved chi prediction next to the
                                   reference with error maps (slices.png)
  sweep folders (trials.csv)       the trials table, the objective against each parameter (log axis for
                                   log-scale parameters) and the history; the best trial joins the runs
  LOO folders (loocv_table.csv)    the methods x metrics table (mean +- sd)
  any other folder                 every run folder below it

Writes REPORT_DIR/report.md, runs.csv, curves.png, slices.png and the sweep figures.

example:
  qsmlab compare runs/uqsm_tv runs/qsmnet/quick/version_0 runs/loocv-uqsm_tv -o reports/today
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="RUN_DIR", help="run, sweep or LOO folders (or folders holding runs)")
    p.add_argument("-o", "--output", required=True, metavar="REPORT_DIR", help="folder for the report")


def run(args: argparse.Namespace) -> int:
    from qsmlab.lab.compare import compare
    from qsmlab.lab.report import markdown_table

    table = compare(args.dirs, args.output)
    if len(table):
        cols = [c for c in ("run", "steps", "val/psnr", "val/nrmse", "val/hfen", "val/ssim") if c in table]
        print(markdown_table(table[cols]))
    print(f"report: {args.output}/report.md")
    return 0
