"""``qsmlab validate``: LightningCLI's validate on an experiment (see :mod:`qsmlab.lab.cli`)."""

from __future__ import annotations

from collections.abc import Sequence

from qsmlab.commands.fit import add_arguments, describe, run_subcommand, usage

SUBCOMMAND = "validate"
USAGE = usage(SUBCOMMAND)
HELP = "evaluate a checkpoint on the validation subjects of an experiment (val/* metrics)"
DESCRIPTION = describe("Evaluate a checkpoint on the experiment's validation volumes (full volumes, val/* metrics).", "qsmlab validate uqsm_tv --ckpt_path runs/uqsm_tv/quick/version_0/checkpoints/last.ckpt")

__all__ = ["DESCRIPTION", "HELP", "USAGE", "add_arguments", "run_argv"]


def run_argv(argv: Sequence[str]) -> int:
    return run_subcommand(SUBCOMMAND, argv)
