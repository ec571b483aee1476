"""The ``qsmlab`` command.

Each sub-command lives in ``qsmlab/commands/<name>.py`` and exposes ``HELP`` (one line),
``DESCRIPTION`` (the ``--help`` text), ``add_arguments(parser)`` and ``run(args) -> int``; a command that
reads its own arguments (``fit``, ``validate``, ``test``: LightningCLI's forms, ``--config FILE``,
``--key=value``, in any order) exposes ``run_argv(argv) -> int`` instead, and argparse only prints its
``--help``. Modules keep heavy imports inside ``run`` so that ``qsmlab --help`` is instant.

Bad input raises :class:`qsmlab.errors.QSMInputError`; it is printed as one line,
``qsmlab <command>: error: <message>``, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qsmlab import __version__
from qsmlab.errors import QSMInputError

COMMANDS = ("evaluate", "recon", "pipeline", "simulate", "bids", "manifest",
            "fit", "validate", "test", "predict", "dip", "sweep", "loocv", "compare")


def _load(name: str):
    try:
        return importlib.import_module(f"qsmlab.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"qsmlab.commands.{name}":
            return None
        raise


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), exit status 2 as before."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qsmlab",
        description="qsmlab: quantitative susceptibility mapping - classical and deep-learning methods on "
        "one physics contract (chi and fields in ppm, phase in rad, TE in s, B0 in T).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'qsmlab <command> --help' for the options of one command.",
    )
    p.add_argument("--version", action="version", version=f"qsmlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        sp = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                            usage=getattr(mod, "USAGE", None), formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        # ACCEPTS_EXTRA: the command takes free-form `--key.path value` overrides (LightningCLI style)
        sp.set_defaults(_run=getattr(mod, "run", None), _name=name,
                        _accepts_extra=getattr(mod, "ACCEPTS_EXTRA", False))
    return p


def _guarded(name: str, fn) -> int:
    try:
        return int(fn() or 0)
    except QSMInputError as e:
        print(f"qsmlab {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qsmlab {name}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS and not {"-h", "--help"} & set(argv[1:]):
        mod = _load(argv[0])
        if mod is not None and hasattr(mod, "run_argv"):  # the command reads its arguments itself, once
            return _guarded(argv[0], lambda: mod.run_argv(argv[1:]))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return _guarded(args._name, lambda: args._run(args))


if __name__ == "__main__":
    sys.exit(main())
