"""``qsmlab loocv``: leave-one-subject-out cross-validation with TKD/TV baselines (see :mod:`qsmlab.lab.loocv`)."""

from __future__ import annotations

import argparse

ACCEPTS_EXTRA = True  # --section.key VALUE overrides of the experiment

HELP = "leave-one-subject-out cross-validation of an experiment, with TKD and tuned-TV baselines"

DESCRIPTION = """\
Train the experiment once per held-out subject of a manifest (leave-one-subject-out folds: every scan of
a subject in one fold; synthetic subjects always train), predict the held-out subject's full volume and
score it inside the mask (PSNR, NRMSE, HFEN, SSIM, ...), next to TKD and TV (TV's weight tuned on each
fold's training subjects only). Writes, under --out (default runs/loocv-<experiment>/): folds.json,
folds/<fold>/ (training run with its CSV log and W&B run in group loocv-<experiment>, predictions,
result.csv), loocv_folds.csv, loocv_table.csv/.md (methods x metrics, mean +- sd) and loocv_box.png.

A fold with a result.csv is finished and skipped on a rerun, so a killed batch resumes; --fold i runs
one fold (one job per fold on a cluster, e.g. a SLURM array: --fold $SLURM_ARRAY_TASK_ID), then
aggregates whatever folds are finished.

example:
  qsmlab loocv uqsm_tv --manifest data/invivo/manifest.csv --params best-of:uqsm_tv --workers 2
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", metavar="EXPERIMENT", help="experiment name (experiments/<name>.yaml) or YAML path")
    p.add_argument("--manifest", default=None, metavar="M",
                   help="manifest CSV with at least 2 in-vivo subjects (synthetic rows always train); a held-out "
                        "scan without a reference chi is scored by data consistency and agreement with the "
                        "classical default")
    p.add_argument("--demo", action="store_true",
                   help="no manifest: 4 in-vivo-like heads written as BIDS, prepared by qsmlab bids, held out "
                        "one at a time beside the embedded synthetic rows (qsmlab.lab.loocv_demo)")
    p.add_argument("--profile", default=None, help="experiment profile (default: quick when defined)")
    p.add_argument("--params", default=None, metavar="best-of:STUDY",
                   help="start from the best trial's parameters of a sweep study")
    p.add_argument("--storage", default=None, metavar="URL", help="storage of that study (default runs/STUDY/journal.log)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="folds run as N local processes")
    p.add_argument("--fold", type=int, default=None, metavar="I", help="run only fold I (0-based)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default runs/loocv-<experiment>)")
    p.add_argument("--tv-alphas", default=None, metavar="A,B,...",
                   help="TV weights searched on each fold's training subjects (default 7 values, 1e-5 ... 1e-2)")
    p.add_argument("--loggers", default=None, help="wandb,csv (default), tensorboard, or none")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from qsmlab.errors import QSMInputError
    from qsmlab.lab.cli import split_overrides
    from qsmlab.lab.loocv import numeric_overrides, run_loocv
    from qsmlab.lab.tracking import parse_logger_names

    if args.demo or args.manifest is None:
        if args.manifest is not None:
            raise QSMInputError("--demo builds its own manifest; drop --manifest or --demo")
        if not args.demo:
            raise QSMInputError("--manifest M is required (or --demo for the embedded leave-one-out demo)")
        from qsmlab.lab.loocv_demo import run_demo

        run_demo(args.experiment, out=args.out, profile=args.profile, params=args.params, storage=args.storage,
                 workers=args.workers, fold=args.fold, loggers=parse_logger_names(args.loggers), quiet=args.quiet,
                 overrides=numeric_overrides(split_overrides(getattr(args, "extra", []) or [])))
        return 0
    run_loocv(args.experiment, args.manifest, profile=args.profile, params=args.params, storage=args.storage,
              workers=args.workers, fold=args.fold, out=args.out, loggers=parse_logger_names(args.loggers),
              overrides=numeric_overrides(split_overrides(getattr(args, "extra", []) or [])), quiet=args.quiet,
              tv_alphas=_alphas(args.tv_alphas))
    return 0


def _alphas(text: str | None) -> list[float] | None:
    from qsmlab.errors import QSMInputError

    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QSMInputError(f"--tv-alphas {text!r}: expected comma-separated positive numbers") from None
    if not vals or min(vals) <= 0:
        raise QSMInputError(f"--tv-alphas {text!r}: expected comma-separated positive numbers")
    return vals
