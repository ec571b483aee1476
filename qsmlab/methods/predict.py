"""One volume through a trained method: numpy in, chi out (``qsmlab predict``, the pipeline's ``ckpt:PATH``).

:func:`predict_volume` loads a checkpoint (once per process, :func:`method_from`) or takes a loaded method,
checks the inputs, and runs :func:`qsmlab.methods.inference.infer_volume`: full-volume inference (padding,
or sliding windows for large volumes), with the input resampled into the training geometry and back when
its B0 direction is more than 1 degree or its voxel size more than 25 % away from the training data's (a
warning says so). :func:`background_from_checkpoint` is NeXtQSM's background net alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from qsmlab.errors import QSMInputError
from qsmlab.methods.inference.flips import TTA
from qsmlab.methods.module import MethodModule
from qsmlab.methods.options import VOXEL_RESAMPLING
from qsmlab.methods.registry import load_method


@lru_cache(maxsize=4)
def _cached(path: str, mtime: float, method: str | None) -> MethodModule:
    return load_method(path, method=method)


def method_from(ckpt: str | Path | MethodModule, method: str | None = None) -> MethodModule:
    """A loaded method, from a path (loaded once per process: cached by path and modification time) or as
    given. The one checkpoint cache of the package (``qsmlab predict``'s API and ``ckpt:PATH`` steps)."""
    if isinstance(ckpt, MethodModule):
        return ckpt
    p = Path(ckpt)
    mtime = p.stat().st_mtime if p.is_file() else -1.0
    return _cached(str(p), mtime, method)


@contextmanager
def evaluating(model: MethodModule) -> Iterator[MethodModule]:
    """``model`` in eval mode under ``torch.inference_mode``; its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def checked_images(images: Mapping[str, np.ndarray | None], first: str) -> dict[str, np.ndarray]:
    """float32 (X, Y, Z) images on ``first``'s grid, finite, with a non-empty ``mask`` (as 0/1); absent ones
    (None) left out. One-line :class:`QSMInputError` naming the image at fault."""
    ref = np.asarray(images[first], dtype=np.float32)
    if ref.ndim != 3:
        raise QSMInputError(f"{first}: expected a 3-D (X, Y, Z) array, got shape {ref.shape}")
    out = {}
    for name, arr in images.items():
        if arr is None:
            continue
        a = np.asarray(arr) > 0.5 if name == "mask" else np.asarray(arr, dtype=np.float32)
        if a.shape != ref.shape:
            what = "the total field's" if first == "total_field" else "the field's"
            raise QSMInputError(f"{name}: grid {a.shape} does not match {what} {ref.shape}")
        out[name] = a.astype(np.float32)
    if not out["mask"].any():
        raise QSMInputError("mask: empty (no voxel set); expected a non-empty brain mask")
    for name, a in out.items():
        if not np.all(np.isfinite(a)):
            raise QSMInputError(f"{name}: contains NaN/Inf")
    return out


def checked_geometry(voxel_size, b0_dir) -> tuple[np.ndarray, np.ndarray]:
    """(voxel size mm, unit B0) as float64 3-vectors; a one-line error for non-positive or zero ones."""
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(3)
    b0 = np.asarray(b0_dir, dtype=np.float64).reshape(3)
    if not (np.all(np.isfinite(vs)) and np.all(vs > 0)):
        raise QSMInputError(f"voxel_size: expected three positive numbers (mm), got {vs.tolist()}")
    if not (np.all(np.isfinite(b0)) and np.linalg.norm(b0) > 0):
        raise QSMInputError(f"b0_dir: expected a non-zero 3-vector, got {b0.tolist()}")
    return vs, b0 / np.linalg.norm(b0)


def predict_volume(ckpt: str | Path | MethodModule, field: np.ndarray, mask: np.ndarray,
                   voxel_size: Sequence[float] = (1.0, 1.0, 1.0), b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
                   magnitude: np.ndarray | None = None, total_field: np.ndarray | None = None,
                   method: str | None = None, output: str | None = None,
                   voxel_resampling: str | None = None, tta: str | None = None) -> np.ndarray:
    """chi (ppm, (X, Y, Z), zero outside the mask) of a local field with a trained method.

    Args:
        ckpt: checkpoint path (``.ckpt``) or a loaded method.
        field: local field (ppm), (X, Y, Z). mask: brain mask, same grid.
        voxel_size: mm. b0_dir: unit B0 direction in voxel axes.
        magnitude, total_field: inputs for methods whose network takes them (same grid).
        method: expected method name (a checkpoint of another method fails).
        output: which named output to return (default the method's primary output, ``chi``).
        voxel_resampling: ``"auto"`` or ``"never"`` for this call (see ``MethodOptions``); None = the
            checkpoint's setting. The model is not changed.
        tta: ``"none"`` or ``"flips"`` (test-time mirroring, :mod:`qsmlab.methods.inference.flips`) for this
            call; None = the checkpoint's ``model.tta``.
    """
    model = method_from(ckpt, method)
    if voxel_resampling is not None and voxel_resampling not in VOXEL_RESAMPLING:
        raise QSMInputError(f"voxel_resampling: expected one of {list(VOXEL_RESAMPLING)}, got {voxel_resampling!r}")
    if tta is not None and tta not in TTA:
        raise QSMInputError(f"tta: expected one of {list(TTA)}, got {tta!r}")
    images = checked_images({"field": field, "mask": mask, "magnitude": magnitude, "total_field": total_field},
                            "field")
    use = list(model.inputs_for(set(images))) + ["mask"]
    missing = [k for k in use if k not in images]
    if missing:
        raise QSMInputError(f"method {model.name!r} needs {missing} as input(s) "
                            f"(--{missing[0].replace('_', '-')})")
    vs, b0 = checked_geometry(voxel_size, b0_dir)
    with evaluating(model):
        out = model.infer_arrays({k: v for k, v in images.items() if k in use}, vs, b0, voxel_resampling, tta=tta)
    key = output or model.primary_output
    if key not in out:
        raise QSMInputError(f"output {key!r}: method {model.name!r} produces {sorted(out)}")
    return np.asarray(out[key], dtype=np.float32)


def background_from_checkpoint(ckpt, total_field: np.ndarray, mask: np.ndarray,
                               voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                               b0_dir: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Background removal by a NeXtQSM checkpoint's background net (``qsmlab pipeline --bfr ckpt:PATH``).

    Args:
        ckpt: NeXtQSM checkpoint (``.ckpt``) or a loaded ``NeXtQSM``.
        total_field: ppm, (X, Y, Z). mask: brain mask on the same grid.
        voxel_size: mm. b0_dir: B0 direction in voxel axes (the input is rotated/resampled into the
            training geometry and back when it is off, as for every method).
    Returns:
        local field (ppm, (X, Y, Z), zero outside the mask).
    """
    model = method_from(ckpt, method="nextqsm")
    images = checked_images({"total_field": total_field, "mask": mask}, "total_field")
    b0 = np.asarray(b0_dir, dtype=np.float64).reshape(3)
    with evaluating(model):
        local = model.background_arrays(images["total_field"], images["mask"], np.asarray(voxel_size, np.float64),
                                        b0 / np.linalg.norm(b0))
    return np.asarray(local, dtype=np.float32)
