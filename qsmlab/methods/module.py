"""``MethodModule``: the Lightning plumbing every qsmlab method shares (reconstruction or segmentation).

- the normalisation buffers a checkpoint carries (``field_scale`` ppm, ``train_b0_dir``, ``train_voxel_size``
  mm) and :meth:`set_statistics`; the training rows of the datamodule (:meth:`training_rows`);
- AdamW with a per-step scheduler (:meth:`configure_optimizers`, from ``self.options``);
- evaluation under DDP: unsharded volumes dealt round-robin to the ranks (:meth:`owns_volume`), fresh
  metric states per process (:meth:`setup`), finite epoch values logged once (:meth:`log_values`);
- orthogonal slices of the first validation volume once per validation (:meth:`log_slices`);
- the ``"qsmlab"`` checkpoint entry (method name, class path, statistics) read by
  :func:`qsmlab.methods.load_method`, and hyper-parameters stored as plain values
  (:meth:`save_method_hyperparameters`).

The common options (``lr``, ``scheduler``, ``log_images``, ...) are validated into ``self.options``
(:class:`qsmlab.methods.options.MethodOptions`); a subclass passes its ``**kwargs`` on.
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

from qsmlab import __version__
from qsmlab.methods.images import log_figure, slice_figure
from qsmlab.methods.options import MethodOptions, plain


class MethodModule(L.LightningModule):
    """Base of every qsmlab LightningModule (see the module docstring)."""

    name: ClassVar[str] = "base"
    inputs: ClassVar[tuple[str, ...]] = ("field",)
    outputs: ClassVar[dict[str, str]] = {"chi": "ppm"}
    primary_output: ClassVar[str] = "chi"
    #: the outputs do not depend on B0 (a magnitude-only net): test-time mirroring may use every axis flip
    b0_invariant: ClassVar[bool] = False

    def __init__(self, **options):
        super().__init__()
        self.options = MethodOptions(**options)
        nan = float("nan")
        fs = self.options.field_scale
        self.register_buffer("field_scale", torch.tensor(nan if fs is None else float(fs)))
        self.register_buffer("train_b0_dir", torch.full((3,), nan))
        self.register_buffer("train_voxel_size", torch.full((3,), nan))
        self._warned: set[str] = set()
        self._image_logged_step = -1

    # -- hyper-parameters and checkpoints ------------------------------------------------------------
    def save_method_hyperparameters(self, init_args: Mapping[str, Any]) -> None:
        """Store the subclass's constructor arguments (``init_args``: its ``locals()``; names that are no
        constructor parameter are left out) and ``self.options`` as plain values.

        Dataclass arguments (``loss``) are stored as dicts, so checkpoints load with
        ``torch.load(weights_only=True)`` and ``hparams.yaml`` stays readable; the constructors accept both.
        A resolved ``self.loss_config`` replaces the (partial) ``loss`` argument.
        """
        params = {p for c in type(self).__mro__ if "__init__" in vars(c)
                  for p in inspect.signature(vars(c)["__init__"]).parameters} - {"self", "kwargs", "args"}
        hp = {k: v for k, v in init_args.items() if k in params}
        hp.update(dataclasses.asdict(self.options))
        if getattr(self, "loss_config", None) is not None:
            hp["loss"] = self.loss_config
        self.save_hyperparameters({k: plain(v) for k, v in hp.items()})
        self._hparams_initial = copy.deepcopy(self._hparams)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
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

    # -- normalisation statistics -------------------------------------------------------------------
    def set_statistics(self, field_scale: float, b0_dir=None, voxel_size=None) -> None:
        """Set the normalisation buffers (ppm; unit B0 in voxel axes or NaN; voxel size in mm or NaN)."""
        self.field_scale.fill_(float(field_scale))
        if b0_dir is not None:
            self.train_b0_dir.copy_(torch.as_tensor(np.asarray(b0_dir, dtype=np.float32)))
        if voxel_size is not None:
            self.train_voxel_size.copy_(torch.as_tensor(np.asarray(voxel_size, dtype=np.float32)))

    def training_rows(self) -> list | None:
        """The datamodule's training manifest rows (:class:`qsmlab.data.manifest.Row`), or None."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        rows = getattr(dm, "rows", {}).get("train") if dm is not None else None
        return list(rows) if rows else None

    def warn_once(self, key: str, message: str) -> None:
        """A warning given once per model and ``key``."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # -- evaluation plumbing ------------------------------------------------------------------------
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

    def owns_volume(self, batch_idx: int) -> bool:
        """Round-robin of evaluation volumes over DDP ranks (the loaders are not sharded)."""
        if self._trainer is None:
            return True
        world, rank = int(self.trainer.world_size), int(self.trainer.global_rank)
        return world == 1 or batch_idx % world == rank

    def log_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Log the finite values (NaN: no volume had what the value needs, e.g. no reference chi).

        Metric states are already summed over ranks (torchmetrics), so every rank holds the same values.
        """
        finite = {k: v.float() for k, v in values.items() if torch.isfinite(v)}
        if finite:
            self.log_dict(finite, sync_dist=False, prog_bar=False)

    def slice_images(self, batch, pred) -> tuple:
        """(image, prediction, reference or None, mask or None) of the batch's first volume, (X, Y, Z) numpy,
        for the logged slices (subclasses say which)."""
        raise NotImplementedError

    def log_slices(self, batch, pred) -> None:
        """Orthogonal slices of :meth:`slice_images` to the loggers, once per validation step."""
        if not self.options.log_images or self._trainer is None or self.trainer.sanity_checking:
            return
        if not self.loggers or self._image_logged_step == self.global_step:
            return
        self._image_logged_step = self.global_step
        key = batch.key[0] if batch.key else ""
        fig = slice_figure(*self.slice_images(batch, pred), title=f"{type(self).__name__} {key} step {self.global_step}")
        log_figure(self.loggers, fig, "val/slices", int(self.global_step))

    # -- Lightning steps on the subclass's evaluate_batch / log_epoch / predict_batch -----------------
    def validation_step(self, batch, batch_idx: int):
        pred = self.evaluate_batch("val", batch, batch_idx)
        if pred is not None and batch_idx == 0 and self.global_rank == 0:
            self.log_slices(batch, pred)

    def on_validation_epoch_end(self) -> None:
        self.log_epoch("val")

    def test_step(self, batch, batch_idx: int):
        self.evaluate_batch("test", batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.log_epoch("test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """``{"key": [...], "affine": [B, 4, 4], <outputs>: [B, C, X, Y, Z] (cpu)}`` for one volume batch."""
        pred = self.predict_batch(batch)
        return {"key": list(batch.key), "affine": batch.affine.cpu(),
                **{k: v.detach().float().cpu() for k, v in pred.items()}}

    # -- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.options
        opt = torch.optim.AdamW(self.parameters(), lr=float(o.lr), weight_decay=float(o.weight_decay),
                                eps=float(o.adam_eps))
        warm = int(o.warmup_steps)
        if o.scheduler == "none":
            sched = None
        elif o.scheduler == "cosine":
            total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
            total = int(total) if math.isfinite(total) and total > 0 else int(o.scheduler_step_size)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warm),
                                                               eta_min=float(o.min_lr))
        elif o.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(o.scheduler_step_size),
                                                    gamma=float(o.scheduler_gamma))
        else:
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=float(o.scheduler_gamma))
        if warm:  # the ramp holds lr once it ends, so alone it is warm-up then a constant rate
            ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / warm, end_factor=1.0,
                                                     total_iters=max(1, warm - 1))
            sched = ramp if sched is None else torch.optim.lr_scheduler.SequentialLR(opt, [ramp, sched],
                                                                                     milestones=[warm])
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
