"""Training patches as the losses should see them (dataclass batches, ``[B, 1, X, Y, Z]`` tensors).

- :func:`simulate_patch_fields`: the local field of the patch's own chi, ``A(chi * M) * M`` (+ noise). A
  cropped field is partly caused by chi outside the patch, which no network can see; a simulated one is
  explained by what is in the patch (as QSMnet built its training pairs by dipole convolution of COSMOS
  patches), so input, prior, label and physics losses agree.
- :func:`interior`: the mask restricted to ``margin`` voxels inside the patch: chi in the border shell is
  free to stand in for the sources outside the patch, and the loss holds where the field is explained.
- :func:`label_windows` / :func:`crop_windows`: random fixed-size windows of a patch, half of them centred
  on a labelled voxel (nnU-Net's foreground oversampling), for a network of fixed input size (PedQ-NET's
  UNETR) trained on a few windows of a larger patch instead of all its sliding windows.
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


def label_windows(labels: torch.Tensor, mask: torch.Tensor, size, n: int,
                  generator: torch.Generator | None = None) -> list[list[tuple[int, int, int]]]:
    """Corners of ``n`` random windows of ``size`` per sample of ``labels`` / ``mask`` [B, 1, X, Y, Z]: the first
    ``ceil(n / 2)`` centred on a random voxel with ``labels > 0`` (where the sample has one), the others on a random
    voxel of the mask (anywhere where it is empty); shifted to lie inside the patch, whose every side must be at
    least the window's."""
    size = tuple(int(s) for s in size)
    shape = tuple(int(s) for s in labels.shape[-3:])
    if any(a < w for a, w in zip(shape, size)):
        raise QSMInputError(f"windows of {size} voxels do not fit patches of {shape}")
    n_fg = -(-int(n) // 2)
    corners = []
    for b in range(labels.shape[0]):
        fg, inside = torch.nonzero(labels[b, 0] > 0), torch.nonzero(mask[b, 0] > 0.5)  # once per sample
        picks = []
        for i in range(int(n)):
            idx = fg if (i < n_fg and len(fg)) else inside
            if len(idx) == 0:
                centre = [int(torch.randint(a, (1,), generator=generator)) for a in shape]
            else:
                centre = idx[int(torch.randint(len(idx), (1,), generator=generator))].tolist()
            picks.append(tuple(min(max(c - w // 2, 0), a - w) for c, w, a in zip(centre, size, shape)))
        corners.append(picks)
    return corners


def crop_windows(t: torch.Tensor, corners: list[list[tuple[int, int, int]]], size) -> torch.Tensor:
    """The windows of ``t`` [B, C, X, Y, Z] at ``corners`` (:func:`label_windows`), stacked [B * n, C, *size]
    (sample-major)."""
    sx, sy, sz = (int(s) for s in size)
    return torch.cat([t[b:b + 1, :, x:x + sx, y:y + sy, z:z + sz]
                      for b, picks in enumerate(corners) for (x, y, z) in picks])
