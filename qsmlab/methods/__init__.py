"""Learned QSM methods: one LightningModule per method on the shared base :class:`QSMMethod`.

Registry: :data:`METHODS` maps a method name to its class path (imported on first use, so listing
names costs nothing); a new method adds one line here. :func:`load_method` rebuilds a method from a
checkpoint written by Lightning (``qsmlab fit``): the checkpoint's ``"qsmlab"`` entry names the class,
its hyper-parameters the constructor arguments, its buffers the normalisation statistics.

- :class:`UQSM`, :class:`UQSMDIP` (``uqsm``, ``uqsm_dip``): self-supervised, physics losses only.
- :class:`QSMnet`, :class:`QSMnetPlus` (``qsmnet``, ``qsmnet_plus``): supervised on chi.
- :class:`NeXtQSM` (``nextqsm``): total field -> local field -> chi, supervised end to end.
- :class:`PedQNet`, :class:`BrainMaskNet` (``pedqnet``, ``brainmask``): self-supervised reconstruction +
  subcortical segmentation; magnitude -> brain mask.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from qsmlab.errors import QSMInputError
from qsmlab.methods.base import QSMMethod
from qsmlab.methods.dip import UQSMDIP
from qsmlab.methods.nextqsm import NeXtQSM, NeXtQSMLoss
from qsmlab.methods.pedqnet import BrainMaskNet, PedQNet, PedQNetLoss
from qsmlab.methods.qsmnet import QSMnet, QSMnetLoss, QSMnetPlus, QSMnetPlusLoss
from qsmlab.methods.uqsm import UQSM, UQSMLoss

METHODS: dict[str, str] = {
    "uqsm": "qsmlab.methods.uqsm.UQSM",
    "uqsm_dip": "qsmlab.methods.dip.UQSMDIP",
    "qsmnet": "qsmlab.methods.qsmnet.QSMnet",
    "qsmnet_plus": "qsmlab.methods.qsmnet.QSMnetPlus",
    "nextqsm": "qsmlab.methods.nextqsm.NeXtQSM",
    "pedqnet": "qsmlab.methods.pedqnet.PedQNet",
    "brainmask": "qsmlab.methods.pedqnet.BrainMaskNet",
}


def method_names() -> list[str]:
    return sorted(METHODS)


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, QSMMethod)):
        raise TypeError(f"{class_path} is not a QSMMethod")
    return cls


def read_checkpoint_info(path: str | Path, what: str = "--ckpt") -> dict:
    """The ``"qsmlab"`` entry of a checkpoint (method, class_path, statistics), without building the model.

    One-line :class:`QSMInputError` naming the file when it is missing, unreadable or not a qsmlab method
    checkpoint.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise QSMInputError(f"{what} {p}: file not found")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or corrupt files
        raise QSMInputError(f"{what} {p}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    info = ckpt.get("qsmlab") if isinstance(ckpt, dict) else None
    if not isinstance(info, dict) or "class_path" not in info or "state_dict" not in ckpt:
        raise QSMInputError(f"{what} {p}: not a qsmlab method checkpoint (no 'qsmlab' entry; checkpoints are "
                            "written by 'qsmlab fit' / Lightning from a qsmlab.methods class)")
    return {**info, "hyper_parameters": dict(ckpt.get("hyper_parameters") or {})}


def load_method(path: str | Path, method: str | None = None, map_location: str = "cpu",
                what: str = "--ckpt") -> QSMMethod:
    """Rebuild a method from a checkpoint, in eval mode.

    Args:
        path: ``.ckpt`` written by Lightning from a :class:`QSMMethod` subclass.
        method: expected registry name (e.g. from ``--method``); a checkpoint of another method fails.
        map_location: device for the weights.
    """
    info = read_checkpoint_info(path, what)
    name = info.get("method")
    if method is not None:
        if method not in METHODS:
            raise QSMInputError(f"--method {method!r}: unknown; choose one of: {', '.join(method_names())}")
        if name != method:
            raise QSMInputError(f"{what} {path}: checkpoint of method {name!r}, not {method!r}")
    try:
        cls = _import(info["class_path"])
    except (ImportError, AttributeError, TypeError) as e:
        raise QSMInputError(f"{what} {path}: its method class {info['class_path']!r} cannot be loaded ({e})") from None
    model = cls.load_from_checkpoint(str(path), map_location=map_location, weights_only=True)
    return model.eval()


__all__ = [
    "METHODS", "BrainMaskNet", "NeXtQSM", "NeXtQSMLoss", "PedQNet", "PedQNetLoss", "QSMMethod", "QSMnet",
    "QSMnetLoss", "QSMnetPlus", "QSMnetPlusLoss", "UQSM", "UQSMDIP", "UQSMLoss",
    "load_method", "method_names", "read_checkpoint_info",
]
