"""The options every learned method shares (YAML ``model.init_args.*``), validated in one place.

:class:`MethodOptions` is a frozen dataclass: :class:`qsmlab.methods.QSMMethod` builds it from its keyword
arguments (a bad value is a one-line :class:`QSMInputError` naming ``model.<key>``) and every part of the
method reads ``self.options.<key>``; checkpoints written before an option existed get its default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qsmlab.errors import QSMInputError
from qsmlab.methods.inference.flips import TTA
from qsmlab.metrics import TORCH_METRICS

SCHEDULERS = ("cosine", "step", "exponential", "none")
PRIORS = ("none", "tkd")
VOXEL_RESAMPLING = ("auto", "never")
PATCH_FIELDS = ("data", "simulate")
PAD_MODES = ("constant", "replicate")
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


def plain(v: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists (recursively): checkpoint- and YAML-safe hyper-parameters."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {k: plain(x) for k, x in dataclasses.asdict(v).items()}
    if isinstance(v, Mapping):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [plain(x) for x in v]
    return v


def _one_of(key: str, value, choices) -> None:
    if value not in choices:
        raise QSMInputError(f"model.{key}: expected one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class MethodOptions:
    """Options common to every method.

    Attributes (common to every method; subclasses forward them with ``**kwargs``):
        lr: AdamW learning rate. weight_decay: AdamW weight decay.
        adam_eps: AdamW's epsilon (PyTorch's 1e-8 by default). Adam divides each gradient by
            ``sqrt(v) + eps``, ``v`` the running mean of its square; where ``sqrt(v)`` is far below ``eps`` the
            update is ``lr * m / eps``: momentum SGD at a rate that scales with the loss's units, not Adam.
            uQSM's losses are in ppm^2 (residuals of ~1e-3 ppm): at the end of the uqsm_tv quick profile
            the median ``sqrt(v)`` over its weights is 1.4e-9, 7x below 1e-8 (NeXtQSM 9e-8, PedQ-NET 6e-8;
            read from the checkpoints' optimiser states, session 26).
        scheduler: ``"cosine"``, ``"step"``, ``"exponential"`` or ``"none"``; ``scheduler_step_size``
            (optimiser steps) and ``scheduler_gamma`` for ``"step"``/``"exponential"``; ``min_lr`` for cosine.
        warmup_steps: optimiser steps of linear learning-rate warm-up (``lr * k / warmup_steps`` at step
            k = 1 .. warmup_steps) before the scheduler (whose cosine then spans the remaining steps); 0 = none
            (the default). Why it exists: Adam's first steps move every weight by about ``lr`` whatever its
            gradient, and a network started at its prior (``prior: tkd``, output layer at zero) is thrown far
            from it: the uqsm_tv cpu profile at lr 3e-3 was at 73.9 % NRMSE after 25 steps from TKD's 56.9 % on
            its own training head; with 50 warm-up steps 56.6 % (but 65.8 / 60.2 % at steps 50 / 75, once the
            rate had risen: warm-up does not make that network beat TKD;
            ``benchmarks/results/cpu_profiles/README.md``).
        field_scale: ppm; None computes it from the training data at the start of fitting.
        pad_factor: zero-padding factor of the dipole operator in the losses (2 = linear convolution).
        pad_mode: ``"constant"`` (zeros) or ``"replicate"`` padding of inputs to the size multiple.
        max_inference_voxels: above this many (padded) voxels, inference uses sliding windows of
            ``sw_roi_size`` voxels per axis with ``sw_overlap`` and Gaussian blending (memory bound).
        metrics: names from :data:`qsmlab.metrics.METRIC_INFO` logged as ``val/<name>``/``test/<name>``.
        log_images: log orthogonal slices of the first validation volume once per validation.
        channels_last: run the network in ``channels_last_3d`` memory format: on CPU it selects oneDNN's
            convolutions (measured 1.6-2x faster training steps on 32^3 patches, 2 threads).
        patch_margin: voxels at each patch face left out of the training loss (see :meth:`QSMMethod.loss_batch`).
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
        tta: test-time augmentation of one-scan predictions (``qsmlab predict --ckpt``, the pipeline's ``ckpt:``
            steps, :func:`qsmlab.methods.predict.predict_volume`; not the Lightning validation / test / predict
            loops, which score every checkpoint the same way): ``"none"`` or
            ``"flips"``, the mean over the axis flips that leave the dipole kernel unchanged (eight for B0 along a
            voxel axis; :mod:`qsmlab.methods.inference.flips`), as nnU-Net predicts with mirroring. Costs one
            pass per flip.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    scheduler: str = "cosine"
    scheduler_step_size: int = 1000
    scheduler_gamma: float = 0.5
    min_lr: float = 0.0
    warmup_steps: int = 0
    field_scale: float | None = None
    pad_factor: float = 2.0
    pad_mode: str = "constant"
    max_inference_voxels: int = 192**3
    sw_roi_size: int = 128
    sw_overlap: float = 0.25
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    log_images: bool = True
    channels_last: bool = True
    patch_margin: int = 0
    prior: str = "none"
    prior_threshold: float = 0.19
    patch_fields: str = "data"
    patch_field_noise: float = 0.0
    voxel_resampling: str = "auto"
    tta: str = "none"

    def __post_init__(self):
        _one_of("scheduler", self.scheduler, SCHEDULERS)
        lr, wd, min_lr = self.lr, self.weight_decay, self.min_lr
        step, gamma = self.scheduler_step_size, self.scheduler_gamma
        if not (lr > 0 and wd >= 0 and min_lr >= 0 and step >= 1 and gamma > 0):
            raise QSMInputError(f"model: lr ({lr}) > 0, weight_decay ({wd}) >= 0, min_lr ({min_lr}) >= 0, "
                                f"scheduler_step_size ({step}) >= 1 and scheduler_gamma ({gamma}) > 0 are required")
        eps = self.adam_eps
        if isinstance(eps, bool) or not (isinstance(eps, int | float) and math.isfinite(eps) and 0 < eps < 1):
            raise QSMInputError(f"model.adam_eps: expected a number 0 < eps < 1, got {eps!r}")
        warm = self.warmup_steps
        if isinstance(warm, bool) or not (isinstance(warm, int) and warm >= 0):
            raise QSMInputError(f"model.warmup_steps: expected an integer >= 0, got {warm!r}")
        if int(self.patch_margin) < 0:
            raise QSMInputError(f"model.patch_margin: expected an integer >= 0, got {self.patch_margin!r}")
        _one_of("prior", self.prior, PRIORS)
        if not (0.0 < float(self.prior_threshold) < 2.0 / 3.0):
            raise QSMInputError(f"model.prior_threshold: expected 0 < threshold < 2/3, got {self.prior_threshold!r}")
        _one_of("patch_fields", self.patch_fields, PATCH_FIELDS)
        if not float(self.patch_field_noise) >= 0:
            raise QSMInputError(f"model.patch_field_noise: expected a number of ppm >= 0, got "
                                f"{self.patch_field_noise!r}")
        _one_of("voxel_resampling", self.voxel_resampling, VOXEL_RESAMPLING)
        _one_of("tta", self.tta, TTA)
        _one_of("pad_mode", self.pad_mode, PAD_MODES)
        fs = self.field_scale
        if fs is not None and not (math.isfinite(fs) and fs > 0):
            raise QSMInputError(f"model.field_scale: expected a positive number of ppm, got {fs!r}")
        metrics = list(self.metrics) if self.metrics is not None else list(DEFAULT_METRICS)
        unknown = [m for m in metrics if m not in TORCH_METRICS]
        if unknown:
            raise QSMInputError(f"model.metrics: unknown metric(s) {unknown}; choose from {sorted(TORCH_METRICS)}")
        # normalised types (frozen: through object.__setattr__)
        for key, value in (("metrics", metrics), ("patch_margin", int(self.patch_margin)),
                           ("prior_threshold", float(self.prior_threshold)),
                           ("patch_field_noise", float(self.patch_field_noise))):
            object.__setattr__(self, key, value)

    @property
    def prior_channels(self) -> int:
        """Input channels the prior adds (0 or 1)."""
        return 0 if self.prior == "none" else 1
