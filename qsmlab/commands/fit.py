"""``qsmlab fit``: train an experiment with LightningCLI (see :mod:`qsmlab.lab.cli`)."""

from __future__ import annotations

import argparse

ACCEPTS_EXTRA = True  # --section.key VALUE overrides pass through to the experiment config
SUBCOMMAND = "fit"

HELP = "train a method from an experiment YAML (LightningCLI; W&B + CSV logs, resumable checkpoints)"

OPTIONS = """\
options (all optional except the experiment):
  EXPERIMENT | --config FILE   experiment name (experiments/<name>.yaml, e.g. uqsm_tv) or YAML path
  --profile NAME               profile of the experiment: quick (2 CPU cores, minutes; the default when
                               defined) or full (GPU, paper settings)
  --run_dir DIR                run folder (default runs/<experiment>/<profile>/version_<n>)
  --ckpt_path PATH|last|best   start from a checkpoint; 'last' resumes the latest run that has a
                               checkpoints/last.ckpt (or the --run_dir given)
  --loggers LIST               wandb,csv (default), add tensorboard, or 'none'
  -o, --output_dir DIR         predict only: where the chi maps go (default <run_dir>/predictions)
  --SECTION.KEY VALUE          override any config key; init_args levels may be left out, e.g.
                               --model.loss.lambda_tv 3e-3  --trainer.max_epochs 5  --data.patch_size 48

Every run folder holds config.yaml (full resolved config), run_info.json (git commit or "unknown",
package versions, manifest sha256, seed, status, final metrics), metrics.csv, checkpoints/last.ckpt and
wandb/ (offline unless you are logged in or set WANDB_MODE=online; upload with 'wandb sync').
"""


def describe(sub: str, what: str, example: str) -> str:
    return f"{what}\n\n{OPTIONS}\nexample:\n  {example}\n"


DESCRIPTION = describe(
    "fit", "Train the experiment's model on its data (the experiment's trainer settings, the chosen profile, "
    "then your overrides). A killed run continues with --ckpt_path last.",
    "qsmlab fit uqsm_tv --profile quick --model.loss.lambda_tv 3e-3")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", nargs="?", metavar="EXPERIMENT",
                   help="experiment name or YAML path (or --config FILE)")


def run_subcommand(sub: str, args: argparse.Namespace) -> int:
    from qsmlab.lab.cli import main

    argv = [sub] + ([args.experiment] if args.experiment else []) + list(getattr(args, "extra", []) or [])
    return main(argv)


def run(args: argparse.Namespace) -> int:
    return run_subcommand(SUBCOMMAND, args)
