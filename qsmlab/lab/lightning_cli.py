"""``QSMLabCLI``: the project's one ``LightningCLI``, fed a resolved config (a dict), never ``sys.argv``.

The command line is parsed once, by :mod:`qsmlab.lab.cli`; experiments are layered by
:mod:`qsmlab.lab.config`; sweep trials and LOO folds change keys of that dict. This module turns such a
dict into a model, a datamodule and a trainer: jsonargparse checks every key and type against the
classes' signatures (``model`` is any LightningModule by ``class_path``, ``data`` a
:class:`~qsmlab.data.datamodule.QSMDataModule`), then the classes are built. A value either step rejects
becomes one :class:`~qsmlab.lab.config_errors.ConfigError` line (key, value, expectation) instead of a
jsonargparse tree or a Lightning traceback, and nothing is written to disk before that point.

:func:`check_config` is the parse step alone (no classes built), for checks that must pass before a
sweep starts.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple
from torch.optim import Optimizer

from qsmlab.data.datamodule import QSMDataModule
from qsmlab.lab.config import flatten
from qsmlab.lab.config_errors import config_error

warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # torch 2.13 vs Lightning


def build_parser(seed_default: bool | int = True) -> LightningArgumentParser:
    """The parser of a resolved config: ``seed_everything``, ``trainer``, ``model`` (any LightningModule),
    ``data`` (QSMDataModule), and LightningCLI's automatic ``optimizer`` / ``lr_scheduler`` groups."""
    p = LightningArgumentParser(exit_on_error=False)
    p.add_argument("--seed_everything", type=bool | int, default=seed_default,
                   help="seed for seed_everything before the classes are built (True: a random one)")
    p.add_lightning_class_args(Trainer, "trainer")
    p.add_lightning_class_args(LightningModule, "model", subclass_mode=True)
    p.add_lightning_class_args(QSMDataModule, "data")
    p.add_optimizer_args((Optimizer,))
    p.add_lr_scheduler_args(LRSchedulerTypeTuple)
    LightningCLI.link_optimizers_and_lr_schedulers(p)
    return p


def check_config(config: Mapping[str, Any], given: Mapping[str, Any] | None = None) -> None:
    """Parse ``config`` without building anything: unknown keys and wrong types raise one
    :class:`~qsmlab.lab.config_errors.ConfigError` line (``given``: the keys the user set)."""
    try:
        build_parser().parse_object(dict(config))
    except (argparse.ArgumentError, ValueError, TypeError) as e:
        raise config_error(e, flatten(config), given) from None


class QSMLabCLI(LightningCLI):
    """LightningCLI on a resolved config dict, with the run folder's loggers, callbacks and checkpoints.

    It never runs a subcommand itself (``run=False``; :func:`qsmlab.lab.run.execute` calls the trainer), so
    the command line, sweeps and LOO folds share one code path. It adds to the trainer, unless the config
    sets them: the ``loggers`` given, ``default_root_dir=<run_dir>``, the ``callbacks`` given (pruning,
    prediction writers, ...) and a ``ModelCheckpoint`` that rewrites ``<run_dir>/checkpoints/last.ckpt``
    after every validation (the resume point; the config's checkpoint callbacks keep their best-k files,
    e.g. ``best-step=40.ckpt``, in the same folder). Nothing is written until the trainer runs.

    Raises:
        ConfigError: any key, type or value the parser or a constructor rejects (one line).
    """

    def __init__(self, config: Mapping[str, Any], run_dir: str | Path, loggers: Sequence | None = None,
                 callbacks: Sequence[Callback] = (), given: Mapping[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self._qsm_loggers = list(loggers or [])
        self._qsm_callbacks = list(callbacks)
        self._config_keys = list(flatten(config))
        self._given = dict(given or {})
        try:
            with warnings.catch_warnings():
                # the config is a dict, not sys.argv, whatever the process was started with
                warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
                super().__init__(model_class=LightningModule, subclass_mode_model=True,
                                 datamodule_class=QSMDataModule, save_config_callback=None,
                                 args=dict(config), run=False, trainer_defaults={"callbacks": []})
        except (argparse.ArgumentError, ValueError, TypeError) as e:
            raise config_error(e, self._config_keys, self._given) from None
        except Exception as e:
            if type(e).__name__ != "MisconfigurationException":  # Lightning's "bad trainer argument"
                raise
            raise config_error(e, self._config_keys, self._given) from None

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        self.parser = build_parser(self.seed_everything_default)

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
        if not trainer.loggers:  # --loggers none: Lightning's LR monitor would stop the run at its start
            trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, LearningRateMonitor)]
        return trainer

    @property
    def seed(self):
        return self._get(self.config, "seed_everything")

    def dump_config(self) -> str:
        """The full parsed config (class defaults included) as YAML."""
        return self.parser.dump(self.config, skip_none=False)
