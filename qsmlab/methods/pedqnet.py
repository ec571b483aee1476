"""PedQ-NET: self-supervised reconstruction with subcortical segmentation, and its brain-masking net.

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

:class:`BrainMaskNet`: magnitude -> brain mask with a UNETR (:class:`qsmlab.models.BrainMaskUNETR`),
Dice + CE against the batch's ``mask``; ``val/dice``. Its output ``mask`` is written as 0/1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.aggregation import MeanMetric

from qsmlab.errors import QSMInputError
from qsmlab.losses import CompositeLoss, DataConsistencyLoss, DiceCELoss, TVLoss
from qsmlab.methods.base import QSMMethod, as_dataclass, normalise_magnitude
from qsmlab.methods.inference import make_frame
from qsmlab.models import BrainMaskUNETR, PedQNetRecon, SubcorticalUNETR

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
    from qsmlab.data.phantoms.anatomical import LABEL_IDS, LABELS

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


def dice_per_volume(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean Dice over the foreground classes present in each volume (MONAI ``compute_dice``), [B].

    ``logits`` [B, C, X, Y, Z]; ``labels`` [B, 1, X, Y, Z] int in 0..C-1. Classes absent from both the
    prediction and the labels are ignored (NaN in MONAI); a volume with no foreground class gives NaN.
    """
    from monai.metrics import compute_dice

    n = logits.shape[1]
    pred = torch.nn.functional.one_hot(logits.argmax(1), n).movedim(-1, 1).float()
    ref = torch.nn.functional.one_hot(labels[:, 0].long().clamp(0, n - 1), n).movedim(-1, 1).float()
    d = compute_dice(pred, ref, include_background=False, ignore_empty=True)
    return torch.nanmean(d, dim=1)


@dataclass
class PedQNetLoss:
    """PedQ-NET loss (YAML ``model.loss.*``).

    Attributes:
        lambda_dc: weight of the L1 nonlinear data consistency (dimensionless).
        lambda_seg: weight of Dice + CE of the subcortical segmentation.
        lambda_tv: optional TV weight (ppm/mm), 0 = off (the abstract's loss has none).
        dc_weighted: multiply the residual by ``W`` (magnitude in [0, 1]); False = unweighted.
        phase_scale: rad/ppm overriding the batches' ``phase_scale``.
    """

    lambda_dc: float = 1.0
    lambda_seg: float = 0.01
    lambda_tv: float = 0.0
    dc_weighted: bool = True
    phase_scale: float | None = None


def build_pedqnet_loss(cfg: PedQNetLoss) -> CompositeLoss:
    for k in ("lambda_dc", "lambda_seg", "lambda_tv"):
        v = getattr(cfg, k)
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise QSMInputError(f"model.loss.{k}: expected a number >= 0, got {v!r}")
    if cfg.phase_scale is not None and not (math.isfinite(cfg.phase_scale) and cfg.phase_scale > 0):
        raise QSMInputError(f"model.loss.phase_scale: expected a positive number of rad/ppm, got {cfg.phase_scale!r}")
    return CompositeLoss({
        "dc": (DataConsistencyLoss(kind="nonlinear", norm="l1", phase_scale=cfg.phase_scale,
                                   weighted=bool(cfg.dc_weighted)), cfg.lambda_dc),
        "seg": (DiceCELoss(output="seg_logits", target="seg"), cfg.lambda_seg),
        "tv": (TVLoss(), cfg.lambda_tv),
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
                 detach_seg_input: bool = False, segment_at_inference: bool = False,
                 loss: PedQNetLoss | None = None, **kwargs):
        super().__init__(**kwargs)
        self.loss_config = as_dataclass(PedQNetLoss, loss)
        self.seg_classes = dict(seg_classes or SUBCORTICAL_CLASSES)
        if not self.seg_classes:
            raise QSMInputError("model.seg_classes: expected at least one class")
        self.register_buffer("label_lut", label_lut(self.seg_classes), persistent=False)
        self.net = PedQNetRecon(in_channels=len(self.inputs) + self.prior_channels, out_channels=1,
                                filters=list(filters), kernel_size=kernel_size,
                                res_block=res_block)
        self.seg_net = SubcorticalUNETR(num_classes=len(self.seg_classes) + 1, img_size=_img_size(seg_img_size),
                                        feature_size=seg_feature_size, hidden_size=seg_hidden_size,
                                        mlp_dim=seg_mlp_dim, num_heads=seg_num_heads)
        self.detach_seg_input = bool(detach_seg_input)
        self.segment_at_inference = bool(segment_at_inference)
        self._evaluating = False
        self.loss_fn = build_pedqnet_loss(self.loss_config)
        self.val_dice, self.test_dice = MeanMetric(), MeanMetric()
        self.save_method_hyperparameters()
        if self.hparams.get("channels_last", False):  # the base converts self.net; the UNETR too (oneDNN)
            self.seg_net.to(memory_format=torch.channels_last_3d)

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("channels_last", False) and x.ndim == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x

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

    def _with_classes(self, batch):
        if batch.get("seg") is None:
            return batch
        return dataclasses.replace(batch, seg=self.map_labels(batch.seg))

    # -- network ------------------------------------------------------------------------------------
    def segment(self, chi: torch.Tensor) -> torch.Tensor:
        """UNETR logits of chi (network units) [B, 1, X, Y, Z]: directly at ``seg_img_size``, else
        Gaussian-blended sliding windows of that size."""
        size = tuple(self.seg_net.fixed_input_size)
        x = self._memory_format(chi.detach() if self.detach_seg_input else chi)
        if tuple(x.shape[-3:]) == size:
            return self.seg_net(x)
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(x, size, sw_batch_size=SW_BATCH, predictor=self.seg_net,
                                        overlap=float(self.hparams.get("sw_overlap", 0.25)), mode="gaussian")

    def run_network(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"chi": the recon net's output (masked), "seg_logits": UNETR on the reconstructed chi}``.

        With ``model.prior`` the input's last channel is the prior (TKD, network units, masked) and the
        reconstructed chi is ``net(x) + prior``: the UNETR segments that sum, while ``"chi"`` returned here
        is the network's part only, because the base adds the prior to the primary output once, after the
        network (:meth:`QSMMethod.infer_images`). So the prior enters chi exactly once, and the segmentation
        loss back-propagates through the same chi the data-consistency loss sees.
        """
        x = self._memory_format(x)
        chi = self.net(x) * (x[:, 1:2] > 0.5)
        out = {"chi": chi}
        if self.training or self.segment_at_inference or self._evaluating:
            full = chi + x[:, -1:] if self.prior_channels else chi
            out["seg_logits"] = self.segment(full)
        return out

    # -- training and evaluation --------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = getattr(self.trainer, "datamodule", None)
        rows = getattr(dm, "rows", {}).get("train") if dm is not None else None
        shapes = [r.subject for r in rows or [] if getattr(r, "group", "") == "shapes"]
        if shapes and self.loss_config.lambda_seg > 0:
            raise QSMInputError(f"PedQNet: training subjects {shapes[:3]} are random-shape phantoms whose seg labels "
                                "are shapes, not anatomy; train on anatomical subjects (data.train_subjects)")

    def training_step(self, batch, batch_idx: int):
        if self.loss_config.lambda_seg > 0 and batch.seg is None:
            raise QSMInputError(f"PedQNet trains its segmentation on the training scans' 'seg' labels (manifest "
                                f"column 'seg'); batch {batch.key[:2]} has none (or set model.loss.lambda_seg 0)")
        size = tuple(self.seg_net.fixed_input_size)
        if tuple(batch.field.shape[-3:]) != size:
            self._warn_once("patch", f"PedQNet: training patches {tuple(batch.field.shape[-3:])} differ from the "
                                     f"UNETR size {size} (model.seg_img_size); set data.patch_size to it")
        return super().training_step(self._with_classes(batch), batch_idx)

    def _evaluate(self, stage: str, batch, batch_idx: int):
        batch = self._with_classes(batch)
        self._evaluating = True
        try:
            pred = super()._evaluate(stage, batch, batch_idx)
        finally:
            self._evaluating = False
        if pred is not None and "seg_logits" in pred and batch.get("seg") is not None:
            d = dice_per_volume(pred["seg_logits"], batch.seg)
            d = d[torch.isfinite(d)]
            if d.numel():
                getattr(self, f"{stage}_dice").update(d)
        return pred

    def _log_epoch(self, stage: str) -> None:
        super()._log_epoch(stage)
        metric = getattr(self, f"{stage}_dice")
        if metric.update_count:
            self.log(f"{stage}/dice", metric.compute().float(), sync_dist=False)
        metric.reset()


class BrainMaskNet(QSMMethod):
    """Brain masking by UNETR: magnitude -> mask (Dice + CE against the batch's ``mask``).

    The magnitude is divided by its 99th percentile over the patch / volume (no mask exists yet);
    the output ``mask`` is ``argmax`` of the two-class logits (0/1), ``mask_logits`` the logits. Full
    volumes go through sliding windows of ``img_size`` (UNETR's fixed input size). B0 plays no part
    (a magnitude image), so only a voxel size > 25 % off the training one is resampled.

    Args:
        img_size: UNETR input size = training patch size (multiples of 16).
        feature_size, hidden_size, mlp_dim, num_heads: UNETR width.
        lambda_dice, lambda_ce: the two parts of the loss.
        **kwargs: common :class:`qsmlab.methods.base.QSMMethod` arguments.
    """

    name = "brainmask"
    inputs = ("magnitude",)
    outputs = {"mask_logits": "logits"}
    primary_output = "mask"

    def __init__(self, img_size: int | Sequence[int] = 64, feature_size: int = 8, hidden_size: int = 96,
                 mlp_dim: int = 192, num_heads: int = 4, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 metrics: list[str] | None = None, **kwargs):
        super().__init__(metrics=metrics or ["nrmse"], **kwargs)
        self.net = BrainMaskUNETR(img_size=_img_size(img_size), feature_size=feature_size, hidden_size=hidden_size,
                                  mlp_dim=mlp_dim, num_heads=num_heads)
        self.loss_fn = CompositeLoss({
            "seg": (DiceCELoss(output="mask_logits", target="mask", lambda_dice=lambda_dice, lambda_ce=lambda_ce),
                    1.0)})
        self.val_dice, self.test_dice = MeanMetric(), MeanMetric()
        self.save_method_hyperparameters()

    @property
    def scale(self) -> float:  # no field enters or leaves this network
        return 1.0

    def network_input(self, images: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mag = images.get("magnitude")
        if mag is None:
            raise QSMInputError("BrainMaskNet needs the magnitude image (--magnitude)")
        return normalise_magnitude(mag.float())

    def _mask_outputs(self, out, mask):
        return out

    def _sliding_window(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from monai.inferers import sliding_window_inference

        out = sliding_window_inference(x, self.fixed_input_size, sw_batch_size=SW_BATCH, predictor=self._run_padded,
                                       overlap=float(self.hparams.get("sw_overlap", 0.25)), mode="gaussian")
        return dict(out) if isinstance(out, Mapping) else {"mask_logits": out}

    def _frame(self, shape, voxel_size, b0_dir):
        return make_frame(shape, voxel_size, b0_dir, None, self.train_voxel_size.cpu().numpy())

    def _ensure_statistics(self, batch) -> None:
        if not torch.all(torch.isfinite(self.train_voxel_size)):
            self.set_statistics(1.0, None, np.median(batch.voxel_size.detach().cpu().numpy(), axis=0))

    def on_fit_start(self) -> None:
        if torch.all(torch.isfinite(self.train_voxel_size)):
            return
        dm = getattr(self.trainer, "datamodule", None)
        rows = getattr(dm, "rows", {}).get("train") if dm is not None else None
        if rows:  # only the voxel size matters here (field_scale is unused: 1)
            self.set_statistics(1.0, None, np.median(np.asarray([r.voxel_size for r in rows], float), axis=0))

    @torch.no_grad()
    def infer_arrays(self, images: Mapping[str, np.ndarray], voxel_size, b0_dir) -> dict[str, np.ndarray]:
        """``{"mask": 0/1 (X, Y, Z), "mask_logits": (2, X, Y, Z)}`` of a magnitude image."""
        mag = np.asarray(images["magnitude"], dtype=np.float32)
        work = {"magnitude": mag, "mask": np.ones(mag.shape, np.float32)}
        out = super().infer_arrays(work, voxel_size, b0_dir)
        logits = out["mask_logits"]
        return {"mask": (logits[1] > logits[0]).astype(np.float32), "mask_logits": logits}

    def predict_batch(self, batch) -> dict[str, torch.Tensor]:
        out = super().predict_batch(batch)
        logits = out["mask_logits"]
        out["mask"] = (logits[:, 1:2] > logits[:, 0:1]).to(logits.dtype)
        return out

    def _evaluate(self, stage: str, batch, batch_idx: int):
        if not self._owns(batch_idx):
            return None
        pred = self.predict_batch(batch)
        d = dice_per_volume(pred["mask_logits"].float(), (batch.mask > 0.5).long())
        d = d[torch.isfinite(d)]
        if d.numel():
            getattr(self, f"{stage}_dice").update(d)
        total, _ = self.loss_fn(pred, batch, None)
        getattr(self, f"{stage}_loss").update(total.detach())
        return pred

    def _log_epoch(self, stage: str) -> None:
        values = {f"{stage}/loss": getattr(self, f"{stage}_loss").compute()}
        metric = getattr(self, f"{stage}_dice")
        if metric.update_count:
            values[f"{stage}/dice"] = metric.compute()
        for m in (metric, getattr(self, f"{stage}_loss")):
            m.reset()
        finite = {k: v.float() for k, v in values.items() if torch.isfinite(v)}
        if finite:
            self.log_dict(finite, sync_dist=False)

    def _log_slices(self, batch, pred) -> None:
        if not self.hparams.get("log_images", True) or self._trainer is None or self.trainer.sanity_checking:
            return
        if not self.loggers or self._image_logged_step == self.global_step:
            return
        from qsmlab.methods.images import log_figure, slice_figure

        self._image_logged_step = self.global_step
        mag = batch.magnitude[0, 0].float().cpu().numpy()
        fig = slice_figure(mag, pred["mask"][0, 0].float().cpu().numpy(), batch.mask[0, 0].float().cpu().numpy(),
                           None, title=f"BrainMaskNet {batch.key[0] if batch.key else ''} step {self.global_step}")
        log_figure(self.loggers, fig, "val/slices", int(self.global_step))

