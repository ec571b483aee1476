"""``qsmlab fit``: train an experiment (the arguments are read once by :mod:`qsmlab.lab.cli`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

SUBCOMMAND = "fit"

HELP = "train a method from an experiment YAML (LightningCLI; W&B + CSV logs, resumable checkpoints)"

OPTIONS = """\
arguments (any order; every option also as --option=VALUE):
  EXPERIMENT                   experiment name (experiments/<name>.yaml, e.g. uqsm_tv) or YAML path
  -c, --config FILE            experiment YAML (instead of or after EXPERIMENT); repeatable: the files
                               are merged in the order given, each with its base: files
  --profile NAME               profile of the experiment: quick (2 CPU cores, minutes; the default when
                               defined), cpu / cpu_cosmos (CPU, up to an hour) or full (GPU, paper
                               settings). On realistic heads, quick and *_cosmos (and QSMnet's cpu)
                               learn from each head's simulated COSMOS map (labels, or the training
                               fields made from it), for a scan scored against COSMOS; *_truth (and the
                               other cpu profiles) from the scalar truth. Which ones an experiment has:
                               experiments/README.md
  --SECTION.KEY VALUE          override any config key (trainer, model, data, seed_everything); init_args
                               levels may be left out, e.g. --model.loss.lambda_tv 3e-3
                               --trainer.max_steps=500 --data.patch_size 48. Applied after the files and
                               the profile, in the order given, wherever they stand on the line.
  --run_dir DIR                run folder (default runs/<experiment>/<profile>/version_<n>)
  --ckpt_path PATH|last|best   start from a checkpoint; 'last' resumes the latest run that has a
                               checkpoints/last.ckpt (or the --run_dir given)
  --loggers LIST               wandb,csv (default), add tensorboard, or 'none'
  -o, --output_dir DIR         predict only: where the maps go (default <run_dir>/predictions)

Every key, type and value is checked before the run folder is created: a bad one is one line naming
the option, what it got and what it expects (exit status 2), and nothing is written.

Every run folder holds config.yaml (full resolved config), run_info.json (git commit or "unknown",
package versions, manifest sha256, seed, status, final metrics), metrics.csv, checkpoints/last.ckpt and
best-step=<n>.ckpt, and wandb/ (offline unless you are logged in or set WANDB_MODE=online; upload with
'wandb sync').
"""


def usage(sub: str) -> str:
    return (f"qsmlab {sub} [EXPERIMENT] [-c|--config FILE ...] [--profile P] [--SECTION.KEY VALUE ...] "
            "[--run_dir DIR] [--ckpt_path PATH] [--loggers LIST]")


USAGE = usage(SUBCOMMAND)


def describe(what: str, example: str) -> str:
    return f"{what}\n\n{OPTIONS}\nexample:\n  {example}\n"


DESCRIPTION = describe(
    "Train the experiment's model on its data (the experiment's trainer settings, the chosen profile, "
    "then your overrides). A killed run continues with --ckpt_path last.",
    "qsmlab fit uqsm_tv --profile quick --model.loss.lambda_tv 3e-3")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """For ``--help`` only: the arguments are read by :func:`run_argv` (see ``qsmlab/cli.py``)."""
    p.add_argument("experiment", nargs="?", metavar="EXPERIMENT",
                   help="experiment name or YAML path (or --config FILE)")


def run_subcommand(sub: str, argv: Sequence[str]) -> int:
    from qsmlab.lab.cli import main

    return main(sub, argv)


def run_argv(argv: Sequence[str]) -> int:
    return run_subcommand(SUBCOMMAND, argv)
