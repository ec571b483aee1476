"""MNI ICBM152 2009a templates that ship inside nilearn (no network), loaded once and cached.

nilearn 0.10+ bundles the symmetric ICBM152 2009a nonlinear templates (Fonov et al., NeuroImage 2011;
Fonov et al., NeuroImage 2009) at 1 mm: a brain-extracted T1 (intensity 0..1), grey- and white-matter
probability maps, and ``load_mni152_brain_mask`` (T1 > 0.2). We always read the 1 mm files (the
resolution-2 variants are resampled by nilearn on every call, ~1 s) and resample ourselves, once, in
:mod:`qsmlab.data.phantoms.anatomical`, where the random deformation is applied in the same pass.

Grid: 197 x 233 x 189 voxels, affine ``diag(1, 1, 1)`` with origin (-98, -134, -72) mm (RAS+ MNI space).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class MNITemplates:
    """Template maps on the 1 mm MNI grid (X, Y, Z); arrays are read-only float32 / bool."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape)


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@lru_cache(maxsize=1)
def load_mni_templates() -> MNITemplates:
    """The 1 mm ICBM152 2009a T1, GM and WM probability maps and brain mask from nilearn (cached)."""
    from nilearn import datasets  # heavy import, only when a phantom is built

    t1_img = datasets.load_mni152_template(resolution=1)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0.5)
    return MNITemplates(t1=_ro(t1), gm=_ro(np.clip(gm, 0, 1)), wm=_ro(np.clip(wm, 0, 1)), brain=_ro(brain),
                        affine=_ro(np.asarray(t1_img.affine, dtype=np.float64)))
