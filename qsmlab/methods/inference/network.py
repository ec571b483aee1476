"""A network on a whole volume, in plain torch: input normalisation, the TKD prior, padding, sliding windows.

Nothing here is Lightning or reads a method's hyper-parameters: every setting is an argument, so the
Lightning base (:class:`qsmlab.methods.QSMMethod`), the brain-masking net, ``qsmlab predict`` and ``qsmlab
dip`` share one implementation, and a cached model can serve several calls with different settings.

- :class:`Context`: what a network run is for (geometry rows, the images used, the outputs wanted, the
  batch's dipole operator when one is already built); passed to a method's hooks instead of state on
  the method.
- :func:`normalise_inputs`: the network's input channels (fields / field_scale, masks 0/1, magnitudes
  / their 99th percentile, :func:`normalise_magnitude`).
- :func:`tkd_prior`: the thresholded k-space division of the masked local field (ppm).
- :func:`run_on_volume` (:func:`run_padded`, :func:`needs_windows`, :func:`window_roi`,
  :func:`sliding_windows`): a network on a volume of any size (padded to its multiple and cropped back,
  or Gaussian-blended windows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference

from qsmlab.errors import QSMInputError
from qsmlab.methods.inference.frame import crop, pad_to_multiple
from qsmlab.physics import DipoleOperator, physics_for_batch

Outputs = dict[str, torch.Tensor]
FIELD_INPUTS = ("field", "total_field")
"""Inputs in ppm, divided by the method's ``field_scale`` (NeXtQSM's total field by its own scale)."""


@dataclass(frozen=True)
class Context:
    """What one network run is for: passed to a method's hooks, so a method keeps no per-call state.

    Attributes:
        voxel_size: [B or 1, 3] mm of the volumes the network sees (one shared row, or one per sample).
        b0_dir: [B or 1, 3] unit B0 directions in voxel axes.
        inputs: names of the images in use (``QSMMethod.inputs_for``).
        outputs: the named outputs wanted; None = all the method gives (training and evaluation).
        training: True in a training step (teacher forcing, patch-only devices).
        physics: the method's dipole operator for these rows (``pad_factor`` of the method), when the
            caller has built it already (a training step builds it once for the prior and the loss).
    """

    voxel_size: torch.Tensor
    b0_dir: torch.Tensor
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] | None = None
    training: bool = False
    physics: DipoleOperator | None = None

    @classmethod
    def of(cls, voxel_size, b0_dir, **kw) -> Context:
        """From 3-vectors or [B, 3] rows (numpy, lists or tensors)."""
        def rows(v):
            return torch.as_tensor(v.detach().cpu() if isinstance(v, torch.Tensor) else v,
                                   dtype=torch.float64).reshape(-1, 3)
        return cls(rows(voxel_size), rows(b0_dir), **kw)

    def wants(self, name: str) -> bool:
        return self.outputs is None or name in self.outputs

    def operator(self, pad_factor: float) -> DipoleOperator:
        """The dipole operator of these rows with ``pad_factor`` (the one given, when it has that padding)."""
        if self.physics is not None and float(self.physics.pad_factor) == float(pad_factor):
            return self.physics
        return physics_for_batch({"voxel_size": self.voxel_size, "b0_dir": self.b0_dir}, pad_factor=pad_factor)


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


def normalise_inputs(images: Mapping[str, torch.Tensor], names: Sequence[str], field_scale: float,
                     who: str = "the method") -> torch.Tensor:
    """Network input channels [B, len(names), X, Y, Z] from images [B, 1, X, Y, Z], in ``names``' order.

    ``field``/``total_field`` enter as ``field / field_scale`` (ppm / ppm) inside the mask, ``mask``/``seg`` as
    0/1, ``magnitude`` over its 99th percentile in the mask; anything else as it is. A missing image is a
    one-line error naming it and the option that gives it.
    """
    mask = images.get("mask")
    chans = []
    for name in names:
        t = images.get(name)
        if t is None:
            raise QSMInputError(f"{who} needs the input {name!r} (its network takes {list(names)}); give it "
                                f"(e.g. --{name.replace('_', '-')})")
        t = t.float()
        if name in FIELD_INPUTS:
            t = t / field_scale * (mask > 0.5) if mask is not None else t / field_scale
        elif name in ("mask", "seg"):
            t = (t > 0.5).float()
        elif name == "magnitude":
            t = normalise_magnitude(t, mask)
        chans.append(t)
    return torch.cat(chans, dim=1)


@torch.no_grad()
def tkd_prior(field: torch.Tensor, mask: torch.Tensor, physics: DipoleOperator, threshold: float) -> torch.Tensor:
    """``M A^dagger(M f)``: TKD (Shmueli et al., MRM 2009) of the local field ``f`` [B, 1, X, Y, Z] (ppm) -> ppm."""
    m = (mask > 0.5).float()
    return physics.A_dagger(field.float() * m, float(threshold)) * m


def run_padded(predictor: Callable[[torch.Tensor], Outputs], x: torch.Tensor, multiple: int,
               pad_mode: str = "constant") -> Outputs:
    """``predictor`` on ``x`` padded to ``multiple`` (centred), its outputs cropped back to ``x``'s grid."""
    xp, pads = pad_to_multiple(x, multiple, pad_mode)
    return {k: crop(v, pads) for k, v in predictor(xp).items()}


def needs_windows(shape: Sequence[int], multiple: int, fixed_input_size: Sequence[int] | None,
                  max_voxels: int) -> bool:
    """Sliding windows for a network of fixed input size (another shape), or above ``max_voxels`` padded."""
    if fixed_input_size is not None:
        return tuple(int(n) for n in shape) != tuple(int(n) for n in fixed_input_size)
    return math.prod(-(-int(n) // multiple) * multiple for n in shape) > int(max_voxels)


def window_roi(shape: Sequence[int], multiple: int, fixed_input_size: Sequence[int] | None,
               roi_edge: int) -> tuple[int, int, int]:
    """Window size: the fixed input size, else ``roi_edge`` rounded to the multiple (not beyond the volume)."""
    if fixed_input_size is not None:
        return tuple(int(n) for n in fixed_input_size)
    edge = max(multiple, int(roi_edge) // multiple * multiple)
    return tuple(min(edge, -(-int(n) // multiple) * multiple) for n in shape)


def sliding_windows(predictor: Callable[[torch.Tensor], Outputs | torch.Tensor], x: torch.Tensor,
                    roi: Sequence[int], overlap: float, batch_size: int = 1, name: str = "out") -> Outputs:
    """MONAI ``sliding_window_inference`` with Gaussian blending; a tensor result comes back as ``{name: ...}``.

    ``batch_size`` windows per forward pass (> 1 lets PyTorch use oneDNN convolutions on CPU for
    networks with few channels).
    """
    out = sliding_window_inference(x, tuple(roi), sw_batch_size=int(batch_size), predictor=predictor,
                                   overlap=float(overlap), mode="gaussian")
    return dict(out) if isinstance(out, Mapping) else {name: out}


def run_on_volume(run: Callable[[torch.Tensor], Outputs], x: torch.Tensor, multiple: int,
                  fixed_input_size: Sequence[int] | None = None, pad_mode: str = "constant",
                  max_voxels: int = 192**3, roi_edge: int = 128, overlap: float = 0.25, windows: bool = True,
                  batch_size: int = 1, name: str = "out") -> Outputs:
    """``run`` (a network on inputs whose size fits it) on ``x`` [B, C, X, Y, Z] of any size: padded to
    ``multiple`` and cropped back, or, with ``windows`` when :func:`needs_windows`, Gaussian-blended windows
    (:func:`window_roi` of ``roi_edge``, ``batch_size`` per pass) each padded the same way."""
    def padded(t):
        return run_padded(run, t, multiple, pad_mode)
    if windows and needs_windows(x.shape[-3:], multiple, fixed_input_size, max_voxels):
        roi = window_roi(x.shape[-3:], multiple, fixed_input_size, roi_edge)
        return sliding_windows(padded, x, roi, overlap, batch_size, name)
    return padded(x)


__all__ = ["FIELD_INPUTS", "Context", "needs_windows", "normalise_inputs", "normalise_magnitude", "run_on_volume", "run_padded", "sliding_windows", "tkd_prior",
           "window_roi"]
