"""Experiment files: layered YAML -> one resolved LightningCLI config (a plain dict).

An experiment file (``experiments/<name>.yaml``) is a LightningCLI config (``seed_everything``, ``trainer``,
``model`` as ``class_path``/``init_args``, ``data`` as :class:`~qsmlab.data.datamodule.QSMDataModule`
arguments) with two extra top-level keys that this module consumes:

- ``base``: a list of files (relative to the file that names them) merged first, in order; bases may have
  bases of their own. Mappings merge key by key, everything else (lists included) is replaced.
- ``profiles``: ``{name: partial config}``; the chosen profile is merged last (profiles of the bases are
  merged into the file's own, so ``base/trainer.yaml`` can define what ``quick`` means for the trainer).
  ``quick`` trains on 2 CPU cores in minutes; ``full`` is sized for a GPU.

Then ``--key.path value`` overrides apply. Dotted keys address the config *without* ``init_args``
(``model.loss.lambda_tv`` finds ``model.init_args.loss.lambda_tv``), so sweeps and the command line name
parameters the way a reader does. An unknown key fails with the closest valid key.

``data.manifest`` may be ``default`` (the embedded synthetic dataset, generated and cached on first use)
or ``recipe:<path.yaml>`` (any recipe, generated and cached); see :func:`resolve_manifest`.

Why not jsonargparse's own ``--config`` layering alone: it has no named profiles and no ``base`` includes,
and sweeps need the merged dict *before* a trainer exists (to validate a search space, to hash a config).
LightningCLI still parses and validates the result (``qsmlab fit`` passes it as ``args=``).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from qsmlab.errors import QSMInputError

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"
RUNS_DIR = Path("runs")  # relative to the working directory: runs, sweeps and LOO batches write here
META_KEYS = ("base", "profiles")
DEFAULT_PROFILE = "quick"
#: top-level keys of a resolved config (what :class:`qsmlab.lab.lightning_cli.QSMLabCLI` parses)
SECTIONS = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler")


def experiment_path(name_or_path: str | Path) -> Path:
    """``uqsm_tv`` -> ``experiments/uqsm_tv.yaml``; a path is returned as is (it must exist)."""
    p = Path(name_or_path)
    candidates = [p] if p.suffix in (".yaml", ".yml") else [p, EXPERIMENTS_DIR / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(f.stem for f in EXPERIMENTS_DIR.glob("*.yaml"))
    hint = difflib.get_close_matches(str(name_or_path), known, n=1)
    raise QSMInputError(f"experiment {name_or_path!r}: no such file"
                        + (f" (did you mean {hint[0]!r}?)" if hint else f"; known: {', '.join(known)}"))


def deep_merge(base: Mapping, over: Mapping) -> dict:
    """``over`` merged into a copy of ``base``: mappings recursively, other values replaced."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise QSMInputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise QSMInputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)


def _load_layers(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """(config without meta keys, profiles) of ``path`` with its bases merged in."""
    path = path.resolve()
    if path in seen:
        raise QSMInputError(f"{path}: circular 'base' chain ({' -> '.join(p.name for p in seen + (path,))})")
    raw = _read(path)
    bases = raw.get("base") or []
    if isinstance(bases, str):
        bases = [bases]
    cfg: dict = {}
    profiles: dict = {}
    for b in bases:
        bp = (path.parent / b)
        if not bp.is_file():
            raise QSMInputError(f"{path}: base file {b!r} not found (looked for {bp})")
        bcfg, bprof = _load_layers(bp, seen + (path,))
        cfg = deep_merge(cfg, bcfg)
        profiles = deep_merge(profiles, bprof)
    own_profiles = raw.get("profiles") or {}
    if not isinstance(own_profiles, Mapping):
        raise QSMInputError(f"{path}: 'profiles' must be a mapping of name -> partial config")
    profiles = deep_merge(profiles, own_profiles)
    cfg = deep_merge(cfg, {k: v for k, v in raw.items() if k not in META_KEYS})
    return cfg, profiles


def profiles_of(name_or_path: str | Path | Sequence[str | Path]) -> list[str]:
    """Profile names an experiment (or a list of layered experiment files) defines, bases included."""
    return sorted(load_layers(name_or_path)[1])


def load_layers(names: str | Path | Sequence[str | Path]) -> tuple[dict, dict]:
    """(config, profiles) of one experiment or of several merged in order (``--config a --config b``)."""
    items = [names] if isinstance(names, (str, Path)) else list(names)
    if not items:
        raise QSMInputError("no experiment given")
    cfg: dict = {}
    profiles: dict = {}
    for item in items:
        c, p = _load_layers(experiment_path(item))
        cfg, profiles = deep_merge(cfg, c), deep_merge(profiles, p)
    return cfg, profiles


def load_experiment(name_or_path: str | Path | Sequence[str | Path], profile: str | None = DEFAULT_PROFILE,
                    overrides: Mapping[str, Any] | Iterable[str] | None = None,
                    manifest: bool = False) -> dict:
    """The resolved config of an experiment: bases, the file, the profile, then dotted overrides.

    Args:
        name_or_path: experiment name (``uqsm_tv``) or YAML path, or a list of them merged in order.
        profile: profile to apply (``None``: none); unknown names fail listing the known ones.
        overrides: ``{"model.loss.lambda_tv": 3e-3}`` or ``["model.loss.lambda_tv=3e-3", ...]`` (values
            parsed as YAML scalars).
        manifest: also resolve ``data.manifest`` (``default`` / ``recipe:...``) to a CSV path, generating
            the dataset if needed.
    """
    cfg, profiles = load_layers(name_or_path)
    if profile is not None:
        if profile not in profiles:
            items = [name_or_path] if isinstance(name_or_path, (str, Path)) else name_or_path
            path = ", ".join(str(experiment_path(i)) for i in items)
            raise QSMInputError(f"{path}: unknown profile {profile!r}; defined: {sorted(profiles) or 'none'}")
        cfg = deep_merge(cfg, profiles[profile])
    for key, value in _pairs(overrides):
        set_dotted(cfg, key, value)
    if manifest:
        resolve_manifest(cfg)
    return cfg


def _pairs(overrides) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    out = []
    for item in overrides:
        if "=" not in item:
            raise QSMInputError(f"override {item!r}: expected KEY=VALUE, e.g. model.loss.lambda_tv=1e-3")
        k, v = item.split("=", 1)
        out.append((k.strip(), parse_scalar(v)))
    return out


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML, with ``3e-3`` read as a float (YAML 1.1 wants ``3.0e-3``)."""
    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


# -- dotted keys ------------------------------------------------------------------------------------------

def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted key, ``init_args`` and ``class_path`` levels elided from the names.

    ``class_path`` entries are kept under ``<key>.class_path`` so a search space may pick a class.
    """
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if k == "init_args" and isinstance(v, Mapping):
            out.update(flatten(v, prefix))
            continue
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _child(node: Mapping, key: str):
    """The dict that holds ``key`` at this level: ``node`` itself or its ``init_args``."""
    if key in node:
        return node
    ia = node.get("init_args")
    if isinstance(ia, Mapping) and key in ia:
        return ia
    return None


def get_dotted(cfg: Mapping, key: str) -> Any:
    """Value at a dotted key (``init_args`` levels optional); unknown keys fail with the closest one."""
    node: Any = cfg
    for part in key.split("."):
        holder = _child(node, part) if isinstance(node, Mapping) else None
        if holder is None:
            raise QSMInputError(_unknown(cfg, key))
        node = holder[part]
    return node


def set_dotted(cfg: dict, key: str, value: Any, create: bool = False) -> None:
    """Set a dotted key in place. Unknown keys fail with the closest valid key unless ``create``.

    ``create`` adds missing levels (under ``init_args`` when the parent has one), for keys a class
    accepts but the file leaves at their defaults.
    """
    parts = key.split(".")
    node: dict = cfg
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        holder = _child(node, part)
        if holder is None:
            if not create:
                raise QSMInputError(_unknown(cfg, key))
            holder = node["init_args"] if isinstance(node.get("init_args"), dict) else node
            if not last:
                holder[part] = {}
        if last:
            holder[part] = value
        else:
            if not isinstance(holder[part], dict):
                if not create:
                    raise QSMInputError(f"config key {key!r}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
                holder[part] = {}
            node = holder[part]


def closest_key(cfg: Mapping, key: str) -> str | None:
    """The valid dotted key most like ``key`` (None if nothing is close)."""
    keys = list(flatten(cfg))
    m = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if m:
        return m[0]
    tail = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == tail]
    return same_leaf[0] if same_leaf else None


def _unknown(cfg: Mapping, key: str) -> str:
    hint = closest_key(cfg, key)
    return f"config key {key!r} does not exist" + (f" (closest: {hint!r})" if hint else "")


# -- data ---------------------------------------------------------------------------------------------------

def resolve_manifest(cfg: dict) -> str | None:
    """Replace ``data.manifest`` ``default`` / ``recipe:<yaml>`` by the generated manifest's path (cached)."""
    data = cfg.get("data")
    if not isinstance(data, Mapping):
        return None
    holder = _child(data, "manifest")
    if holder is None:
        return None
    value = str(holder["manifest"])
    if value == "default" or value.startswith("recipe:"):
        from qsmlab.data.recipe import ensure_dataset

        recipe = None if value == "default" else value.split(":", 1)[1]
        if recipe is not None and not Path(recipe).is_file():
            raise QSMInputError(f"data.manifest: recipe file {recipe!r} not found")
        holder["manifest"] = str(ensure_dataset(recipe))
    elif not Path(value).is_file():
        raise QSMInputError(f"data.manifest: manifest file {value!r} not found")
    return str(holder["manifest"])


def dump(cfg: Mapping) -> str:
    """YAML text of a resolved config (what is saved with every run)."""
    return yaml.safe_dump(dict(cfg), sort_keys=False)
