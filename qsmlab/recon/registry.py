"""Name -> function registries for classical algorithms, used by the CLI and the pipeline.

Every registered function has the signature of its family:

- ``inversion``: ``fn(field, mask, *, voxel_size=(1,1,1), b0_dir=(0,0,1), magnitude=None, **params)
  -> chi`` (numpy float arrays, ppm in, ppm out, shape (X, Y, Z); COSMOS is the exception and takes
  lists, see its docstring).
- ``background``: ``fn(total_field, mask, *, voxel_size=(1,1,1), b0_dir=(0,0,1), **params)
  -> (local_field, valid_mask)``.
- ``unwrap``: ``fn(phase, mask=None, *, voxel_size=(1,1,1), magnitude=None, **params) -> unwrapped``.

Parameters are keyword-only with defaults and units in the docstring; :func:`call` checks parameter names
so that ``--param lamda=1`` fails with a one-line error listing the accepted names. A regularisation weight
whose default is :data:`AUTO` (``"auto"``) takes a number or ``auto`` (chosen from the data, see
:mod:`qsmlab.recon.inversion.auto`); ``auto`` on any other parameter is a one-line error naming the
parameters that accept it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from qsmlab.errors import QSMInputError

AUTO = "auto"
"""Default (and accepted value) of a regularisation weight the method chooses from the data."""

REGISTRIES: dict[str, dict[str, Callable]] = {"inversion": {}, "background": {}, "unwrap": {}}
# Arguments filled by the caller, not by --param.
_RESERVED = {"field", "total_field", "mask", "voxel_size", "b0_dir", "magnitude", "phase", "fields",
             "b0_dirs", "masks", "quiet"}


def register(family: str, name: str):
    """Decorator: ``@register("inversion", "tkd")``."""

    def deco(fn: Callable) -> Callable:
        REGISTRIES[family][name] = fn
        return fn

    return deco


def _ensure_loaded() -> None:
    # Importing the package modules registers their functions.
    import qsmlab.recon  # noqa: F401


#: ``prefix -> resolver(family, argument) -> function`` for names like ``ckpt:PATH``. Layers above recon
#: install resolvers (``qsmlab.methods.checkpoint_recon.install``), so recon never imports them.
PREFIX_RESOLVERS: dict[str, Callable[[str, str], Callable]] = {}


def register_prefix(prefix: str, resolver: Callable[[str, str], Callable]) -> None:
    """Let ``get(family, "<prefix>:<argument>")`` return ``resolver(family, argument)``."""
    PREFIX_RESOLVERS[prefix] = resolver


def get(family: str, name: str) -> Callable:
    """The function registered as ``name``; a one-line error lists the known names otherwise."""
    _ensure_loaded()
    if ":" in name:
        prefix, arg = name.split(":", 1)
        if prefix in PREFIX_RESOLVERS:
            return PREFIX_RESOLVERS[prefix](family, arg)
    reg = REGISTRIES[family]
    if name not in reg:
        raise QSMInputError(f"unknown {family} method {name!r}; choose one of: {', '.join(sorted(reg))}")
    return reg[name]


def names(family: str) -> list[str]:
    _ensure_loaded()
    return sorted(REGISTRIES[family])


def parameters(fn: Callable) -> dict[str, object]:
    """User-settable keyword parameters of ``fn`` and their defaults."""
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind == p.KEYWORD_ONLY and p.name not in _RESERVED:
            out[p.name] = p.default
    return out


def is_auto(value) -> bool:
    """True for ``"auto"`` (any case, surrounding blanks ignored)."""
    return isinstance(value, str) and value.strip().lower() == AUTO


def auto_parameters(fn: Callable) -> list[str]:
    """Names of ``fn``'s parameters whose default is :data:`AUTO`."""
    return [k for k, v in parameters(fn).items() if is_auto(v)]


def check_params(family: str, name: str, params: dict) -> dict:
    """Validate ``params`` against the method's signature, converting strings to the default's type."""
    return convert_params(get(family, name), params, f"{family} method {name!r}", name)


def convert_params(fn: Callable, params: dict, what: str, short: str | None = None) -> dict:
    """Check ``params`` names against ``fn``'s keyword-only parameters and convert string values to the
    type of each default; errors name ``what`` (e.g. ``"inversion method 'tkd'"``)."""
    known = parameters(fn)
    name = short or what
    out = {}
    for k, v in params.items():
        if k not in known:
            raise QSMInputError(f"unknown parameter {k!r} for {what}; "
                                f"accepted: {', '.join(sorted(known)) or '(none)'}")
        default = known[k]
        if is_auto(v):
            if not is_auto(default):
                autos = auto_parameters(fn)
                raise QSMInputError(
                    f"parameter {k}=auto for {name!r}: only a regularisation weight can be chosen "
                    + (f"automatically, and for {name!r} that is {', '.join(autos)}" if autos
                       else f"automatically, and {name!r} has none; give {k} a value"))
            out[k] = AUTO
            continue
        if isinstance(v, str) and is_auto(default):
            try:
                v = float(v)
            except ValueError:
                raise QSMInputError(f"parameter {k}={v!r} for {name!r}: expected a number or auto") from None
        elif isinstance(v, str) and default is None:
            v = _parse_untyped(v)
        elif isinstance(v, str) and default is not inspect.Parameter.empty:
            try:
                if isinstance(default, bool):
                    v = v.lower() in ("1", "true", "yes", "on")
                elif isinstance(default, int):
                    v = int(v)
                elif isinstance(default, float):
                    v = float(v)
                elif isinstance(default, tuple | list):
                    v = type(default)(float(x) for x in v.split(","))
            except ValueError:
                raise QSMInputError(f"parameter {k}={v!r} for {name!r}: expected {type(default).__name__}") from None
        out[k] = v
    return out


def _parse_untyped(v: str):
    """A value for a parameter whose default is None: ``none`` -> None, else int, float or the string."""
    if v.lower() in ("none", "null", ""):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_params(items: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` from ``--param`` into a dict; one-line error for a malformed item."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise QSMInputError(f"--param {it!r}: expected NAME=VALUE")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def call(family: str, name: str, *args, params: dict | None = None, **kwargs):
    """Look up, validate ``params`` and call."""
    fn = get(family, name)
    return fn(*args, **kwargs, **check_params(family, name, params or {}))
