"""NeXtQSM (Cognolato et al., Medical Image Analysis 2023): a background-field U-Net chained into a
variational network for the dipole inversion, trained end to end.

- :class:`BackgroundUNet`: total field + mask ``[B, 2, X, Y, Z]`` -> local field ``[B, 1, X, Y, Z]``.
- :class:`VariationalNet`: K unrolled steps (Hammernik et al., MRM 2018) of a projected gradient
  descent on the data term ``½‖M(Aχ − f)‖²`` with a learned regulariser::

      χ₀ = M f                 (init="field", the paper's)   or   χ₀ = M A†(M f)   (init="tkd")
      χ_{k+1} = M · ( χ_k − α_k · [ A(M(Aχ_k − f)) + R(χ_k, f, M) ] ),   α_k = softplus(a_k)

  ``A`` is the dipole operator (:class:`qsmlab.physics.DipoleOperator`; self-adjoint, so
  ``A(M(Aχ − f))`` is the gradient of the data term), ``M`` the brain mask, ``f`` the local field (ppm),
  ``R`` one CNN shared by all steps, ``a_k`` one learned scalar per step. The projection ``M ·`` keeps χ
  on the brain, where the local field's sources are (``local = A(χ·M)``). ``R``'s output layer starts at
  zero, so the untrained network is plain data-consistency descent from χ₀.

  ``init="tkd"`` (an addition of this project) starts from the thresholded k-space division of the local
  field, ``A†`` = :meth:`qsmlab.physics.DipoleOperator.A_dagger` (TKD, Shmueli et al. MRM 2009), instead
  of the field itself. The local field is not a susceptibility map: it is ~3x smaller than χ and blurred
  by the dipole, and K≈3-4 descent steps from it stay far from χ (measured on the 2 mm validation
  subject anat004: 90 % NRMSE after one step, 68 % after six, against TKD's 36.6 %), so the learned
  regulariser must spend its capacity undoing the init. From TKD the untrained network is already TKD
  plus K masked data-consistency steps (36.6 -> 36.0 % after three steps of 1.0 on anat004) and training
  only has to remove TKD's streaks and its underestimation at the cone. ``A†`` is linear and
  differentiable, so a background net upstream still trains end to end through it.
- :class:`NeXtQSMChain`: both, ``forward(inputs, mask, physics) -> {"local_field", "chi"}``.

Units: f, χ in ppm (or both divided by the same scale: the data term is linear, so a common
normalisation of field and χ leaves the steps consistent).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qsmlab.errors import QSMInputError
from qsmlab.models._blocks import check_choice, check_input, check_positive_int, inverse_softplus
from qsmlab.models.unet import UNet3d

INITS = ("field", "tkd")


class BackgroundUNet(UNet3d):
    """Background-field removal U-Net: ``[B, 2, X, Y, Z]`` (total field, mask) -> ``[B, 1, X, Y, Z]``
    (local field; the caller masks it). 3³ convolutions, BatchNorm, ReLU, nearest-neighbour up path;
    ``size_multiple = 2**depth``."""

    def __init__(self, in_channels: int = 2, out_channels: int = 1, width: int = 16, depth: int = 4,
                 kernel_size: int = 3, norm: str = "batch", upsample: str = "nearest"):
        super().__init__(in_channels=in_channels, out_channels=out_channels, width=width, depth=depth,
                         kernel_size=kernel_size, convs_per_level=2, norm=norm, activation="relu",
                         upsample=upsample, out_kernel_size=1)


class VariationalNet(nn.Module):
    """Unrolled variational network for the dipole inversion (see the module docstring).

    Args:
        steps: number of unrolled steps K.
        width, depth, convs_per_level: the shared regulariser U-Net (3 inputs: χ, f, mask; no
            normalisation, LeakyReLU, nearest up path); ``size_multiple = 2**depth``. It runs once per
            step, so its cost is paid ``steps`` times: the defaults (8 channels, one conv per level and
            path) keep four steps below one ``BackgroundUNet`` pass.
        init_step: initial step weight α_k for every step (> 0). The data term's Lipschitz constant is
            ``max D² = 4/9``, so plain descent is stable for α < 4.5.
        checkpointing: recompute each step in the backward pass (``torch.utils.checkpoint``) instead of
            storing its activations: memory of one step instead of K, for one more forward.
        init: ``"field"`` (χ₀ = M f, the paper's) or ``"tkd"`` (χ₀ = M A†(M f), see the module docstring).
        init_threshold: TKD threshold of ``init="tkd"`` (0 < t < 2/3; 0.19 as :func:`qsmlab.recon.inversion.tkd`).

    ``forward(local_field [B,1,X,Y,Z] ppm, mask [B,1,X,Y,Z], physics) -> chi [B,1,X,Y,Z] ppm``.
    """

    fixed_input_size = None

    def __init__(self, steps: int = 4, width: int = 8, depth: int = 2, init_step: float = 1.0,
                 checkpointing: bool = False, convs_per_level: int = 1, init: str = "field",
                 init_threshold: float = 0.19):
        super().__init__()
        self.steps = check_positive_int(steps, "steps")
        self.init = check_choice(init, INITS, "init")
        if not (0.0 < float(init_threshold) < 2.0 / 3.0):
            raise QSMInputError(f"init_threshold must be in (0, 2/3) (|D| is at most 2/3); got {init_threshold!r}")
        self.init_threshold = float(init_threshold)
        self.checkpointing = bool(checkpointing)
        self.regulariser = UNet3d(in_channels=3, out_channels=1, width=width, depth=depth, kernel_size=3,
                                  convs_per_level=convs_per_level, norm="none", activation="leaky_relu",
                                  negative_slope=0.01, upsample="nearest", out_kernel_size=1)
        nn.init.zeros_(self.regulariser.head.weight)
        nn.init.zeros_(self.regulariser.head.bias)
        self.step_params = nn.Parameter(torch.full((self.steps,), inverse_softplus(float(init_step))))
        self.size_multiple = self.regulariser.size_multiple

    @property
    def step_weights(self) -> torch.Tensor:
        """α_k = softplus(a_k), shape ``[steps]``."""
        return F.softplus(self.step_params)

    def _step(self, chi: torch.Tensor, field: torch.Tensor, mask: torch.Tensor, physics,
              alpha: torch.Tensor) -> torch.Tensor:
        grad = physics.A(mask * (physics.A(chi) - field))
        reg = self.regulariser(torch.cat([chi, field, mask], dim=1))
        return mask * (chi - alpha * (grad + reg))

    def initial(self, local_field: torch.Tensor, mask: torch.Tensor, physics) -> torch.Tensor:
        """χ₀ of the unrolled descent (same units as ``local_field``): ``M f`` or ``M A†(M f)``."""
        if self.init == "tkd":
            return physics.A_dagger(local_field * mask, self.init_threshold) * mask
        return local_field * mask

    def forward(self, local_field: torch.Tensor, mask: torch.Tensor, physics) -> torch.Tensor:
        check_input(self, local_field, 1, "local_field")
        if tuple(mask.shape) != tuple(local_field.shape):
            raise QSMInputError(f"VariationalNet: mask shape {tuple(mask.shape)} must equal the local "
                                f"field's {tuple(local_field.shape)}")
        mask = mask.to(local_field.dtype)
        chi = self.initial(local_field, mask, physics)
        alphas = self.step_weights
        use_ckpt = self.checkpointing and torch.is_grad_enabled()
        for k in range(self.steps):
            if use_ckpt:
                chi = checkpoint(self._step, chi, local_field, mask, physics, alphas[k], use_reentrant=False)
            else:
                chi = self._step(chi, local_field, mask, physics, alphas[k])
        return chi


class NeXtQSMChain(nn.Module):
    """NeXtQSM's network: :class:`BackgroundUNet` chained into :class:`VariationalNet`, trained end to end.

    Args:
        bg: keyword arguments of :class:`BackgroundUNet` (``None``: its defaults); ``in_channels`` counts
            the background inputs and the mask.
        varnet: keyword arguments of :class:`VariationalNet` (``None``: its defaults).
        residual: the background net adds a correction to its last input channel (a classical estimate of
            the local field, e.g. V-SHARP) instead of predicting the local field; its output layer starts
            at zero, so the untrained chain starts from that estimate.

    ``forward(inputs [B,C,X,Y,Z], mask [B,1,X,Y,Z], physics, true_local=None)`` ->
    ``{"local_field": M·(BackgroundUNet([inputs, M]) [+ inputs[:, -1]]), "chi": VariationalNet(local_field, M,
    physics)}``, plus ``"chi_local"``: the variational network on ``true_local`` when given (teacher forcing).
    """

    fixed_input_size = None

    def __init__(self, bg: dict | None = None, varnet: dict | None = None, residual: bool = False):
        super().__init__()
        self.background = BackgroundUNet(**(bg or {}))
        if self.background.out_channels != 1:
            raise QSMInputError("NeXtQSMChain: bg must keep out_channels=1 (the local field); got "
                                f"{self.background.out_channels}")
        self.varnet = VariationalNet(**(varnet or {}))
        self.residual = bool(residual)
        if self.residual:  # start as the classical estimate: the net adds a correction
            nn.init.zeros_(self.background.head.weight)
            nn.init.zeros_(self.background.head.bias)
        self.size_multiple = math.lcm(self.background.size_multiple, self.varnet.size_multiple)

    def local_field(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The background net's local field (masked), same units as the inputs' last channel when residual."""
        if tuple(mask.shape[-3:]) != tuple(inputs.shape[-3:]) or mask.shape[1] != 1:
            raise QSMInputError(f"NeXtQSMChain: mask shape {tuple(mask.shape)} must be [B, 1] + the inputs' grid "
                                f"{tuple(inputs.shape[-3:])}")
        mask = mask.to(inputs.dtype)
        local = self.background(torch.cat([inputs, mask], dim=1))
        if self.residual:
            local = local + inputs[:, -1:]
        return local * mask

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor, physics,
                true_local: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        local = self.local_field(inputs, mask)
        mask = mask.to(local.dtype)
        out = {"local_field": local, "chi": self.varnet(local, mask, physics)}
        if true_local is not None:
            out["chi_local"] = self.varnet(true_local, mask, physics)
        return out
