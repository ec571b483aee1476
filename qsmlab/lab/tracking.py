"""Loggers of a run: W&B and CSV by default, TensorBoard on request (docs/architecture.md, section 6).

W&B mode: whatever the user chose (``WANDB_MODE``, ``wandb online``/``offline``) wins. When nothing is
chosen and no API key is configured (``WANDB_API_KEY`` or a ``.netrc`` entry for the W&B host), qsmlab sets
``WANDB_MODE=offline`` so a run never stops at a login prompt; offline runs are written under
``<run_dir>/wandb/offline-run-*`` and uploaded later with ``wandb sync``. Logged in, runs go online.

CSV: :class:`AppendingCSVLogger` writes ``<run_dir>/metrics.csv`` (one row per logging step, columns
``epoch``, ``step`` and every metric), flushed at every logging step. Unlike Lightning's own CSVLogger it keeps the rows of an earlier
attempt when a run resumes from ``last.ckpt`` in the same folder (Lightning's deletes the file); tables
take the last value of each metric, so rows logged again after the resume replace nothing they should not.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from qsmlab.errors import QSMInputError

DEFAULT_PROJECT = "qsmlab"
LOGGER_NAMES = ("wandb", "csv", "tensorboard")
DEFAULT_LOGGERS = ("wandb", "csv")


def wandb_has_credentials() -> bool:
    """True when an API key is configured: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def ensure_wandb_mode() -> str:
    """Set ``WANDB_MODE=offline`` unless the user chose a mode or has credentials; returns the mode."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if wandb_has_credentials():
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


def parse_logger_names(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"wandb,csv"`` -> ``("wandb", "csv")``; ``"none"`` -> ``()``; unknown names fail naming the option."""
    if spec is None:
        return DEFAULT_LOGGERS
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in LOGGER_NAMES]
    if bad:
        raise QSMInputError(f"--loggers: unknown logger(s) {bad}; choose from {', '.join(LOGGER_NAMES)} or 'none'")
    return tuple(dict.fromkeys(names))


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer that appends to an existing ``metrics.csv`` instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            import csv

            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/metrics.csv`` directly (no version folder), appending on resume."""

    def __init__(self, save_dir: str | Path, flush_logs_every_n_steps: int = 1):
        # flushed at every logging step (an append of a few rows): a killed run keeps its log up to the
        # kill, which a resumed run then continues
        super().__init__(save_dir=str(save_dir), name="", version="",
                         flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    def experiment(self):
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def make_loggers(run_dir: str | Path, names: Iterable[str] = DEFAULT_LOGGERS, *,
                 wandb_kwargs: Mapping[str, Any] | None = None) -> list[Logger]:
    """Loggers writing into ``run_dir``.

    Args:
        names: any of ``wandb``, ``csv``, ``tensorboard``.
        wandb_kwargs: passed to ``wandb.init`` through Lightning's ``WandbLogger`` (``name``, ``group``,
            ``job_type``, ``config``, ``tags``, ``project``; project defaults to ``$WANDB_PROJECT`` or
            ``qsmlab``).
    """
    # absolute: wandb-core is a long-lived service process that resolves paths against its own cwd
    run_dir = Path(run_dir).resolve()
    out: list[Logger] = []
    # CSV first: Lightning puts ModelCheckpoint's default folder under the first logger
    # (<run_dir>/checkpoints for this CSV logger; W&B's would be a new run-id folder on every resume)
    for n in sorted(names, key=lambda n: n != "csv"):
        if n == "csv":
            out.append(AppendingCSVLogger(run_dir))
        elif n == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            out.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
        elif n == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            ensure_wandb_mode()
            kw = dict(wandb_kwargs or {})
            kw.setdefault("project", os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT))
            # reinit: several runs (trials, folds) follow one another in one process
            kw.setdefault("reinit", "finish_previous")
            kw.setdefault("settings", _quiet_settings())
            lg = WandbLogger(save_dir=str(run_dir), **kw)
            lg._wandb_init.pop("anonymous", None)  # Lightning passes None, which wandb 0.31 warns about
            out.append(lg)
    return out


def _quiet_settings():
    """Lean W&B settings: no console capture (Lightning's bar and qsmlab's progress lines stay on the
    terminal only), no system-metrics sampler, no machine/git metadata or requirements upload (the run's
    config carries the git commit and manifest hash; ``run_info.json`` the package versions). Measured:
    wandb.init takes 0.2 s per run with W&B's defaults and 0.02 s with these, after the first run of a
    process (which starts wandb-core, ~0.8 s)."""
    import wandb

    return wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_meta=True,
                          x_disable_machine_info=True, x_save_requirements=False, disable_git=True,
                          save_code=False)


def wandb_run(loggers: Iterable[Logger]):
    """The W&B run of the first ``WandbLogger`` in ``loggers`` (created on first access), or None."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            return lg.experiment
    return None


def finish_wandb(loggers: Iterable[Logger], exit_code: int = 0, summary: Mapping[str, Any] | None = None) -> None:
    """Write ``summary`` into each W&B run of ``loggers`` and finish it (``exit_code`` 1 marks it failed).

    Lightning's ``WandbLogger.finalize`` does not finish the run; without this a process running several
    trials would keep appending to the first one.
    """
    for lg in loggers:
        if type(lg).__name__ != "WandbLogger" or getattr(lg, "_experiment", None) is None:
            continue
        run = lg._experiment
        if summary:
            for k, v in summary.items():
                run.summary[k] = v
        run.finish(exit_code=exit_code)
        lg._experiment = None
