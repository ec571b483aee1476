"""Normalised root-mean-square errors (percent): plain, demeaned and detrended.

- ``nrmse`` -- the 2016 QSM reconstruction challenge "RMSE" (Langkammer et al., MRM 2018;
  ``compute_rmse.m`` applied to ``recon .* mask`` and ``ref .* mask``):
  ``100 * ||x*m - ref*m||_2 / ||ref*m||_2`` over the whole volume, *not* demeaned.
- ``nrmse_demeaned`` -- QSM challenge 2.0 (Bilgic et al., MRM 2021): both maps demeaned over the
  mask, ``100 * ||(x - mean_m x) - (ref - mean_m ref)||_2 / ||ref - mean_m ref||_2`` over mask voxels.
- ``nrmse_detrended`` -- QSM challenge 2.0 "detrended NRMSE": least-squares fit ``x = a*ref + b`` over
  the mask voxels, then the demeaned NRMSE of ``(x - b) / a`` against ``ref``. Invariant to any affine
  rescaling ``x -> c*x + d`` (``c != 0``); it scores structure, not the global scale.

Degenerate inputs (``ref`` zero, or constant for the demeaned/detrended forms, inside the mask;
``a == 0``) give ``inf`` or ``nan`` rather than raising, so a validation loop keeps running.
numpy functions take (X, Y, Z) arrays and return a float; ``*_torch`` take ``[B, 1, X, Y, Z]``
tensors and return a ``[B]`` tensor (no autograd graph).
"""

from __future__ import annotations

import numpy as np
import torch

from qsmlab.metrics._inputs import VOLUME_DIMS, check_numpy, check_torch


def nrmse(pred, ref, mask) -> float:
    """2016-challenge RMSE (%): ``100 * ||pred*m - ref*m|| / ||ref*m||`` (Langkammer et al., MRM 2018)."""
    x, r, m = check_numpy(pred, ref, mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(100.0 * np.linalg.norm((x - r)[m]) / np.linalg.norm(r[m]))


def _demeaned_np(x: np.ndarray, r: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xv, rv = x[m], r[m]
    return xv - xv.mean(), rv - rv.mean()


def nrmse_demeaned(pred, ref, mask) -> float:
    """Demeaned NRMSE (%) over mask voxels (QSM challenge 2.0, Bilgic et al., MRM 2021)."""
    xd, rd = _demeaned_np(*check_numpy(pred, ref, mask))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(100.0 * np.linalg.norm(xd - rd) / np.linalg.norm(rd))


def nrmse_detrended(pred, ref, mask) -> float:
    """Detrended NRMSE (%) (QSM challenge 2.0): fit ``pred = a*ref + b`` in the mask, score ``(pred-b)/a``.

    The demeaned ``(pred - b)/a`` is ``(pred - mean pred)/a`` with ``a = <pred_d, ref_d>/<ref_d, ref_d>``.
    """
    xd, rd = _demeaned_np(*check_numpy(pred, ref, mask))
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.dot(xd, rd) / np.dot(rd, rd)
        return float(100.0 * np.linalg.norm(xd / a - rd) / np.linalg.norm(rd))


def _norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=VOLUME_DIMS)


@torch.no_grad()
def nrmse_torch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched :func:`nrmse`: ``[B, 1, X, Y, Z]`` -> ``[B]`` (%)."""
    x, r, m = check_torch(pred, ref, mask)
    return 100.0 * _norm((x - r) * m) / _norm(r * m)


def _demeaned_torch(x: torch.Tensor, r: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mf = m.to(x.dtype)
    n = mf.sum(VOLUME_DIMS, keepdim=True)
    xd = (x - (x * mf).sum(VOLUME_DIMS, keepdim=True) / n) * mf
    rd = (r - (r * mf).sum(VOLUME_DIMS, keepdim=True) / n) * mf
    return xd, rd


@torch.no_grad()
def nrmse_demeaned_torch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched :func:`nrmse_demeaned`: ``[B, 1, X, Y, Z]`` -> ``[B]`` (%)."""
    xd, rd = _demeaned_torch(*check_torch(pred, ref, mask))
    return 100.0 * _norm(xd - rd) / _norm(rd)


@torch.no_grad()
def nrmse_detrended_torch(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched :func:`nrmse_detrended`: ``[B, 1, X, Y, Z]`` -> ``[B]`` (%)."""
    xd, rd = _demeaned_torch(*check_torch(pred, ref, mask))
    a = (xd * rd).sum(VOLUME_DIMS, keepdim=True) / (rd * rd).sum(VOLUME_DIMS, keepdim=True)
    return 100.0 * _norm(xd / a - rd) / _norm(rd)
