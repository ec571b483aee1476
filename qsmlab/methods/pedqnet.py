"""PedQ-NET: self-supervised reconstruction with subcortical segmentation.

PedQ-NET (as described in issue 7 and DESIGN.md section 4; its abstract is the source, the full paper
could not be checked offline): an nnU-Net-style reconstruction network (MONAI ``DynUNet``,
:class:`qsmlab.models.PedQNetRecon`) maps the local field and the brain mask to chi; a UNETR
(:class:`qsmlab.models.SubcorticalUNETR`) segments the deep grey-matter nuclei *on the reconstructed
chi of the whole volume*, and both are trained together with

    lambda_dc * sum_M |W (e^{i phi_s D chi} - e^{i phi_s f})| / N_M  +  lambda_seg * (Dice + CE)(seg, labels)
    [+ lambda_tv * TV(chi), off by default]

(the L1 nonlinear model loss of :class:`qsmlab.losses.DataConsistencyLoss`, ``W`` the magnitude scaled
to [0, 1] in the mask, ``phi_s`` the scan's rad/ppm; MONAI's Dice + CE through
:class:`qsmlab.losses.DiceCELoss`). No chi label is used: the segmentation loss back-propagates into the
reconstruction net, so nuclei must be recognisable in chi (the point of training them jointly).

Labels: the data engine's anatomical ``seg`` map (:data:`qsmlab.data.phantoms.anatomical.LABELS`) is
mapped to a small set of subcortical classes, :data:`SUBCORTICAL_CLASSES` (class 0 = everything else);
``seg_classes`` overrides the mapping (class name -> label ids). Random-shape phantoms label their
shapes, not anatomy, so PedQ-NET trains on anatomical subjects only (a training row of group ``shapes``
is refused).

UNETR has a fixed input size (``seg_img_size``): training patches are that size (the recon net runs on
the same patch); on a full volume the recon net runs on the (padded) volume and the UNETR slides over
its chi with Gaussian-blended windows (MONAI ``sliding_window_inference``). Validation logs the base's
chi metrics and ``val/dice`` (mean Dice over the subcortical classes present, background excluded).

Its brain-masking net is :class:`qsmlab.methods.brainmask.BrainMaskNet`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torchmetrics.aggregation import MeanMetric

from qsmlab.data.phantoms.anatomical import LABEL_IDS, LABELS
from qsmlab.errors import QSMInputError
from qsmlab.losses import CompositeLoss, DataConsistencyLoss, DiceCELoss, TVLoss
from qsmlab.methods.base import QSMMethod
from qsmlab.methods.brainmask import BrainMaskNet  # noqa: F401 (checkpoints written before it moved name this path)
from qsmlab.methods.inference import Context, sliding_windows
from qsmlab.methods.options import as_dataclass
from qsmlab.methods.patches import crop_windows, label_windows
from qsmlab.methods.scores import dice_per_volume
from qsmlab.models import PedQNetRecon, SubcorticalUNETR
from qsmlab.models._blocks import check_positive_int

SUBCORTICAL_CLASSES: dict[str, list[str]] = {
    "caudate": ["caudate"],
    "putamen": ["putamen"],
    "globus_pallidus": ["globus_pallidus"],
    "thalamus": ["thalamus"],
    "midbrain": ["red_nucleus", "substantia_nigra"],
    "dentate": ["dentate"],
}
"""Default segmentation classes (1..6) -> anatomical label names; the red nucleus and substantia nigra
are merged (a few voxels each at 2 mm)."""
SW_BATCH = 4
"""UNETR windows per forward pass: a batch > 1 makes PyTorch use oneDNN convolutions on CPU (for one
sample with few channels it falls back to its much slower native 3-D convolution)."""


def label_lut(seg_classes: Mapping[str, Sequence[str | int]]) -> torch.Tensor:
    """Lookup table anatomical label id -> class index (0 = background/other), from class -> labels."""
    lut = torch.zeros(max(LABELS) + 1, dtype=torch.long)
    for c, (name, labels) in enumerate(seg_classes.items(), start=1):
        if isinstance(labels, str | int):
            labels = [labels]
        for lab in labels:
            idx = LABEL_IDS.get(lab) if isinstance(lab, str) else int(lab)
            if idx is None or not 0 < idx < len(lut):
                raise QSMInputError(f"model.seg_classes.{name}: unknown label {lab!r}; labels are names or ids of "
                                    f"{ {k: v for k, v in LABELS.items() if k} }")
            lut[idx] = c
    return lut


@dataclass
class PedQNetLoss:
    """PedQ-NET loss (YAML ``model.loss.*``).

    Attributes:
        lambda_dc: weight of the L1 nonlinear data consistency (dimensionless).
        lambda_seg: weight of Dice + CE of the subcortical segmentation.
        lambda_tv: optional TV weight (ppm/mm), 0 = off (the abstract's loss has none).
        dc_weighted: multiply the residual by ``W`` (magnitude in [0, 1]); False = unweighted.
        phase_scale: rad/ppm overriding the batches' ``phase_scale``.
        support: ``"mask"`` (the paper: the recon net's chi is masked before the loss) or ``"free"``: the
            data term sees the recon's whole output, so chi outside the mask (masked at inference, and in
            what the UNETR segments) may explain the part of the masked field no chi inside it can
            (background-removal residue, sources at the mask's edge); TV, if on, then counts every
            difference of the patch. uQSM's :class:`qsmlab.methods.uqsm.UQSMLoss` has the same switch and
            says why it matters on realistic fields.
    """

    lambda_dc: float = 1.0
    lambda_seg: float = 0.01
    lambda_tv: float = 0.0
    dc_weighted: bool = True
    phase_scale: float | None = None
    support: str = "mask"


def build_pedqnet_loss(cfg: PedQNetLoss) -> CompositeLoss:
    for k in ("lambda_dc", "lambda_seg", "lambda_tv"):
        v = getattr(cfg, k)
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise QSMInputError(f"model.loss.{k}: expected a number >= 0, got {v!r}")
    if cfg.phase_scale is not None and not (math.isfinite(cfg.phase_scale) and cfg.phase_scale > 0):
        raise QSMInputError(f"model.loss.phase_scale: expected a positive number of rad/ppm, got {cfg.phase_scale!r}")
    if cfg.support not in ("mask", "free"):
        raise QSMInputError(f"model.loss.support: expected 'mask' or 'free', got {cfg.support!r}")
    return CompositeLoss({
        "dc": (DataConsistencyLoss(kind="nonlinear", norm="l1", phase_scale=cfg.phase_scale,
                                   weighted=bool(cfg.dc_weighted)), cfg.lambda_dc),
        "seg": (DiceCELoss(output="seg_logits", target="seg"), cfg.lambda_seg),
        "tv": (TVLoss(support="grid" if cfg.support == "free" else "mask"), cfg.lambda_tv),
    })


def _img_size(v) -> tuple[int, int, int]:
    return (int(v),) * 3 if isinstance(v, int) else tuple(int(s) for s in v)


class PedQNet(QSMMethod):
    """PedQ-NET (see the module docstring).

    Args:
        filters, kernel_size, res_block: of :class:`qsmlab.models.PedQNetRecon` (DynUNet).
        seg_img_size: UNETR input size (multiples of 16) = the training patch size.
        seg_feature_size, seg_hidden_size, seg_mlp_dim, seg_num_heads: the UNETR's width.
        seg_classes: class name -> anatomical label names or ids (default :data:`SUBCORTICAL_CLASSES`).
        detach_seg_input: stop the segmentation loss's gradient at chi (False: joint training).
        seg_train_windows: in training, the UNETR segments this many random ``seg_img_size`` windows of the
            reconstructed chi per patch (which must be at least that size), half centred on a labelled voxel
            (nnU-Net's foreground oversampling; :func:`qsmlab.methods.patches.label_windows`), and the
            segmentation loss covers those windows; 0 (default): Gaussian-blended sliding windows over the whole patch, which on a
            112 x 112 x 104 head of 32^3 windows are ~125 UNETR passes, ~3x the reconstruction's cost.
        segment_at_inference: ``predict`` / :meth:`infer_arrays` also return ``seg_logits`` (UNETR windows
            over the whole volume); off by default because chi is what a prediction is for and the windows
            cost more than the reconstruction. Validation and test always segment (``val/dice``).
        loss: :class:`PedQNetLoss`.
        **kwargs: common :class:`qsmlab.methods.base.QSMMethod` arguments.
    """

    name = "pedqnet"
    inputs = ("field", "mask")
    outputs = {"chi": "ppm", "seg_logits": "logits"}

    def __init__(self, filters: Sequence[int] = (16, 32, 64, 128), kernel_size: int = 3, res_block: bool = False,
                 seg_img_size: int | Sequence[int] = 64, seg_feature_size: int = 8, seg_hidden_size: int = 96,
                 seg_mlp_dim: int = 192, seg_num_heads: int = 4, seg_classes: Mapping[str, list] | None = None,
                 detach_seg_input: bool = False, segment_at_inference: bool = False, seg_train_windows: int = 0,
                 loss: PedQNetLoss | None = None, **kwargs):
        super().__init__(**kwargs)
        self.loss_config = as_dataclass(PedQNetLoss, loss)
        self.seg_classes = dict(seg_classes or SUBCORTICAL_CLASSES)
        if not self.seg_classes:
            raise QSMInputError("model.seg_classes: expected at least one class")
        self.register_buffer("label_lut", label_lut(self.seg_classes), persistent=False)
        self.net = self.prepare_network(PedQNetRecon(in_channels=len(self.inputs) + self.prior_channels,
                                                     out_channels=1, filters=list(filters), kernel_size=kernel_size,
                                                     res_block=res_block))
        self.seg_net = SubcorticalUNETR(num_classes=len(self.seg_classes) + 1, img_size=_img_size(seg_img_size),
                                        feature_size=seg_feature_size, hidden_size=seg_hidden_size,
                                        mlp_dim=seg_mlp_dim, num_heads=seg_num_heads)
        self.detach_seg_input = bool(detach_seg_input)
        self.segment_at_inference = bool(segment_at_inference)
        self.seg_train_windows = check_positive_int(seg_train_windows, "model.seg_train_windows", minimum=0)
        self.loss_fn = build_pedqnet_loss(self.loss_config)
        self.val_dice, self.test_dice = MeanMetric(), MeanMetric()
        if self.options.channels_last:  # the UNETR too (oneDNN convolutions on CPU)
            self.seg_net.to(memory_format=torch.channels_last_3d)
        self.save_method_hyperparameters(locals())

    @property
    def inference_outputs(self) -> tuple[str, ...] | None:
        return None if self.segment_at_inference else ("chi",)

    @property
    def requires(self) -> tuple[str, ...]:
        need = ("seg",) if self.loss_config.lambda_seg > 0 else ()
        return need + (("magnitude",) if self.loss_config.dc_weighted else ())

    def can_compute_loss(self, batch) -> bool:
        if not super().can_compute_loss(batch):
            return False
        return self.loss_config.phase_scale is not None or bool(torch.all(torch.isfinite(batch.phase_scale)))

    def map_labels(self, seg: torch.Tensor) -> torch.Tensor:
        """Anatomical label ids [B, 1, X, Y, Z] -> class indices (0..len(seg_classes))."""
        lab = seg.long()
        if lab.min() < 0 or lab.max() >= len(self.label_lut):
            raise QSMInputError(f"seg: labels {int(lab.min())}..{int(lab.max())} are not the data engine's anatomical "
                                f"labels 0..{len(self.label_lut) - 1}")
        return self.label_lut.to(lab.device)[lab]

    def prepare_batch(self, batch):
        """The batch with its anatomical ``seg`` labels mapped to this net's classes."""
        if batch.get("seg") is None:
            return batch
        return dataclasses.replace(batch, seg=self.map_labels(batch.seg))

    # -- network ------------------------------------------------------------------------------------
    def segment(self, chi: torch.Tensor) -> torch.Tensor:
        """UNETR logits of chi (network units) [B, 1, X, Y, Z]: directly at ``seg_img_size``, else
        Gaussian-blended sliding windows of that size."""
        size = tuple(self.seg_net.fixed_input_size)
        x = self.memory_format(chi.detach() if self.detach_seg_input else chi)
        if tuple(x.shape[-3:]) == size:
            return self.seg_net(x)
        return sliding_windows(self.seg_net, x, size, self.options.sw_overlap, batch_size=SW_BATCH)["out"]

    def run_network(self, x: torch.Tensor, ctx: Context) -> dict[str, torch.Tensor]:
        """``{"chi": the recon net's output (masked), "seg_logits": UNETR on the reconstructed chi}``.

        With ``model.prior`` the input's last channel is the prior (TKD, network units, masked) and the
        reconstructed chi is ``net(x) + prior``: the UNETR segments that sum, while ``"chi"`` returned here
        is the network's part only, because the base adds the prior to the primary output once, after the
        network (:meth:`QSMMethod.outputs_to_chi`). The UNETR runs in training and when ``ctx`` wants
        ``seg_logits`` (evaluation; prediction with ``segment_at_inference``). So the prior enters chi exactly once, and the segmentation
        loss back-propagates through the same chi the data-consistency loss sees. With ``loss.support: free``
        ``"chi"`` is not masked here (the data term sees it whole; inference masks it) and the UNETR segments
        its masked part, as a prediction returns it.
        """
        x = self.memory_format(x)
        inside = (x[:, 1:2] > 0.5).to(x.dtype)
        chi = self.net(x)
        masked = chi * inside
        out = {"chi": chi if self.loss_config.support == "free" else masked}
        if (self.training and not self.windowed_training) or (not self.training and ctx.wants("seg_logits")):
            full = masked + x[:, -1:] if self.prior_channels else masked
            out["seg_logits"] = self.segment(full)
        return out

    # -- training and evaluation --------------------------------------------------------------------
    @property
    def windowed_training(self) -> bool:
        """The segmentation trains on ``seg_train_windows`` random windows (:meth:`training_loss`)."""
        return self.seg_train_windows > 0 and self.loss_config.lambda_seg > 0

    def training_loss(self, batch, outputs, physics):
        """With ``seg_train_windows``: the UNETR on random windows of the reconstructed chi (masked, network
        units, the prior included: what :meth:`run_network` segments), the labels cropped alike; the
        segmentation loss back-propagates into the reconstruction through those windows."""
        if not self.windowed_training:
            return super().training_loss(batch, outputs, physics)
        size = tuple(self.seg_net.fixed_input_size)
        chi = outputs["chi"] * (batch.mask > 0.5).to(outputs["chi"].dtype) / self.scale
        if self.detach_seg_input:
            chi = chi.detach()
        corners = label_windows(batch.seg, batch.mask, size, self.seg_train_windows)
        logits = self.seg_net(self.memory_format(crop_windows(chi, corners, size)))
        batch = dataclasses.replace(batch, seg=crop_windows(batch.seg, corners, size))
        return super().training_loss(batch, {**outputs, "seg_logits": logits}, physics)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        shapes = [r.subject for r in self.training_rows() or [] if getattr(r, "group", "") == "shapes"]
        if shapes and self.loss_config.lambda_seg > 0:
            raise QSMInputError(f"PedQNet: training subjects {shapes[:3]} are random-shape phantoms whose seg labels "
                                "are shapes, not anatomy; train on anatomical subjects (data.train_subjects)")

    def training_step(self, batch, batch_idx: int):
        if self.loss_config.lambda_seg > 0 and batch.seg is None:
            raise QSMInputError(f"PedQNet trains its segmentation on the training scans' 'seg' labels (manifest "
                                f"column 'seg'); batch {batch.key[:2]} has none (or set model.loss.lambda_seg 0)")
        size = tuple(self.seg_net.fixed_input_size)
        if self.windowed_training and any(a < w for a, w in zip(batch.field.shape[-3:], size)):
            raise QSMInputError(f"model.seg_train_windows: training patches {tuple(batch.field.shape[-3:])} are "
                                f"smaller than the UNETR's windows {size} (model.seg_img_size); use a data.patch_size "
                                "at least that size, or seg_train_windows 0")
        if tuple(batch.field.shape[-3:]) != size and not self.windowed_training:
            self.warn_once("patch", f"PedQNet: training patches {tuple(batch.field.shape[-3:])} differ from the "
                                     f"UNETR size {size} (model.seg_img_size): the UNETR runs Gaussian-blended "
                                     "windows of its size over each patch (slower; data.patch_size equal to it "
                                     "gives one window)")
        return super().training_step(batch, batch_idx)

    def score_volume(self, stage: str, batch, outputs) -> None:
        if "seg_logits" in outputs and batch.get("seg") is not None:
            d = dice_per_volume(outputs["seg_logits"], batch.seg)
            d = d[torch.isfinite(d)]
            if d.numel():
                getattr(self, f"{stage}_dice").update(d)

    def epoch_values(self, stage: str) -> dict[str, torch.Tensor]:
        metric = getattr(self, f"{stage}_dice")
        values = {f"{stage}/dice": metric.compute()} if metric.update_count else {}
        metric.reset()
        return values
