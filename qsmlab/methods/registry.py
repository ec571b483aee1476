"""The method registry: names -> classes, and methods rebuilt from checkpoints.

:data:`METHODS` maps a method name to its class path (imported on first use, so listing names costs
nothing, and this module imports no method: the inference helpers below the methods can use it); a new
method adds one line here. :func:`load_method` rebuilds a method from a checkpoint written by Lightning
(``qsmlab fit``): the checkpoint's ``"qsmlab"`` entry names the class, its hyper-parameters the
constructor arguments, its buffers the normalisation statistics.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from qsmlab.errors import QSMInputError
from qsmlab.methods.module import MethodModule

METHODS: dict[str, str] = {
    "uqsm": "qsmlab.methods.uqsm.UQSM",
    "uqsm_dip": "qsmlab.methods.dip.UQSMDIP",
    "qsmnet": "qsmlab.methods.qsmnet.QSMnet",
    "qsmnet_plus": "qsmlab.methods.qsmnet.QSMnetPlus",
    "nextqsm": "qsmlab.methods.nextqsm.NeXtQSM",
    "pedqnet": "qsmlab.methods.pedqnet.PedQNet",
    "brainmask": "qsmlab.methods.brainmask.BrainMaskNet",
}


def method_names() -> list[str]:
    return sorted(METHODS)


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, MethodModule)):
        raise TypeError(f"{class_path} is not a qsmlab method (MethodModule)")
    return cls


def read_checkpoint_info(path: str | Path, what: str = "--ckpt") -> dict:
    """The ``"qsmlab"`` entry of a checkpoint (method, class_path, statistics), without building the model.

    One-line :class:`QSMInputError` naming the file when it is missing, unreadable or not a qsmlab method
    checkpoint.
    """
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
                what: str = "--ckpt") -> MethodModule:
    """Rebuild a method from a checkpoint, in eval mode.

    Args:
        path: ``.ckpt`` written by Lightning from a qsmlab method (a :class:`MethodModule` subclass).
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
