"""``BrainMaskNet``: brain masking by UNETR, magnitude -> mask; a segmentation module, not a QSM method.

The magnitude is divided by its 99th percentile over the patch / volume (no mask exists yet); a UNETR
(:class:`qsmlab.models.BrainMaskUNETR`) gives two-class logits ``mask_logits``, trained with Dice + CE
against the batch's ``mask``; the output ``mask`` is their ``argmax`` (0/1). Full volumes go through
Gaussian-blended sliding windows of ``img_size`` (UNETR's fixed input size). B0 plays no part (a
magnitude image), so only a voxel size > 25 % off the training one is resampled. Validation logs
``val/dice`` and ``val/loss``. It shares the trainer plumbing (optimiser, DDP evaluation, slice images,
checkpoint entry) with the QSM methods through :class:`qsmlab.methods.module.MethodModule`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchmetrics.aggregation import MeanMetric

from qsmlab.errors import QSMInputError
from qsmlab.losses import CompositeLoss, DiceCELoss
from qsmlab.methods.inference import (
    infer_volume,
    make_frame,
    normalise_magnitude,
    run_on_volume,
)
from qsmlab.methods.module import MethodModule
from qsmlab.methods.scores import dice_per_volume
from qsmlab.models import BrainMaskUNETR

SW_BATCH = 4
"""UNETR windows per forward pass: a batch > 1 makes PyTorch use oneDNN convolutions on CPU (for one
sample with few channels it falls back to its much slower native 3-D convolution)."""


def img_size3(v) -> tuple[int, int, int]:
    """An ``img_size`` option (one int or three) as three ints."""
    return (int(v),) * 3 if isinstance(v, int) else tuple(int(s) for s in v)


class BrainMaskNet(MethodModule):
    """Brain masking by UNETR (see the module docstring).

    Args:
        img_size: UNETR input size = training patch size (multiples of 16).
        feature_size, hidden_size, mlp_dim, num_heads: UNETR width.
        lambda_dice, lambda_ce: the two parts of the loss.
        metrics: accepted for checkpoints of the QSM options (unused: a mask is scored by Dice).
        **kwargs: the common options (:class:`qsmlab.methods.options.MethodOptions`: lr, scheduler, ...).
    """

    name = "brainmask"
    inputs = ("magnitude",)
    outputs = {"mask_logits": "logits"}
    primary_output = "mask"
    inference_outputs = None
    b0_invariant = True  # a magnitude image

    def __init__(self, img_size: int | Sequence[int] = 64, feature_size: int = 8, hidden_size: int = 96,
                 mlp_dim: int = 192, num_heads: int = 4, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 metrics: list[str] | None = None, **kwargs):
        super().__init__(metrics=metrics or ["nrmse"], **kwargs)
        self.net = BrainMaskUNETR(img_size=img_size3(img_size), feature_size=feature_size, hidden_size=hidden_size,
                                  mlp_dim=mlp_dim, num_heads=num_heads)
        if self.options.channels_last:
            self.net.to(memory_format=torch.channels_last_3d)
        self.loss_fn = CompositeLoss({
            "seg": (DiceCELoss(output="mask_logits", target="mask", lambda_dice=lambda_dice, lambda_ce=lambda_ce),
                    1.0)})
        self.val_dice, self.test_dice = MeanMetric(), MeanMetric()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.save_method_hyperparameters(locals())

    # -- voxel size: the only statistic (field_scale stays 1: no field enters or leaves this network) --
    def on_fit_start(self) -> None:
        rows = self.training_rows()
        if rows and not torch.all(torch.isfinite(self.train_voxel_size)):
            self.set_statistics(1.0, None, np.median(np.asarray([r.voxel_size for r in rows], float), axis=0))

    def statistics_from_batch(self, batch) -> None:
        if not torch.all(torch.isfinite(self.train_voxel_size)):
            self.set_statistics(1.0, None, np.median(batch.voxel_size.detach().cpu().numpy(), axis=0))

    # -- inference ------------------------------------------------------------------------------------
    def inputs_for(self, available) -> tuple[str, ...]:
        return tuple(self.inputs)

    def inference_frame(self, shape, voxel_size, b0_dir, voxel_resampling: str | None = None, mask=None):
        """Resampling to the training voxel size (B0 is irrelevant to a magnitude; no rotation, so ``mask`` is
        not needed)."""
        never = (voxel_resampling or self.options.voxel_resampling) == "never"
        return None if never else make_frame(shape, voxel_size, b0_dir, None, self.train_voxel_size.cpu().numpy())

    def infer_images(self, images: Mapping[str, torch.Tensor], geometry=None, outputs=None, windows: bool = True,
                     physics=None) -> dict[str, torch.Tensor]:
        """``{"mask_logits": [B, 2, X, Y, Z]}`` of magnitude images [B, 1, X, Y, Z] on their own grid."""
        mag = images.get("magnitude")
        if mag is None:
            raise QSMInputError("BrainMaskNet needs the magnitude image (--magnitude)")
        x = normalise_magnitude(mag.float())
        o = self.options
        out = run_on_volume(lambda v: {"mask_logits": self.net(v.contiguous(memory_format=torch.channels_last_3d)
                                                                if o.channels_last else v)},
                            x, self.net.size_multiple, self.net.fixed_input_size, o.pad_mode, o.max_inference_voxels,
                            overlap=o.sw_overlap, windows=windows, batch_size=SW_BATCH, name="mask_logits")
        return {k: v.float() for k, v in out.items()}

    def infer_arrays(self, images, voxel_size, b0_dir, voxel_resampling=None, outputs=None,
                     tta=None) -> dict[str, np.ndarray]:
        """``{"mask": 0/1 (X, Y, Z), "mask_logits": (2, X, Y, Z)}`` of a magnitude image."""
        mag = np.asarray(images["magnitude"], dtype=np.float32)
        out = infer_volume(self, {"magnitude": mag, "mask": np.ones(mag.shape, np.float32)}, voxel_size, b0_dir,
                           voxel_resampling, tta=tta)
        logits = out["mask_logits"]
        return {"mask": (logits[1] > logits[0]).astype(np.float32), "mask_logits": logits}

    def predict_batch(self, batch, outputs=None) -> dict[str, torch.Tensor]:
        """``{"mask_logits": [B, 2, ...], "mask": [B, 1, ...] 0/1}`` of full volumes, per sample."""
        logits = []
        for i in range(len(batch)):
            mag = batch.magnitude[i:i + 1]
            vs, b0 = batch.voxel_size[i].cpu().numpy(), batch.b0_dir[i].cpu().numpy()
            if self.inference_frame(mag.shape[-3:], vs, b0) is None:
                logits.append(self.infer_images({"magnitude": mag})["mask_logits"])
            else:
                a = self.infer_arrays({"magnitude": mag[0, 0].cpu().numpy()}, vs, b0, tta="none")["mask_logits"]
                logits.append(torch.from_numpy(np.asarray(a, np.float32))[None].to(self.device))
        lg = torch.cat(logits)
        return {"mask_logits": lg, "mask": (lg[:, 1:2] > lg[:, 0:1]).to(lg.dtype)}

    # -- training and evaluation ----------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.statistics_from_batch(batch)
        total, parts = self.loss_fn(self.infer_images({"magnitude": batch.magnitude}, windows=False), batch, None)
        self.log("train/loss", total, prog_bar=True, batch_size=len(batch))
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=len(batch))
        return total

    def evaluate_batch(self, stage: str, batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        if not self.owns_volume(batch_idx):
            return None
        pred = self.predict_batch(batch)
        d = dice_per_volume(pred["mask_logits"].float(), (batch.mask > 0.5).long())
        d = d[torch.isfinite(d)]
        if d.numel():
            getattr(self, f"{stage}_dice").update(d)
        getattr(self, f"{stage}_loss").update(self.loss_fn(pred, batch, None)[0].detach())
        return pred

    def log_epoch(self, stage: str) -> None:
        dice, loss = getattr(self, f"{stage}_dice"), getattr(self, f"{stage}_loss")
        values = {f"{stage}/loss": loss.compute()}
        if dice.update_count:
            values[f"{stage}/dice"] = dice.compute()
        dice.reset()
        loss.reset()
        self.log_values(values)

    def slice_images(self, batch, pred) -> tuple:
        """Magnitude, predicted mask, reference mask of the batch's first volume."""
        return (batch.magnitude[0, 0].float().cpu().numpy(), pred["mask"][0, 0].float().cpu().numpy(),
                batch.mask[0, 0].float().cpu().numpy(), None)
