"""A weighted sum of named loss terms, each logged on its own.

    total = sum_name  weight[name] * term[name](pred, batch, physics)

Each term's weight is addressed by name (``composite.weights["tv"]``) or as ``lambda_<name>``
(``composite.lambda_tv = 1e-3``): the names YAML configs and Optuna sweeps use as dotted keys. A term
whose weight is 0 is skipped (not computed: an ablation without TV costs no TV). ``forward`` returns
``(total, parts)`` with ``parts["loss_<name>"]`` the unweighted value of each computed term, so a
LightningModule logs ``train/loss_tv`` etc. next to ``train/loss``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qsmlab.losses._common import _get
from qsmlab.physics.batch import physics_for_batch


@dataclass
class Term:
    """One named term: ``weight * loss(pred, batch, physics)``."""

    name: str
    loss: nn.Module
    weight: float = 1.0


def _check_weight(name: str, weight) -> float:
    w = float(weight)
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"CompositeLoss: weight lambda_{name} must be a finite number >= 0, got {weight!r}")
    return w


class CompositeLoss(nn.Module):
    """Named loss terms with named weights.

    Args:
        terms: ``{"dc": (DataConsistencyLoss(), 1.0), "tv": (TVLoss(), 1e-3)}`` or a list of
            :class:`Term`. Names must be identifiers (they become ``lambda_<name>`` and ``loss_<name>``).

    ``forward(pred, batch, physics=None, skip=()) -> (total, parts)``. ``physics`` is passed to every term; when
    None it is built once with :func:`~qsmlab.physics.physics_for_batch` (default padding) when
    the batch has ``b0_dir`` and ``voxel_size``. Weights: ``self.weights`` (a dict name -> float) or ``lambda_<name>``
    attributes; :meth:`set_weights` sets several at once.
    """

    def __init__(self, terms: Mapping[str, tuple[nn.Module, float]] | Iterable[Term]):
        super().__init__()
        if isinstance(terms, Mapping):
            items = [Term(name, *spec) if isinstance(spec, tuple) else Term(name, spec)
                     for name, spec in terms.items()]
        else:
            items = [t if isinstance(t, Term) else Term(*t) for t in terms]
        if not items:
            raise ValueError("CompositeLoss needs at least one term")
        names = [t.name for t in items]
        if len(set(names)) != len(names):
            raise ValueError(f"CompositeLoss: term names must be unique, got {names}")
        for t in items:
            if not t.name.isidentifier():
                raise ValueError(f"CompositeLoss: term name {t.name!r} is not an identifier")
            if not isinstance(t.loss, nn.Module):
                raise TypeError(f"CompositeLoss: term {t.name!r} must be an nn.Module, got {type(t.loss).__name__}")
        self.terms = nn.ModuleDict({t.name: t.loss for t in items})
        self.weights: dict[str, float] = {t.name: _check_weight(t.name, t.weight) for t in items}

    # -- weights by name -----------------------------------------------------------------------------
    def _term_of(self, key: str) -> str:
        name = key[len("lambda_"):] if key.startswith("lambda_") else key
        if name not in self.weights:
            raise KeyError(f"CompositeLoss has no term {name!r} (terms: {sorted(self.weights)})")
        return name

    def set_weights(self, **weights: float) -> CompositeLoss:
        """``set_weights(lambda_tv=1e-3, dc=1.0)``: keys are term names with or without ``lambda_``."""
        new = {self._term_of(k): _check_weight(self._term_of(k), v) for k, v in weights.items()}
        self.weights.update(new)
        return self

    def weight_hparams(self) -> dict[str, float]:
        """``{"lambda_<name>": weight}`` for logging the weights as hyper-parameters."""
        return {f"lambda_{k}": v for k, v in self.weights.items()}

    def __getattr__(self, key: str):
        if key.startswith("lambda_"):
            weights = self.__dict__.get("weights", {})
            name = key[len("lambda_"):]
            if name in weights:
                return weights[name]
        return super().__getattr__(key)

    def __setattr__(self, key: str, value) -> None:
        if key.startswith("lambda_") and key[len("lambda_"):] in self.__dict__.get("weights", {}):
            self.set_weights(**{key: value})
            return
        super().__setattr__(key, value)

    def extra_repr(self) -> str:
        return ", ".join(f"lambda_{k}={v:g}" for k, v in self.weights.items())

    # -- evaluation ----------------------------------------------------------------------------------
    def forward(self, pred, batch, physics=None, skip: Iterable[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, parts)``; the terms named in ``skip`` are left out as if their weight were 0 (e.g. a
        training-only term when a method is evaluated)."""
        skip = set(skip)
        active = [(name, w) for name, w in self.weights.items() if w != 0.0 and name not in skip]
        if not active:
            raise ValueError(f"CompositeLoss: every term has weight 0 ({self.weight_hparams()}); nothing to optimise")
        if physics is None and _get(batch, "b0_dir") is not None and _get(batch, "voxel_size") is not None:
            physics = physics_for_batch(batch)  # built once for all terms (kernels are cached per geometry)
        parts: dict[str, torch.Tensor] = {}
        total = None
        for name, w in active:
            value = self.terms[name](pred, batch, physics)
            parts[f"loss_{name}"] = value
            total = w * value if total is None else total + w * value
        return total, parts
