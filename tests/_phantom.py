"""A small analytic head phantom for recon tests (numpy only, deterministic).

``head_phantom(n=64)`` returns a dict with ``chi`` (ppm; smooth ellipsoidal brain with a WM/GM-like
contrast, deep-grey-like paramagnetic nuclei, a vein and a calcification-like diamagnetic blob),
``mask`` (brain), ``magnitude`` (tissue-dependent, edges where chi changes), ``chi_bg`` (external
sources: an air cavity and a skull shell, outside the mask), ``voxel_size`` and ``b0_dir``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _ellipsoid(shape, centre, radii):
    g = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    r = sum(((g[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return r <= 1.0


def head_phantom(n: int = 64, voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), seed: int = 0,
                 csf_mm: float = 0.0) -> dict:
    """``csf_mm`` > 0 tapers chi linearly to 0 over that distance from the brain edge (after a one-voxel
    rim of 0), like the CSF (the chi reference) around a real brain; 0 keeps a sharp tissue edge."""
    rng = np.random.default_rng(seed)
    shape = (n, n, n)
    c = np.array(shape) / 2.0
    brain = _ellipsoid(shape, c, (0.36 * n, 0.42 * n, 0.34 * n))
    wm = _ellipsoid(shape, c, (0.24 * n, 0.30 * n, 0.22 * n))
    chi = np.zeros(shape)
    chi[brain] = 0.02  # GM-like
    chi[wm] = -0.03  # WM slightly diamagnetic
    # smooth low-frequency tissue variation
    chi += brain * ndimage.gaussian_filter(rng.normal(0, 1, shape), 4 * n / 64) * 0.05
    # deep grey nuclei (paramagnetic), a vein, a calcification
    for off, rad, val in [((-0.1, 0.08, 0.0), 0.07, 0.15), ((0.1, 0.08, 0.0), 0.07, 0.15),
                          ((0.0, -0.12, 0.05), 0.05, 0.10)]:
        chi[_ellipsoid(shape, c + np.array(off) * n, (rad * n,) * 3)] = val
    vein = _ellipsoid(shape, c + np.array([0.0, 0.25, 0.1]) * n, (0.02 * n, 0.12 * n, 0.02 * n))
    chi[vein] = 0.35
    chi[_ellipsoid(shape, c + np.array([0.15, -0.2, -0.05]) * n, (0.03 * n,) * 3)] = -0.2
    chi = ndimage.gaussian_filter(chi, 0.7) * brain
    if csf_mm > 0:
        d = ndimage.distance_transform_edt(brain, sampling=voxel_size)
        chi *= np.clip((d - min(voxel_size)) / csf_mm, 0.0, 1.0)
    mask = brain.copy()
    mag = np.where(brain, 0.8 - 2.0 * np.abs(chi), 0.0)
    mag = ndimage.gaussian_filter(mag, 0.5) * brain + 0.05 * (~brain) * _ellipsoid(shape, c, (0.45 * n, 0.47 * n, 0.43 * n))
    # background sources outside the brain: skull shell (diamagnetic) and an air cavity (chi_air - chi_tissue ~ 9.4 ppm)
    head = _ellipsoid(shape, c, (0.45 * n, 0.47 * n, 0.43 * n))
    skull = head & ~_ellipsoid(shape, c, (0.40 * n, 0.44 * n, 0.38 * n))
    chi_bg = np.zeros(shape)
    chi_bg[skull] = -2.0
    chi_bg[_ellipsoid(shape, c + np.array([0.0, 0.43, -0.25]) * n, (0.08 * n, 0.05 * n, 0.06 * n))] = 9.4
    chi_bg[~head] = 9.4  # air around the head
    chi_bg[brain] = 0.0
    return {"chi": chi, "mask": mask, "magnitude": mag, "chi_bg": chi_bg,
            "voxel_size": tuple(float(v) for v in voxel_size), "b0_dir": np.asarray(b0_dir, float)}
