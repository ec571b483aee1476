"""Data consistency between a predicted chi and the measured field: linear, weighted, nonlinear; L1 or L2.

With ``r = D chi - f`` (ppm; ``D chi`` = ``physics.A(chi)``, ``f`` the target field), ``M`` the brain
mask and ``W`` a voxel weight, the three kinds are

    linear     (LDI):   sum_M |r|^p                                   / N_M      [ppm^p]
    weighted   (WLDI):  sum_M |W r|^p                                 / N_M      [ppm^p]
    nonlinear  (NDI):   sum_M |W (e^{i phi_s D chi} - e^{i phi_s f})|^p / N_M      [dimensionless]

with ``p = 1`` (``norm="l1"``) or ``p = 2`` (``norm="l2"``, the squared L2 norm) and ``N_M`` the number of
voxels in the mask of the whole batch (a mean over masked voxels: the value does not depend on the patch
or volume size). ``W`` is the batch's ``noise_weight`` when it has one, else the magnitude divided by its
maximum inside the mask of each sample and clamped to [0, 1] (per sample = per patch when training on
patches). ``phi_s`` is the sample's ``phase_scale`` in rad/ppm (``2 pi gamma_bar B0 TE``, i.e. an explicit
effective echo time; see :func:`qsmlab.physics.units.phase_scale`), never a hidden constant.

Sources: the nonlinear (complex-exponential) field model is MEDI's (Liu T et al., "Nonlinear formulation
of the magnetic field to source relationship for robust quantitative susceptibility mapping", MRM 2013)
and NDI's (Polak D et al., "Nonlinear dipole inversion (NDI) enables robust quantitative susceptibility
mapping (QSM)", NMR Biomed 2020); uQSM trains its network on it and ablates NDI, LDI + TV, WLDI + TV and
NDI + TV. The uQSM paper's text swaps the formulas of WLDI and NDI; this module implements what the names
mean: linear, weighted-linear and weighted-nonlinear. The ablation is therefore four configs and no code:
``kind="nonlinear"`` alone; ``kind="linear"`` + TV; ``kind="weighted"`` + TV; ``kind="nonlinear"`` + TV.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qsmlab.losses._common import (
    _get,
    check_norm,
    check_shapes,
    like,
    mask_of,
    masked_mean,
    penalty,
    select,
    target_tensor,
)
from qsmlab.physics.batch import physics_for_batch

KINDS = ("linear", "weighted", "nonlinear")


def magnitude_weight(batch, ref: torch.Tensor, mask: torch.Tensor, who: str = "magnitude_weight") -> torch.Tensor:
    """Voxel weight ``W`` in [0, 1]: the batch's ``noise_weight`` if present, else magnitude / max in mask.

    The magnitude is normalised per sample by its maximum inside that sample's mask, then clamped to
    [0, 1]; samples with no mask voxel get W = 0 (they contribute nothing anyway). Shape as ``ref``.
    """
    nw = _get(batch, "noise_weight")
    if nw is not None:
        w = like(nw, ref)
        if torch.any(w < 0) or not torch.all(torch.isfinite(w)):
            raise ValueError(f"{who}: the batch's noise_weight must be finite and >= 0")
        return w
    mag = _get(batch, "magnitude")
    if mag is None:
        raise ValueError(f"{who} needs the batch's 'magnitude' (or 'noise_weight') for its weight W; "
                         "use kind='linear' or weighted=False for a batch without one")
    mag = like(mag, ref)
    reduce = tuple(range(1, mag.ndim))
    peak = (mag * mask).amax(dim=reduce, keepdim=True)
    has_mask = mask.amax(dim=reduce, keepdim=True) > 0
    if torch.any(has_mask & (peak <= 0)):
        raise ValueError(f"{who}: the magnitude is <= 0 everywhere inside the mask of a sample; "
                         "W = magnitude / max(magnitude in mask) is undefined")
    return (mag / peak.clamp_min(torch.finfo(mag.dtype).tiny)).clamp(0.0, 1.0)


class DataConsistencyLoss(nn.Module):
    """``||W M (D chi - f)||`` family (see the module docstring for the formulas, units and sources).

    Args:
        kind: ``"linear"``, ``"weighted"`` or ``"nonlinear"``.
        norm: ``"l2"`` (mean of squares) or ``"l1"`` (mean of absolute values).
        output: entry of a dict prediction holding chi (ppm); a Tensor prediction is used directly.
        target: name of the field f (ppm), looked up first among the outputs of a dict prediction (e.g.
            NeXtQSM's predicted ``"local_field"``), then in the batch (default ``"field"``).
        phase_scale: rad/ppm for the nonlinear kind; overrides the batch's ``phase_scale``. Without it,
            a batch whose ``phase_scale`` is NaN (unknown TE/B0) raises ``ValueError``.
        weighted: apply ``W``; default True for ``"weighted"``/``"nonlinear"``, False for ``"linear"``
            (``kind="nonlinear", weighted=False`` is NDI without a magnitude prior).

    ``forward(pred, batch, physics)``: ``physics`` is the batch's ``DipoleOperator``; ``None`` builds it
    with :func:`physics_for_batch`. Returns a scalar tensor.
    """

    def __init__(self, kind: str = "nonlinear", norm: str = "l2", output: str = "chi", target: str = "field",
                 phase_scale: float | None = None, weighted: bool | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"DataConsistencyLoss: kind must be one of {KINDS}, got {kind!r}")
        if phase_scale is not None and not (math.isfinite(phase_scale) and phase_scale > 0):
            raise ValueError(f"DataConsistencyLoss: phase_scale must be a positive number of rad/ppm, "
                             f"got {phase_scale!r}")
        self.kind = kind
        self.norm = check_norm(norm, "DataConsistencyLoss")
        self.output = output
        self.target = target
        self.phase_scale = None if phase_scale is None else float(phase_scale)
        self.weighted = (kind != "linear") if weighted is None else bool(weighted)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, norm={self.norm!r}, output={self.output!r}, target={self.target!r}, "
                f"phase_scale={self.phase_scale}, weighted={self.weighted}")

    def _phase_scale(self, batch, ref: torch.Tensor) -> torch.Tensor:
        """phi_s as [B, 1, 1, 1, 1] (rad/ppm)."""
        if self.phase_scale is not None:
            return torch.tensor(self.phase_scale, dtype=ref.dtype, device=ref.device)
        ps = _get(batch, "phase_scale")
        ps = torch.full((ref.shape[0],), math.nan) if ps is None else torch.as_tensor(ps)
        ps = like(ps.reshape(-1), ref)
        if ps.numel() == 1:
            ps = ps.expand(ref.shape[0])
        bad = ~(torch.isfinite(ps) & (ps > 0))
        if torch.any(bad):
            idx = torch.nonzero(bad).flatten().tolist()
            raise ValueError(f"DataConsistencyLoss(kind='nonlinear'): the batch's phase_scale (rad/ppm) is "
                             f"unknown or not positive for sample(s) {idx}; give the manifest te and b0_tesla "
                             "or set phase_scale on the loss")
        return ps.reshape(-1, *([1] * (ref.ndim - 1)))

    def forward(self, pred, batch, physics=None) -> torch.Tensor:
        chi = select(pred, self.output, "DataConsistencyLoss")
        f = like(target_tensor(pred, batch, self.target, "DataConsistencyLoss"), chi)
        mask = mask_of(batch, chi)
        check_shapes("DataConsistencyLoss", chi=chi, **{self.target: f}, mask=mask)
        if physics is None:
            physics = physics_for_batch(batch)
        r = physics.A(chi) - f
        if self.kind == "nonlinear":
            phi = self._phase_scale(batch, chi)
            # |e^{ia} - e^{ib}| = 2 |sin((a - b) / 2)|: real arithmetic, exact, and periodic in a - b with
            # period 2 pi, so a wrap of phi_s * f by 2 pi k changes nothing (a complex difference in float32
            # would lose digits for large phases and costs two complex tensors).
            r = 2.0 * torch.sin(0.5 * phi * r)
        if self.weighted:
            r = r * magnitude_weight(batch, chi, mask, f"DataConsistencyLoss(kind={self.kind!r})")
        return masked_mean(penalty(r, self.norm), mask, mask.sum())
