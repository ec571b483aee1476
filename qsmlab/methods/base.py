"""``QSMMethod``: the LightningModule every learned QSM method builds on (fastMRI's ``MriModule`` pattern).

A method declares ``inputs`` (batch images its network takes, in channel order), ``outputs`` (name ->
``"ppm"`` or ``"logits"``), ``primary_output`` (scored and written, ``"chi"``) and ``requires`` (what its loss
needs besides the inputs); its constructor builds ``self.net = self.prepare_network(...)`` and
``self.loss_fn`` (a :class:`qsmlab.losses.CompositeLoss`) and ends with
``self.save_method_hyperparameters(locals())``. How a batch flows, with the hooks a method may override:

    training_step: statistics_from_batch -> physics_for_batch (once) -> prepare_batch -> training_batch
        -> infer_images [network_inputs -> run_network (padded) -> outputs_to_chi] -> mask_outputs
        -> training_loss (loss_batch) -> train/loss, train/loss_<term>
    validation/test: prepare_batch -> predict_batch (per sample: infer_images, or infer_volume in the
        training frame) -> val/<metric>, val/dc, val/loss (evaluation_loss), score_volume/epoch_values

``"ppm"`` outputs leave the network times ``field_scale``, masked. Full volumes are padded or tiled and
resampled into the training B0 direction / voxel size and back when off (:mod:`qsmlab.methods.inference`,
plain torch). Options: :class:`qsmlab.methods.options.MethodOptions`; Lightning plumbing (optimiser, DDP
evaluation, slice images, checkpoint entry): :class:`qsmlab.methods.module.MethodModule`; docs/methods.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch

from qsmlab.errors import QSMInputError
from qsmlab.methods.inference import (
    Context,
    infer_volume,
    make_frame,
    needs_windows,
    normalise_inputs,
    run_on_volume,
    tkd_prior,
)
from qsmlab.methods.module import MethodModule
from qsmlab.methods.patches import interior, simulate_patch_fields
from qsmlab.methods.scores import EvaluationScores
from qsmlab.methods.statistics import batch_statistics, training_statistics
from qsmlab.physics import physics_for_batch


class QSMMethod(MethodModule):
    """Shared base of the learned QSM methods (see the module docstring; options: ``MethodOptions``)."""

    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options):
        super().__init__(**options)
        if self.options.prior != "none" and "field" not in self.inputs:
            raise QSMInputError(f"model.prior={self.options.prior!r}: {type(self).__name__} has no local-field input "
                                f"(inputs {list(self.inputs)}); use prior: none")
        self.val_scores = EvaluationScores(self.options.metrics)
        self.test_scores = EvaluationScores(self.options.metrics)
        self.last_loss_parts: dict[str, float] = {}

    def prepare_network(self, net: torch.nn.Module) -> torch.nn.Module:
        """``net`` ready for this method: with a prior, its output layer (``head``) zeroed so the untrained
        method *is* the prior; in ``channels_last_3d`` when ``options.channels_last`` (in place: the same
        Parameters, so optimisers built later see them)."""
        head = getattr(net, "head", None)
        if self.prior_channels and isinstance(head, torch.nn.Conv3d):
            torch.nn.init.zeros_(head.weight)
            if head.bias is not None:
                torch.nn.init.zeros_(head.bias)
        return net.to(memory_format=torch.channels_last_3d) if self.options.channels_last else net

    @property
    def prior_channels(self) -> int:
        """Input channels the prior adds (a network is built with ``len(inputs) + prior_channels``)."""
        return self.options.prior_channels

    # -- normalisation ------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        s = float(self.field_scale)
        if not (math.isfinite(s) and s > 0):
            raise QSMInputError(f"{type(self).__name__}: field_scale is not set; fit the method on data (it is "
                                "computed at the start of fitting) or give model.field_scale in ppm")
        return s

    def on_fit_start(self) -> None:
        if math.isfinite(float(self.field_scale)) and torch.all(torch.isfinite(self.train_voxel_size)):
            return  # given, or restored from a checkpoint
        rows = self.training_rows()
        if rows:
            st = training_statistics(rows)  # same rows on every rank -> same statistics
            scale = float(self.field_scale) if math.isfinite(float(self.field_scale)) else st["field_scale"]
            self.set_statistics(scale, st["b0_dir"], st["voxel_size"])
        # else: from the first training batch (statistics_from_batch)

    def statistics_from_batch(self, batch) -> None:
        """Without a datamodule's rows: statistics of the first training batch, broadcast from rank 0."""
        if math.isfinite(float(self.field_scale)):
            return
        stats = batch_statistics(batch)
        if self._trainer is not None:
            stats = self.trainer.strategy.broadcast(stats, src=0)
        if not (math.isfinite(stats[0]) and stats[0] > 0):
            raise QSMInputError("field_scale: the first training batch has no non-zero field inside its mask; "
                                "set model.field_scale (ppm) or use a datamodule with training rows")
        self.warn_once("scale", f"{type(self).__name__}: field_scale computed from the first training batch "
                                f"({stats[0]:.4g} ppm); a datamodule with training rows gives a better estimate")
        self.set_statistics(*stats)

    # -- hooks: what goes into the network and what comes out ---------------------------------------
    def inputs_for(self, available) -> tuple[str, ...]:
        """The images used when those named in ``available`` are given (default ``inputs``)."""
        return tuple(self.inputs)

    @property
    def inference_outputs(self) -> tuple[str, ...] | None:
        """The outputs a prediction computes (None: all of ``outputs``)."""
        return None

    def network_inputs(self, images: Mapping[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        """Network input [B, C, X, Y, Z]: the normalised ``inputs`` in order, then the prior (if any)."""
        x = normalise_inputs(images, self.inputs, self.scale, type(self).__name__)
        return torch.cat([x, self.prior_map(images, ctx).to(x.dtype)], dim=1) if self.prior_channels else x

    def prior_map(self, images: Mapping[str, torch.Tensor], geometry: Context | tuple | None = None) -> torch.Tensor:
        """The ``prior`` (TKD) in network units, masked; ``geometry``: a context or (voxel_size, b0_dir),
        None = the training geometry (the inference frame's)."""
        ctx = geometry if isinstance(geometry, Context) else Context.of(
            *(geometry or (self.train_voxel_size, self.train_b0_dir)))
        if not (torch.all(torch.isfinite(ctx.voxel_size)) and torch.all(torch.isfinite(ctx.b0_dir))):
            raise QSMInputError(f"{type(self).__name__}: prior={self.options.prior!r} needs the voxel size and B0 "
                                "direction of the input (not known: fit the method or pass the geometry)")
        op = ctx.operator(self.options.pad_factor)
        return tkd_prior(images["field"], images["mask"], op, self.options.prior_threshold) / self.scale

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in ``channels_last_3d`` when ``options.channels_last`` (oneDNN convolutions on CPU: measured
        1.6-2x faster training steps on 32^3 patches, 2 threads)."""
        return x.contiguous(memory_format=torch.channels_last_3d) if self.options.channels_last else x

    def run_network(self, x: torch.Tensor, ctx: Context) -> dict[str, torch.Tensor]:
        """Raw outputs by name (network units) for an input that fits the network; a tensor output's
        channels are split over ``outputs`` in order (the last takes the rest)."""
        y = self.net(self.memory_format(x))
        if isinstance(y, Mapping):
            return dict(y)
        names = list(self.outputs)
        if len(names) == 1:
            return {names[0]: y}
        return dict(zip(names, torch.split(y, [1] * (len(names) - 1) + [y.shape[1] - len(names) + 1], dim=1)))

    def outputs_to_chi(self, raw: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Network units -> ppm (``"ppm"`` outputs times ``field_scale``, the prior added to the primary
        output), float32: under bf16 autocast the network's output is bf16, and the losses subtract fields
        of ~0.05 ppm to get residuals of ~1e-3 ppm, which bf16 cannot resolve. Not masked."""
        if self.prior_channels:
            key = self.primary_output
            raw = {**raw, key: raw[key] + x[:, -1:].to(raw[key].dtype)}
        s = self.scale
        return {k: (v.float() * s if self.outputs.get(k) == "ppm" else v.float()) for k, v in raw.items()}

    # -- full-volume inference ----------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        return int(getattr(self.net, "size_multiple", 1) or 1)

    @property
    def fixed_input_size(self) -> tuple[int, int, int] | None:
        f = getattr(self.net, "fixed_input_size", None)
        return None if f is None else tuple(int(v) for v in f)

    def needs_windows(self, shape) -> bool:
        return needs_windows(shape, self.size_multiple, self.fixed_input_size, self.options.max_inference_voxels)

    def infer_images(self, images: Mapping[str, torch.Tensor], geometry=None, outputs=None, windows: bool = True,
                     physics=None) -> dict[str, torch.Tensor]:
        """Outputs (ppm for ``"ppm"`` kinds, not masked) for images [B, 1, X, Y, Z] on their own grid.

        ``geometry`` = (voxel_size, b0_dir), one 3-vector or one row per sample (None: the training one);
        ``outputs``: the outputs wanted (None: ``inference_outputs``); ``physics``: the batch's operator if
        built. Pads to the size multiple, or (``windows``) tiles large or fixed-size inputs.
        """
        ctx = Context.of(*(geometry or (self.train_voxel_size, self.train_b0_dir)),
                         inputs=self.inputs_for({k for k, v in images.items() if v is not None}),
                         outputs=self.inference_outputs if outputs is None else tuple(outputs), physics=physics)
        x = self.network_inputs(images, ctx)
        o = self.options
        raw = run_on_volume(lambda v: self.run_network(v, ctx), x, self.size_multiple, self.fixed_input_size, o.pad_mode,
                            o.max_inference_voxels, o.sw_roi_size, o.sw_overlap, windows, name=list(self.outputs)[0])
        return self.outputs_to_chi(raw, x)

    def mask_outputs(self, out: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        m = (mask > 0.5).to(next(iter(out.values())).dtype)
        return {k: (v * m if self.outputs.get(k) == "ppm" else v) for k, v in out.items()}

    def forward(self, images: Mapping[str, torch.Tensor], geometry=None) -> dict[str, torch.Tensor]:
        """Masked outputs (ppm) for images on their grid: ``{"chi": [B, 1, X, Y, Z], ...}``."""
        return self.mask_outputs(self.infer_images(images, geometry), images["mask"])

    def inference_frame(self, shape, voxel_size, b0_dir, voxel_resampling: str | None = None, mask=None):
        """The resampling frame of a scan (None: its geometry is the training one, within tolerance); with the
        scan's ``mask``, the frame's extent follows the head (:func:`make_frame`)."""
        never = (voxel_resampling or self.options.voxel_resampling) == "never"
        return make_frame(shape, voxel_size, b0_dir, self.train_b0_dir.cpu().numpy(),
                          None if never else self.train_voxel_size.cpu().numpy(), mask=mask)

    def infer_arrays(self, images, voxel_size, b0_dir, voxel_resampling=None, outputs=None,
                     tta=None) -> dict[str, np.ndarray]:
        """One scan, numpy (X, Y, Z) in and out (:func:`qsmlab.methods.inference.infer_volume`)."""
        return infer_volume(self, images, voxel_size, b0_dir, voxel_resampling, outputs, tta)

    def batch_images(self, batch, i: slice | None = None) -> dict[str, torch.Tensor]:
        """The images of ``batch`` (samples ``i``) the method uses, with the mask."""
        names = set(self.inputs_for(set(batch.keys()) if hasattr(batch, "keys") else set(self.inputs))) | {"mask"}
        found = {n: batch.get(n) if hasattr(batch, "get") else getattr(batch, n, None) for n in names}
        return {n: (t if i is None else t[i]) for n, t in found.items() if t is not None}

    def predict_batch(self, batch, outputs=None) -> dict[str, torch.Tensor]:
        """Full-volume, masked outputs for each sample of an evaluation batch (geometry per sample)."""
        results = []
        for i in range(len(batch)):
            images = self.batch_images(batch, slice(i, i + 1))
            vs, b0 = batch.voxel_size[i].cpu().numpy(), batch.b0_dir[i].cpu().numpy()
            if self.inference_frame(images["mask"].shape[-3:], vs, b0) is None:
                results.append(self.mask_outputs(self.infer_images(images, (vs, b0), outputs), images["mask"]))
                continue
            out = self.infer_arrays({k: v[0, 0].cpu().numpy() for k, v in images.items()}, vs, b0, outputs=outputs,
                                    tta="none")
            results.append({k: torch.from_numpy(np.asarray(v, np.float32)).reshape((1, -1) + v.shape[-3:])
                            .to(self.device) for k, v in out.items()})
        return {k: torch.cat([r[k] for r in results]) for k in results[0]}

    # -- training -----------------------------------------------------------------------------------
    def prepare_batch(self, batch):
        """A training or evaluation batch as the method's losses and metrics read it (default: as is)."""
        return batch

    def training_batch(self, batch, physics):
        """The batch the network trains on: with ``patch_fields: simulate``, the field of the patch's own chi
        (:func:`qsmlab.methods.patches.simulate_patch_fields`)."""
        if self.options.patch_fields != "simulate" or not dataclasses.is_dataclass(batch):
            return batch
        if batch.get("chi") is None:
            self.warn_once("simulate", f"{type(self).__name__}: patch_fields=simulate but the training batch has "
                                       "no chi (in-vivo rows): training on the measured field")
            return batch
        return simulate_patch_fields(batch, physics, self.options.patch_field_noise)

    def loss_batch(self, batch):
        """The batch the training loss sees: its mask ``patch_margin`` voxels inside the patch
        (:func:`qsmlab.methods.patches.interior`); the network's input mask is unchanged."""
        return interior(batch, self.options.patch_margin) if dataclasses.is_dataclass(batch) else batch

    def training_outputs(self, out: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs the training loss sees: masked, as at inference, unless the method's loss config says
        ``support: "free"`` (uQSM, uQSM-DIP, PedQ-NET): then the loss sees the whole output."""
        if getattr(getattr(self, "loss_config", None), "support", "mask") == "free":
            return out
        return self.mask_outputs(out, mask)

    def training_loss(self, batch, outputs, physics) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, {"loss_<term>": value})`` of the training outputs (masked, ppm)."""
        return self.loss_fn(outputs, self.loss_batch(batch), physics)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.statistics_from_batch(batch)
        physics = physics_for_batch(batch, pad_factor=self.options.pad_factor)  # patch fields, prior and loss
        batch = self.training_batch(self.prepare_batch(batch), physics)
        out = self.infer_images(self.batch_images(batch), (batch.voxel_size, batch.b0_dir), tuple(self.outputs),
                                windows=False, physics=physics)
        total, parts = self.training_loss(batch, self.training_outputs(out, batch.mask), physics)
        self.log("train/loss", total, prog_bar=True, batch_size=len(batch))
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=len(batch))
        self.last_loss_parts = {k: float(v.detach()) for k, v in parts.items()}
        return total

    # -- evaluation ---------------------------------------------------------------------------------
    def can_compute_loss(self, batch) -> bool:
        return all(batch.get(k) is not None for k in self.requires)

    def evaluation_loss(self, outputs, batch, physics) -> torch.Tensor:
        """``val/loss``: the training loss on the full volume's outputs."""
        return self.loss_fn(outputs, batch, physics)[0]

    def score_volume(self, stage: str, batch, outputs) -> None:
        """Method-specific scores of an evaluated batch (add metrics; log them in :meth:`epoch_values`)."""

    def epoch_values(self, stage: str) -> dict[str, torch.Tensor]:
        """Method-specific values logged at the end of an evaluation epoch (computed and reset)."""
        return {}

    def evaluate_batch(self, stage: str, batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        if not self.owns_volume(batch_idx):
            return None
        batch = self.prepare_batch(batch)
        pred = self.predict_batch(batch, outputs=tuple(self.outputs))
        physics = physics_for_batch(batch, pad_factor=self.options.pad_factor)
        loss = self.evaluation_loss(pred, batch, physics) if self.can_compute_loss(batch) else None
        getattr(self, f"{stage}_scores").update(pred[self.primary_output].float(), batch, physics, loss)
        self.score_volume(stage, batch, pred)
        return pred

    def log_epoch(self, stage: str) -> None:
        self.log_values({**getattr(self, f"{stage}_scores").compute(stage), **self.epoch_values(stage)})

    def slice_images(self, batch, pred) -> tuple:
        """Field, chi, reference chi and mask of the batch's first volume (ppm)."""
        ref = None if batch.chi is None else batch.chi[0, 0].float().cpu().numpy()
        return (batch.field[0, 0].float().cpu().numpy(), pred[self.primary_output][0, 0].float().cpu().numpy(), ref,
                batch.mask[0, 0].cpu().numpy() > 0.5)
