"""``qsmlab validate``: LightningCLI's validate on an experiment (see :mod:`qsmlab.lab.cli`)."""

from __future__ import annotations

import argparse

from qsmlab.commands.fit import add_arguments, describe, run_subcommand

ACCEPTS_EXTRA = True
SUBCOMMAND = "validate"
HELP = "evaluate a checkpoint on the validation subjects of an experiment (val/* metrics)"
DESCRIPTION = describe("validate", "Evaluate a checkpoint on the experiment's validation volumes (full volumes, val/* metrics).", "qsmlab validate uqsm_tv --ckpt_path runs/uqsm_tv/quick/version_0/checkpoints/last.ckpt")

__all__ = ["ACCEPTS_EXTRA", "DESCRIPTION", "HELP", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    return run_subcommand(SUBCOMMAND, args)
