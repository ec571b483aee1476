"""``qsmlab test``: LightningCLI's test on an experiment (see :mod:`qsmlab.lab.cli`)."""

from __future__ import annotations

import argparse

from qsmlab.commands.fit import add_arguments, describe, run_subcommand

ACCEPTS_EXTRA = True
SUBCOMMAND = "test"
HELP = "score a checkpoint on the test subjects of an experiment (test/* metrics)"
DESCRIPTION = describe("test", "Score a checkpoint on the experiment's test subjects (full volumes, test/* metrics; synthetic rows never test).", "qsmlab test uqsm_tv --ckpt_path runs/uqsm_tv/quick/version_0/checkpoints/last.ckpt")

__all__ = ["ACCEPTS_EXTRA", "DESCRIPTION", "HELP", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    return run_subcommand(SUBCOMMAND, args)
