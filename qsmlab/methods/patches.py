"""Training patches as the losses should see them (dataclass batches, ``[B, 1, X, Y, Z]`` tensors).

- :func:`simulate_patch_fields`: the local field of the patch's own chi, ``A(chi * M) * M`` (+ noise). A
  cropped field is partly caused by chi outside the patch, which no network can see; a simulated one is
  explained by what is in the patch (as QSMnet built its training pairs by dipole convolution of COSMOS
  patches), so input, prior, label and physics losses agree.
- :func:`interior`: the mask restricted to ``margin`` voxels inside the patch: chi in the border shell is
  free to stand in for the sources outside the patch, and the loss holds where the field is explained.
"""

from __future__ import annotations

import dataclasses

import torch

from qsmlab.errors import QSMInputError


@torch.no_grad()
def simulate_patch_fields(batch, physics, noise_ppm: float = 0.0):
    """``batch`` with ``field = A(chi * M) * M`` (ppm) under ``physics`` (its operator), plus Gaussian noise of
    a standard deviation drawn uniformly in [0, ``noise_ppm``] per sample."""
    m = (batch.mask > 0.5).to(batch.chi.dtype)
    field = physics.A(batch.chi * m)
    if noise_ppm > 0:
        std = torch.rand((field.shape[0],) + (1,) * (field.ndim - 1), device=field.device) * noise_ppm
        field = field + std.to(field.dtype) * torch.randn_like(field)
    return dataclasses.replace(batch, field=(field * m).to(batch.field.dtype))


def interior(batch, margin: int):
    """``batch`` with its mask zero within ``margin`` voxels of each patch face (``margin`` 0: as is)."""
    if margin <= 0:
        return batch
    X, Y, Z = batch.mask.shape[-3:]
    if min(X, Y, Z) <= 2 * margin:
        raise QSMInputError(f"model.patch_margin={margin}: patches of {(X, Y, Z)} voxels leave no interior")
    inner = torch.zeros_like(batch.mask)
    inner[..., margin:X - margin, margin:Y - margin, margin:Z - margin] = 1
    return dataclasses.replace(batch, mask=batch.mask * inner)
