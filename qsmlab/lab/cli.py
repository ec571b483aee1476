"""``qsmlab fit|validate|test|predict``: the command line, parsed once, into one resolved config and a run.

Every form LightningCLI accepts, in any order::

    qsmlab fit uqsm_tv --profile quick --model.loss.lambda_tv 3e-3
    qsmlab fit --config experiments/uqsm_tv.yaml --trainer.max_steps=50 --profile=quick
    qsmlab fit --trainer.max_steps 50 --config=experiments/base/trainer.yaml --config experiments/uqsm_tv.yaml
    qsmlab fit uqsm_tv --ckpt_path last                 # resume the latest run of uqsm_tv/quick
    qsmlab test uqsm_tv --ckpt_path runs/uqsm_tv/quick/version_0/checkpoints/last.ckpt

:func:`parse_argv` reads the arguments once into an :class:`Invocation`. The config is then resolved in
a fixed order whatever the order typed: the experiment (positional: a name under ``experiments/`` or a
YAML path) and every ``--config FILE`` merged in the order given (each with its ``base:`` files), the
``--profile`` (default ``quick`` where defined), then every ``--key.path value`` in the order given
(``init_args`` levels optional; a key the YAML leaves at its class default is added). The resulting dict
goes to :func:`qsmlab.lab.run.execute`, which checks every key, type and value before it creates the run
folder: a bad one is one line naming the option, exit status 2, and nothing written.

Every run folder (default ``runs/<experiment>/<profile>/version_<n>``) holds ``config.yaml`` (the full
LightningCLI config, defaults included), ``run_info.json`` (:mod:`qsmlab.lab.provenance`), ``metrics.csv``,
``checkpoints/`` (``last.ckpt`` after every validation, ``best-step=<n>.ckpt``), ``wandb/`` and, after
``fit``, ``predictions/`` (the first validation volume's maps, NIfTI) with ``final_chi.png``.
``--ckpt_path last`` without ``--run_dir`` continues the latest version that has a ``last.ckpt``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsmlab.errors import QSMInputError
from qsmlab.lab import config as C
from qsmlab.lab.config_errors import ConfigError
from qsmlab.lab.run import SUBCOMMANDS, RunOptions, RunResult, execute
from qsmlab.lab.tracking import parse_logger_names

#: qsmlab's own options (each takes one value) -> the Invocation field they set
OPTIONS = {"--config": "configs", "-c": "configs", "--profile": "profile", "--run_dir": "run_dir",
           "--run-dir": "run_dir", "--ckpt_path": "ckpt_path", "--ckpt-path": "ckpt_path",
           "--loggers": "loggers", "--output_dir": "output_dir", "--output-dir": "output_dir",
           "-o": "output_dir"}
# a whole section may be given only where it is one value (a seed; LightningCLI's optimizer shorthand)
_OVERRIDE = re.compile(r"^--(seed_everything|optimizer|lr_scheduler"
                       r"|(?:trainer|model|data|optimizer|lr_scheduler)(?:\.[A-Za-z_]\w*)+)$")


@dataclass
class Invocation:
    """``qsmlab <subcommand> ...`` as typed: experiment files, qsmlab options and config overrides."""

    subcommand: str
    experiment: str | None = None  # the positional
    configs: list[str] = field(default_factory=list)  # --config FILE, in order
    profile: str | None = None
    run_dir: str | None = None
    ckpt_path: str | None = None
    loggers: str | None = None
    output_dir: str | None = None
    overrides: list[tuple[str, str]] = field(default_factory=list)  # (dotted key, text), in order

    @property
    def files(self) -> list[str]:
        return ([self.experiment] if self.experiment else []) + self.configs

    @property
    def name(self) -> str:
        """Name of the run's experiment: the positional, else the last --config (the most specific)."""
        return C.experiment_path(self.experiment or self.configs[-1]).stem


def split_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``["--a.b", "1", "--c.d=x"]`` -> ``[("a.b", "1"), ("c.d", "x")]``; anything else fails naming it."""
    inv = Invocation("fit")
    _read(inv, list(argv), allow=False)
    return inv.overrides


def parse_argv(subcommand: str, argv: Sequence[str]) -> Invocation:
    """The arguments of ``qsmlab <subcommand>``, read once (see the module docstring)."""
    if subcommand not in SUBCOMMANDS:
        raise QSMInputError(f"expected a subcommand in {SUBCOMMANDS}, got {subcommand!r}")
    inv = Invocation(subcommand)
    _read(inv, list(argv), allow=True)
    if not inv.files:
        raise QSMInputError(f"name an experiment (e.g. qsmlab {subcommand} uqsm_tv) or give --config FILE")
    return inv


def _read(inv: Invocation, argv: list[str], allow: bool) -> None:
    i = 0
    while i < len(argv):
        tok = argv[i]
        opt, eq, inline = tok.partition("=") if tok.startswith("-") else (tok, "", "")
        if not tok.startswith("-") or tok == "-":
            if not allow:
                raise QSMInputError(f"unexpected argument {tok!r}: overrides are --section.key VALUE "
                                    "(e.g. --model.loss.lambda_tv 3e-3)")
            if inv.experiment is not None:
                raise QSMInputError(f"unexpected argument {tok!r}: the experiment is already {inv.experiment!r} "
                                    "(more files: --config FILE; values: --section.key VALUE)")
            inv.experiment = tok
            i += 1
            continue
        is_override = _OVERRIDE.match(opt) is not None
        if not is_override and not (allow and opt in OPTIONS):
            raise QSMInputError(_unknown_option(opt, allow))
        if eq:
            value, i = inline, i + 1
        else:
            if i + 1 >= len(argv):
                raise QSMInputError(f"{opt}: missing value")
            value, i = argv[i + 1], i + 2
        if is_override:
            inv.overrides.append((opt[2:], value))
        elif OPTIONS[opt] == "configs":
            inv.configs.append(value)
        else:
            setattr(inv, OPTIONS[opt], value)


def _unknown_option(opt: str, allow: bool) -> str:
    known = [o for o in OPTIONS if o.startswith("--")] if allow else []
    hint = difflib.get_close_matches(opt, known, n=1, cutoff=0.7)
    if hint:
        return f"unknown option {opt} (did you mean {hint[0]}?)"
    if opt.startswith("--") and "." in opt:
        section = opt[2:].split(".", 1)[0]
        return (f"unknown option {opt}: config keys start with one of {', '.join(C.SECTIONS)}, "
                f"not {section!r}")
    what = ", ".join(known + ["--section.key VALUE"]) if allow else "--section.key VALUE"
    return f"unknown option {opt} (options: {what})"


# -- config -------------------------------------------------------------------------------------------------

def resolve(inv: Invocation) -> tuple[dict, dict[str, Any], str | None]:
    """(resolved config, ``{key: value}`` of the overrides, profile) of an invocation; data generated
    and cached if ``data.manifest`` asks for it."""
    profile = inv.profile
    if profile is None and C.DEFAULT_PROFILE in C.profiles_of(inv.files):
        profile = C.DEFAULT_PROFILE
    cfg = C.load_experiment(inv.files, profile)
    given: dict[str, Any] = {}
    for key, text in inv.overrides:
        value = C.parse_scalar(text)
        try:
            C.set_dotted(cfg, key, value, create=True)
        except QSMInputError as e:
            raise QSMInputError(f"--{key}: {e}") from None
        given[key.replace(".init_args", "")] = value
    C.resolve_manifest(cfg)
    return cfg, given, profile


def _next_version(root: Path) -> Path:
    nums = [int(p.name.split("_", 1)[1]) for p in root.glob("version_*") if p.name.split("_", 1)[1].isdigit()]
    return root / f"version_{max(nums) + 1 if nums else 0}"


def _latest_resumable(root: Path) -> Path | None:
    cands = [p for p in root.glob("version_*") if (p / "checkpoints" / "last.ckpt").is_file()]
    return max(cands, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime) if cands else None


def default_run_dir(experiment: str, profile: str | None, subcommand: str, ckpt_path: str | None) -> Path:
    """``runs/<experiment>/<profile>/version_<n>``: the next version, or with ``--ckpt_path last`` the
    latest one holding a ``last.ckpt``; a test/validate/predict of a checkpoint inside a run folder
    writes to ``<that run>/<subcommand>``."""
    root = C.RUNS_DIR / experiment / (profile or "default")
    if ckpt_path == "last" and (latest := _latest_resumable(root)) is not None:
        return latest if subcommand == "fit" else latest / subcommand
    if ckpt_path and ckpt_path not in ("last", "best") and subcommand != "fit":
        p = Path(ckpt_path).resolve()
        if p.parent.name == "checkpoints":
            return p.parent.parent / subcommand
    return _next_version(root)


def options(inv: Invocation) -> RunOptions:
    """The :class:`~qsmlab.lab.run.RunOptions` of an invocation (config resolved, run folder chosen)."""
    loggers = parse_logger_names(inv.loggers)
    if inv.ckpt_path and inv.ckpt_path not in ("last", "best") and not Path(inv.ckpt_path).is_file():
        raise QSMInputError(f"--ckpt_path {inv.ckpt_path}: no such file (or 'last' / 'best')")
    cfg, given, profile = resolve(inv)
    name = inv.name
    run_dir = Path(inv.run_dir) if inv.run_dir else default_run_dir(name, profile, inv.subcommand, inv.ckpt_path)
    return RunOptions(inv.subcommand, cfg, run_dir, given=given, experiment=name, profile=profile,
                      ckpt_path=inv.ckpt_path, output_dir=Path(inv.output_dir) if inv.output_dir else None,
                      loggers=loggers)


def main(subcommand: str, argv: Sequence[str]) -> int:
    """``qsmlab <subcommand> <argv>``; returns the exit status (bad input raises QSMInputError, one line)."""
    inv = parse_argv(subcommand, argv)
    opts = options(inv)
    try:
        result = execute(opts)
    except ConfigError as e:
        key = e.key or ""
        raise QSMInputError(e.shown(f"--{key}") if key in opts.given else e.shown(f"config key {key}")
                            if key else str(e)) from None
    _print_result(subcommand, result)
    return 0


def _print_result(sub: str, result: RunResult) -> None:
    shown = {k: v for k, v in result.metrics.items() if k.startswith(("val/", "test/"))}
    line = "  ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items()))
    print(f"qsmlab {sub}: {result.status} in {result.seconds:.0f} s -> {result.run_dir}" + (f"\n  {line}" if line else ""))
