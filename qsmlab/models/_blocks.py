"""Building blocks shared by the model files: conv-norm-activation, the input-shape contract.

Every model exposes ``size_multiple`` (spatial dims must be multiples of it: pooling halves them
``depth`` times) and ``fixed_input_size`` (``None`` for fully convolutional nets, the ``img_size`` of a
transformer with a learned position embedding). Models never pad: the method pads, crops or tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qsmlab.errors import QSMInputError

NORMS = ("batch", "instance", "none")
ACTIVATIONS = ("relu", "leaky_relu")


def check_choice(value: str, choices: Sequence[str], option: str) -> str:
    if value not in choices:
        raise QSMInputError(f"{option} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_positive_int(value, option: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise QSMInputError(f"{option} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def check_input(model: nn.Module, x: torch.Tensor, channels: int, name: str = "input") -> None:
    """Validate ``x`` against the model's contract: ``[B, channels, X, Y, Z]``, spatial dims multiples of
    ``model.size_multiple`` and equal to ``model.fixed_input_size`` when that is set.

    Raises :class:`~qsmlab.errors.QSMInputError` (a ``ValueError``) naming the shape and the multiple.
    """
    cls = type(model).__name__
    if x.ndim != 5 or x.shape[1] != channels:
        raise QSMInputError(f"{cls}: {name} must be [B, {channels}, X, Y, Z]; got shape {tuple(x.shape)}")
    spatial = tuple(int(s) for s in x.shape[2:])
    fixed = model.fixed_input_size
    if fixed is not None and spatial != tuple(fixed):
        raise QSMInputError(f"{cls}: {name} spatial shape {spatial} must equal the fixed input size "
                            f"{tuple(fixed)} (img_size); crop or tile the volume")
    m = model.size_multiple
    if any(s % m for s in spatial):
        padded = tuple(m * math.ceil(s / m) for s in spatial)
        raise QSMInputError(f"{cls}: {name} spatial shape {spatial} is not a multiple of size_multiple={m} "
                            f"on every axis; pad or crop it (e.g. to {padded})")


def make_norm(kind: str, channels: int) -> nn.Module | None:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return None


def norm_inplace(norm: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``norm(y)`` computed in place on ``y`` where that is exact (no autograd: callers check).

    Eval-mode BatchNorm with running statistics is ``y * s + t`` per channel; InstanceNorm without running
    statistics normalises each (sample, channel) by its own mean and biased variance, then applies the
    affine map. Anything else falls back to ``norm(y)``.
    """
    shape = (1, -1, 1, 1, 1)
    if isinstance(norm, nn.BatchNorm3d) and not norm.training and norm.track_running_stats:
        scale = torch.rsqrt(norm.running_var + norm.eps)
        shift = -norm.running_mean * scale
        if norm.affine:
            scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
        return y.mul_(scale.view(shape)).add_(shift.view(shape))
    if isinstance(norm, nn.InstanceNorm3d) and not norm.track_running_stats:
        var, mean = torch.var_mean(y, dim=(2, 3, 4), keepdim=True, correction=0)
        y.sub_(mean).mul_(torch.rsqrt(var + norm.eps))
        if norm.affine:
            y.mul_(norm.weight.view(shape)).add_(norm.bias.view(shape))
        return y
    return norm(y)


class ConvNormAct(nn.Module):
    """``act(norm(conv(x)))`` with a ``k³`` convolution, 'same' zero padding, stride 1.

    Without autograd (``torch.inference_mode`` / ``no_grad``) the normalisation is applied in place on the
    convolution output: an eval-mode BatchNorm is a per-channel affine map and InstanceNorm a per-(sample,
    channel) one, so the full-resolution activation is not duplicated.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm: str = "batch",
                 activation: str = "relu", negative_slope: float = 0.01):
        super().__init__()
        self.norm_kind = check_choice(norm, NORMS, "norm")
        self.activation = check_choice(activation, ACTIVATIONS, "activation")
        self.negative_slope = float(negative_slope)
        # A bias before a normalisation is cancelled by its mean subtraction.
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              bias=norm == "none")
        self.norm = make_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.conv(x))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """Normalisation and activation of a convolution output ``y`` (modified in place)."""
        if self.norm is not None:
            y = norm_inplace(self.norm, y) if not torch.is_grad_enabled() else self.norm(y)
        if self.activation == "relu":
            return F.relu(y, inplace=True)
        return F.leaky_relu(y, self.negative_slope, inplace=True)


def inverse_softplus(y: float) -> float:
    """``x`` with ``softplus(x) = log(1 + e^x) = y`` (y > 0)."""
    if y <= 0:
        raise QSMInputError(f"init_step must be > 0 (the step weight is softplus(parameter)); got {y}")
    return float(y + math.log(-math.expm1(-y)))
