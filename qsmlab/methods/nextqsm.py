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

Inference modes (from the images given, :meth:`NeXtQSM.inputs_for`, and the outputs wanted):

- ``total_field`` + ``mask``: the whole chain (``qsmlab predict --total-field``);
- ``field`` (a local field) + ``mask`` without a total field: the variational network alone (the
  background net is skipped), so the checkpoint also works as a dipole inversion (``--inversion ckpt:``);
- outputs ``("local_field",)``: the background net alone, total -> local field (:meth:`background_arrays`,
  ``qsmlab pipeline --bfr ckpt:PATH`` through :func:`qsmlab.methods.predict.background_from_checkpoint`).

Validation logs the base's metrics on chi (end to end from the total field) and
``val/nrmse_local_field`` (%) of the predicted local field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from qsmlab.errors import QSMInputError
from qsmlab.losses import ChiLoss, CompositeLoss, DataConsistencyLoss, FieldLoss
from qsmlab.methods.background_inputs import harmonic_residual, smv_kernel, vsharp_estimate  # noqa: F401 (API)
from qsmlab.methods.base import QSMMethod
from qsmlab.methods.inference import Context, infer_volume
from qsmlab.methods.input_cache import TensorCache
from qsmlab.methods.options import as_dataclass
from qsmlab.methods.statistics import field_scale_of_rows, robust_std
from qsmlab.metrics import VolumeMetrics
from qsmlab.models import NeXtQSMChain

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
            ``"field"`` (chi_0 = M f, the paper's); why: :mod:`qsmlab.models.nextqsm` (untrained, 68-90 %
            NRMSE on anat004 from the field, 36.0 % from TKD vs TKD's 36.6 %). The TKD is linear, so the
            chain still trains end to end.
        varnet_init_threshold: TKD threshold of ``varnet_init="tkd"`` (0.19, as ``qsmlab recon tkd``).
        harmonic_input: the total field's SHARP residual :func:`harmonic_residual` as a third input channel
            of the background net (see the module docstring).
        smv_radius_mm: radius of that sphere (mm).
        background_init: ``"none"`` (the paper's: the background net maps its inputs to the local field)
            or ``"vsharp"`` (this project's): the V-SHARP local field of the total field
            (:func:`vsharp_estimate`, TSVD, parameter-free) is one more input channel and the net adds a
            correction to it from a zero output layer (:class:`qsmlab.models.NeXtQSMChain`, ``residual``).
            Background removal is a global, linear problem a small CNN on 32^3 patches learns slowly: after
            200 quick steps from ``"none"`` the local field was at 48-53 % NRMSE on anat004 (V-SHARP: 19 %
            with CG, 29 % with TSVD) and chi from it 77-85 %.
        loss: :class:`NeXtQSMLoss`.
        total_field_scale: ppm; None computes it from the training total fields at the start of fitting.
        input_cache_mb: in training, the SHARP residual and V-SHARP channels of a total field already seen
            (the same bytes: same head, flip, mask and voxel size) are looked up, not recomputed
            (:mod:`qsmlab.methods.input_cache`; exact, LRU, at most this many MiB; 0 switches it off). Whole-head
            profiles see a few heads x 8 flips again and again: V-SHARP was 16 % of a quick step.
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
                 total_field_scale: float | None = None, input_cache_mb: float = 512.0, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(input_cache_mb, int | float) and math.isfinite(input_cache_mb) and input_cache_mb >= 0):
            raise QSMInputError(f"model.input_cache_mb: expected a number of MiB >= 0, got {input_cache_mb!r}")
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
        self.input_cache = TensorCache(input_cache_mb)
        self.varnet_pad_factor = float(varnet_pad_factor)
        self.varnet_inference_pad_factor = None if varnet_inference_pad_factor is None else \
            float(varnet_inference_pad_factor)
        self.net = self.prepare_network(NeXtQSMChain(
            bg=dict(in_channels=2 + self.harmonic_input + (background_init != "none"), width=bg_width, depth=bg_depth),
            varnet=dict(steps=steps, width=reg_width, depth=reg_depth, init_step=init_step, checkpointing=checkpointing,
                        init=varnet_init, init_threshold=varnet_init_threshold),
            residual=background_init != "none"))
        self.loss_fn = build_nextqsm_loss(self.loss_config)
        self.register_buffer("total_field_scale",
                             torch.tensor(math.nan if total_field_scale is None else float(total_field_scale)))
        self.val_local_metrics = VolumeMetrics(["nrmse"])
        self.test_local_metrics = VolumeMetrics(["nrmse"])
        self.save_method_hyperparameters(locals())

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
        rows = self.training_rows()
        if math.isfinite(float(self.total_field_scale)) or not rows:
            return
        missing = [r.subject for r in rows if r.total_field is None]
        if missing:
            raise QSMInputError(f"NeXtQSM trains from total fields: training subjects {missing[:3]} have no "
                                "'total_field' column in the manifest")
        try:
            self.total_field_scale.fill_(field_scale_of_rows(rows, "total_field"))
        except ValueError as e:
            raise QSMInputError(f"NeXtQSM: {e}") from None

    def on_train_end(self) -> None:
        c = self.input_cache
        if c.hits + c.misses:
            rank_zero_info(f"NeXtQSM: background channels looked up {c.hits} times, computed {c.misses} "
                           f"({c.bytes / 2**20:.0f} MiB cached; model.input_cache_mb)")

    def statistics_from_batch(self, batch) -> None:
        super().statistics_from_batch(batch)
        if math.isfinite(float(self.total_field_scale)):
            return
        s = robust_std(batch.total_field[batch.mask > 0.5].detach().float().cpu().numpy())
        if self._trainer is not None:
            s = self.trainer.strategy.broadcast(s, src=0)
        if not (math.isfinite(s) and s > 0):
            raise QSMInputError("NeXtQSM: the first training batch has no non-zero total field inside its mask; "
                                "set model.total_field_scale (ppm)")
        self.total_field_scale.fill_(float(s))

    # -- hooks: inputs, network, evaluation ---------------------------------------------------------
    def inputs_for(self, available) -> tuple[str, ...]:
        """The total field when there is one, else the local ``field`` (variational network alone); in
        training with ``lambda_chi_local`` > 0 also the true local field (teacher forcing)."""
        if "total_field" in available or "field" not in available:
            teacher = self.training and self.loss_config.lambda_chi_local > 0 and "field" in available
            return ("total_field", "mask", "field") if teacher else ("total_field", "mask")
        return ("field", "mask")

    def mode(self, ctx: Context) -> str:
        """``"local"`` (a local field given), ``"background"`` (only the local field wanted) or ``"total"``."""
        if ctx.inputs[:1] == ("field",):
            return "local"
        return "total" if ctx.wants("chi") else "background"

    def channel_names(self, ctx: Context) -> list[str]:
        """The network input's channels (:meth:`network_inputs`) for a context."""
        if self.mode(ctx) == "local":
            return ["field", "mask"]
        names = ["total_field"] + ["harmonic"] * self.harmonic_input + ["bg_init"] * (self.background_init == "vsharp")
        teacher = self.training and self.mode(ctx) == "total" and "field" in ctx.inputs and ctx.wants("chi_local")
        return names + ["mask"] + ["true_local"] * teacher

    @property
    def varnet_pad(self) -> float:
        """Padding factor of the variational network's operator now: the training one while training,
        ``varnet_inference_pad_factor`` (when set) otherwise."""
        inference = self.varnet_inference_pad_factor
        return self.varnet_pad_factor if self.training or inference is None else inference

    def varnet_operator(self, ctx: Context | None = None, n: int = 1):
        """The dipole operator inside the variational network (``ctx``'s geometry; None: the training one)."""
        if ctx is None:
            if not (torch.all(torch.isfinite(self.train_b0_dir)) and torch.all(torch.isfinite(self.train_voxel_size))):
                raise QSMInputError("NeXtQSM: no B0 direction / voxel size for the variational network's "
                                    "dipole operator (give them, or use a fitted checkpoint)")
            ctx = Context.of(self.train_voxel_size, self.train_b0_dir)
        if ctx.b0_dir.shape[0] not in (1, n) or ctx.voxel_size.shape[0] not in (1, n):
            raise QSMInputError(f"NeXtQSM: geometry for {ctx.b0_dir.shape[0]} samples, network input has {n}")
        return ctx.operator(self.varnet_pad)

    def network_inputs(self, images, ctx: Context) -> torch.Tensor:
        """Channels (:meth:`channel_names`): local field / field_scale and mask; or total field /
        total_field_scale, [its SHARP residual / field_scale,] [V-SHARP / field_scale,] mask [, true local
        field / field_scale (teacher forcing)]."""
        mask = images.get("mask")
        if mask is None:
            raise QSMInputError("NeXtQSM needs the brain mask (--mask)")
        m = (mask > 0.5).float()
        if self.mode(ctx) == "local":
            return torch.cat([images["field"].float() / self.scale * m, m], dim=1)
        t = images.get("total_field")
        if t is None:
            raise QSMInputError("NeXtQSM needs the total field (--total-field), or a local field (--field) "
                                "to run its variational network alone")
        t = t.float() * m
        chans = [t / self.total_scale]
        derived = self.background_channels(t, m, ctx)
        if derived is not None:
            chans.append(derived / self.scale)
        chans.append(m)
        if "true_local" in self.channel_names(ctx):
            chans.append(images["field"].float() / self.scale * m)
        return torch.cat(chans, dim=1)

    def background_channels(self, t: torch.Tensor, m: torch.Tensor, ctx: Context) -> torch.Tensor | None:
        """The parameter-free channels of the masked total field ``t`` (ppm): [SHARP residual,] [V-SHARP]
        (None if neither); in training through :attr:`input_cache` (the same tensor a recomputation gives)."""
        if not (self.harmonic_input or self.background_init == "vsharp"):
            return None

        def compute() -> torch.Tensor:
            out = []
            if self.harmonic_input:
                out.append(harmonic_residual(t, m, ctx.voxel_size, self.smv_radius_mm))
            if self.background_init == "vsharp":
                out.append(vsharp_estimate(t, m, ctx.voxel_size))
            return torch.cat(out, dim=1)

        if not self.training:
            return compute()
        vs = torch.as_tensor(ctx.voxel_size, dtype=torch.float64)
        extra = ("nextqsm-background", self.harmonic_input, self.smv_radius_mm, self.background_init)
        return self.input_cache.get_or_compute((t, m, vs), extra, compute)

    def run_network(self, x: torch.Tensor, ctx: Context) -> dict[str, torch.Tensor]:
        """``local_field`` and (unless background-only) ``chi`` in units of ``field_scale``, plus ``chi_local``
        (the variational network on the true local field) when teacher forcing."""
        x = self.memory_format(x)
        names = self.channel_names(ctx)
        mask = x[:, names.index("mask")][:, None]
        if self.mode(ctx) == "local":
            local = x[:, :1]
            return {"local_field": local, "chi": self.net.varnet(local, mask, self.varnet_operator(ctx, len(x)))}
        inputs = x[:, : names.index("mask")]
        if self.mode(ctx) == "background":
            return {"local_field": self.net.local_field(inputs, mask)}
        true_local = x[:, names.index("true_local")][:, None] if "true_local" in names else None
        return self.net(inputs, mask, self.varnet_operator(ctx, len(x)), true_local=true_local)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if batch.total_field is None or batch.chi is None:
            raise QSMInputError("NeXtQSM is trained end to end on hybrid data: the training scans need "
                                f"'total_field' and 'chi' (manifest columns); batch {batch.key[:2]} lacks one")
        return super().training_step(batch, batch_idx)

    def training_batch(self, batch, physics):
        """The base's ``patch_fields: simulate`` (local field = ``A(chi * mask) * mask`` of the patch's own
        chi), with the total field kept consistent: ``total - local_old + local_new``, i.e. the patch's
        background field (harmonic inside the mask, from sources outside it) plus the simulated local field."""
        new = super().training_batch(batch, physics)
        if new is batch or batch.get("total_field") is None:
            return new
        total = batch.total_field - batch.field.to(batch.total_field.dtype) + new.field.to(batch.total_field.dtype)
        return dataclasses.replace(new, total_field=total)

    def evaluation_loss(self, outputs, batch, physics) -> torch.Tensor:
        # teacher forcing is a training device: there is no chi_local output outside training
        return self.loss_fn(outputs, batch, physics, skip=("chi_local",))[0]

    def score_volume(self, stage: str, batch, outputs) -> None:
        if "local_field" in outputs and batch.get("total_field") is not None:
            getattr(self, f"{stage}_local_metrics").update(outputs["local_field"].float(), batch.field.float(),
                                                           batch.mask)

    def epoch_values(self, stage: str) -> dict[str, torch.Tensor]:
        metric = getattr(self, f"{stage}_local_metrics")
        value = metric.compute()["nrmse"]
        metric.reset()
        return {f"{stage}/nrmse_local_field": value}

    def background_arrays(self, total_field: np.ndarray, mask: np.ndarray, voxel_size, b0_dir) -> np.ndarray:
        """The background net alone: local field (ppm, (X, Y, Z), masked) of a total field (ppm)."""
        images = {"total_field": total_field, "mask": mask}
        return infer_volume(self, images, voxel_size, b0_dir, outputs=("local_field",))["local_field"]
