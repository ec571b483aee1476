"""Parameter-free background-removal inputs of NeXtQSM's background net, in torch (on the input's device).

- :func:`harmonic_residual`: SHARP's first step, ``M_r (t - S_r * (M t))``, background-free where the
  ball ``S_r`` fits inside the mask (mean value property of harmonic fields);
- :func:`vsharp_estimate`: V-SHARP with the one-shot TSVD deconvolution, the same algorithm and the same
  numbers as :func:`qsmlab.recon.background.sharp.vsharp` (``solver="tsvd"``) to float32 round-off.

Why not call the recon functions: they are float64 numpy on the CPU, built for one careful
reconstruction. Here they run on every training batch and inside ``qsmlab predict``: the numpy V-SHARP
took 11 s of the NeXtQSM quick profile's 18.6 s inference at 160^3 (2 threads; 5 s after its erosions
shared one distance transform), and on a GPU it would copy every volume to the host. This version keeps
the recon's building blocks (the discrete ball of :func:`qsmlab.recon.background.spherical.sphere_offsets`,
its padded FFT grid, the erosion by one distance transform) and does the filtering with ``torch.fft``
in float32, one ball spectrum at a time (no cache of twelve padded spectra: at 256^3 those are 1 GB).
The erosion stays a scipy distance transform of the (small, boolean) mask on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qsmlab.recon.background.spherical import boundary_distance, eroded, padded_grid, sphere_offsets

#: V-SHARP's default radii (mm), as :func:`qsmlab.recon.background.sharp.vsharp`.
VSHARP_RADII_MM = (12.0, 11.0, 10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0)


def smv_kernel(radius_mm: float, voxel_size) -> torch.Tensor:
    """Normalised ball of ``radius_mm`` on a grid of ``voxel_size`` (mm), [1, 1, a, b, c], sum 1."""
    ball = sphere_offsets(tuple(float(v) for v in voxel_size), float(radius_mm)).astype(np.float32)
    return torch.from_numpy(ball / ball.sum())[None, None]


def ball_spectrum(grid: Sequence[int], voxel_size, radius_mm: float, device=None) -> torch.Tensor:
    """Real half spectrum (float32, ``grid[:2] + (grid[2] // 2 + 1,)``) of the normalised ball centred on
    voxel 0 of the periodic ``grid`` (negative offsets wrap), as the recon's ``_smv_spectrum``."""
    ball = sphere_offsets(tuple(float(v) for v in voxel_size), float(radius_mm))
    w = [(s - 1) // 2 for s in ball.shape]
    idx = np.nonzero(ball)
    k = torch.zeros(tuple(int(g) for g in grid), dtype=torch.float32, device=device)
    pos = [torch.as_tensor((idx[i] - w[i]) % int(grid[i]), device=device) for i in range(3)]
    k[pos[0], pos[1], pos[2]] = 1.0 / len(idx[0])
    return torch.fft.rfftn(k).real  # real up to round-off: the kernel is even


def _rfft(x: torch.Tensor, grid) -> torch.Tensor:
    return torch.fft.rfftn(x, s=tuple(grid), dim=(-3, -2, -1))


def _irfft(spec: torch.Tensor, grid, shape) -> torch.Tensor:
    out = torch.fft.irfftn(spec, s=tuple(grid), dim=(-3, -2, -1))
    return out[..., : shape[0], : shape[1], : shape[2]]


def _voxel_rows(voxel_size, n: int) -> np.ndarray:
    # rounded to 1e-6 mm: batches carry float32 voxel sizes (2.4 -> 2.4000001), and a ball offset of exactly
    # r (5 x 2.4 mm = 12 mm) would drop out of the ball that float64 voxel sizes give
    vs = np.round(torch.as_tensor(voxel_size, dtype=torch.float64).reshape(-1, 3).cpu().numpy(), 6)
    if vs.shape[0] not in (1, n):
        raise ValueError(f"voxel sizes for {vs.shape[0]} samples, batch has {n}")
    return vs


def harmonic_residual(total: torch.Tensor, mask: torch.Tensor, voxel_size, radius_mm: float) -> torch.Tensor:
    """``M_r (t - S_r * (M t))`` for ``t`` [B, 1, X, Y, Z] (ppm) and voxel sizes [B, 3] or [1, 3] (mm).

    SHARP's first step (Schweser et al., NeuroImage 54, 2011): by the mean value property a field that is
    harmonic inside the brain equals its spherical mean, so the residual holds no background at all
    where the sphere ``S_r`` fits inside the mask (``M_r``, the eroded mask; 0 elsewhere), and the local
    field's high-pass there. The ball convolutions (of the field and of the mask, for the erosion) are
    linear convolutions: FFTs on a grid padded by the ball's width, zero outside the FOV.
    """
    vs = _voxel_rows(voxel_size, total.shape[0])
    out = []
    for i in range(total.shape[0]):
        v = tuple(vs[min(i, len(vs) - 1)])
        shape = tuple(total.shape[-3:])
        m = (mask[i, 0] > 0.5).to(total.dtype)
        t = total[i, 0] * m
        grid = padded_grid(shape, v, radius_mm)
        spec = ball_spectrum(grid, v, radius_mm, t.device)
        mean = _irfft(_rfft(t.float(), grid) * spec, grid, shape)
        # erosion by the ball: the ball's mean of the mask is 1 exactly where the ball fits (float32 round-off
        # ~1e-6; one ball voxel less is >= 1e-4 below 1 for balls of under 10^4 voxels)
        keep = _irfft(_rfft(m.float(), grid) * spec, grid, shape) > 1 - 1e-4
        out.append((torch.where(keep, t - mean.to(t.dtype), torch.zeros_like(t)))[None, None])
    return torch.cat(out)


@torch.no_grad()
def vsharp_estimate(total: torch.Tensor, mask: torch.Tensor, voxel_size,
                    radii_mm: Sequence[float] = VSHARP_RADII_MM, threshold: float = 0.05) -> torch.Tensor:
    """V-SHARP local field (ppm, [B, 1, X, Y, Z], 0 outside its valid mask) of masked total fields (ppm).

    V-SHARP (Li et al., NeuroImage 55, 2011; Wu et al., MRM 67, 2012) with the TSVD deconvolution of the
    largest ball, demeaned over the valid mask: each voxel high-passed with the largest ball that fits in
    the mask, then ``F^-1[F[h] / (1 - S_rmax)]`` with frequencies where ``|1 - S_rmax| < threshold``
    dropped. Per sample; radii below the largest voxel size are dropped (a "ball" without a neighbour
    along the coarse axis); a sample where no ball fits inside the mask gives zeros. A fixed,
    parameter-free input (no gradient); local-field NRMSE 29 % on the 2 mm brain anat004 (the recon's CG
    solver: 19 %, at several times the cost).
    """
    vs = _voxel_rows(voxel_size, total.shape[0])
    shape = tuple(total.shape[-3:])
    out = torch.zeros_like(total)
    for i in range(total.shape[0]):
        v = tuple(float(x) for x in vs[min(i, len(vs) - 1)])
        radii = sorted({float(r) for r in radii_mm if float(r) >= max(v)}, reverse=True)
        m = mask[i, 0].detach().cpu().numpy() > 0.5
        if not radii or not m.any():
            continue
        distance = boundary_distance(m, v)
        grid = padded_grid(shape, v, radii[0])
        t = (total[i, 0] * torch.from_numpy(m).to(total.device)).float()
        spec_t = _rfft(t, grid)
        largest = ball_spectrum(grid, v, radii[0], t.device)  # high-passes the centre, and is deconvolved
        hp = torch.zeros_like(t)
        done = np.zeros_like(m)
        for r in radii:
            new = eroded(distance, r) & ~done
            if not new.any():
                continue
            spec = largest if r == radii[0] else ball_spectrum(grid, v, r, t.device)
            sel = torch.from_numpy(new).to(t.device)
            hp = torch.where(sel, t - _irfft(spec_t * spec, grid, shape), hp)
            done |= new
        if not done.any():  # no ball fits inside the mask
            continue
        one_minus_s = 1.0 - largest
        inv = torch.where(one_minus_s.abs() >= threshold, 1.0 / torch.where(one_minus_s == 0, 1.0, one_minus_s),
                          torch.zeros_like(one_minus_s))
        local = _irfft(_rfft(hp, grid) * inv, grid, shape)
        valid = torch.from_numpy(done).to(t.device)
        local = torch.where(valid, local - local[valid].mean(), torch.zeros_like(local))
        out[i, 0] = local.to(out.dtype)
    return out


__all__ = ["VSHARP_RADII_MM", "ball_spectrum", "harmonic_residual", "smv_kernel", "vsharp_estimate"]
