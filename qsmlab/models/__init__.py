"""Plain ``nn.Module``s for the deep-learning QSM methods; no Lightning, no data code.

Every model has ``size_multiple`` (input spatial dims must be multiples of it) and
``fixed_input_size`` (``None``, or the one spatial shape a UNETR accepts). Models do not pad: the
method pads, crops or tiles, and a wrong shape raises a ``ValueError`` naming the shape and the multiple.

- :class:`UQSMNet` (uQSM), :class:`QSMnetUNet` (QSMnet/QSMnet+),
- :class:`BackgroundUNet`, :class:`VariationalNet`, :class:`NeXtQSMChain` (NeXtQSM),
- :class:`PedQNetRecon`, :class:`SubcorticalUNETR`, :class:`BrainMaskUNETR` (PedQ-NET),
- :class:`UNet3d`, the configurable U-Net under the first three.
"""

from __future__ import annotations

from torch import nn

from qsmlab.models.nextqsm import BackgroundUNet, NeXtQSMChain, VariationalNet
from qsmlab.models.pedqnet import BrainMaskUNETR, PedQNetRecon, SubcorticalUNETR
from qsmlab.models.qsmnet_unet import QSMnetUNet
from qsmlab.models.unet import UNet3d
from qsmlab.models.uqsm_net import UQSMNet


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def default_models(num_classes: int = 8) -> dict[str, nn.Module]:
    """One instance of every model with its default arguments (``num_classes`` for the segmentation net)."""
    return {
        "UQSMNet": UQSMNet(),
        "QSMnetUNet": QSMnetUNet(),
        "BackgroundUNet": BackgroundUNet(),
        "VariationalNet": VariationalNet(),
        "NeXtQSMChain": NeXtQSMChain(),
        "PedQNetRecon": PedQNetRecon(),
        f"SubcorticalUNETR({num_classes})": SubcorticalUNETR(num_classes),
        "BrainMaskUNETR": BrainMaskUNETR(),
    }


def summary(num_classes: int = 8) -> str:
    """Table (text) of the default models: parameter count, ``size_multiple``, ``fixed_input_size``."""
    rows = [("model", "parameters", "size_multiple", "fixed_input_size")]
    for name, model in default_models(num_classes).items():
        fixed = "-" if model.fixed_input_size is None else "x".join(map(str, model.fixed_input_size))
        rows.append((name, f"{count_parameters(model):,}", str(model.size_multiple), fixed))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = [
    "BackgroundUNet", "BrainMaskUNETR", "NeXtQSMChain", "PedQNetRecon", "QSMnetUNet", "SubcorticalUNETR",
    "UNet3d", "UQSMNet", "VariationalNet", "count_parameters", "default_models", "summary",
]
