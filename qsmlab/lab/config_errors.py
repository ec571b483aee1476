"""One-line messages for config values LightningCLI (jsonargparse) or a class constructor rejects.

jsonargparse reports a bad value deep inside ``model:`` as an indented tree of union alternatives
("Does not validate against any of the Union subtypes ... Given value: {...}"), hundreds of characters
that bury the one fact a user needs. :func:`config_error` walks that tree (or a constructor's own
message) and returns a :class:`ConfigError` that names the dotted key (``init_args`` levels left out, as
on the command line), the value it got and what it expects::

    model.loss.lambda_tv: got 'abc', expected a number
    trainer.max_steps: got -5; `max_steps` must be a non-negative integer or -1 (infinite steps). ...
    model.lamda_tv: not a parameter of qsmlab.methods.UQSM (closest: 'model.loss.lambda_tv')

The caller decides how a key is shown (``--model.loss.lambda_tv`` for a command-line override, the
sweep file's name for a sweep's).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qsmlab.errors import QSMInputError

_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS = re.compile(r"^(?:- )?Problem with given class_path '([\w.]+)':")
_OPTION = re.compile(r"^(?:- )?Option '(\w+)' is not accepted")
_GROUP = re.compile(r"^(?:- )?Group '([\w.]+)' does not accept (?:nested key|option) '([\w.]+)'")
_KEY_NOT_EXPECTED = re.compile(r"^(?:- )?Key '([\w.]+)' is not expected")
_EXPECTED = re.compile(r"^(?:- )?Expected a (.+?)(?:\. Got value: (.*))?$")
_GIVEN = re.compile(r"^Given value: (.*)$")
_NOISE = re.compile(r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value type: )")

#: the class each section's keys belong to, for "closest" hints of unknown keys
_SECTION_CLASS = {"trainer": "lightning.pytorch.Trainer", "data": "qsmlab.data.datamodule.QSMDataModule"}


class ConfigError(QSMInputError):
    """A rejected config value: ``key`` (dotted, no ``init_args``), ``problem`` (the rest of the line)."""

    def __init__(self, key: str | None, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}" if key else problem)

    def shown(self, name: str) -> str:
        """The message with the key written as ``name`` (e.g. ``--model.width`` or a file's label)."""
        return f"{name}: {self.problem}"


def _words(type_text: str) -> str | None:
    """``<class 'float'>`` -> ``a number``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    t = type_text.strip()
    simple = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
              "dict": "a mapping", "list": "a list", "collections.abc.Sequence": "a list",
              "collections.abc.Mapping": "a mapping", "pathlib.Path": "a path"}
    m = re.fullmatch(r"<class '([\w.]+)'>", t)
    if m:
        return None if m.group(1) == "NoneType" else simple.get(m.group(1), m.group(1).rsplit(".", 1)[-1])
    m = re.fullmatch(r"typing\.Literal\[(.*)\]", t)
    if m:
        return f"one of {m.group(1)}"
    return t


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass
class _Leaf:
    path: list[str]
    kind: str  # expected | option | message
    detail: str
    got: str | None = None
    cls: str | None = None


def _leaves(text: str) -> tuple[list[_Leaf], dict[str, str]]:
    """The leaf errors of a jsonargparse error tree, each with the key path above it; and the
    ``Given value`` seen under each path."""
    stack: list[tuple[int, str | None, str | None]] = []  # (indent, key part, class path)
    leaves: list[_Leaf] = []
    given: dict[str, str] = {}
    for raw in str(text).splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip())
        line = raw.strip()
        bare = line[2:] if line.startswith("- ") else line
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k, _ in stack if k]
        cls = next((c for _, _, c in reversed(stack) if c), None)
        if m := _PARSER_KEY.match(bare):
            stack.append((indent, m.group(1), None))
        elif m := _CLASS.match(line):
            stack.append((indent, None, m.group(1)))
        elif m := _OPTION.match(line):
            leaves.append(_Leaf(path + [m.group(1)], "option", m.group(1), cls=cls))
        elif m := _GROUP.match(line):
            leaves.append(_Leaf(path + m.group(1).split(".") + m.group(2).split("."), "option", m.group(2)))
        elif m := _KEY_NOT_EXPECTED.match(line):
            leaves.append(_Leaf(path + m.group(1).split("."), "option", m.group(1)))
        elif m := _EXPECTED.match(line):
            if _words(m.group(1)) is not None:
                leaves.append(_Leaf(path, "expected", m.group(1), got=m.group(2), cls=cls))
        elif m := _GIVEN.match(line):
            given.setdefault(".".join(path), m.group(1))
        elif not _NOISE.match(line) and line.startswith("- "):
            leaves.append(_Leaf(path, "message", line[2:], cls=cls))  # a constructor's own message
    return leaves, given


def _parameters(class_path: str | None) -> list[str]:
    if not class_path:
        return []
    try:
        mod, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(mod), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def _closest(key: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``key``: a sibling with a similar last part first (``model.widht`` ->
    ``model.width``), then any key with the same last part (``model.lambda_tv`` -> ``model.loss.lambda_tv``),
    then a key alike as a whole."""
    cands = list(dict.fromkeys(candidates))
    prefix, _, leaf = key.rpartition(".")
    siblings = {c.rpartition(".")[2]: c for c in cands if c.rpartition(".")[0] == prefix}
    m = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.7)
    if m:
        return siblings[m[0]]
    others = {c: c.rpartition(".")[2] for c in cands if c.split(".", 1)[0] == key.split(".", 1)[0]}
    m = difflib.get_close_matches(leaf, list(dict.fromkeys(others.values())), n=1, cutoff=0.75)
    if m:
        return next(c for c, lf in others.items() if lf == m[0])
    m = difflib.get_close_matches(key, cands, n=1, cutoff=0.85)
    return m[0] if m else None


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def config_error(error: BaseException, config_keys: Iterable[str] = (),
                 given: Mapping[str, Any] | None = None, section: str | None = None) -> ConfigError:
    """A :class:`ConfigError` for ``error`` raised while parsing or instantiating a resolved config.

    Args:
        error: jsonargparse's ``ArgumentError`` or a constructor's exception (ValueError, Lightning's
            MisconfigurationException, QSMInputError, ...).
        config_keys: the dotted keys of the resolved config (for "closest" hints and to find the key a
            constructor's message is about).
        given: ``{dotted key: value}`` the user set (command-line overrides, a trial's parameters): a key
            a message mentions is looked up here first, and its value is the one shown.
        section: the config section the error came from, when the caller knows it (``data``).
    """
    given = dict(given or {})
    keys = list(config_keys)
    leaves, seen = _leaves(str(error))
    real = [leaf for leaf in leaves if leaf.kind != "expected" or leaf.path]
    if real:
        deepest = max(len(leaf.path) for leaf in real)
        leaf = next(leaf for leaf in real if len(leaf.path) == deepest)
        key = ".".join(leaf.path)
        if leaf.kind == "option":
            section = leaf.path[0]
            owner = leaf.cls or _SECTION_CLASS.get(section)
            prefix = ".".join(leaf.path[:-1])
            # not the user's own keys: a second unknown key of the same line is no hint
            cands = [k for k in keys if k not in given] + [f"{prefix}.{p}" for p in _parameters(owner)]
            hint = _closest(key, [c for c in cands if c != key])
            what = f"not a parameter of {owner}" if owner else "not a known key"
            return ConfigError(key, what + (f" (closest: {hint!r})" if hint else ""))
        if leaf.kind == "expected":
            alts = _merge([w for lf in real if lf.kind == "expected" and lf.path == leaf.path
                           if (w := _words(lf.detail)) is not None])
            value = given[key] if key in given else (leaf.got if leaf.got is not None else seen.get(key, "?"))
            shown = _show(value) if key in given else (repr(value) if leaf.got is not None else value)
            return ConfigError(key, f"got {shown}, expected {' or '.join(dict.fromkeys(alts))}")
        return _from_message(leaf.detail, keys, given, section=leaf.path[0] if leaf.path else None)
    return _from_message(_one_line(error), keys, given, section=section)


def _merge(alternatives: list[str]) -> list[str]:
    """``["one of 1, 2", "a number", "one of 'a'"]`` -> ``["one of 1, 2, 'a'", "a number"]`` (no repeats)."""
    choices: list[str] = []
    rest: list[str] = []
    for a in alternatives:
        if a.startswith("one of "):
            choices += [c.strip() for c in a[len("one of "):].split(",")]
        else:
            rest.append(a)
    merged = [f"one of {', '.join(dict.fromkeys(choices))}"] if choices else []
    return list(dict.fromkeys(merged + rest))


def _from_message(message: str, keys: list[str], given: Mapping[str, Any], section: str | None = None
                  ) -> ConfigError:
    """A constructor's message: name the key it is about (a given key first, then any config key)."""
    message = _one_line(message)

    def mentioned(k: str) -> bool:
        leaf = k.rsplit(".", 1)[-1]
        return k in message or re.search(rf"(?<![\w.]){re.escape(leaf)}(?![\w])", message) is not None

    def in_section(k: str) -> bool:
        return section is None or k.split(".", 1)[0] == section

    label = re.match(r"([A-Za-z_][\w.]*):", message)  # "train_subjects: ..." names its key first
    if label:
        pools = [[k for k in pool if k == label.group(1) or k.endswith("." + label.group(1))]
                 for pool in (list(given), keys)]
    else:
        pools = []
    for pool in pools + [list(given), keys]:
        hits = [k for k in pool if in_section(k) and mentioned(k)]
        if hits:
            key = max(hits, key=lambda k: (k in message, len(k)))  # the full dotted name wins
            body = message
            for label in (key, key.rsplit(".", 1)[-1]):  # "model.prior: expected ..." -> "expected ..."
                if body.startswith(f"{label}:"):
                    body = body[len(label) + 1:].strip()
                    break
            value = given.get(key)
            if value is not None and not (re.search(r"\bgot\b", body) and str(value) in body):  # said already?
                body = f"got {_show(value)}; {body}"
            return ConfigError(key, body)
    return ConfigError(section, message)
