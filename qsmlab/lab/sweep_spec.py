"""Sweep files (``sweeps/<name>.yaml``): what to search, how to score it, and the budget.

::

    experiment: uqsm_tv          # experiments/<name>.yaml (or a path relative to the sweep file)
    profile: quick               # the experiment's profile
    study: uqsm_tv               # Optuna study name (default: the file's stem)
    overrides:                   # applied to every trial (dotted keys, as on the command line)
      trainer.max_steps: 150
    search_space:                # dotted keys of the resolved config
      model.loss.lambda_tv: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
      model.width: {type: int, low: 8, high: 32, step: 8}
      model.loss.dc: {type: categorical, choices: [linear, nonlinear]}
    objective: {metric: val/nrmse, direction: minimize}   # direction defaults from the metric
    sampler: {name: tpe, seed: 0, n_startup_trials: 5}    # tpe | random | qmc (+ their arguments)
    pruner: {name: median, n_startup_trials: 3, n_warmup_steps: 1}   # median | percentile |
                                              # successive_halving | hyperband | threshold | none
    n_trials: 10                 # finished trials the study should hold (a resumed sweep tops it up)
    seed_reruns: 0               # then re-run the best trial with this many other seeds: the seed noise
                                 # the report sets the objective's spread against ("flat" when within it)
    timeout: null                # seconds; no new trial starts after it
    workers: 1                   # local worker processes (--workers wins)
    loggers: [wandb, csv]

Every check here runs before any training: an unknown key anywhere fails with one line naming the file
and key (for search-space keys: the closest valid key of the resolved config), as does an empty search
space or an objective metric the methods do not log (the line lists those they do).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from qsmlab.errors import QSMInputError
from qsmlab.lab import config as C
from qsmlab.lab.config_errors import ConfigError
from qsmlab.lab.lightning_cli import check_config
from qsmlab.lab.tracking import parse_logger_names
from qsmlab.metrics import METRIC_INFO, TORCH_METRICS

TOP_KEYS = ("experiment", "profile", "study", "overrides", "search_space", "objective", "sampler", "pruner",
            "n_trials", "seed_reruns", "timeout", "workers", "loggers", "description")
PARAM_TYPES = ("float", "int", "categorical")
SAMPLERS = ("tpe", "random", "qmc")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "threshold", "none")


#: Validation values the methods log besides the metrics of :data:`qsmlab.metrics.TORCH_METRICS`
#: (``qsmlab.methods.base``: data consistency ``val/dc`` in %, ``val/loss``; PedQ-NET: ``val/dice``;
#: NeXtQSM: ``val/nrmse_local_field``), with the direction that is better.
EXTRA_METRICS = {"val/dc": "minimize", "val/loss": "minimize", "val/dice": "maximize",
                 "val/nrmse_local_field": "minimize", "train/loss": "minimize"}


def logged_metrics() -> list[str]:
    """Metrics qsmlab methods log once per validation (full volumes): ``val/<metric>`` for each of
    :data:`qsmlab.metrics.TORCH_METRICS`, then :data:`EXTRA_METRICS`."""
    return [f"val/{m}" for m in TORCH_METRICS] + list(EXTRA_METRICS)


def metric_direction(metric: str) -> str:

    if metric in EXTRA_METRICS:
        return EXTRA_METRICS[metric]
    info = METRIC_INFO.get(metric.split("/", 1)[-1])
    return "maximize" if info is not None and info.higher_is_better else "minimize"


@dataclass
class Param:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    def suggest(self, trial):
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, self.choices)


@dataclass
class SweepSpec:
    path: Path
    experiment: str
    profile: str | None
    study: str
    search_space: dict[str, Param]
    metric: str
    direction: str
    overrides: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    n_trials: int = 10
    seed_reruns: int = 0
    timeout: float | None = None
    workers: int = 1
    loggers: tuple[str, ...] = ("wandb", "csv")

    @property
    def log_params(self) -> list[str]:
        return [p.name for p in self.search_space.values() if p.log]

    def base_config(self, manifest: bool = True) -> dict:
        """The resolved experiment config with the sweep's overrides (trial parameters not yet set)."""
        cfg = C.load_experiment(self.experiment, self.profile)
        for k, v in self.overrides.items():
            C.set_dotted(cfg, k, v, create=True)
        if manifest:
            C.resolve_manifest(cfg)
        return cfg


def _err(path: Path, msg: str) -> QSMInputError:
    return QSMInputError(f"{path}: {msg}")


def _param(path: Path, name: str, spec: Any) -> Param:
    if not isinstance(spec, Mapping):
        raise _err(path, f"search_space.{name}: expected a mapping like {{type: float, low: 1e-5, high: 1e-1, log: true}}")
    allowed = {"type", "low", "high", "log", "step", "choices"}
    bad = set(spec) - allowed
    if bad:
        raise _err(path, f"search_space.{name}: unknown field(s) {sorted(bad)} (allowed: {sorted(allowed)})")
    kind = spec.get("type", "categorical" if "choices" in spec else "float")
    if kind not in PARAM_TYPES:
        raise _err(path, f"search_space.{name}.type: {kind!r} is not one of {list(PARAM_TYPES)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _err(path, f"search_space.{name}.choices: expected a non-empty list")
        return Param(name, kind, choices=choices)
    try:
        low, high = float(C.parse_scalar(str(spec["low"]))), float(C.parse_scalar(str(spec["high"])))
    except KeyError as e:
        raise _err(path, f"search_space.{name}: {e.args[0]!r} is required for type {kind}") from None
    except (TypeError, ValueError):
        raise _err(path, f"search_space.{name}: low/high must be numbers, got {spec.get('low')!r}, {spec.get('high')!r}") from None
    log = bool(spec.get("log", False))
    if not low < high:
        raise _err(path, f"search_space.{name}: low ({low:g}) must be below high ({high:g})")
    if log and low <= 0:
        raise _err(path, f"search_space.{name}: a log scale needs low > 0, got {low:g}")
    step = spec.get("step")
    if step is not None and log:
        raise _err(path, f"search_space.{name}: step and log cannot be combined")
    return Param(name, kind, low, high, log, None if step is None else float(step))


def _named(path: Path, what: str, spec: Any, names: tuple[str, ...], default: str) -> dict:
    if spec is None:
        return {"name": default}
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise _err(path, f"{what}: expected {{name: <one of {list(names)}>, ...arguments}}")
    if spec["name"] not in names:
        raise _err(path, f"{what}.name: {spec['name']!r} is not one of {list(names)}")
    return dict(spec)


def load_sweep(path: str | Path, check_keys: bool = True) -> SweepSpec:
    """Read and validate a sweep file (see the module docstring); ``check_keys`` resolves the
    experiment (without generating data) to check that every override and search key exists."""
    p = Path(path)
    if not p.is_file() and not p.suffix:
        p = C.EXPERIMENTS_DIR.parent / "sweeps" / f"{path}.yaml"
    if not p.is_file():
        known = sorted(f.stem for f in (C.EXPERIMENTS_DIR.parent / "sweeps").glob("*.yaml"))
        raise QSMInputError(f"sweep file {str(path)!r} not found (sweeps/: {', '.join(known) or 'none'})")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise _err(p, f"not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, Mapping):
        raise _err(p, "expected a mapping at the top level")
    bad = [k for k in raw if k not in TOP_KEYS]
    if bad:
        hint = difflib.get_close_matches(bad[0], TOP_KEYS, n=1)
        raise _err(p, f"unknown key {bad[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else f"; keys: {', '.join(TOP_KEYS)}"))
    if "experiment" not in raw:
        raise _err(p, "'experiment' is required (an experiments/<name>.yaml name or a path)")
    exp = str(raw["experiment"])
    if exp.endswith((".yaml", ".yml")) and not Path(exp).is_absolute() and (p.parent / exp).is_file():
        exp = str(p.parent / exp)
    space_raw = raw.get("search_space") or {}
    if not isinstance(space_raw, Mapping) or not space_raw:
        raise _err(p, "search_space is empty: give at least one parameter, e.g. "
                      "model.loss.lambda_tv: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}")
    space = {str(k): _param(p, str(k), v) for k, v in space_raw.items()}
    obj = raw.get("objective") or {}
    if isinstance(obj, str):
        obj = {"metric": obj}
    metric = str(obj.get("metric", "val/nrmse"))
    known = logged_metrics()
    if metric not in known:
        raise _err(p, f"objective metric {metric!r} is not logged by qsmlab methods; logged: {', '.join(known)}")
    direction = str(obj.get("direction", metric_direction(metric)))
    if direction not in ("minimize", "maximize"):
        raise _err(p, f"objective.direction: {direction!r} is not minimize or maximize")
    overrides = dict(raw.get("overrides") or {})
    n_trials = int(raw.get("n_trials", 10))
    if n_trials < 1:
        raise _err(p, f"n_trials: expected a positive integer, got {n_trials}")

    try:
        seed_reruns = int(raw.get("seed_reruns", 0))
    except (TypeError, ValueError):
        raise _err(p, f"seed_reruns: expected an integer >= 0, got {raw.get('seed_reruns')!r}") from None
    if seed_reruns < 0:
        raise _err(p, f"seed_reruns: expected an integer >= 0, got {seed_reruns}")

    spec = SweepSpec(
        path=p, experiment=exp, profile=raw.get("profile", C.DEFAULT_PROFILE), study=str(raw.get("study", p.stem)),
        search_space=space, metric=metric, direction=direction, overrides=overrides,
        sampler=_named(p, "sampler", raw.get("sampler"), SAMPLERS, "tpe"),
        pruner=_named(p, "pruner", raw.get("pruner"), PRUNERS, "median"),
        n_trials=n_trials, seed_reruns=seed_reruns, timeout=None if raw.get("timeout") is None else float(raw["timeout"]),
        workers=int(raw.get("workers", 1)), loggers=parse_logger_names(raw.get("loggers")),
    )
    if check_keys:
        check_against_config(spec)
    return spec


def check_against_config(spec: SweepSpec) -> dict:
    """Resolve the experiment (no data generation) and check every override and search key exists."""
    try:
        cfg = C.load_experiment(spec.experiment, spec.profile)
    except QSMInputError as e:
        raise _err(spec.path, str(e)) from None
    for key, value in spec.overrides.items():
        try:  # an override may set a class default the YAML leaves out; LightningCLI checks it below
            C.set_dotted(cfg, key, value, create=True)
        except QSMInputError as e:
            raise _err(spec.path, f"overrides: {e}") from None
    for key in spec.search_space:
        try:
            C.get_dotted(cfg, key)
        except QSMInputError:
            hint = C.closest_key(cfg, key)
            raise _err(spec.path, f"search_space key {key!r} does not exist in the resolved config of "
                                  f"{Path(spec.experiment).stem}" + (f" (closest: {hint!r})" if hint else "")) from None

    try:
        check_config(cfg, given=spec.overrides)
    except ConfigError as e:
        where = "overrides." if e.key in spec.overrides else ""
        raise _err(spec.path, e.shown(where + (e.key or "config"))) from None
    return cfg


def make_sampler(spec: SweepSpec, seed_offset: int = 0):
    """The Optuna sampler of the spec; ``seed_offset`` keeps workers (and resumed sweeps) from drawing the
    same random start-up points (a fixed seed would repeat them)."""
    kw = {k: v for k, v in spec.sampler.items() if k != "name"}
    seed = kw.pop("seed", None)
    name = spec.sampler["name"]
    if name == "qmc":  # one scrambled sequence shared by all workers: same seed everywhere
        return optuna.samplers.QMCSampler(seed=seed if seed is not None else 0, **kw)
    s = None if seed is None else int(seed) + seed_offset
    if name == "random":
        return optuna.samplers.RandomSampler(seed=s, **kw)
    return optuna.samplers.TPESampler(seed=s, **kw)


def make_pruner(spec: SweepSpec):

    kw = {k: v for k, v in spec.pruner.items() if k != "name"}
    return {
        "median": lambda: optuna.pruners.MedianPruner(**kw),
        "percentile": lambda: optuna.pruners.PercentilePruner(**kw),
        "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(**kw),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(**kw),
        "threshold": lambda: optuna.pruners.ThresholdPruner(**kw),  # e.g. stop diverging trials
        "none": lambda: optuna.pruners.NopPruner(),
    }[spec.pruner["name"]]()
