"""Input checks shared by every metric (numpy and torch): shapes, mask values, empty masks.

numpy metrics take ``pred, ref, mask`` as (X, Y, Z) arrays (chi in ppm, mask boolean or 0/1);
torch metrics take ``[B, 1, X, Y, Z]`` tensors (the mask may also have batch size 1, broadcast over
the batch). Bad input raises :class:`qsmlab.errors.QSMInputError` (a ``ValueError``) naming the
argument at fault and its shape.
"""

from __future__ import annotations

import numpy as np
import torch

from qsmlab.errors import QSMInputError

VOLUME_DIMS = (1, 2, 3, 4)  # the C, X, Y, Z dims of a [B, 1, X, Y, Z] tensor


def check_numpy(pred, ref, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate (X, Y, Z) inputs; return float64 ``pred``, ``ref`` and a boolean ``mask``."""
    pred, ref, mask = np.asarray(pred), np.asarray(ref), np.asarray(mask)
    if ref.ndim != 3:
        raise QSMInputError(f"ref has shape {ref.shape}; expected a 3-D (X, Y, Z) array")
    for name, arr in (("pred", pred), ("mask", mask)):
        if arr.shape != ref.shape:
            raise QSMInputError(
                f"{name} has shape {arr.shape} but ref has shape {ref.shape}; expected the same (X, Y, Z) shape"
            )
    for name, arr in (("pred", pred), ("ref", ref)):
        if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise QSMInputError(f"{name} has dtype {arr.dtype}; expected a real-valued array (ppm)")
    if mask.dtype != bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise QSMInputError("mask has values other than 0 and 1; expected a boolean or 0/1 mask")
        mask = mask != 0
    if not mask.any():
        raise QSMInputError("mask is empty (no voxel inside it); a masked metric needs at least one voxel")
    return pred.astype(np.float64), ref.astype(np.float64), mask


def check_torch(pred, ref, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate ``[B, 1, X, Y, Z]`` inputs; return detached floating ``pred``, ``ref`` and a boolean mask.

    The compute dtype is the promoted dtype of ``pred`` and ``ref`` (float16/bfloat16/integers are
    raised to float32); the mask is expanded to ``ref``'s shape and moved to its device.
    """
    for name, t in (("pred", pred), ("ref", ref), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise QSMInputError(f"{name} is a {type(t).__name__}; expected a torch.Tensor [B, 1, X, Y, Z]")
    if ref.ndim != 5 or ref.shape[1] != 1:
        raise QSMInputError(f"ref has shape {tuple(ref.shape)}; expected [B, 1, X, Y, Z]")
    if pred.shape != ref.shape:
        raise QSMInputError(
            f"pred has shape {tuple(pred.shape)} but ref has shape {tuple(ref.shape)}; expected the same shape"
        )
    if mask.shape != ref.shape and not (mask.ndim == 5 and mask.shape[0] == 1 and mask.shape[1:] == ref.shape[1:]):
        raise QSMInputError(
            f"mask has shape {tuple(mask.shape)}; expected {tuple(ref.shape)} (or batch size 1, broadcast)"
        )
    if pred.is_complex() or ref.is_complex():
        raise QSMInputError("pred/ref are complex; expected real-valued susceptibility maps (ppm)")
    dtype = torch.promote_types(pred.dtype, ref.dtype)
    if not dtype.is_floating_point or dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    pred = pred.detach().to(dtype)
    ref = ref.detach().to(device=pred.device, dtype=dtype)
    mask = mask.detach().to(pred.device)
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise QSMInputError("mask has values other than 0 and 1; expected a boolean or 0/1 mask")
        mask = mask != 0
    mask = mask.expand_as(ref)
    empty = (mask.flatten(1).sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise QSMInputError(
            f"mask is empty (no voxel inside it) for batch element(s) {empty}; "
            "a masked metric needs at least one voxel per element"
        )
    return pred, ref, mask
