"""``qsmlab fit|validate|test|predict``: LightningCLI on layered experiment YAML.

::

    qsmlab fit uqsm_tv --profile quick --model.loss.lambda_tv 3e-3
    qsmlab fit --config experiments/uqsm_tv.yaml --trainer.max_epochs 5 --run_dir runs/mine
    qsmlab fit uqsm_tv --ckpt_path last                 # resume the latest run of uqsm_tv/quick
    qsmlab test uqsm_tv --ckpt_path runs/uqsm_tv/quick/version_0/checkpoints/last.ckpt

The experiment (a name under ``experiments/`` or a YAML path) is resolved by :mod:`qsmlab.lab.config`
(``base:`` files, the ``--profile``, then every ``--key.path value`` that names a key of the resolved
config, ``init_args`` levels optional). The result is written to ``<run_dir>/experiment.yaml`` and parsed
by :class:`QSMLabCLI` (a ``LightningCLI``: ``model`` any LightningModule by ``class_path``, ``data`` a
:class:`~qsmlab.data.datamodule.QSMDataModule`); overrides of keys the YAML leaves at their class
defaults go to LightningCLI as they are (``--model.init_args.width 8``), so LightningCLI validates them.

Every run folder (default ``runs/<experiment>/<profile>/version_<n>``) holds ``config.yaml`` (the full
LightningCLI config, defaults included), ``run_info.json`` (:mod:`qsmlab.lab.provenance`: git commit,
package versions, manifest sha256, seed, status, final metrics), ``metrics.csv``, ``checkpoints/``
(``last.ckpt`` after every epoch), ``wandb/`` and, after ``fit``, ``predictions/`` (chi of the first
validation volume, NIfTI, ppm) with ``final_chi.png``. ``--ckpt_path last`` without ``--run_dir``
continues the latest version that has a ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from qsmlab.data.datamodule import QSMDataModule
from qsmlab.errors import QSMInputError

SUBCOMMANDS = ("fit", "validate", "test", "predict")
RUNS_DIR = Path("runs")


class QSMLabCLI(LightningCLI):
    """The project's one ``LightningCLI``: any LightningModule (``model.class_path``) on ``QSMDataModule``.

    It never runs a subcommand itself (``run=False``; :func:`qsmlab.lab.run.execute` calls the trainer), so
    sweeps, LOO folds and the command line share one code path. It adds to the trainer, unless the config
    sets them: the ``loggers`` given (W&B + CSV by default), ``default_root_dir=<run_dir>``, the
    ``callbacks`` given (pruning, ...) and a ``ModelCheckpoint`` that rewrites ``<run_dir>/checkpoints/
    last.ckpt`` after every validation (the resume point; checkpoint callbacks of the config keep their
    best-k files in the same folder).
    Parse errors raise :class:`QSMInputError` with LightningCLI's message on one line.
    """

    def __init__(self, args: Sequence[str] | dict, run_dir: str | Path, loggers: Sequence | None = None,
                 callbacks: Sequence[Callback] = (), dry_run: bool = False, **kwargs: Any):
        self.run_dir = Path(run_dir)
        self.dry_run = dry_run  # parse and validate only (no model, data or trainer built)
        self._qsm_loggers = list(loggers or [])
        self._qsm_callbacks = list(callbacks)
        kwargs.setdefault("seed_everything_default", True)
        # args come from qsmlab's own command line, which LightningCLI would otherwise warn about
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # torch 2.13 vs Lightning
        try:
            super().__init__(model_class=LightningModule, subclass_mode_model=True,
                             datamodule_class=QSMDataModule, save_config_callback=None,
                             parser_kwargs={"exit_on_error": False}, args=args, run=False,
                             trainer_defaults={"callbacks": []}, **kwargs)
        except argparse.ArgumentError as e:
            raise QSMInputError(f"config: {_one_line(str(e))}") from None

    def instantiate_classes(self) -> None:
        if not self.dry_run:
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any):
        cfg = self._get(self.config_init, "trainer", default={})
        if cfg.get("logger") in (None, True):
            kwargs["logger"] = self._qsm_loggers or False
        if not cfg.get("default_root_dir"):
            kwargs["default_root_dir"] = str(self.run_dir)
        extra = list(self._qsm_callbacks)
        # Resume point: last.ckpt rewritten at every validation (or epoch end). Lightning 2.6's own
        # save_last only writes when a top-k checkpoint was written (i.e. when the monitored metric
        # improved), so a resumed run could lose everything since the last improvement.
        extra.append(ModelCheckpoint(dirpath=str(self.run_dir / "checkpoints"), filename="last", monitor=None,
                                     save_top_k=1, save_last=False, enable_version_counter=False))
        self.trainer_defaults["callbacks"] = extra
        trainer = super().instantiate_trainer(**kwargs)
        for cb in trainer.checkpoint_callbacks:
            if cb is extra[-1]:
                continue
            if getattr(cb, "dirpath", None) is None:  # else Lightning derives it from the first logger
                cb.dirpath = str(self.run_dir / "checkpoints")
            cb.save_last = False  # one writer of last.ckpt (the callback above)
        return trainer

    @property
    def seed(self):
        return self._get(self.config, "seed_everything")

    def dump_config(self) -> str:
        """The full parsed config (class defaults included) as YAML."""
        return self.parser.dump(self.config, skip_none=False)


def validate_config(config: dict, label: str = "config") -> None:
    """Parse a resolved experiment config with LightningCLI without building anything: unknown keys and
    wrong types fail here (one line) instead of in the first training run."""
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory(prefix="qsmlab-check-") as d:
        p = Path(d) / "experiment.yaml"
        p.write_text(yaml.safe_dump({**dict(config), "seed_everything": False}, sort_keys=False))  # no seeding
        try:
            QSMLabCLI(args=["--config", str(p)], run_dir=d, dry_run=True, seed_everything_default=False)
        except QSMInputError as e:
            raise QSMInputError(f"{label}: {str(e).removeprefix('config: ')}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- command line -------------------------------------------------------------------------------------------

def build_parser(subcommand: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"qsmlab {subcommand}", add_help=True)
    p.add_argument("experiment", nargs="?", help="experiment name (experiments/<name>.yaml) or YAML path")
    p.add_argument("-c", "--config", help="experiment YAML (instead of EXPERIMENT)")
    p.add_argument("--profile", default=None, help="profile of the experiment (default: quick when defined)")
    p.add_argument("--run_dir", "--run-dir", dest="run_dir", default=None,
                   help="run folder (default runs/<experiment>/<profile>/version_<n>)")
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", default=None,
                   help="checkpoint to start from: a path, 'last' (resume) or 'best'")
    p.add_argument("--loggers", default=None, help="comma list of wandb,csv,tensorboard or 'none' (default wandb,csv)")
    p.add_argument("-o", "--output_dir", "--output-dir", dest="output_dir", default=None,
                   help="predict: folder for the chi maps (default <run_dir>/predictions)")
    return p


_KEY = re.compile(r"^--([A-Za-z_][\w]*(?:\.[\w]+)+|seed_everything)(?:=(.*))?$")


def split_overrides(extra: Sequence[str]) -> list[tuple[str, str]]:
    """``["--a.b", "1", "--c.d=x"]`` -> ``[("a.b", "1"), ("c.d", "x")]``; anything else fails naming it."""
    out, i = [], 0
    extra = list(extra)
    while i < len(extra):
        m = _KEY.match(extra[i])
        if not m:
            raise QSMInputError(f"unexpected argument {extra[i]!r}: overrides are --section.key VALUE "
                                "(e.g. --model.loss.lambda_tv 3e-3)")
        if m.group(2) is not None:
            out.append((m.group(1), m.group(2)))
            i += 1
        else:
            if i + 1 >= len(extra):
                raise QSMInputError(f"{extra[i]}: missing value")
            out.append((m.group(1), extra[i + 1]))
            i += 2
    return out


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
    root = RUNS_DIR / experiment / (profile or "default")
    if ckpt_path == "last" and (latest := _latest_resumable(root)) is not None:
        return latest if subcommand == "fit" else latest / subcommand
    if ckpt_path and ckpt_path not in ("last", "best") and subcommand != "fit":
        p = Path(ckpt_path).resolve()
        if p.parent.name == "checkpoints":
            return p.parent.parent / subcommand
    return _next_version(root)


def main(argv: list[str]) -> int:
    """Entry point: ``argv[0]`` in fit|validate|test|predict, then the options of :func:`build_parser`
    and ``--key.path VALUE`` overrides. Returns the exit status (bad input raises QSMInputError)."""
    from qsmlab.lab import config as C
    from qsmlab.lab.run import execute
    from qsmlab.lab.tracking import parse_logger_names

    if not argv or argv[0] not in SUBCOMMANDS:
        raise QSMInputError(f"expected a subcommand in {SUBCOMMANDS}, got {argv[:1]}")
    sub = argv[0]
    args, extra = build_parser(sub).parse_known_args(argv[1:])
    exp = args.config or args.experiment
    if exp is None:
        raise QSMInputError(f"qsmlab {sub}: name an experiment (e.g. uqsm_tv) or give --config FILE")
    if args.config and args.experiment:
        raise QSMInputError(f"give either EXPERIMENT ({args.experiment}) or --config ({args.config}), not both")
    profile = args.profile
    if profile is None and C.DEFAULT_PROFILE in C.profiles_of(exp):
        profile = C.DEFAULT_PROFILE
    cfg = C.load_experiment(exp, profile)
    passthrough: list[str] = []
    for key, text in split_overrides(extra):
        try:
            C.get_dotted(cfg, key)
        except QSMInputError:
            passthrough += [f"--{key}", text]  # a class default the YAML does not spell out
            continue
        C.set_dotted(cfg, key, C.parse_scalar(text))
    C.resolve_manifest(cfg)
    name = C.experiment_path(exp).stem
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(name, profile, sub, args.ckpt_path)
    try:
        result = execute(sub, cfg, run_dir, extra_args=passthrough, ckpt_path=args.ckpt_path,
                         loggers=parse_logger_names(args.loggers), experiment=name, profile=profile,
                         output_dir=args.output_dir)
    except QSMInputError as e:
        raise QSMInputError(_explain(str(e), passthrough[::2], cfg)) from None
    _print_result(sub, result)
    return 0


def _explain(message: str, keys: Sequence[str], cfg) -> str:
    """LightningCLI's error for an override it rejects, shortened, with the closest valid key."""
    from qsmlab.lab.config import closest_key

    m = re.search(r"class_path '([\w.]+)': Option '(\w+)' is not accepted", message)
    for k in keys:
        k = k[2:]
        if m and k.rsplit(".", 1)[-1] == m.group(2):
            hint = closest_key(cfg, k)
            return (f"config key {k!r} is not accepted by {m.group(1)}"
                    + (f" (closest: {hint!r})" if hint else ""))
    return message


def _print_result(sub: str, result) -> None:
    shown = {k: v for k, v in result.metrics.items() if k.startswith(("val/", "test/"))}
    line = "  ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items()))
    print(f"qsmlab {sub}: {result.status} in {result.seconds:.0f} s -> {result.run_dir}" + (f"\n  {line}" if line else ""))
