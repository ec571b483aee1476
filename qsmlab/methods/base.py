"""``QSMMethod``: the LightningModule every learned QSM method builds on (fastMRI's ``MriModule`` pattern).

A method is a thin subclass that declares

- ``inputs``: the batch entries its network takes, in channel order (``("field", "mask")`` for uQSM);
  ``field``/``total_field`` enter as ``field / field_scale``, ``mask`` as 0/1, ``magnitude`` divided by its
  99th percentile (per sample: per patch in training, per volume at inference);
- ``outputs``: the named outputs, ``{"chi": "ppm"}``; an output of kind ``"ppm"`` is predicted in units of
  ``field_scale`` and multiplied back (so it is in ppm everywhere outside the network) and masked, kind
  ``"logits"`` is left as the network gives it (segmentation); ``primary_output`` is the map that is scored
  and written (``"chi"``);
- ``requires``: batch entries its training loss needs besides the inputs (``("chi",)`` when supervised);

and builds ``self.net`` (an ``nn.Module`` with ``size_multiple`` and ``fixed_input_size``) and ``self.loss_fn``
(a :class:`qsmlab.losses.CompositeLoss`), then calls :meth:`save_method_hyperparameters`. Everything else
is here:

- **Normalisation** (:mod:`qsmlab.methods.statistics`): buffers ``field_scale`` (ppm), ``train_b0_dir`` and
  ``train_voxel_size``, computed at ``on_fit_start`` from the datamodule's training rows unless set (a
  checkpoint restores them), so every checkpoint carries its normalisation.
- **Training**: ``training_step`` runs the network on patches (padded to ``size_multiple`` and cropped
  back), builds the batch's dipole operator (each sample's ``b0_dir`` and ``voxel_size``) and logs
  ``train/loss`` and ``train/loss_<term>``.
- **Full-volume validation / test / predict**: pad to the multiple, or MONAI ``sliding_window_inference``
  with Gaussian blending when the volume has more than ``max_inference_voxels`` voxels or the network
  has a ``fixed_input_size``. A volume whose B0 is more than 1 degree from the training B0, or whose
  voxel size is more than 25 % from it, is resampled into a frame that matches and back
  (:mod:`qsmlab.methods.inference`), with a warning. Metrics inside the mask through
  :class:`qsmlab.metrics.VolumeMetrics` (``val/psnr``, ``val/nrmse``, ``val/hfen``, ``val/ssim``,
  ``val/nrmse_demeaned``, ...), data consistency ``val/dc`` = ``100 ||M (D chi - f)|| / ||M f||`` (%) for
  every volume, ``val/loss`` when the batch has what the loss needs, ``val/n_volumes`` scored; all
  torchmetrics states, so they are summed over DDP ranks. Under DDP the (unsharded) validation volumes are dealt round-robin to the
  ranks, so each is scored once. Orthogonal slices of the first validation volume are logged as an
  image once per validation (:mod:`qsmlab.methods.images`).
- **Optimisation**: AdamW (``lr``, ``weight_decay``) and a scheduler stepped per optimiser step:
  ``"cosine"`` (to ``min_lr`` over the run's total steps), ``"step"`` (x ``scheduler_gamma`` every
  ``scheduler_step_size`` steps, QSMnet's schedule), ``"exponential"`` (x ``scheduler_gamma`` per step)
  or ``"none"``.

Checkpoints hold plain hyper-parameters (dataclass arguments are stored as dicts) and a ``"qsmlab"``
entry naming the method and its class (read by :func:`qsmlab.methods.load_method`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric, SumMetric

from qsmlab.errors import QSMInputError
from qsmlab.methods.inference import crop, make_frame, pad_to_multiple
from qsmlab.methods.statistics import robust_std, training_statistics
from qsmlab.metrics import TORCH_METRICS, VolumeMetrics
from qsmlab.physics import physics_for_batch

SCHEDULERS = ("cosine", "step", "exponential", "none")
PRIORS = ("none", "tkd")
VOXEL_RESAMPLING = ("auto", "never")
FIELD_INPUTS = ("field", "total_field")
DEFAULT_METRICS = ("psnr", "nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen", "ssim", "xsim", "corr")


def as_dataclass(cls, value):
    """``value`` as an instance of the dataclass ``cls``: None -> defaults, a mapping -> ``cls(**value)``.

    Mappings come back from checkpoints (hyper-parameters are stored as plain dicts); an unknown key
    fails naming it and the accepted keys.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise QSMInputError(f"{cls.__name__}: unknown key(s) {unknown}; accepted: {sorted(names)}")
        return cls(**value)
    raise QSMInputError(f"{cls.__name__}: expected a mapping of {sorted(f.name for f in dataclasses.fields(cls))}, "
                        f"got {type(value).__name__}")


def _plain(v: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists (recursively): checkpoint- and YAML-safe hyper-parameters."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {k: _plain(x) for k, x in dataclasses.asdict(v).items()}
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v


def normalise_magnitude(mag: torch.Tensor, mask: torch.Tensor | None = None, q: float = 0.99) -> torch.Tensor:
    """Magnitude divided by its ``q``-quantile per sample (inside the mask when given), clamped to [0, 1.5].

    A quantile, not the maximum, so one bright vessel does not dim the image. At most ~1M voxels per
    sample enter the quantile (a fixed stride; ``torch.quantile`` has an input size limit).
    """
    out = torch.empty_like(mag)
    for i in range(mag.shape[0]):
        v = mag[i].reshape(-1)
        if mask is not None:
            sel = mask[i].reshape(-1) > 0.5
            if sel.any():
                v = v[sel]
        v = v[:: max(1, v.numel() // 1_000_000)].float()
        s = torch.quantile(v, q) if v.numel() else torch.tensor(1.0)
        s = s if torch.isfinite(s) and s > 0 else torch.tensor(1.0)
        out[i] = (mag[i] / s.to(mag.dtype)).clamp(0.0, 1.5)
    return out


class QSMMethod(L.LightningModule):
    """Shared base of the learned QSM methods (see the module docstring).

    Args (common to every method; subclasses forward them with ``**kwargs``):
        lr: AdamW learning rate. weight_decay: AdamW weight decay.
        scheduler: ``"cosine"``, ``"step"``, ``"exponential"`` or ``"none"``; ``scheduler_step_size``
            (optimiser steps) and ``scheduler_gamma`` for ``"step"``/``"exponential"``; ``min_lr`` for cosine.
        field_scale: ppm; None computes it from the training data at the start of fitting.
        pad_factor: zero-padding factor of the dipole operator in the losses (2 = linear convolution).
        pad_mode: ``"constant"`` (zeros) or ``"replicate"`` padding of inputs to the size multiple.
        max_inference_voxels: above this many (padded) voxels, inference uses sliding windows of
            ``sw_roi_size`` voxels per axis with ``sw_overlap`` and Gaussian blending (memory bound).
        metrics: names from :data:`qsmlab.metrics.METRIC_INFO` logged as ``val/<name>``/``test/<name>``.
        log_images: log orthogonal slices of the first validation volume once per validation.
        channels_last: run the network in ``channels_last_3d`` memory format: on CPU it selects oneDNN's
            convolutions (measured 1.6-2x faster training steps on 32^3 patches, 2 threads).
        patch_margin: voxels at each patch face left out of the training loss (see :meth:`loss_batch`).
        prior: ``"none"`` (the papers: the network maps the inputs to chi) or ``"tkd"``: a physics prior,
            the thresholded k-space division of the (masked) local field under each sample's geometry
            (:meth:`qsmlab.physics.DipoleOperator.A_dagger`), enters the network as one more input channel
            and is added to its chi output, so the network learns a correction to TKD (residual learning
            from a model-based initialisation, as in unrolled/learned-post-processing QSM). With the output
            layer started at zero, an untrained network *is* TKD; every training step improves on it
            under the method's own loss. Methods whose inputs have no local field ignore it (error).
        prior_threshold: TKD threshold of the prior (default 0.19, as :func:`qsmlab.recon.inversion.tkd`).
        patch_fields: ``"data"`` (train on the batch's field) or ``"simulate"``: on training batches that
            carry chi (synthetic rows), replace the local field by the field of the patch's own chi,
            ``A(chi * mask) * mask`` under each sample's geometry (as QSMnet built its training pairs by
            dipole convolution of COSMOS patches). A cropped field is partly caused by chi outside the
            patch, which no network can see; a simulated one is explained by what is in the patch, so
            input, prior, label and physics losses agree. Validation and inference use the real field.
        patch_field_noise: with ``"simulate"``: Gaussian noise added to the simulated field, std drawn
            uniformly in [0, patch_field_noise] ppm per sample (real local fields are noisy).
        voxel_resampling: inference on a scan whose voxel size is more than 25 % from the training one:
            ``"auto"`` resamples the inputs to the training voxel size and the outputs back (a network
            trained from scratch knows features of one scale only); ``"never"`` runs the network on the
            scan's own grid (its prior and physics under the scan's voxel size). A method with
            ``prior: tkd`` keeps the scan's resolution that way: measured on an in-vivo-like 160^3 scan at
            1.06 mm with networks trained at 2 mm (``benchmarks/invivo_like_methods.py``), the resampled
            route scored 53 % NRMSE (the chi of a 2 mm grid, worse than TKD's 41 % at 1.06 mm) and the
            native route 39-40 %. A B0 direction off the training one is rotated either way.
    """

    name: ClassVar[str] = "base"
    inputs: ClassVar[tuple[str, ...]] = ("field",)
    outputs: ClassVar[dict[str, str]] = {"chi": "ppm"}
    primary_output: ClassVar[str] = "chi"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        scheduler_step_size: int = 1000,
        scheduler_gamma: float = 0.5,
        min_lr: float = 0.0,
        field_scale: float | None = None,
        pad_factor: float = 2.0,
        pad_mode: str = "constant",
        max_inference_voxels: int = 192**3,
        sw_roi_size: int = 128,
        sw_overlap: float = 0.25,
        metrics: list[str] | None = None,
        log_images: bool = True,
        channels_last: bool = True,
        patch_margin: int = 0,
        prior: str = "none",
        prior_threshold: float = 0.19,
        patch_fields: str = "data",
        patch_field_noise: float = 0.0,
        voxel_resampling: str = "auto",
    ):
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise QSMInputError(f"model.scheduler: expected one of {list(SCHEDULERS)}, got {scheduler!r}")
        if not (lr > 0 and weight_decay >= 0 and min_lr >= 0 and scheduler_step_size >= 1 and scheduler_gamma > 0):
            raise QSMInputError(f"model: lr ({lr}) > 0, weight_decay ({weight_decay}) >= 0, min_lr ({min_lr}) >= 0, "
                                f"scheduler_step_size ({scheduler_step_size}) >= 1 and scheduler_gamma "
                                f"({scheduler_gamma}) > 0 are required")
        if int(patch_margin) < 0:
            raise QSMInputError(f"model.patch_margin: expected an integer >= 0, got {patch_margin!r}")
        if prior not in PRIORS:
            raise QSMInputError(f"model.prior: expected one of {list(PRIORS)}, got {prior!r}")
        if not (0.0 < float(prior_threshold) < 2.0 / 3.0):
            raise QSMInputError(f"model.prior_threshold: expected 0 < threshold < 2/3, got {prior_threshold!r}")
        if prior != "none" and "field" not in self.inputs:
            raise QSMInputError(f"model.prior={prior!r}: {type(self).__name__} has no local-field input "
                                f"(inputs {list(self.inputs)}); use prior: none")
        if patch_fields not in ("data", "simulate"):
            raise QSMInputError(f"model.patch_fields: expected 'data' or 'simulate', got {patch_fields!r}")
        if not float(patch_field_noise) >= 0:
            raise QSMInputError(f"model.patch_field_noise: expected a number of ppm >= 0, got {patch_field_noise!r}")
        if voxel_resampling not in VOXEL_RESAMPLING:
            raise QSMInputError(f"model.voxel_resampling: expected one of {list(VOXEL_RESAMPLING)}, got "
                                f"{voxel_resampling!r}")
        if pad_mode not in ("constant", "replicate"):
            raise QSMInputError(f"model.pad_mode: expected 'constant' or 'replicate', got {pad_mode!r}")
        if field_scale is not None and not (math.isfinite(field_scale) and field_scale > 0):
            raise QSMInputError(f"model.field_scale: expected a positive number of ppm, got {field_scale!r}")
        metrics = list(metrics) if metrics is not None else list(DEFAULT_METRICS)
        unknown = [m for m in metrics if m not in TORCH_METRICS]
        if unknown:
            raise QSMInputError(f"model.metrics: unknown metric(s) {unknown}; choose from {sorted(TORCH_METRICS)}")
        self._base_hparams = dict(
            lr=lr, weight_decay=weight_decay, scheduler=scheduler, scheduler_step_size=scheduler_step_size,
            scheduler_gamma=scheduler_gamma, min_lr=min_lr, field_scale=field_scale, pad_factor=pad_factor,
            pad_mode=pad_mode, max_inference_voxels=max_inference_voxels, sw_roi_size=sw_roi_size,
            sw_overlap=sw_overlap, metrics=metrics, log_images=log_images, channels_last=channels_last,
            patch_margin=int(patch_margin), prior=prior, prior_threshold=float(prior_threshold),
            patch_fields=patch_fields, patch_field_noise=float(patch_field_noise),
            voxel_resampling=voxel_resampling)
        nan = float("nan")
        self.register_buffer("field_scale", torch.tensor(nan if field_scale is None else float(field_scale)))
        self.register_buffer("train_b0_dir", torch.full((3,), nan))
        self.register_buffer("train_voxel_size", torch.full((3,), nan))
        self.val_metrics = VolumeMetrics(metrics)
        self.test_metrics = VolumeMetrics(metrics)
        self.val_dc, self.test_dc = MeanMetric(), MeanMetric()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_volumes, self.test_volumes = SumMetric(), SumMetric()
        self._warned: set[str] = set()
        self._image_logged_step = -1

    # -- hyper-parameters ---------------------------------------------------------------------------
    def save_method_hyperparameters(self) -> None:
        """Subclasses call this at the end of ``__init__``: saves their arguments and the base's, plain.

        Dataclass arguments (``loss``) are stored as dicts so checkpoints load with
        ``torch.load(weights_only=True)`` and ``hparams.yaml`` stays readable; the constructors accept both.
        """
        frame = inspect.currentframe().f_back
        self.save_hyperparameters(frame=frame)
        hp = dict(self._hparams)
        hp.update(self._base_hparams)
        if getattr(self, "loss_config", None) is not None:
            hp["loss"] = self.loss_config  # the resolved loss (defaults filled in), not the partial input
        hp = {k: _plain(v) for k, v in hp.items()}
        self._hparams.clear()
        self._hparams.update(hp)
        self._hparams_initial = copy.deepcopy(self._hparams)
        if self.prior_channels and hasattr(self, "net") and isinstance(getattr(self.net, "head", None),
                                                                        torch.nn.Conv3d):
            # Start as the prior itself: a zero output layer (its input still gets gradients).
            torch.nn.init.zeros_(self.net.head.weight)
            if self.net.head.bias is not None:
                torch.nn.init.zeros_(self.net.head.bias)
        if self._base_hparams["channels_last"] and hasattr(self, "net"):
            # In place (same Parameter objects), so optimisers built later see the same tensors.
            self.net.to(memory_format=torch.channels_last_3d)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from qsmlab import __version__

        cls = type(self)
        checkpoint["qsmlab"] = {
            "method": self.name,
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "inputs": list(self.inputs),
            "outputs": dict(self.outputs),
            "field_scale_ppm": float(self.field_scale),
            "train_b0_dir": [float(v) for v in self.train_b0_dir],
            "train_voxel_size": [float(v) for v in self.train_voxel_size],
            "qsmlab_version": __version__,
        }

    # -- normalisation ------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        s = float(self.field_scale)
        if not (math.isfinite(s) and s > 0):
            raise QSMInputError(f"{type(self).__name__}: field_scale is not set; fit the method on data (it is "
                                "computed at the start of fitting) or give model.field_scale in ppm")
        return s

    def set_statistics(self, field_scale: float, b0_dir=None, voxel_size=None) -> None:
        """Set the normalisation buffers (ppm; unit B0 in voxel axes or NaN; voxel size in mm or NaN)."""
        self.field_scale.fill_(float(field_scale))
        if b0_dir is not None:
            self.train_b0_dir.copy_(torch.as_tensor(np.asarray(b0_dir, dtype=np.float32)))
        if voxel_size is not None:
            self.train_voxel_size.copy_(torch.as_tensor(np.asarray(voxel_size, dtype=np.float32)))

    def setup(self, stage: str) -> None:
        """Fresh metric states in every process of a multi-process run.

        ``ddp_spawn`` pickles the module to each process through ``torch.multiprocessing``, which puts CPU
        tensors in shared memory. Lightning un-shares parameters and buffers, but not the states of the
        torchmetrics children, so on CPU every rank added into the *same* sums (each volume counted once
        per rank; measured: 4 volumes logged for 2). ``reset`` gives each process its own tensors.
        """
        if self._trainer is None or int(self.trainer.world_size) <= 1:
            return
        for m in self.modules():
            if isinstance(m, Metric):
                m.reset()

    def on_fit_start(self) -> None:
        if math.isfinite(float(self.field_scale)) and torch.all(torch.isfinite(self.train_voxel_size)):
            return  # given, or restored from a checkpoint
        dm = getattr(self.trainer, "datamodule", None)
        rows = getattr(dm, "rows", {}).get("train") if dm is not None else None
        if rows:
            st = training_statistics(rows)  # same rows on every rank -> same statistics
            scale = float(self.field_scale) if math.isfinite(float(self.field_scale)) else st["field_scale"]
            self.set_statistics(scale, st["b0_dir"], st["voxel_size"])
        # else: set from the first training batch (see _ensure_statistics)

    def _ensure_statistics(self, batch) -> None:
        """Without a datamodule's rows: statistics of the first training batch, broadcast from rank 0."""
        if math.isfinite(float(self.field_scale)):
            return
        m = batch.mask > 0.5
        scale = robust_std(batch.field[m].detach().float().cpu().numpy())
        b0 = batch.b0_dir.detach().float().cpu().numpy()
        vs = batch.voxel_size.detach().float().cpu().numpy()
        from qsmlab.methods.statistics import common_b0_dir

        stats = [scale, common_b0_dir(b0).tolist(), np.median(vs, axis=0).tolist()]
        if self._trainer is not None:
            stats = self.trainer.strategy.broadcast(stats, src=0)
        if not (math.isfinite(stats[0]) and stats[0] > 0):
            raise QSMInputError("field_scale: the first training batch has no non-zero field inside its mask; "
                                "set model.field_scale (ppm) or use a datamodule with training rows")
        self._warn_once("scale", f"{type(self).__name__}: field_scale computed from the first training batch "
                                 f"({stats[0]:.4g} ppm); a datamodule with training rows gives a better estimate")
        self.set_statistics(*stats)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # -- network ------------------------------------------------------------------------------------
    def network_input(self, images: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Channels of the network input from ``images`` [B, 1, X, Y, Z] (see ``inputs``)."""
        mask = images.get("mask")
        chans = []
        for name in self.inputs:
            t = images.get(name)
            if t is None:
                raise QSMInputError(f"{type(self).__name__} needs the input {name!r} (its network takes "
                                    f"{list(self.inputs)}); give it (e.g. --{name.replace('_', '-')})")
            t = t.float()
            if name in FIELD_INPUTS:
                t = t / self.scale
                if mask is not None:
                    t = t * (mask > 0.5)
            elif name in ("mask", "seg"):
                t = (t > 0.5).float()
            elif name == "magnitude":
                t = normalise_magnitude(t, mask)
            chans.append(t)
        return torch.cat(chans, dim=1)

    @property
    def prior_channels(self) -> int:
        """Extra input channels the prior adds (subclasses build their network with
        ``in_channels = len(inputs) + prior_channels``)."""
        return 0 if self._base_hparams.get("prior", "none") == "none" else 1

    @torch.no_grad()
    def prior_map(self, images: Mapping[str, torch.Tensor], geometry=None) -> torch.Tensor:
        """The ``prior`` chi (network units, masked) for ``images``; ``geometry`` = (voxel_size, b0_dir),
        one 3-vector or one row per sample; None = the training geometry (the inference frame's)."""
        if geometry is None:
            geometry = (self.train_voxel_size, self.train_b0_dir)
        vs, b0 = geometry
        if not all(bool(np.all(np.isfinite(np.asarray(torch.as_tensor(g).cpu())))) for g in geometry):
            raise QSMInputError(f"{type(self).__name__}: prior={self.hparams.get('prior')!r} needs the voxel size "
                                "and B0 direction of the input (not known: fit the method or pass the geometry)")
        # the losses' operator: one kernel row when every sample shares the geometry
        op = physics_for_batch({"voxel_size": vs, "b0_dir": b0}, pad_factor=float(self.hparams.get("pad_factor", 2.0)))
        m = (images["mask"] > 0.5).float()
        chi = op.A_dagger(images["field"].float() * m, float(self.hparams.get("prior_threshold", 0.19)))
        return chi * m / self.scale

    def run_network(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw network outputs by name (network units), for an input whose size fits the network.

        The default splits a tensor output's channels over ``outputs`` in order (one channel each, the
        last takes the rest); a network returning a dict is passed through.
        """
        if self.hparams.get("channels_last", False) and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        y = self.net(x)
        if isinstance(y, Mapping):
            return dict(y)
        names = list(self.outputs)
        if len(names) == 1:
            return {names[0]: y}
        parts = list(torch.split(y, [1] * (len(names) - 1) + [y.shape[1] - len(names) + 1], dim=1))
        return dict(zip(names, parts))

    @property
    def size_multiple(self) -> int:
        return int(getattr(self.net, "size_multiple", 1) or 1)

    @property
    def fixed_input_size(self) -> tuple[int, int, int] | None:
        f = getattr(self.net, "fixed_input_size", None)
        return None if f is None else tuple(int(v) for v in f)

    def _run_padded(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        xp, pads = pad_to_multiple(x, self.size_multiple, self.hparams.get("pad_mode", "constant"))
        return {k: crop(v, pads) for k, v in self.run_network(xp).items()}

    def _needs_windows(self, shape) -> bool:
        if self.fixed_input_size is not None:
            return tuple(shape) != self.fixed_input_size
        m = self.size_multiple
        padded = math.prod(-(-int(n) // m) * m for n in shape)
        return padded > int(self.hparams.get("max_inference_voxels", 192**3))

    def _sliding_window(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from monai.inferers import sliding_window_inference

        if self.fixed_input_size is not None:
            roi = self.fixed_input_size
        else:
            m = self.size_multiple
            edge = max(m, int(self.hparams.get("sw_roi_size", 128)) // m * m)
            roi = tuple(min(edge, -(-int(n) // m) * m) for n in x.shape[-3:])
        out = sliding_window_inference(x, roi, sw_batch_size=1, predictor=self._run_padded,
                                       overlap=float(self.hparams.get("sw_overlap", 0.25)), mode="gaussian")
        return dict(out) if isinstance(out, Mapping) else {list(self.outputs)[0]: out}

    def infer_images(self, images: Mapping[str, torch.Tensor], windows: bool = True,
                     geometry=None) -> dict[str, torch.Tensor]:
        """Outputs (ppm for ``"ppm"`` kinds, unmasked) for images [B, 1, X, Y, Z] on their own grid.

        Pads to the size multiple (and crops back); with ``windows``, large volumes or fixed-size
        networks go through Gaussian-blended sliding windows. ``geometry`` (voxel_size, b0_dir) is used
        by the ``prior`` only (computed on the whole volume, before any windowing).
        """
        x = self.network_input(images)
        prior = None
        if self.prior_channels:
            prior = self.prior_map(images, geometry).to(x.dtype)
            x = torch.cat([x, prior], dim=1)
        if windows and self._needs_windows(x.shape[-3:]):
            raw = self._sliding_window(x)
        else:
            raw = self._run_padded(x)
        if prior is not None:
            key = self.primary_output
            raw[key] = raw[key] + prior.to(raw[key].dtype)
        s = self.scale
        # float32 from here on: under bf16 autocast the network's output is bf16 (8-bit mantissa), and the
        # losses subtract fields of ~0.05 ppm to get residuals of ~1e-3 ppm, which bf16 cannot resolve.
        return {k: (v.float() * s if self.outputs.get(k) == "ppm" else v.float()) for k, v in raw.items()}

    def _mask_outputs(self, out: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        m = (mask > 0.5).to(next(iter(out.values())).dtype)
        return {k: (v * m if self.outputs.get(k) == "ppm" else v) for k, v in out.items()}

    def inputs_for(self, available) -> tuple[str, ...]:
        """The inputs this method uses when the images named in ``available`` are given (default:
        ``inputs``; a method with alternative inputs, e.g. NeXtQSM's total or local field, overrides it)."""
        return tuple(self.inputs)

    def _images_of(self, batch, i: slice | None = None) -> dict[str, torch.Tensor]:
        names = set(self.inputs_for(set(batch.keys()) if hasattr(batch, "keys") else set(self.inputs))) | {"mask"}
        out = {}
        for n in names:
            t = batch.get(n) if hasattr(batch, "get") else getattr(batch, n, None)
            if t is not None:
                out[n] = t if i is None else t[i]
        return out

    def forward(self, images: Mapping[str, torch.Tensor], geometry=None) -> dict[str, torch.Tensor]:
        """Masked outputs (ppm) for images on their grid: ``{"chi": [B, 1, X, Y, Z], ...}``; ``geometry``
        = (voxel_size, b0_dir) of the images (None: the training geometry)."""
        return self._mask_outputs(self.infer_images(images, geometry=geometry), images["mask"])

    # -- full-volume inference with geometry handling -----------------------------------------------
    def _frame(self, shape, voxel_size, b0_dir):
        train_vs = self.train_voxel_size.cpu().numpy()
        if self.hparams.get("voxel_resampling", "auto") == "never":  # old checkpoints: "auto"
            train_vs = None
        return make_frame(shape, voxel_size, b0_dir, self.train_b0_dir.cpu().numpy(), train_vs)

    @torch.no_grad()
    def infer_arrays(self, images: Mapping[str, np.ndarray], voxel_size, b0_dir) -> dict[str, np.ndarray]:
        """Full-volume inference on one scan: numpy (X, Y, Z) images (fields in ppm) -> outputs (X, Y, Z).

        ``images`` holds ``mask`` and the method's ``inputs``. When the B0 direction or the voxel size is
        off the training geometry the images are resampled into a matching frame and the outputs back
        (with a warning). ``"ppm"`` outputs are in ppm and masked.
        """
        mask = np.asarray(images["mask"]) > 0.5
        frame = self._frame(mask.shape, voxel_size, b0_dir)
        work = dict(images)
        if frame is not None:
            what = []
            if frame.rotated:
                what.append(f"B0 is {frame.angle_deg:.1f} deg from the training direction "
                            f"{np.round(self.train_b0_dir.cpu().numpy(), 3).tolist()}: rotated to it")
            if frame.resampled:
                what.append(f"voxel size {np.round(frame.in_voxel_size, 3).tolist()} mm is > 25 % from the training "
                            f"{np.round(frame.out_voxel_size, 3).tolist()} mm: resampled to it")
            self._warn_once("frame", f"{type(self).__name__}: {'; '.join(what)}, and the result back")
            work = frame.forward(images)
        tens = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None, None].to(self.device)
                for k, v in work.items() if v is not None}
        geometry = (voxel_size, b0_dir)
        if frame is not None:
            geometry = (frame.out_voxel_size, self.train_b0_dir.cpu().numpy() if frame.rotated else b0_dir)
        out = self.infer_images(tens, geometry=geometry)
        res = {}
        for k, t in out.items():
            a = t[0].float().cpu().numpy()
            if frame is not None:
                a = np.stack([frame.backward(c) for c in a])
            if self.outputs.get(k) == "ppm":
                a = a * mask
            res[k] = a[0] if a.shape[0] == 1 else a
        return res

    def predict_batch(self, batch) -> dict[str, torch.Tensor]:
        """Full-volume, masked outputs for each sample of an evaluation batch (geometry handled per sample)."""
        results = []
        for i in range(len(batch)):
            sl = slice(i, i + 1)
            images = self._images_of(batch, sl)
            vs = batch.voxel_size[i].cpu().numpy()
            b0 = batch.b0_dir[i].cpu().numpy()
            if self._frame(images["mask"].shape[-3:], vs, b0) is None:
                results.append(self.forward(images, geometry=(vs, b0)))
            else:
                arrays = {k: v[0, 0].cpu().numpy() for k, v in images.items()}
                out = self.infer_arrays(arrays, vs, b0)
                results.append({k: torch.from_numpy(np.asarray(v, np.float32)).reshape(images["mask"].shape[:1]
                                                                                       + (-1,) + v.shape[-3:])
                                .to(self.device) for k, v in out.items()})
        return {k: torch.cat([r[k] for r in results]) for k in results[0]}

    # -- training -----------------------------------------------------------------------------------
    def simulate_patch_fields(self, batch):
        """``patch_fields: simulate``: the batch with ``field = A(chi * mask) * mask`` (+ noise), when it has chi."""
        if self.hparams.get("patch_fields", "data") != "simulate" or not dataclasses.is_dataclass(batch):
            return batch
        if batch.get("chi") is None:
            self._warn_once("simulate", f"{type(self).__name__}: patch_fields=simulate but the training batch has "
                                        "no chi (in-vivo rows): training on the measured field")
            return batch
        m = (batch.mask > 0.5).to(batch.chi.dtype)
        with torch.no_grad():
            physics = physics_for_batch(batch, pad_factor=float(self.hparams.get("pad_factor", 2.0)))
            field = physics.A(batch.chi * m)
            sigma = float(self.hparams.get("patch_field_noise", 0.0) or 0.0)
            if sigma > 0:
                std = torch.rand((field.shape[0],) + (1,) * (field.ndim - 1), device=field.device) * sigma
                field = field + std.to(field.dtype) * torch.randn_like(field)
        return dataclasses.replace(batch, field=(field * m).to(batch.field.dtype))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self._ensure_statistics(batch)
        batch = self.simulate_patch_fields(batch)
        pred = self._mask_outputs(self.infer_images(self._images_of(batch), windows=False,
                                                    geometry=(batch.voxel_size, batch.b0_dir)), batch.mask)
        physics = physics_for_batch(batch, pad_factor=float(self.hparams.get("pad_factor", 2.0)))
        total, parts = self.loss_fn(pred, self.loss_batch(batch), physics)
        bs = len(batch)
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        self._last_parts = {k: float(v.detach()) for k, v in parts.items()}
        return total

    def loss_batch(self, batch):
        """The training batch the loss sees: its mask restricted to ``patch_margin`` voxels inside the patch.

        The field of a patch is also caused by the chi outside it, which the network never sees; a
        physics loss right at the patch faces asks for the impossible. With a margin, chi in the border
        shell is free (it can stand in for the sources outside the patch) and the loss holds where the
        field is explained by what the network predicts. The network's input mask is not changed.
        """
        m = int(self.hparams.get("patch_margin", 0) or 0)
        if m <= 0 or not dataclasses.is_dataclass(batch):
            return batch
        inner = torch.zeros_like(batch.mask)
        X, Y, Z = batch.mask.shape[-3:]
        if min(X, Y, Z) <= 2 * m:
            raise QSMInputError(f"model.patch_margin={m}: patches of {(X, Y, Z)} voxels leave no interior")
        inner[..., m:X - m, m:Y - m, m:Z - m] = 1
        return dataclasses.replace(batch, mask=batch.mask * inner)

    # -- evaluation ---------------------------------------------------------------------------------
    def _owns(self, batch_idx: int) -> bool:
        """Round-robin of evaluation volumes over DDP ranks (the loaders are not sharded)."""
        if self._trainer is None:
            return True
        world, rank = int(self.trainer.world_size), int(self.trainer.global_rank)
        return world == 1 or batch_idx % world == rank

    def can_compute_loss(self, batch) -> bool:
        return all(batch.get(k) is not None for k in self.requires)

    @staticmethod
    def data_consistency(chi: torch.Tensor, batch, physics) -> torch.Tensor:
        """Per sample ``100 ||M (D chi - f)|| / ||M f||`` (%)."""
        m = (batch.mask > 0.5).to(chi.dtype)
        r = (physics.A(chi) - batch.field.to(chi.dtype)) * m
        num = r.flatten(1).norm(dim=1)
        den = (batch.field.to(chi.dtype) * m).flatten(1).norm(dim=1).clamp_min(1e-12)
        return 100.0 * num / den

    def _evaluate(self, stage: str, batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        if not self._owns(batch_idx):
            return None
        pred = self.predict_batch(batch)
        chi = pred[self.primary_output].float()
        physics = physics_for_batch(batch, pad_factor=float(self.hparams.get("pad_factor", 2.0)))
        getattr(self, f"{stage}_volumes").update(float(len(batch)))
        getattr(self, f"{stage}_dc").update(self.data_consistency(chi, batch, physics))
        if batch.chi is not None:
            getattr(self, f"{stage}_metrics").update(chi, batch.chi.float(), batch.mask)
        if self.can_compute_loss(batch):
            total, _ = self.loss_fn(pred, batch, physics)
            getattr(self, f"{stage}_loss").update(total.detach())
        return pred

    def _log_epoch(self, stage: str) -> None:
        values = {f"{stage}/{k}": v for k, v in getattr(self, f"{stage}_metrics").compute().items()}
        values[f"{stage}/dc"] = getattr(self, f"{stage}_dc").compute()
        values[f"{stage}/loss"] = getattr(self, f"{stage}_loss").compute()
        values[f"{stage}/n_volumes"] = getattr(self, f"{stage}_volumes").compute()
        for name in ("metrics", "dc", "loss", "volumes"):
            getattr(self, f"{stage}_{name}").reset()
        # States are already summed over ranks (torchmetrics), so every rank holds the same values;
        # NaN means no volume had what the value needs (e.g. no reference chi).
        finite = {k: v.float() for k, v in values.items() if torch.isfinite(v)}
        if finite:
            self.log_dict(finite, sync_dist=False, prog_bar=False)

    def validation_step(self, batch, batch_idx: int):
        pred = self._evaluate("val", batch, batch_idx)
        if pred is not None and batch_idx == 0 and self.global_rank == 0:
            self._log_slices(batch, pred)
        return None

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch, batch_idx: int):
        self._evaluate("test", batch, batch_idx)
        return None

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """``{"key": [...], "affine": [B, 4, 4], <outputs>: [B, C, X, Y, Z] (cpu)}`` for one volume batch."""
        pred = self.predict_batch(batch)
        return {"key": list(batch.key), "affine": batch.affine.cpu(),
                **{k: v.detach().float().cpu() for k, v in pred.items()}}

    def _log_slices(self, batch, pred) -> None:
        if not self.hparams.get("log_images", True) or self._trainer is None or self.trainer.sanity_checking:
            return
        if not self.loggers or self._image_logged_step == self.global_step:
            return
        from qsmlab.methods.images import log_figure, slice_figure

        self._image_logged_step = self.global_step
        f = batch.field[0, 0].float().cpu().numpy()
        p = pred[self.primary_output][0, 0].float().cpu().numpy()
        r = None if batch.chi is None else batch.chi[0, 0].float().cpu().numpy()
        m = batch.mask[0, 0].cpu().numpy() > 0.5
        key = batch.key[0] if batch.key else ""
        fig = slice_figure(f, p, r, m, title=f"{type(self).__name__} {key} step {self.global_step}")
        log_figure(self.loggers, fig, "val/slices", int(self.global_step))

    # -- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=float(hp.lr), weight_decay=float(hp.weight_decay))
        kind = hp.scheduler
        if kind == "none":
            return opt
        if kind == "cosine":
            total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
            total = int(total) if math.isfinite(total) and total > 0 else int(hp.scheduler_step_size)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total), eta_min=float(hp.min_lr))
        elif kind == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(hp.scheduler_step_size),
                                                    gamma=float(hp.scheduler_gamma))
        else:
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=float(hp.scheduler_gamma))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
