"""uQSM: unsupervised (self-supervised) QSM from the local field, the brain mask and the magnitude.

The uQSM paper (as described in issue 7 and DESIGN.md section 4; its authors and venue are not restated
here because we could not verify them offline): a 3-D encoder-decoder maps (field, mask) to chi and is
trained with no chi label, only with the physics: a data-consistency loss
``||W M (e^{i phi_s D chi} - e^{i phi_s f})||^2`` (NDI) plus ``lambda_TV * TV(chi)``. The paper's ablation (NDI; LDI + TV; WLDI + TV; NDI + TV) is four configs of
:class:`UQSMLoss` (``experiments/uqsm*.yaml``), no code: ``dc`` picks the data-consistency kind of
:class:`qsmlab.losses.DataConsistencyLoss` (linear, weighted-linear, weighted-nonlinear; the paper's text
swaps the WLDI and NDI formulas, see that class) and ``lambda_tv`` the TV weight.

Units: ``W`` is the magnitude scaled to [0, 1] in the mask, ``phi_s`` the sample's ``phase_scale``
(rad/ppm, from the first echo time and B0 of the manifest row, or ``phase_scale`` here), chi and fields
in ppm, TV in ppm/mm. The nonlinear term is dimensionless and about ``phi_s**2`` times the linear one
(``2 sin(phi_s r / 2) ~ phi_s r``), so TV weights of linear and nonlinear variants differ by that factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qsmlab.errors import QSMInputError
from qsmlab.losses import DATA_CONSISTENCY_KINDS, CompositeLoss, DataConsistencyLoss, TVLoss
from qsmlab.methods.base import QSMMethod
from qsmlab.methods.options import as_dataclass
from qsmlab.models import UQSMNet


@dataclass
class UQSMLoss:
    """uQSM loss (YAML ``model.loss.*``): ``lambda_dc * DC(kind=dc, norm=dc_norm) + lambda_tv * TV``.

    Attributes:
        dc: ``"nonlinear"`` (NDI, the paper), ``"weighted"`` (WLDI) or ``"linear"`` (LDI).
        dc_norm: ``"l2"`` (the paper) or ``"l1"``.
        dc_weighted: the voxel weight ``W`` (magnitude / its maximum, or the batch's ``noise_weight``) in the
            data term: None (default) = the kind's own (weighted for ``nonlinear`` and ``weighted``, not for
            ``linear``); False drops it, e.g. for fields simulated with spatially uniform noise
            (``patch_fields: simulate``), whose reliability the magnitude does not describe.
        lambda_dc: weight of the data-consistency term.
        lambda_tv: weight of the TV term (ppm/mm); 0 switches TV off (the NDI-only ablation).
        phase_scale: rad/ppm for the nonlinear kind, overriding the batches' ``phase_scale``.
        support: where the training loss lets chi be nonzero. ``"mask"`` (the paper): chi is masked before
            the loss. ``"free"``: the loss sees the network's whole output; chi outside the mask (not
            scored, masked at inference) may explain the part of the masked field that no chi inside it can
            (V-SHARP residue, sources at the mask's edge), and TV counts every difference of the patch
            (``TVLoss(support="grid")``). Why (issue 15, ``benchmarks/results/uqsm_loss_landscape/``): on a
            realistic subject the truth's data term is 5x TKD's, and the map optimised on the masked loss
            ends *worse* than TKD (55.7 % vs 56.9 %); with free support the same optimisation ends at 50.6 %.
    """

    dc: str = "nonlinear"
    dc_norm: str = "l2"
    dc_weighted: bool | None = None
    lambda_dc: float = 1.0
    lambda_tv: float = 2e-4
    phase_scale: float | None = None
    support: str = "mask"


def build_uqsm_loss(cfg: UQSMLoss) -> CompositeLoss:
    if cfg.dc not in DATA_CONSISTENCY_KINDS:
        raise QSMInputError(f"model.loss.dc: expected one of {list(DATA_CONSISTENCY_KINDS)}, got {cfg.dc!r}")
    if cfg.dc_norm not in ("l1", "l2"):
        raise QSMInputError(f"model.loss.dc_norm: expected 'l1' or 'l2', got {cfg.dc_norm!r}")
    if cfg.support not in ("mask", "free"):
        raise QSMInputError(f"model.loss.support: expected 'mask' or 'free', got {cfg.support!r}")
    if cfg.dc_weighted is not None and not isinstance(cfg.dc_weighted, bool):
        raise QSMInputError(f"model.loss.dc_weighted: expected true, false or null, got {cfg.dc_weighted!r}")
    for k in ("lambda_dc", "lambda_tv"):
        if not getattr(cfg, k) >= 0:
            raise QSMInputError(f"model.loss.{k}: expected a number >= 0, got {getattr(cfg, k)!r}")
    return CompositeLoss({
        "dc": (DataConsistencyLoss(kind=cfg.dc, norm=cfg.dc_norm, phase_scale=cfg.phase_scale,
                                   weighted=cfg.dc_weighted), cfg.lambda_dc),
        "tv": (TVLoss(support="grid" if cfg.support == "free" else "mask"), cfg.lambda_tv),
    })


class UQSM(QSMMethod):
    """uQSM (see the module docstring): ``UQSMNet`` on (field / field_scale, mask) -> chi / field_scale.

    Args:
        depth, width, upsample, norm: of :class:`qsmlab.models.UQSMNet` (the paper: nearest upsampling,
            batch norm).
        loss: :class:`UQSMLoss` (``--model.loss.lambda_tv 3e-4``).
        **kwargs: the common arguments of :class:`qsmlab.methods.base.QSMMethod` (lr, scheduler, ...).
    """

    name = "uqsm"
    inputs = ("field", "mask")
    outputs = {"chi": "ppm"}

    def __init__(self, depth: int = 4, width: int = 16, upsample: str = "nearest", norm: str = "batch",
                 loss: UQSMLoss | None = None, **kwargs):
        super().__init__(**kwargs)
        self.loss_config = as_dataclass(UQSMLoss, loss)
        self.net = self.prepare_network(UQSMNet(in_channels=len(self.inputs) + self.prior_channels, out_channels=1,
                                                depth=depth, width=width, upsample=upsample, norm=norm))
        self.loss_fn = build_uqsm_loss(self.loss_config)
        self.save_method_hyperparameters(locals())

    @property
    def requires(self) -> tuple[str, ...]:  # what the loss reads beyond the inputs
        return ("magnitude",) if self.loss_config.dc != "linear" else ()

    def can_compute_loss(self, batch) -> bool:
        if not super().can_compute_loss(batch):
            return False
        if self.loss_config.dc == "nonlinear" and self.loss_config.phase_scale is None:
            return bool(torch.all(torch.isfinite(batch.phase_scale)))
        return True
