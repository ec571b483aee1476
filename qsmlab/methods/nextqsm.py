"""NeXtQSM: total field -> local field -> chi, one network trained end to end on hybrid synthetic data.

Cognolato F, O'Brien K, Jin J, et al., "NeXtQSM - A complete deep learning pipeline for data-consistent
quantitative susceptibility mapping trained with hybrid data", Medical Image Analysis 84 (2023). The
network (:class:`NeXtQSMChain`) is a background-field U-Net (:class:`qsmlab.models.BackgroundUNet`: total
field + mask -> local field) chained into a variational network (:class:`qsmlab.models.VariationalNet`: K
unrolled gradient steps on ``1/2 ||M (D chi - f)||^2`` through the dipole operator of each sample's
``b0_dir`` and ``voxel_size``, plus one shared learned regulariser). Both outputs are supervised, all
inside the mask (:mod:`qsmlab.losses`):

    lambda_field * |f_hat - f|_p + lambda_chi * |chi_hat - chi|_p + lambda_chi_local * |VN(f) - chi|_p
        + lambda_dc * |M (D chi_hat - f)|_2^2

with ``f`` the true local field (the batch's ``field``, ppm), ``chi`` the true susceptibility (ppm),
``VN(f)`` the variational network run on the true local field (teacher forcing during training, so the
inversion learns from the first step instead of waiting for accurate background removal) and the data
term optional (``lambda_dc = 0`` by default: the variational network already descends on it). The
weights and norms are this project's defaults (L1, equal weights: all terms are in ppm and of similar
size), not values quoted from the paper.

Background-net input: the total field, the mask and (``harmonic_input``, default on) the total field's
SHARP residual ``M_r (t - S_r * t)`` (:func:`harmonic_residual`): a fixed, parameter-free channel that is
free of background wherever a sphere of ``smv_radius_mm`` fits in the mask (mean value property of
harmonic fields). An addition of this project: from the total field alone, whose background is ~50x the
local field, the quick CPU profile's small net had learned nothing after 100 steps (local-field NRMSE
100 %); with the residual it starts from the high-pass and learns the rim and the low frequencies.

Changes to the paper, each a switch (``varnet_init``, ``background_init``, ``harmonic_input``), all
physics-based starts that the networks then correct: the variational network starts from the TKD of its
local field instead of the field itself (:class:`qsmlab.models.VariationalNet`, ``init="tkd"``), and the
background net may start from V-SHARP (``background_init="vsharp"``). With both, the untrained chain is
V-SHARP + TKD + data-consistency steps, and training only has to improve on it; from the paper's starts
the quick CPU profile ended far above TKD (85 % chi NRMSE on anat004 after 200 steps).

Normalisation: the network sees ``total_field / total_field_scale`` (robust std of the training total
fields inside the mask, a buffer stored in the checkpoint; total fields are ~50x local ones, so the
local-field scale would feed inputs of several hundred) and predicts ``local_field / field_scale`` and
``chi / field_scale`` (the base's scale; the variational network's data term is linear, so dividing
field and chi by one scale keeps its steps consistent).

Inference modes (picked from the images given, :meth:`NeXtQSM.inputs_for`):

- ``total_field`` + ``mask``: the whole chain (``qsmlab predict --total-field``);
- ``field`` (a local field) + ``mask`` without a total field: the variational network alone (the
  background net is skipped), so the checkpoint also works as a dipole inversion (``--inversion ckpt:``);
- :func:`background_from_checkpoint`: the background net alone, total -> local field
  (``qsmlab pipeline --bfr ckpt:PATH``).

Validation logs the base's metrics on chi (end to end from the total field) and
``val/nrmse_local_field`` (%) of the predicted local field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qsmlab.errors import QSMInputError
from qsmlab.losses import ChiLoss, CompositeLoss, DataConsistencyLoss, FieldLoss
from qsmlab.methods.background_inputs import harmonic_residual, smv_kernel, vsharp_estimate  # noqa: F401 (API)
from qsmlab.methods.base import QSMMethod, as_dataclass
from qsmlab.methods.statistics import masked_sample, robust_std
from qsmlab.metrics import VolumeMetrics
from qsmlab.models import NeXtQSMChain
from qsmlab.physics import physics_for_batch

MODES = ("total", "local", "background")
BACKGROUND_INITS = ("none", "vsharp")


@dataclass
class NeXtQSMLoss:
    """NeXtQSM loss (YAML ``model.loss.*``); norms ``"l1"`` or ``"l2"``.

    Attributes:
        lambda_field: weight of the local-field term (predicted vs true local field, ppm).
        lambda_chi: weight of the chi term (ppm).
        lambda_chi_local: weight of the chi term of the variational network run on the *true* local field
            (teacher forcing, training only): it learns the inversion from the first step instead of
            waiting for the background net's local fields to become accurate; 0 switches it off.
        lambda_dc: weight of the linear data consistency ``||M (D chi_hat - f)||^2`` (ppm^2) on the true
            local field; 0 switches it off.
        field_norm, chi_norm: ``"l1"`` or ``"l2"``.
    """

    lambda_field: float = 1.0
    lambda_chi: float = 1.0
    lambda_chi_local: float = 1.0
    lambda_dc: float = 0.0
    field_norm: str = "l1"
    chi_norm: str = "l1"


def build_nextqsm_loss(cfg: NeXtQSMLoss) -> CompositeLoss:
    for k in ("lambda_field", "lambda_chi", "lambda_chi_local", "lambda_dc"):
        v = getattr(cfg, k)
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise QSMInputError(f"model.loss.{k}: expected a number >= 0, got {v!r}")
    for k in ("field_norm", "chi_norm"):
        if getattr(cfg, k) not in ("l1", "l2"):
            raise QSMInputError(f"model.loss.{k}: expected 'l1' or 'l2', got {getattr(cfg, k)!r}")
    return CompositeLoss({
        "field": (FieldLoss(norm=cfg.field_norm, output="local_field", target="field"), cfg.lambda_field),
        "chi": (ChiLoss(norm=cfg.chi_norm), cfg.lambda_chi),
        "chi_local": (ChiLoss(norm=cfg.chi_norm, output="chi_local"), cfg.lambda_chi_local),
        "dc": (DataConsistencyLoss(kind="linear", norm="l2", output="chi", target="field"), cfg.lambda_dc),
    })


def _sample(batch, i: int):
    """Sample ``i`` of a dataclass batch (tensors and lists sliced ``[i:i+1]``)."""
    if len(batch) == 1:
        return batch
    if not dataclasses.is_dataclass(batch):
        raise TypeError(f"NeXtQSM: cannot split a batch of type {type(batch).__name__}")
    sl = slice(i, i + 1)
    changes = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor | list):
            changes[f.name] = v[sl]
    return dataclasses.replace(batch, **changes)


class NeXtQSM(QSMMethod):
    """NeXtQSM (see the module docstring).

    Args:
        bg_width, bg_depth: :class:`qsmlab.models.BackgroundUNet` width and number of poolings.
        steps: unrolled steps K of the variational network.
        reg_width, reg_depth: its shared regulariser U-Net.
        init_step: initial step weight of every step (the data term is stable below 4.5).
        checkpointing: gradient checkpointing of the unrolled steps (memory of one step, one more forward).
        varnet_pad_factor: zero padding of the dipole operator inside the variational network (1 =
            periodic on the network's grid; the brain sits inside zeros, so wrap-around is small, and
            every step costs two FFT pairs of the padded grid: 2 pads 8x the voxels).
        varnet_inference_pad_factor: the same padding outside training (validation, test, predict); None
            (default) = ``varnet_pad_factor``. Training on patches needs the linear convolution (a patch's
            field is the linear convolution of its chi), but a whole head sits inside a border of zeros,
            where a smaller padding changes little and the FFTs shrink: at 160^3, 2 -> 1.5 takes a
            three-step variational network from 5.2 to 3.0 s (2 threads), and at 256^3 the padded grid
            from 512^3 (0.5 GB per real copy) to 384^3.
        varnet_init: where the unrolled descent starts: ``"tkd"`` (default, this project's: chi_0 =
            M A^dagger(M f), the TKD of the background net's local field through the same operator) or
            ``"field"`` (chi_0 = M f, the paper's). The local field is ~3x smaller than chi and blurred, and
            three or four steps from it stay far from chi (the untrained network: 68-90 % NRMSE on anat004),
            so the quick CPU profile never got below TKD; from TKD the untrained variational network is
            already TKD plus data-consistency steps (36.0 % vs TKD's 36.6 % on anat004) and training
            removes TKD's streaks. The TKD is linear and differentiable, so the chain still trains end to
            end (the chi loss reaches the background net through it).
        varnet_init_threshold: TKD threshold of ``varnet_init="tkd"`` (0.19, as ``qsmlab recon tkd``).
        harmonic_input: give the background net, besides the total field and the mask, the total field's
            SHARP residual :func:`harmonic_residual` (background-free where a ``smv_radius_mm`` sphere fits
            in the mask) as a third channel. The background is ~50x the local field, so from the total
            field alone a small net learns the subtraction slowly (measured: local-field NRMSE still 100 %
            after 100 quick steps); the residual hands it the high-pass for free, and it learns the rest
            (the rim, the low frequencies).
        smv_radius_mm: radius of that sphere (mm).
        background_init: ``"none"`` (the paper's: the background net maps its inputs to the local field)
            or ``"vsharp"`` (this project's): the V-SHARP local field of the total field
            (:func:`vsharp_estimate`, TSVD, parameter-free) is one more input channel and the net adds a
            correction to it, its output layer started at zero, so the untrained chain is V-SHARP, then the
            variational network. Background removal is a global, linear problem (project out the field
            that is harmonic inside the mask) that a small CNN on 32^3 patches learns slowly: after 200
            quick steps the local field was still at 48-53 % NRMSE on anat004 (V-SHARP: 19 % with CG, 29 %
            with TSVD) and chi from it 77-85 %.
        loss: :class:`NeXtQSMLoss`.
        total_field_scale: ppm; None computes it from the training total fields at the start of fitting.
        **kwargs: common :class:`qsmlab.methods.base.QSMMethod` arguments.
    """

    name = "nextqsm"
    inputs = ("total_field", "mask")
    outputs = {"chi": "ppm", "local_field": "ppm", "chi_local": "ppm"}  # chi_local: training only
    requires = ("chi",)

    def __init__(self, bg_width: int = 16, bg_depth: int = 4, steps: int = 4, reg_width: int = 8,
                 reg_depth: int = 2, init_step: float = 1.0, checkpointing: bool = False,
                 varnet_pad_factor: float = 1.0, varnet_inference_pad_factor: float | None = None,
                 varnet_init: str = "tkd", varnet_init_threshold: float = 0.19,
                 harmonic_input: bool = True, smv_radius_mm: float = 4.0, background_init: str = "none",
                 loss: NeXtQSMLoss | None = None,
                 total_field_scale: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if not (math.isfinite(varnet_pad_factor) and varnet_pad_factor >= 1):
            raise QSMInputError(f"model.varnet_pad_factor: expected a number >= 1, got {varnet_pad_factor!r}")
        if varnet_inference_pad_factor is not None and not (math.isfinite(varnet_inference_pad_factor)
                                                            and varnet_inference_pad_factor >= 1):
            raise QSMInputError("model.varnet_inference_pad_factor: expected a number >= 1 or null, got "
                                f"{varnet_inference_pad_factor!r}")
        if total_field_scale is not None and not (math.isfinite(total_field_scale) and total_field_scale > 0):
            raise QSMInputError(f"model.total_field_scale: expected a positive number of ppm, got "
                                f"{total_field_scale!r}")
        if not (math.isfinite(smv_radius_mm) and smv_radius_mm > 0):
            raise QSMInputError(f"model.smv_radius_mm: expected a positive number of mm, got {smv_radius_mm!r}")
        self.loss_config = as_dataclass(NeXtQSMLoss, loss)
        if background_init not in BACKGROUND_INITS:
            raise QSMInputError(f"model.background_init: expected one of {list(BACKGROUND_INITS)}, got "
                                f"{background_init!r}")
        self.harmonic_input, self.smv_radius_mm = bool(harmonic_input), float(smv_radius_mm)
        self.background_init = background_init
        self.net = NeXtQSMChain(
            bg=dict(in_channels=2 + self.harmonic_input + (background_init != "none"), width=bg_width, depth=bg_depth),
            varnet=dict(steps=steps, width=reg_width, depth=reg_depth, init_step=init_step, checkpointing=checkpointing,
                        init=varnet_init, init_threshold=varnet_init_threshold),
            residual=background_init != "none")
        self._channels: list[str] = []
        self.loss_fn = build_nextqsm_loss(self.loss_config)
        self.register_buffer("total_field_scale",
                             torch.tensor(math.nan if total_field_scale is None else float(total_field_scale)))
        self.val_local_metrics = VolumeMetrics(["nrmse"])
        self.test_local_metrics = VolumeMetrics(["nrmse"])
        self._mode = "total"
        self._geometry: tuple[torch.Tensor, torch.Tensor] | None = None
        self.save_method_hyperparameters()

    # -- statistics ---------------------------------------------------------------------------------
    @property
    def total_scale(self) -> float:
        s = float(self.total_field_scale)
        if not (math.isfinite(s) and s > 0):
            raise QSMInputError("NeXtQSM: total_field_scale is not set; fit the method on data with total "
                                "fields or give model.total_field_scale in ppm")
        return s

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if math.isfinite(float(self.total_field_scale)):
            return
        dm = getattr(self.trainer, "datamodule", None)
        rows = getattr(dm, "rows", {}).get("train") if dm is not None else None
        if rows:
            import nibabel as nib

            missing = [r.subject for r in rows if r.total_field is None]
            if missing:
                raise QSMInputError(f"NeXtQSM trains from total fields: training subjects {missing[:3]} have no "
                                    "'total_field' column in the manifest")
            samples = [masked_sample(np.asarray(nib.load(str(r.total_field)).dataobj, dtype=np.float32),
                                     np.asarray(nib.load(str(r.mask)).dataobj) > 0.5) for r in rows]
            s = robust_std(np.concatenate(samples))
            if not (math.isfinite(s) and s > 0):
                raise QSMInputError(f"NeXtQSM: the training total fields are zero inside the masks "
                                    f"(first row: {rows[0].total_field})")
            self.total_field_scale.fill_(s)

    def _ensure_statistics(self, batch) -> None:
        super()._ensure_statistics(batch)
        if math.isfinite(float(self.total_field_scale)):
            return
        m = batch.mask > 0.5
        s = robust_std(batch.total_field[m].detach().float().cpu().numpy())
        if self._trainer is not None:
            s = self.trainer.strategy.broadcast(s, src=0)
        if not (math.isfinite(s) and s > 0):
            raise QSMInputError("NeXtQSM: the first training batch has no non-zero total field inside its mask; "
                                "set model.total_field_scale (ppm)")
        self.total_field_scale.fill_(float(s))

    # -- which inputs, which mode -------------------------------------------------------------------
    def inputs_for(self, available) -> tuple[str, ...]:
        """The inputs used given the available image names: the total field when there is one, else
        the local ``field`` (variational network alone)."""
        if "total_field" in available or "field" not in available:
            return ("total_field", "mask")
        return ("field", "mask")

    @contextlib.contextmanager
    def _using(self, mode: str | None = None, geometry=None):
        """Run with an inference ``mode`` and/or the geometry (b0_dir [B, 3], voxel_size [B, 3]) of the
        dipole operator inside the variational network; restores the previous ones on exit."""
        old = (self._mode, self._geometry)
        if mode is not None:
            self._mode = mode
        if geometry is not None:
            b0, vs = geometry
            self._geometry = (torch.as_tensor(np.asarray(b0, dtype=np.float32)).reshape(-1, 3),
                              torch.as_tensor(np.asarray(vs, dtype=np.float32)).reshape(-1, 3))
        try:
            yield
        finally:
            self._mode, self._geometry = old

    def _geometry_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b0_dir, voxel_size) rows of the current geometry (the training geometry when none is set)."""
        if self._geometry is not None:
            return self._geometry
        b0, vs = self.train_b0_dir.detach().cpu()[None], self.train_voxel_size.detach().cpu()[None]
        if not (torch.all(torch.isfinite(b0)) and torch.all(torch.isfinite(vs))):
            raise QSMInputError("NeXtQSM: no B0 direction / voxel size for the variational network's "
                                "dipole operator (give them, or use a fitted checkpoint)")
        return b0, vs

    def _network_physics(self, n: int):
        """The dipole operator of the current geometry inside the variational network."""
        b0, vs = self._geometry_rows()
        if b0.shape[0] not in (1, n) or vs.shape[0] not in (1, n):
            raise QSMInputError(f"NeXtQSM: geometry for {b0.shape[0]} samples, network input has {n}")
        return physics_for_batch({"b0_dir": b0, "voxel_size": vs},
                                 pad_factor=self.varnet_pad)

    @property
    def varnet_pad(self) -> float:
        """Padding factor of the variational network's operator now: the training one while training,
        ``varnet_inference_pad_factor`` (when set) otherwise."""
        pad = float(self.hparams.get("varnet_pad_factor", 1.0))
        inference = self.hparams.get("varnet_inference_pad_factor")
        return pad if self.training or inference is None else float(inference)

    def network_input(self, images: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Channels by mode (``self._channels`` names them for :meth:`run_network`):

        - local: local field / field_scale, mask;
        - total / background: total field / total_field_scale, [its SHARP residual / field_scale,] mask,
          and in training with ``lambda_chi_local`` > 0 the true local field / field_scale (teacher forcing).
        """
        mask = images.get("mask")
        if mask is None:
            raise QSMInputError("NeXtQSM needs the brain mask (--mask)")
        m = (mask > 0.5).float()
        if self._mode == "local":
            f = images.get("field")
            if f is None:
                raise QSMInputError("NeXtQSM from a local field needs it (--field)")
            self._channels = ["field", "mask"]
            return torch.cat([f.float() / self.scale * m, m], dim=1)
        t = images.get("total_field")
        if t is None:
            raise QSMInputError("NeXtQSM needs the total field (--total-field), or a local field (--field) "
                                "to run its variational network alone")
        t = t.float() * m
        chans, names = [t / self.total_scale], ["total_field"]
        if self.harmonic_input:
            vs = self._geometry_rows()[1]
            chans.append(harmonic_residual(t, m, vs, self.smv_radius_mm) / self.scale)
            names.append("harmonic")
        if self.background_init == "vsharp":
            chans.append(vsharp_estimate(t, m, self._geometry_rows()[1]) / self.scale)
            names.append("bg_init")
        chans.append(m)
        names.append("mask")
        if self._teacher_forcing(images):
            chans.append(images["field"].float() / self.scale * m)
            names.append("true_local")
        self._channels = names
        return torch.cat(chans, dim=1)

    def _teacher_forcing(self, images) -> bool:
        return (self.training and self._mode == "total" and self.loss_config.lambda_chi_local > 0
                and images.get("field") is not None)

    def run_network(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named outputs in units of ``field_scale``: ``local_field`` and (unless background-only) ``chi``,
        plus ``chi_local`` (the variational network on the true local field) when teacher forcing."""
        if self.hparams.get("channels_last", False):  # oneDNN convolutions on CPU (see the base)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        names = self._channels
        mask = x[:, names.index("mask")][:, None]
        if self._mode == "local":
            local = x[:, :1]
            return {"local_field": local, "chi": self.net.varnet(local, mask, self._network_physics(x.shape[0]))}
        local = self.net.background(x[:, : names.index("mask") + 1])
        if "bg_init" in names:
            local = local + x[:, names.index("bg_init")][:, None]
        local = local * mask
        if self._mode == "background":
            return {"local_field": local}
        physics = self._network_physics(x.shape[0])
        out = {"local_field": local, "chi": self.net.varnet(local, mask, physics)}
        if "true_local" in names:
            out["chi_local"] = self.net.varnet(x[:, names.index("true_local")][:, None], mask, physics)
        return out

    def infer_images(self, images: Mapping[str, torch.Tensor], windows: bool = True,
                     geometry=None) -> dict[str, torch.Tensor]:
        mode = self._mode
        if mode != "background":
            mode = "total" if self.inputs_for(set(k for k, v in images.items() if v is not None))[0] == \
                "total_field" else "local"
        with self._using(mode=mode):
            # geometry feeds the base's prior only; NeXtQSM has none (its TKD init lives in the varnet,
            # under the geometry set by _using)
            out = super().infer_images(images, windows=windows, geometry=geometry)
        # the background mode has no chi; outputs are all "ppm" (scaled by field_scale in the base)
        return out

    def _images_of(self, batch, i: slice | None = None) -> dict[str, torch.Tensor]:
        names = set(self.inputs_for(set(batch.keys()) if hasattr(batch, "keys") else set())) | {"mask"}
        if self.training and self.loss_config.lambda_chi_local > 0:
            names.add("field")  # the true local field, for teacher forcing (see network_input)
        out = {}
        for n in names:
            t = batch.get(n) if hasattr(batch, "get") else getattr(batch, n, None)
            if t is not None:
                out[n] = t if i is None else t[i]
        return out

    # -- geometry of the variational network, per sample -------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if batch.total_field is None or batch.chi is None:
            raise QSMInputError("NeXtQSM is trained end to end on hybrid data: the training scans need "
                                f"'total_field' and 'chi' (manifest columns); batch {batch.key[:2]} lacks one")
        with self._using(mode="total", geometry=(batch.b0_dir.cpu(), batch.voxel_size.cpu())):
            return super().training_step(batch, batch_idx)

    def simulate_patch_fields(self, batch):
        """The base's ``patch_fields: simulate`` (local field = ``A(chi * mask) * mask`` of the patch's own
        chi), with the total field kept consistent: ``total - local_old + local_new``, i.e. the patch's
        background field (harmonic inside the mask, from sources outside it) plus the simulated local field."""
        new = super().simulate_patch_fields(batch)
        if new is batch or batch.get("total_field") is None:
            return new
        total = batch.total_field - batch.field.to(batch.total_field.dtype) + new.field.to(batch.total_field.dtype)
        return dataclasses.replace(new, total_field=total)

    def predict_batch(self, batch) -> dict[str, torch.Tensor]:
        outs = []
        for i in range(len(batch)):
            with self._using(geometry=(batch.b0_dir[i].cpu(), batch.voxel_size[i].cpu())):
                outs.append(super().predict_batch(_sample(batch, i)))
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    @torch.no_grad()
    def infer_arrays(self, images: Mapping[str, np.ndarray], voxel_size, b0_dir) -> dict[str, np.ndarray]:
        mask = np.asarray(images["mask"]) > 0.5
        frame = self._frame(mask.shape, voxel_size, b0_dir)
        b0 = np.asarray(b0_dir, dtype=np.float64)
        if frame is None:
            geometry = (b0, voxel_size)
        else:  # the inputs are resampled into the frame: training B0 if rotated, the frame's voxels
            geometry = (self.train_b0_dir.cpu().numpy() if frame.rotated else b0, frame.out_voxel_size)
        with self._using(geometry=geometry):
            return super().infer_arrays(images, voxel_size, b0_dir)

    def background_arrays(self, total_field: np.ndarray, mask: np.ndarray, voxel_size, b0_dir) -> np.ndarray:
        """The background net alone: local field (ppm, (X, Y, Z), masked) of a total field (ppm)."""
        with self._using(mode="background"):
            out = self.infer_arrays({"total_field": total_field, "mask": mask}, voxel_size, b0_dir)
        return out["local_field"]

    # -- evaluation of the local field --------------------------------------------------------------
    def _evaluate(self, stage: str, batch, batch_idx: int):
        w = self.loss_fn.weights["chi_local"]
        self.loss_fn.weights["chi_local"] = 0.0  # teacher forcing is a training device: no such output here
        try:
            pred = super()._evaluate(stage, batch, batch_idx)
        finally:
            self.loss_fn.weights["chi_local"] = w
        if pred is not None and "local_field" in pred and batch.get("total_field") is not None:
            getattr(self, f"{stage}_local_metrics").update(pred["local_field"].float(), batch.field.float(), batch.mask)
        return pred

    def _log_epoch(self, stage: str) -> None:
        super()._log_epoch(stage)
        metric = getattr(self, f"{stage}_local_metrics")
        value = metric.compute()["nrmse"]
        metric.reset()
        if torch.isfinite(value):
            self.log(f"{stage}/nrmse_local_field", value.float(), sync_dist=False)


def background_from_checkpoint(ckpt: str | Path | NeXtQSM, total_field: np.ndarray, mask: np.ndarray,
                               voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                               b0_dir: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Background removal by a NeXtQSM checkpoint's background net (``qsmlab pipeline --bfr ckpt:PATH``).

    Args:
        ckpt: NeXtQSM checkpoint (``.ckpt``) or a loaded :class:`NeXtQSM`.
        total_field: ppm, (X, Y, Z). mask: brain mask on the same grid.
        voxel_size: mm. b0_dir: B0 direction in voxel axes (the input is rotated/resampled into the
            training geometry and back when it is off, as for every method).
    Returns:
        local field (ppm, (X, Y, Z), zero outside the mask).
    """
    from qsmlab.methods.predict import method_from

    model = method_from(ckpt, method="nextqsm")
    t = np.asarray(total_field, dtype=np.float32)
    m = np.asarray(mask) > 0.5
    if t.ndim != 3:
        raise QSMInputError(f"total_field: expected a 3-D (X, Y, Z) array, got shape {t.shape}")
    if m.shape != t.shape:
        raise QSMInputError(f"mask: grid {m.shape} does not match the total field's {t.shape}")
    if not m.any():
        raise QSMInputError("mask: empty (no voxel set); expected a non-empty brain mask")
    if not np.all(np.isfinite(t)):
        raise QSMInputError("total_field: contains NaN/Inf")
    b0 = np.asarray(b0_dir, dtype=np.float64).reshape(3)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            local = model.background_arrays(t, m.astype(np.float32), np.asarray(voxel_size, np.float64),
                                            b0 / np.linalg.norm(b0))
    finally:
        model.train(was_training)
    return np.asarray(local, dtype=np.float32)
