"""Phantoms for hybrid synthetic data: anatomical (MNI-based), random shapes, and head backgrounds.

Every generator takes a ``numpy.random.Generator`` and returns a :class:`Phantom`; the same seed gives
the same phantom. Susceptibilities are in ppm: ``chi`` relative to CSF (the QSM reference, 0 outside the
brain mask), ``chi_bg`` relative to air (so the operator's zero padding is air; see
:mod:`qsmlab.data.phantoms.background`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Phantom:
    """One synthetic subject on one grid, all arrays (X, Y, Z).

    Attributes:
        chi: susceptibility (ppm, relative to CSF), 0 outside ``mask``; float32.
        mask: brain (region of interest) mask; bool.
        labels: integer tissue labels (see ``label_names``); int16, 0 outside the mask.
        m0: proton-density-like signal at TE = 0 (a.u., ~0..1), with bias field; 0 in air.
        r2star: R2* = 1/T2* at 3 T (1/s); scaled linearly with B0 by the simulator.
        chi_bg: background sources (ppm, relative to air): tissue, skull, air cavities.
        affine: NIfTI voxel-to-world (mm) matrix of the grid.
        label_names: label id -> name.
        kind: ``"anatomical"`` or ``"shapes"``.
        meta: what was drawn (per-label chi, lesion counts, ...), JSON-serialisable.
    """

    chi: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    m0: np.ndarray
    r2star: np.ndarray
    chi_bg: np.ndarray
    affine: np.ndarray
    label_names: dict[int, str]
    kind: str
    meta: dict = field(default_factory=dict)

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.chi.shape)


from qsmlab.data.phantoms.anatomical import (  # noqa: E402  (the submodules use Phantom)
    DEFAULT_CHI_RANGES,
    LABELS,
    anatomical_phantom,
)
from qsmlab.data.phantoms.background import head_model  # noqa: E402
from qsmlab.data.phantoms.shapes import SHAPE_LABELS, random_shapes_phantom  # noqa: E402

__all__ = ["Phantom", "LABELS", "DEFAULT_CHI_RANGES", "SHAPE_LABELS", "anatomical_phantom",
           "random_shapes_phantom", "head_model"]
