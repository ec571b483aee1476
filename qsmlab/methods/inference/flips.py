"""Test-time mirroring: a network's outputs averaged over the axis flips that leave the dipole kernel unchanged.

nnU-Net predicts with mirroring (the mean over flips of the input, each output flipped back), and a network
trained with flip augmentation has no preferred orientation along those axes, so the mean keeps what the
flipped predictions share and averages out what they do not (the network's own noise). For QSM a flip is
only a valid augmentation when the physics does not change: flipping the voxel axes in ``S`` maps
``k_i -> -k_i`` (``i`` in ``S``), and the kernel ``D(k) = 1/3 - (k . b)^2 / |k|^2`` is unchanged for every
``k`` exactly when ``F_S b = +b`` or ``-b`` (B0's sign does not change the kernel). Hence:

- B0 along a voxel axis (axial scans, and every scan the inference frame rotated into the training B0):
  all eight flips;
- B0 in a voxel plane, e.g. ``(0, sin, cos)``: four (the identity, the flip of the axis normal to the plane,
  the flip of the other two, all three);
- any other direction: two (the identity and the point reflection ``b -> -b``).

The TKD prior and the dipole operators inside a method are computed from the flipped images under the same
geometry, so each flipped pass is a pass on a scan the physics cannot tell from the original.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

TTA = ("none", "flips")
"""``tta`` choices: no test-time augmentation, or the mean over :func:`kernel_preserving_flips`."""


def kernel_preserving_flips(b0_dir: Sequence[float] | None, tol: float = 1e-6) -> list[tuple[int, ...]]:
    """The sets of spatial axes (0, 1, 2) whose flip maps ``b0_dir`` onto ``±b0_dir``, identity first.

    ``b0_dir=None``: every flip (an input without B0 dependence, such as a magnitude image)."""
    subsets = [s for n in range(4) for s in itertools.combinations(range(3), n)]
    if b0_dir is None:
        return subsets
    b = np.asarray(b0_dir, dtype=np.float64).reshape(3)
    b = b / np.linalg.norm(b)
    keep = []
    for s in subsets:
        f = b.copy()
        f[list(s)] *= -1
        if np.allclose(f, b, atol=tol) or np.allclose(f, -b, atol=tol):
            keep.append(s)
    return keep


def mirror_averaged(run: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]],
                    images: Mapping[str, torch.Tensor], flips: Sequence[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The mean over ``flips`` of ``run`` on the flipped ``images`` ([B, C, X, Y, Z]), each output flipped back.

    Outputs are averaged as they come (chi in ppm, logits), one running sum alive at a time."""
    if not flips:
        raise ValueError("mirror_averaged: no flips given (the identity is ())")
    total: dict[str, torch.Tensor] = {}
    for s in flips:
        dims = [d + 2 for d in s]
        out = run({k: (v.flip(dims) if dims else v) for k, v in images.items()})
        for k, v in out.items():
            v = (v.flip(dims) if dims else v).float()
            total[k] = v.clone() if k not in total else total[k].add_(v)
    return {k: v / len(flips) for k, v in total.items()}
