"""Padding to a network's size multiple, and the inference frame (B0 direction and voxel size).

Two things stand between an arbitrary input volume and a network trained on patches:

- **Grid size.** Encoder-decoders need every axis divisible by ``2**depth``: :func:`pad_to_multiple`
  pads (symmetrically, zeros or replicated edges) and :func:`crop` undoes it. Volumes too large for one
  pass go through Gaussian-blended sliding windows (:mod:`qsmlab.methods.inference.network`).
- **Geometry.** A network sees voxels, not B0: trained on axial B0 it has learned the dipole pattern of
  axial B0 only (and of the training voxel size). :class:`Frame` resamples the inputs into a grid whose
  B0 direction is the training one (a rotation about the volume centre, in mm) and, when the voxel size
  differs by more than 25 %, whose voxels have the training size; the network's output is resampled back
  onto the input grid. Rotating the head rotates its field with it (the dipole field of a rotated source
  in a rotated B0 is the rotated field), so the rotated field is a field the network was trained on.

Coordinates: voxel index ``i`` (input) and ``o`` (frame) map to mm about each grid's centre,
``p = S_in (i - c_in)`` and ``q = S_out (o - c_out)`` with ``S = diag(voxel_size)`` and ``c = (n - 1) / 2``;
the frame is ``q = R p`` with ``R`` the smallest rotation taking the input B0 onto the training B0
(``R b = ±t``: B0's sign does not change the dipole kernel). Hence
``i = S_in^-1 R^T S_out (o - c_out) + c_in``, which is what ``scipy.ndimage.affine_transform`` takes.
Fields, magnitudes and the network's output are interpolated by cubic B-splines (:data:`INTERP_ORDER`),
masks and labels by nearest neighbour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

ANGLE_TOL_DEG = 1.0
"""B0 directions closer than this to the training one are used as they are."""
VOXEL_TOL = 0.25
"""A voxel size further than this (relative, any axis) from the training one is resampled to it."""
MASK_MARGIN_MM = 4.0
"""With the input's mask, the frame extends at least this far (mm) beyond the rotated mask (a cubic spline's
support and a few voxels of empty border)."""
NEAREST_KEYS = ("mask", "seg")
"""Images resampled by nearest neighbour (labels); everything else at :data:`INTERP_ORDER`."""
INTERP_ORDER = 3
"""Spline order of the frame's resampling, both ways (scipy's prefiltered cubic B-spline). Linear
interpolation there and back smooths a 1 mm map twice: on a realistic head with B0 tilted 20 deg
(``benchmarks/invivo_like_methods.py --recipe realistic --tilt 20``) it cost the learned ``cpu`` profiles
2-4 NRMSE points against the truth and 4 against COSMOS, most of their gain over TKD (which needs no
frame); cubic splines gave back nearly all of it (QSMnet cpu_cosmos 48.2 / 32.2 % linear, 46.1 / 28.1 %
cubic, 45.5 / 26.9 % on the same head with axial B0). Order 1 is the cheaper, smoother choice."""


# -- padding --------------------------------------------------------------------------------------------

def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "constant"
                    ) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
    """Pad the last three axes of ``x`` [B, C, X, Y, Z] up to multiples of ``multiple``.

    Padding is split evenly before/after each axis (the network's receptive field sees the volume
    centred, as in training patches). ``mode``: ``"constant"`` (zeros) or ``"replicate"``. Returns the
    padded tensor and the ``(before, after)`` pads per axis for :func:`crop`.
    """
    if mode not in ("constant", "replicate"):
        raise ValueError(f"pad mode must be 'constant' or 'replicate', got {mode!r}")
    pads = []
    for n in x.shape[-3:]:
        extra = (-int(n)) % int(multiple)
        pads.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in pads):
        return x, tuple(pads)
    flat = [v for a, b in reversed(pads) for v in (a, b)]  # F.pad lists the last axis first
    return F.pad(x, flat, mode=mode), tuple(pads)


def crop(x: torch.Tensor, pads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` on the last three axes."""
    sl = [slice(a, x.shape[-3 + i] - b) for i, (a, b) in enumerate(pads)]
    return x[..., sl[0], sl[1], sl[2]]


# -- geometry -------------------------------------------------------------------------------------------

def unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(3)
    return a / np.linalg.norm(a)


def b0_angle_deg(a: Sequence[float], b: Sequence[float]) -> float:
    """Angle between two B0 axes in degrees, sign-insensitive (B0 and -B0 give the same kernel)."""
    c = abs(float(np.dot(unit(a), unit(b))))
    return math.degrees(math.acos(min(1.0, c)))


def rotation_onto(b: Sequence[float], t: Sequence[float]) -> np.ndarray:
    """Smallest rotation ``R`` with ``R b`` parallel to ``t`` (either sign of ``t``), by Rodrigues' formula."""
    b, t = unit(b), unit(t)
    if np.dot(b, t) < 0:
        t = -t
    axis = np.cross(b, t)
    s, c = np.linalg.norm(axis), float(np.dot(b, t))
    if s < 1e-12:
        return np.eye(3)
    k = axis / s
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + s * K + (1 - c) * (K @ K)


@dataclass
class Frame:
    """Resampling between an input grid and the inference grid (see the module docstring).

    ``matrix``/``offset`` map frame voxel indices to input voxel indices (``i = matrix @ o + offset``).
    """

    in_shape: tuple[int, int, int]
    in_voxel_size: np.ndarray
    out_shape: tuple[int, int, int]
    out_voxel_size: np.ndarray
    rotation: np.ndarray
    matrix: np.ndarray
    offset: np.ndarray
    angle_deg: float
    resampled: bool

    @property
    def rotated(self) -> bool:
        return self.angle_deg > 0

    def forward(self, images: Mapping[str, np.ndarray], order: int = INTERP_ORDER) -> dict[str, np.ndarray]:
        """Input-grid images -> frame grid (splines of ``order``; ``mask``/``seg`` nearest)."""
        return {k: _resample(v, self.matrix, self.offset, self.out_shape, 0 if k in NEAREST_KEYS else order)
                for k, v in images.items() if v is not None}

    def backward(self, volume: np.ndarray, order: int = INTERP_ORDER) -> np.ndarray:
        """A frame-grid volume -> input grid (the inverse map)."""
        inv = np.linalg.inv(self.matrix)
        return _resample(volume, inv, -inv @ self.offset, self.in_shape, order)


def _resample(v: np.ndarray, matrix: np.ndarray, offset: np.ndarray, shape, order: int) -> np.ndarray:
    """``scipy.ndimage.affine_transform`` (zeros outside), float32 out; orders above 1 prefiltered in float64
    (a B-spline without its prefilter smooths)."""
    dtype = np.float64 if order > 1 else np.float32
    out = ndimage.affine_transform(np.asarray(v, dtype=dtype), matrix, offset, output_shape=tuple(shape), order=order,
                                   mode="constant", cval=0.0, prefilter=order > 1)
    return out.astype(np.float32, copy=False)


def make_frame(shape: Sequence[int], voxel_size: Sequence[float], b0_dir: Sequence[float],
               train_b0_dir: Sequence[float] | None = None, train_voxel_size: Sequence[float] | None = None,
               angle_tol_deg: float = ANGLE_TOL_DEG, voxel_tol: float = VOXEL_TOL,
               mask: np.ndarray | None = None) -> Frame | None:
    """The inference frame for an input, or None when its geometry is close enough to training's.

    Rotation when B0 is more than ``angle_tol_deg`` from ``train_b0_dir``; resampling to
    ``train_voxel_size`` when any axis differs by more than ``voxel_tol`` (relative). A None or
    non-finite training geometry disables that part (e.g. a network trained on mixed orientations).

    Extent: without ``mask``, the bounding box of the rotated input box (nothing is cut off). With the input's
    ``mask``, per axis the input grid's own extent, grown (up to that box) where the rotated mask plus
    :data:`MASK_MARGIN_MM` needs it: the head keeps the share of the grid it has in the input. Why: a network with
    instance normalisation (PedQ-NET's DynUNet) normalises over the whole grid, zeros included, so the empty
    corners of the rotated box change its output. On a realistic 160^3 head with B0 tilted 20 deg, PedQ-NET's
    cpu_cosmos network scored 54.8 / 39.5 % (truth / COSMOS) in the rotated box, 52.5 / 37.9 % in the mask-fitted
    frame and 52.0 / 36.9 % run unrotated (TKD 55.2 / 40.7; batch-normalised networks moved < 0.5, README);
    on the axial head, 24 voxels of extra zeros per side moved it from 52.2 to 54.3 % (uQSM's batch-normalised
    net: 52.7 vs 52.3 %).
    """
    shape = tuple(int(n) for n in shape)
    vs_in = np.asarray(voxel_size, dtype=np.float64).reshape(3)
    angle = 0.0
    rot = np.eye(3)
    if train_b0_dir is not None and np.all(np.isfinite(train_b0_dir)):
        angle = b0_angle_deg(b0_dir, train_b0_dir)
        if angle > angle_tol_deg:
            rot = rotation_onto(b0_dir, train_b0_dir)
        else:
            angle = 0.0
    vs_out = vs_in.copy()
    resampled = False
    if train_voxel_size is not None and np.all(np.isfinite(train_voxel_size)):
        tvs = np.asarray(train_voxel_size, dtype=np.float64).reshape(3)
        if np.any(np.abs(vs_in / tvs - 1.0) > voxel_tol):
            vs_out, resampled = tvs, True
    if angle == 0.0 and not resampled:
        return None
    # Output extent (mm from the centre): the bounding box of the rotated input box, so no voxel is cut off; with
    # the mask, the input's own extent where the rotated mask fits in it (see the docstring).
    half = 0.5 * (np.asarray(shape) - 1) * vs_in
    c_in = (np.asarray(shape) - 1) / 2.0
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * half
    extent = np.abs(corners @ rot.T).max(axis=0)
    if mask is not None and np.asarray(mask).shape == shape and np.any(mask):
        pts = (np.argwhere(np.asarray(mask) > 0.5) - c_in) * vs_in  # mask voxel centres, mm
        need = np.abs(pts @ rot.T).max(axis=0) + MASK_MARGIN_MM
        extent = np.minimum(extent, np.maximum(half, need))
    out_shape = tuple(int(np.ceil(2 * e / v - 1e-6)) + 1 for e, v in zip(extent, vs_out))
    c_out = (np.asarray(out_shape) - 1) / 2.0
    matrix = np.diag(1.0 / vs_in) @ rot.T @ np.diag(vs_out)
    offset = c_in - matrix @ c_out
    return Frame(shape, vs_in, out_shape, vs_out, rot, matrix, offset, angle, resampled)
