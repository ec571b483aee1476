"""``qsmlab test``: LightningCLI's test on an experiment (see :mod:`qsmlab.lab.cli`)."""

from __future__ import annotations

from collections.abc import Sequence

from qsmlab.commands.fit import add_arguments, describe, run_subcommand, usage

SUBCOMMAND = "test"
USAGE = usage(SUBCOMMAND)
HELP = "score a checkpoint on the test subjects of an experiment (test/* metrics)"
DESCRIPTION = describe("Score a checkpoint on the experiment's test subjects (full volumes, test/* metrics; synthetic rows never test).", "qsmlab test uqsm_tv --ckpt_path runs/uqsm_tv/quick/version_0/checkpoints/last.ckpt")

__all__ = ["DESCRIPTION", "HELP", "USAGE", "add_arguments", "run_argv"]


def run_argv(argv: Sequence[str]) -> int:
    return run_subcommand(SUBCOMMAND, argv)
