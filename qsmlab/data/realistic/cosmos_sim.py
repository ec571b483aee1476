"""A simulated COSMOS reference: the subject scanned at several head orientations, fitted by least squares.

In vivo, a method is scored against COSMOS (Liu et al., MRM 61:196, 2009): the head is scanned in several
orientations (typically 3-12, rotated by ~15-25 deg about the left-right and anterior-posterior axes), each
scan goes through the pipeline (echo fit, background removal), is registered to the reference, and the
per-frequency least-squares fit ``chi = F^-1[sum_o D_o F[f_o] / sum_o D_o^2]``
(:func:`qsmlab.recon.inversion.cosmos`) gives the reference map. It is a *model* fit: white-matter
anisotropy (COSMOS of a tensor is not its mean; Liu 2010 STI), veins, noise and background-removal residue
all enter it, so COSMOS and the scalar truth differ, as they do in vivo.

Here each orientation is simulated on the reference head's grid with its own ``b0_dir`` (the
co-registered form, as :mod:`qsmlab.data.simulate` does: no registration blur), with its own noise
realisation and its own pass through the pipeline; :data:`COSMOS_ROTATIONS_DEG` are the default extra head
rotations (extrinsic x-y-z Euler angles, deg) applied on top of the scan's own tilt: pitch +-20 deg about
the left-right axis and a 20 deg roll about the anterior-posterior axis, the range of published
in-vivo COSMOS protocols (Liu 2009: 3 orientations; Wharton & Bowtell 2010; the 2016 QSM challenge: 12).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial.transform import Rotation

COSMOS_ROTATIONS_DEG: tuple[tuple[float, float, float], ...] = ((0.0, 0.0, 0.0), (20.0, 0.0, 0.0),
                                                                  (-20.0, 0.0, 0.0), (0.0, 20.0, 0.0))
COSMOS_THRESHOLD = 0.01
"""Lower bound on ``sum_o D_o^2`` (:func:`qsmlab.recon.inversion.cosmos`'s default)."""


def cosmos_b0_dirs(tilt_deg: float | Sequence[float],
                   rotations_deg: Sequence[Sequence[float]] = COSMOS_ROTATIONS_DEG) -> list[np.ndarray]:
    """B0 in the reference head's voxel axes for each extra head rotation R_o on top of the reference scan's
    head rotation R_ref (``tilt_deg``: a pitch about i in deg, or an [rx, ry, rz] rotation as in a recipe's
    ``orientations``): the head's total rotation is ``R_o R_ref`` and ``b0 = (R_o R_ref)^T z``."""
    z = np.array([0.0, 0.0, 1.0])
    base = [float(tilt_deg), 0.0, 0.0] if np.isscalar(tilt_deg) else [float(v) for v in tilt_deg]
    r_ref = Rotation.from_euler("xyz", base, degrees=True)
    return [(Rotation.from_euler("xyz", r, degrees=True) * r_ref).as_matrix().T @ z for r in rotations_deg]


def cosmos_fit(fields: Sequence[np.ndarray], masks: Sequence[np.ndarray], b0_dirs: Sequence[Sequence[float]],
               voxel_size: Sequence[float], threshold: float = COSMOS_THRESHOLD, pad_factor: float = 2.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """COSMOS map (ppm, float32) over the intersection of the orientations' valid masks, and that mask."""
    from qsmlab.recon.inversion.cosmos import cosmos

    m = np.logical_and.reduce([np.asarray(x, bool) for x in masks])
    chi = cosmos([np.asarray(f, np.float64) for f in fields], m, b0_dirs=[np.asarray(b) for b in b0_dirs],
                 voxel_size=tuple(float(v) for v in voxel_size), pad_factor=pad_factor, threshold=threshold,
                 quiet=True)
    return np.asarray(chi, np.float32), m
