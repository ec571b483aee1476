"""Trained checkpoints as pipeline steps: ``--inversion ckpt:PATH`` and ``--bfr ckpt:PATH``.

:func:`install` registers the ``ckpt`` prefix with :mod:`qsmlab.recon.registry`, so any trained method's
checkpoint is an inversion with the registry's signature, and a NeXtQSM checkpoint's background net is a
background-removal method. The command layer calls it (recon must not import methods: DESIGN.md §2).
A loaded checkpoint is kept for the process (:func:`qsmlab.methods.predict.method_from`, the package's one
checkpoint cache), so a pipeline over many scans loads it once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from qsmlab.errors import QSMInputError
from qsmlab.methods.predict import background_from_checkpoint, method_from, predict_volume
from qsmlab.recon import registry


def _checked(path: str, family: str) -> str:
    if not path:
        raise QSMInputError(f"{family} ckpt:PATH: no checkpoint path given")
    if not Path(path).is_file():
        raise QSMInputError(f"{family} ckpt:{path}: checkpoint file not found")
    return str(Path(path).resolve())


def _inversion(path: str) -> Callable:
    def ckpt_inversion(field, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), magnitude=None,
                        quiet=False):
        """Dipole inversion by the trained network in the checkpoint (ppm in, ppm out)."""
        return predict_volume(method_from(path), np.asarray(field, np.float32), np.asarray(mask) > 0,
                              voxel_size=voxel_size, b0_dir=b0_dir, magnitude=magnitude)

    ckpt_inversion.__qualname__ = f"ckpt:{path}"
    return ckpt_inversion


def _background(path: str) -> Callable:
    def ckpt_background(total_field, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), quiet=False):
        """Background removal by a NeXtQSM checkpoint's background network -> (local field, mask)."""
        m = np.asarray(mask) > 0
        local = background_from_checkpoint(method_from(path), np.asarray(total_field, np.float32), m,
                                           voxel_size=voxel_size, b0_dir=b0_dir)
        return local, m

    return ckpt_background


def _resolve(family: str, arg: str) -> Callable:
    path = _checked(arg, family)
    if family == "inversion":
        return _inversion(path)
    if family == "background":
        return _background(path)
    raise QSMInputError(f"ckpt:{arg}: a checkpoint can be an inversion or a background method, not {family}")


def install() -> None:
    """Register the ``ckpt:`` prefix (idempotent)."""
    registry.register_prefix("ckpt", _resolve)
