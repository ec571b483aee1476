"""uQSM-DIP: uQSM's network and loss fitted to one volume from random initialisation (deep image prior).

No training set: the network's weights are the unknowns of one reconstruction, optimised on the test
volume itself with the uQSM loss (``lambda_dc * DC + lambda_tv * TV``, see :mod:`qsmlab.methods.uqsm`); the
convolutional architecture is the prior (Ulyanov, Vedaldi, Lempitsky, "Deep image prior", CVPR 2018).
The fit stops after ``iterations`` optimiser steps (200 in the uQSM paper), or earlier at a
data-consistency criterion:

- ``tol``: the data-consistency term changed by less than ``tol`` (relative) over the last 10 iterations;
- ``noise_level`` (ppm): the discrepancy principle, the masked RMS of the linear residual ``D chi - f``
  is at or below the field's noise level (fitting further would fit noise).

Batch normalisation uses the statistics of the volume itself, during the fit and when the result is
computed (there is only one volume; running averages would lag behind the last weights).

Two ways to run it: :meth:`UQSMDIP.fit_volume` (numpy in, numpy out, plain PyTorch, ``qsmlab dip``), or
Lightning (``experiments/uqsm_dip.yaml``: a one-volume datamodule whose patch is the whole volume;
``training_step`` is uQSM's, the stopping rules are checked after every step), so it can be swept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from qsmlab.errors import QSMInputError
from qsmlab.methods.statistics import field_scale_of
from qsmlab.methods.uqsm import UQSM, UQSMLoss
from qsmlab.physics import physics_for_batch

TOL_WINDOW = 10


class UQSMDIP(UQSM):
    """uQSM in deep-image-prior mode (see the module docstring).

    Args:
        depth, width, upsample, norm, loss: as :class:`qsmlab.methods.UQSM`.
        iterations: optimiser steps per volume (200, the paper).
        tol: relative change of the data-consistency term over 10 steps that stops the fit (0: off).
        noise_level: field noise standard deviation (ppm) for the discrepancy-principle stop (None: off).
        seed: seed of the random initialisation of each fit.
        prior: ``"tkd"`` (a common :class:`qsmlab.methods.base.QSMMethod` argument): TKD of the field is an input
            channel and is added to the output, whose layer starts at zero, so each fit starts at TKD and the
            loss moves it from there; ``"none"`` (the paper) starts from the random network's output.
        scheduler: ``"none"`` by default (a DIP fit has no epochs to anneal over).
        **kwargs: common :class:`qsmlab.methods.base.QSMMethod` arguments (lr, weight_decay, ...).
    """

    name = "uqsm_dip"

    def __init__(self, depth: int = 4, width: int = 16, upsample: str = "nearest", norm: str = "batch",
                 loss: UQSMLoss | None = None, iterations: int = 200, tol: float = 0.0,
                 noise_level: float | None = None, seed: int = 0, scheduler: str = "none", **kwargs):
        if int(iterations) < 1:
            raise QSMInputError(f"model.iterations: expected a positive integer, got {iterations!r}")
        if not tol >= 0 or (noise_level is not None and not noise_level > 0):
            raise QSMInputError(f"model.tol ({tol}) must be >= 0 and model.noise_level ({noise_level}) > 0 ppm")
        super().__init__(depth=depth, width=width, upsample=upsample, norm=norm, loss=loss, scheduler=scheduler,
                         **kwargs)
        self.iterations, self.tol, self.noise_level, self.seed = int(iterations), float(tol), noise_level, int(seed)
        self._dc_history: list[float] = []
        self.last_fit: dict = {}

    # BN on the volume's own statistics, also outside training mode.
    def run_network(self, x: torch.Tensor, ctx) -> dict[str, torch.Tensor]:
        if self.net.training:
            return super().run_network(x, ctx)
        bns = [m for m in self.net.modules() if isinstance(m, _BatchNorm)]
        for m in bns:
            m.train()
        try:
            return super().run_network(x, ctx)
        finally:
            for m in bns:
                m.eval()

    def reset_network(self, seed: int | None = None) -> None:
        """Fresh random weights (reproducible from ``seed``; the global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed if seed is None else int(seed))
            for m in self.net.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.prepare_network(self.net)  # with a prior: the output layer back at zero, so the fit starts at it

    def _should_stop(self, dc_history: Sequence[float], residual_rms: float | None) -> str | None:
        if self.noise_level is not None and residual_rms is not None and residual_rms <= self.noise_level:
            return "noise_level"
        if self.tol > 0 and len(dc_history) > TOL_WINDOW:
            old, new = dc_history[-1 - TOL_WINDOW], dc_history[-1]
            if abs(new - old) <= self.tol * abs(old):
                return "tol"
        return None

    def fit_volume(self, field: np.ndarray, mask: np.ndarray, magnitude: np.ndarray | None = None,
                   voxel_size: Sequence[float] = (1.0, 1.0, 1.0), b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
                   phase_scale: float | None = None, iterations: int | None = None,
                   progress: bool = False, callback: Callable[[int, float, float], None] | None = None,
                   snapshots: Sequence[int] = ()) -> np.ndarray:
        """Fit the network to one volume and return chi (ppm, (X, Y, Z), zero outside the mask).

        Args:
            field: local field (ppm), (X, Y, Z). mask: brain mask, same shape.
            magnitude: for the weight W of the weighted/nonlinear terms; None gives W = 1 in the mask.
            voxel_size: mm. b0_dir: unit B0 in voxel axes (any direction: it enters through the operator).
            phase_scale: rad/ppm for ``loss.dc="nonlinear"`` (``2 pi gamma_bar B0 TE``), unless the loss has one.
            iterations: overrides ``self.iterations``.
            progress: a tqdm bar. callback: ``callback(iteration, loss, residual_rms_ppm)`` after each step.
            snapshots: iteration counts after which chi is also kept (the fit's learning curve, one extra
                forward pass each): ``self.last_fit["snapshots"]`` maps each count reached to its chi (numpy).

        The network is re-initialised (``seed``) first; ``self.last_fit`` records the iterations run, why
        the fit stopped, and the final data consistency.
        """
        field = np.asarray(field, dtype=np.float32)
        m = np.asarray(mask) > 0.5
        if field.ndim != 3 or m.shape != field.shape:
            raise QSMInputError(f"fit_volume: field {field.shape} and mask {m.shape} must be one (X, Y, Z) grid")
        if not m.any() or not np.all(np.isfinite(field)):
            raise QSMInputError("fit_volume: the mask is empty or the field has NaN/Inf")
        if magnitude is None:
            mag = m.astype(np.float32)  # W = 1 inside the mask
        else:
            mag = np.asarray(magnitude, dtype=np.float32)
            if mag.shape != field.shape:
                raise QSMInputError(f"fit_volume: magnitude {mag.shape} does not match the field {field.shape}")
        ps = phase_scale if phase_scale is not None else self.loss_config.phase_scale
        if self.loss_config.dc == "nonlinear" and ps is None:
            raise QSMInputError("uQSM-DIP with dc='nonlinear' needs phase_scale (rad/ppm = 2 pi * 42.58 MHz/T * B0 "
                                "* TE): give --phase-scale, or the field's sidecar EchoTime and "
                                "MagneticFieldStrength, or use dc='weighted'")
        n = int(iterations or self.iterations)
        self.set_statistics(field_scale_of([field], [m]), b0_dir, voxel_size)
        self.reset_network()
        dev = self.device
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(dev)  # noqa: E731
        batch = {
            "field": as_t(field), "mask": as_t(m), "magnitude": as_t(mag),
            "b0_dir": torch.tensor([list(map(float, b0_dir))], dtype=torch.float32),
            "voxel_size": torch.tensor([list(map(float, voxel_size))], dtype=torch.float32),
            "phase_scale": torch.tensor([math.nan if ps is None else float(ps)], dtype=torch.float32),
        }
        images = {"field": batch["field"], "mask": batch["mask"]}
        physics = physics_for_batch(batch, pad_factor=self.options.pad_factor)
        msk = batch["mask"]
        n_mask = float(msk.sum())
        opt = torch.optim.AdamW(self.net.parameters(), lr=float(self.options.lr),
                                weight_decay=float(self.options.weight_decay))
        self.net.train()
        history: list[float] = []
        keep, kept = {int(k) for k in snapshots}, {}
        reason, rms, it = "iterations", float("nan"), 0
        bar = tqdm(range(n), desc="uQSM-DIP", unit="it", disable=not progress)
        for it in bar:
            opt.zero_grad(set_to_none=True)
            # the loss sees what uQSM's training step sees (loss.support: masked, or free outside the mask);
            # the result below is masked either way
            pred = self.training_outputs(self.infer_images(images, outputs=tuple(self.outputs), windows=False), msk)
            total, parts = self.loss_fn(pred, batch, physics)
            total.backward()
            opt.step()
            with torch.no_grad():
                r = (physics.A(pred["chi"].detach() * msk) - batch["field"]) * msk
                rms = float(torch.sqrt((r * r).sum() / n_mask))
            history.append(float(parts["loss_dc"].detach()))
            if it + 1 in keep:
                with torch.no_grad():
                    snap = self.mask_outputs(self.infer_images(images, outputs=tuple(self.outputs), windows=False),
                                             msk)["chi"]
                kept[it + 1] = snap[0, 0].float().cpu().numpy() * m
            if callback is not None:
                callback(it, float(total.detach()), rms)
            bar.set_postfix(loss=f"{float(total.detach()):.3g}", rms_ppm=f"{rms:.2g}", refresh=False)
            stop = self._should_stop(history, rms)
            if stop:
                reason = stop
                break
        bar.close()
        with torch.no_grad():
            chi = self.mask_outputs(self.infer_images(images, outputs=tuple(self.outputs), windows=False), msk)["chi"]
        self.last_fit = {"iterations": it + 1, "stopped_by": reason, "loss_dc": history[-1],
                         "residual_rms_ppm": rms, "field_scale_ppm": self.scale, "snapshots": kept}
        return chi[0, 0].float().cpu().numpy() * m

    # -- Lightning path: stop rules after each step ---------------------------------------------------
    def on_train_start(self) -> None:
        self._dc_history = []

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        parts = self.last_loss_parts
        if "loss_dc" in parts:
            self._dc_history.append(parts["loss_dc"])
        reason = None
        if self.global_step >= self.iterations:
            reason = "iterations"
        elif self.noise_level is not None:
            with torch.no_grad():
                chi = self.mask_outputs(self.infer_images(self.batch_images(batch), windows=False), batch.mask)["chi"]
                physics = physics_for_batch(batch, pad_factor=self.options.pad_factor)
                r = (physics.A(chi) - batch.field) * (batch.mask > 0.5)
                rms = float(torch.sqrt((r * r).sum() / (batch.mask > 0.5).sum().clamp_min(1)))
            reason = self._should_stop(self._dc_history, rms)
        else:
            reason = self._should_stop(self._dc_history, None)
        if reason:
            self.last_fit = {"iterations": int(self.global_step), "stopped_by": reason}
            self.trainer.should_stop = True
