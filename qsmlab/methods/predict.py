"""One volume through a trained method: numpy in, chi out (``qsmlab predict`` and the pipeline's ``ckpt:PATH``).

:func:`predict_volume` loads a checkpoint (or takes a loaded method), checks the inputs, and runs
:meth:`QSMMethod.infer_arrays`: full-volume inference (padding, or sliding windows for large volumes),
with the input resampled into the training geometry and back when its B0 direction is more than 1 degree
or its voxel size more than 25 % away from the training data's (a warning says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from qsmlab.errors import QSMInputError
from qsmlab.methods import QSMMethod, load_method


@lru_cache(maxsize=4)
def _cached(path: str, mtime: float, method: str | None) -> QSMMethod:
    return load_method(path, method=method)


def method_from(ckpt: str | Path | QSMMethod, method: str | None = None) -> QSMMethod:
    """A loaded method, from a path (cached by path and modification time) or as given."""
    if isinstance(ckpt, QSMMethod):
        return ckpt
    p = Path(ckpt)
    mtime = p.stat().st_mtime if p.is_file() else -1.0
    return _cached(str(p), mtime, method)


def predict_volume(ckpt: str | Path | QSMMethod, field: np.ndarray, mask: np.ndarray,
                   voxel_size: Sequence[float] = (1.0, 1.0, 1.0), b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
                   magnitude: np.ndarray | None = None, total_field: np.ndarray | None = None,
                   method: str | None = None, output: str | None = None,
                   voxel_resampling: str | None = None) -> np.ndarray:
    """chi (ppm, (X, Y, Z), zero outside the mask) of a local field with a trained method.

    Args:
        ckpt: checkpoint path (``.ckpt``) or a loaded :class:`QSMMethod`.
        field: local field (ppm), (X, Y, Z). mask: brain mask, same grid.
        voxel_size: mm. b0_dir: unit B0 direction in voxel axes.
        magnitude, total_field: inputs for methods whose network takes them (same grid).
        method: expected method name (a checkpoint of another method fails).
        output: which named output to return (default the method's primary output, ``chi``).
        voxel_resampling: ``"auto"`` or ``"never"`` for this call (see :class:`QSMMethod`); None = the
            checkpoint's setting.
    """
    model = method_from(ckpt, method)
    if voxel_resampling is not None:
        from qsmlab.methods.base import VOXEL_RESAMPLING

        if voxel_resampling not in VOXEL_RESAMPLING:
            raise QSMInputError(f"voxel_resampling: expected one of {list(VOXEL_RESAMPLING)}, got "
                                f"{voxel_resampling!r}")
    f = np.asarray(field, dtype=np.float32)
    m = np.asarray(mask) > 0.5
    if f.ndim != 3:
        raise QSMInputError(f"field: expected a 3-D (X, Y, Z) array, got shape {f.shape}")
    images = {"field": f, "mask": m.astype(np.float32)}
    for name, arr in (("mask", m), ("magnitude", magnitude), ("total_field", total_field)):
        if arr is None:
            continue
        a = np.asarray(arr, dtype=np.float32)
        if a.shape != f.shape:
            raise QSMInputError(f"{name}: grid {a.shape} does not match the field's {f.shape}")
        if name != "mask":
            images[name] = a
    if not m.any():
        raise QSMInputError("mask: empty (no voxel set); expected a non-empty brain mask")
    for name, a in images.items():
        if not np.all(np.isfinite(a)):
            raise QSMInputError(f"{name}: contains NaN/Inf")
    use = list(model.inputs_for(set(images))) + ["mask"]
    missing = [k for k in use if k not in images]
    if missing:
        raise QSMInputError(f"method {model.name!r} needs {missing} as input(s) "
                            f"(--{missing[0].replace('_', '-')})")
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(3)
    b0 = np.asarray(b0_dir, dtype=np.float64).reshape(3)
    if not (np.all(np.isfinite(vs)) and np.all(vs > 0)):
        raise QSMInputError(f"voxel_size: expected three positive numbers (mm), got {vs.tolist()}")
    if not (np.all(np.isfinite(b0)) and np.linalg.norm(b0) > 0):
        raise QSMInputError(f"b0_dir: expected a non-zero 3-vector, got {b0.tolist()}")
    was_training = model.training
    saved = model.hparams.get("voxel_resampling", "auto")
    model.eval()
    try:
        if voxel_resampling is not None:
            model.hparams["voxel_resampling"] = voxel_resampling
        with torch.inference_mode():
            out = model.infer_arrays({k: v for k, v in images.items() if k in use},
                                     vs, b0 / np.linalg.norm(b0))
    finally:
        model.train(was_training)
        model.hparams["voxel_resampling"] = saved
    key = output or model.primary_output
    if key not in out:
        raise QSMInputError(f"output {key!r}: method {model.name!r} produces {sorted(out)}")
    return np.asarray(out[key], dtype=np.float32)
