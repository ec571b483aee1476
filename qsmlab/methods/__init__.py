"""Learned QSM methods: one LightningModule per method on the shared base :class:`QSMMethod`.

Registry (:mod:`qsmlab.methods.registry`): :data:`METHODS` maps a method name to its class path; a new
method adds one line there. :func:`load_method` rebuilds a method from a checkpoint.

- :class:`UQSM`, :class:`UQSMDIP` (``uqsm``, ``uqsm_dip``): self-supervised, physics losses only.
- :class:`QSMnet`, :class:`QSMnetPlus` (``qsmnet``, ``qsmnet_plus``): supervised on chi.
- :class:`NeXtQSM` (``nextqsm``): total field -> local field -> chi, supervised end to end.
- :class:`PedQNet` (``pedqnet``): self-supervised reconstruction + subcortical segmentation.
- :class:`BrainMaskNet` (``brainmask``): magnitude -> brain mask, a segmentation module on the shared
  :class:`MethodModule` plumbing (not a QSM method).
"""

from __future__ import annotations

from qsmlab.methods.base import QSMMethod
from qsmlab.methods.brainmask import BrainMaskNet
from qsmlab.methods.dip import UQSMDIP
from qsmlab.methods.module import MethodModule
from qsmlab.methods.nextqsm import NeXtQSM, NeXtQSMLoss
from qsmlab.methods.pedqnet import PedQNet, PedQNetLoss
from qsmlab.methods.qsmnet import QSMnet, QSMnetLoss, QSMnetPlus, QSMnetPlusLoss
from qsmlab.methods.registry import METHODS, load_method, method_names, read_checkpoint_info
from qsmlab.methods.uqsm import UQSM, UQSMLoss

__all__ = [
    "METHODS", "BrainMaskNet", "MethodModule", "NeXtQSM", "NeXtQSMLoss", "PedQNet", "PedQNetLoss", "QSMMethod", "QSMnet",
    "QSMnetLoss", "QSMnetPlus", "QSMnetPlusLoss", "UQSM", "UQSMDIP", "UQSMLoss",
    "load_method", "method_names", "read_checkpoint_info",
]
