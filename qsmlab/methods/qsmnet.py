"""QSMnet and QSMnet+: supervised dipole inversion with a 5³ U-Net (Yoon et al. 2018; Jung et al. 2020).

Yoon J, Gong E, Chatnuntawech I, et al., "Quantitative susceptibility mapping using deep neural network:
QSMnet", NeuroImage 179 (2018); Jung W, Yoon J, Ji S, et al., "Exploring linearity of deep neural network
trained QSM: QSMnet+", NeuroImage 211 (2020). The network sees the local field (``field / field_scale``)
and predicts chi (``/ field_scale``); labels are chi maps (COSMOS in the papers; the data engine's chi, or
its multi-orientation COSMOS labels, here). Loss, all inside the mask (``qsmlab.losses``):

    lambda_chi * |chi_hat - chi|_1 + lambda_model * |D chi_hat - f|_1 + lambda_grad * |grad chi_hat - grad chi|_1

Default weights are those of the authors' PyTorch training code, ``train_params.py`` of
github.com/minjoony/qsmnet_torch (SNU Laboratory for Imaging Science and Technology): ``W_L1Loss = 1``,
``W_MDLOSS = 1`` (QSMnet) / ``0.5`` (QSMnet+), ``W_GDLOSS = 0.1``. (The original TensorFlow release,
github.com/SNU-LIST/QSMnet ``Train/training_params.py``, weighted the model loss by 5 and the gradient loss
by 0.1, with the model loss on normalised maps.) Both read from the stored sources, not from memory.

QSMnet+ is QSMnet trained with the linearity augmentation (chi and field scaled together by a random
factor and sign): ``augment: {linearity: {}}`` of :class:`qsmlab.data.datamodule.QSMDataModule`
(``experiments/qsmnet_plus.yaml``). :class:`QSMnetPlus` only changes the default model-loss weight and
warns when the datamodule does not scale.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from qsmlab.errors import QSMInputError
from qsmlab.losses import ChiLoss, CompositeLoss, DataConsistencyLoss, GradientDifferenceLoss
from qsmlab.methods.base import QSMMethod
from qsmlab.methods.options import as_dataclass
from qsmlab.models import QSMnetUNet


@dataclass
class QSMnetLoss:
    """QSMnet loss weights (YAML ``model.loss.*``); norms ``"l1"`` as in the papers or ``"l2"``."""

    lambda_chi: float = 1.0
    lambda_model: float = 1.0
    lambda_grad: float = 0.1
    chi_norm: str = "l1"
    model_norm: str = "l1"
    grad_norm: str = "l1"


def build_qsmnet_loss(cfg: QSMnetLoss) -> CompositeLoss:
    for k in ("lambda_chi", "lambda_model", "lambda_grad"):
        if not getattr(cfg, k) >= 0:
            raise QSMInputError(f"model.loss.{k}: expected a number >= 0, got {getattr(cfg, k)!r}")
    for k in ("chi_norm", "model_norm", "grad_norm"):
        if getattr(cfg, k) not in ("l1", "l2"):
            raise QSMInputError(f"model.loss.{k}: expected 'l1' or 'l2', got {getattr(cfg, k)!r}")
    return CompositeLoss({
        "chi": (ChiLoss(norm=cfg.chi_norm), cfg.lambda_chi),
        "model": (DataConsistencyLoss(kind="linear", norm=cfg.model_norm), cfg.lambda_model),
        "grad": (GradientDifferenceLoss(norm=cfg.grad_norm), cfg.lambda_grad),
    })


class QSMnet(QSMMethod):
    """QSMnet (see the module docstring): ``QSMnetUNet`` on field / field_scale -> chi / field_scale.

    Args:
        width, depth, kernel_size, negative_slope: of :class:`qsmlab.models.QSMnetUNet` (paper: 32, 4, 5, 0.1).
        loss: :class:`QSMnetLoss`.
        **kwargs: common :class:`qsmlab.methods.base.QSMMethod` arguments.
    """

    name = "qsmnet"
    inputs = ("field",)
    outputs = {"chi": "ppm"}
    requires = ("chi",)

    def __init__(self, width: int = 32, depth: int = 4, kernel_size: int = 5, negative_slope: float = 0.1,
                 loss: QSMnetLoss | None = None, **kwargs):
        super().__init__(**kwargs)
        self.loss_config = as_dataclass(QSMnetLoss, loss)
        self.net = self.prepare_network(QSMnetUNet(in_channels=len(self.inputs) + self.prior_channels, out_channels=1,
                                                   width=width, depth=depth, kernel_size=kernel_size,
                                                   negative_slope=negative_slope))
        self.loss_fn = build_qsmnet_loss(self.loss_config)
        self.save_method_hyperparameters(locals())

    def training_step(self, batch, batch_idx: int):
        if batch.chi is None:
            raise QSMInputError(f"{type(self).__name__} is supervised: the training scans need a chi label "
                                f"(manifest column 'chi'); batch {batch.key[:2]} has none")
        return super().training_step(batch, batch_idx)


@dataclass
class QSMnetPlusLoss(QSMnetLoss):
    """QSMnet+ loss weights: the model loss at 0.5 (authors' PyTorch code)."""

    lambda_model: float = 0.5


class QSMnetPlus(QSMnet):
    """QSMnet+ = QSMnet + the datamodule's linearity augmentation (``data.augment.linearity``)."""

    name = "qsmnet_plus"

    def __init__(self, width: int = 32, depth: int = 4, kernel_size: int = 5, negative_slope: float = 0.1,
                 loss: QSMnetPlusLoss | None = None, **kwargs):
        super().__init__(width=width, depth=depth, kernel_size=kernel_size, negative_slope=negative_slope,
                         loss=as_dataclass(QSMnetPlusLoss, loss), **kwargs)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = getattr(self.trainer, "datamodule", None)
        augment = getattr(dm, "augment", None) or {}
        # {} means "on, with defaults" (qsmlab.data.transforms.build_augmentation); False/None mean off
        if dm is not None and augment.get("linearity", None) in (None, False):
            warnings.warn("QSMnetPlus is training without the linearity augmentation (data.augment.linearity); "
                          "that is plain QSMnet with lambda_model=0.5", stacklevel=2)

