"""Helpers shared by the loss modules: duck-typed batch access, output selection, masked reductions.

Losses never import :mod:`qsmlab.data` (layering, see DESIGN.md section 2), so a batch is anything with
attribute or ``[]`` access to its tensors: a ``QSMBatch``, a plain ``dict`` or a ``SimpleNamespace``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

NORMS = ("l1", "l2")


def _get(batch, name: str, default=None):
    """``batch.name`` or ``batch[name]``; ``default`` when absent or None."""
    if isinstance(batch, Mapping):
        value = batch.get(name, default)
    else:
        value = getattr(batch, name, default)
        if value is default and hasattr(batch, "__getitem__") and not isinstance(batch, torch.Tensor):
            try:
                value = batch[name]
            except (KeyError, IndexError, TypeError):
                value = default
    return default if value is None else value


def _require(batch, name: str, who: str) -> torch.Tensor:
    value = _get(batch, name)
    if value is None:
        raise ValueError(f"{who} needs the batch entry {name!r}, which this batch does not have")
    return value


def select(pred, output: str, who: str) -> torch.Tensor:
    """The tensor a loss reads: ``pred`` itself if it is a Tensor, else ``pred[output]``."""
    if isinstance(pred, torch.Tensor):
        return pred
    if isinstance(pred, Mapping):
        if output not in pred:
            raise ValueError(f"{who}(output={output!r}): the prediction has no {output!r} entry "
                             f"(it has {sorted(pred)})")
        return pred[output]
    raise TypeError(f"{who}: pred must be a Tensor or a dict of Tensors, got {type(pred).__name__}")


def target_tensor(pred, batch, name: str, who: str) -> torch.Tensor:
    """A target looked up first among the named outputs of a dict ``pred``, then in the batch."""
    if isinstance(pred, Mapping) and name in pred:
        return pred[name]
    return _require(batch, name, who)


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` on ``ref``'s device with ``ref``'s floating dtype (batches are float32; gradcheck is float64)."""
    return t.to(device=ref.device, dtype=ref.dtype)


def mask_of(batch, ref: torch.Tensor) -> torch.Tensor:
    """The batch's brain mask as 0/1 in ``ref``'s dtype, broadcastable to ``ref``; all ones if absent."""
    m = _get(batch, "mask")
    if m is None:
        return torch.ones_like(ref)
    m = m.to(device=ref.device)
    return (m > 0.5).to(ref.dtype) if m.dtype != torch.bool else m.to(ref.dtype)


def check_shapes(who: str, **tensors: torch.Tensor) -> None:
    """All tensors must share one shape ``[B, C, X, Y, Z]`` (no silent broadcasting of a wrong patch)."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 5 or any(s != first for s in shapes.values()):
        raise ValueError(f"{who}: expected tensors of one shape [B, C, X, Y, Z], got {shapes}")


def check_norm(norm: str, who: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"{who}: norm must be one of {NORMS}, got {norm!r}")
    return norm


def penalty(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Elementwise ``|x|`` (l1) or ``x**2`` (l2, the squared L2 norm's summand)."""
    return x.abs() if norm == "l1" else x.square()


def masked_mean(values: torch.Tensor, weight: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``sum(weight * values) / max(count, 1)``: a mean over the ``count`` voxels in the mask.

    Normalising by the number of masked voxels of the whole batch (not by the array size) makes the
    value independent of the patch or volume size and of how much background a patch holds; an empty
    mask gives 0 (with a graph, so ``backward`` still works).
    """
    return (values * weight).sum() / count.clamp_min(1)


def forward_differences(x: torch.Tensor, mask: torch.Tensor, spacing: torch.Tensor | None = None):
    """Forward differences of ``x`` [B, C, X, Y, Z] along the 3 voxel axes, with their pair masks.

    Returns a list of ``(d_i, m_i)`` for axes i = 0, 1, 2: ``d_i = (x[n + e_i] - x[n]) / h_i`` (``h_i`` =
    ``spacing[:, i]`` in mm, per sample, or 1 when ``spacing`` is None) and ``m_i = mask[n + e_i] *
    mask[n]``, so only differences whose both voxels are inside the mask count (no edge of the mask
    itself is penalised). No wrap-around: each axis has one difference fewer than samples.
    """
    out = []
    for i in range(3):
        dim = x.ndim - 3 + i
        n = x.shape[dim]
        hi = x.narrow(dim, 1, n - 1)
        lo = x.narrow(dim, 0, n - 1)
        d = hi - lo
        if spacing is not None:
            d = d / spacing[:, i].reshape(-1, *([1] * (x.ndim - 1)))
        m = mask.narrow(dim, 1, n - 1) * mask.narrow(dim, 0, n - 1)
        out.append((d, m))
    return out


def spacing_of(batch, ref: torch.Tensor, who: str) -> torch.Tensor:
    """The batch's ``voxel_size`` (mm) as [B, 3] in ``ref``'s dtype (one row broadcasts to B)."""
    vs = like(torch.as_tensor(_require(batch, "voxel_size", who)), ref).reshape(-1, 3)
    if vs.shape[0] == 1:
        vs = vs.expand(ref.shape[0], 3)
    if vs.shape[0] != ref.shape[0] or not torch.all(vs > 0):
        raise ValueError(f"{who}: voxel_size must be positive mm, one row per sample; got {tuple(vs.shape)}")
    return vs
