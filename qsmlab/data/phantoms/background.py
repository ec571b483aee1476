"""A head around the brain: soft tissue, a skull shell, air cavities and air outside the head.

These are the *background* sources of QSM: everything outside the brain mask whose susceptibility
differs from brain tissue. Values (ppm) follow the usual whole-head simulation models (e.g. the QSM
Challenge 2.0 head model, Marques et al., MRM 2021; Buch et al., MRM 2015 for air/tissue):
air - tissue = +9.4 ppm (air +0.36 ppm, water/tissue -9.05 ppm), cortical bone - tissue = -2 ppm.

``chi_bg`` is stored **relative to air**: air (outside the head and in cavities) is 0, soft tissue
(brain included) is -9.4 ppm and bone -11.4 ppm. The background's field
(:func:`qsmlab.data.simulate.background_field`, the exact field of the voxelised sources) takes the
space outside the array as empty, so with this reference it is air, as around a real head; referencing
to tissue instead would put a +9.4 ppm box edge at the FOV boundary. Where the head is cut by the FOV
(the neck), the simulator continues it beyond the face. Brain ``chi`` (relative to CSF) adds to this
inside the mask. The field of a uniform region is harmonic inside it, so the -9.4 ppm inside the brain
contributes only a harmonic (removable) background there; what shapes the background field is the
air/tissue and bone boundaries. These boundaries are voxel-sharp on purpose: the field model is exact for
voxelised sources, so no smoothing is needed (and none would be right at every voxel size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CHI_AIR_MINUS_TISSUE = 9.4
"""ppm; air (+0.36) minus water-like tissue (-9.05), rounded as in most head models."""
CHI_BONE_MINUS_TISSUE = -2.0
"""ppm; cortical bone relative to soft tissue."""

# Approximate centres / radii (mm, MNI ICBM152 space) of air spaces next to the brain. Placement is
# anatomical only roughly (frontal and sphenoid sinuses, maxillary sinuses, external ear canals and
# mastoid air); what matters for QSM is large air/tissue boundaries close to orbitofrontal and
# inferior temporal cortex, where real background fields are strongest.
MNI_AIR_CAVITIES: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((0.0, 70.0, -2.0), (14.0, 7.0, 10.0)),     # frontal sinus
    ((0.0, 10.0, -45.0), (11.0, 11.0, 9.0)),    # sphenoid sinus
    ((30.0, 32.0, -62.0), (12.0, 16.0, 14.0)),  # maxillary sinus, right
    ((-30.0, 32.0, -62.0), (12.0, 16.0, 14.0)),  # maxillary sinus, left
    ((62.0, -22.0, -42.0), (9.0, 7.0, 6.0)),    # ear canal / mastoid, right
    ((-62.0, -22.0, -42.0), (9.0, 7.0, 6.0)),   # ear canal / mastoid, left
)


@dataclass
class HeadModel:
    """Background sources on the phantom grid (X, Y, Z).

    Attributes:
        chi_bg: ppm relative to air (0 air, -9.4 tissue incl. brain, -11.4 bone).
        head: inside the head (tissue, bone or cavity); bool.
        skull: bone shell; bool.
        cavities: air inside the head; bool.
        scalp: soft tissue outside the brain (scalp, meninges, neck); bool.
    """

    chi_bg: np.ndarray
    head: np.ndarray
    skull: np.ndarray
    cavities: np.ndarray
    scalp: np.ndarray


def world_coords(shape: Sequence[int], affine: np.ndarray) -> list[np.ndarray]:
    """Broadcastable world coordinates (mm) ``[x, y, z]`` of voxel centres of an axis-aligned grid."""
    a = np.asarray(affine, dtype=np.float64)
    if not np.allclose(a[:3, :3], np.diag(np.diag(a[:3, :3]))):
        raise ValueError("world_coords expects an axis-aligned (diagonal) affine")
    out = []
    for ax in range(3):
        c = a[ax, ax] * np.arange(shape[ax], dtype=np.float32) + a[ax, 3]
        out.append(c.reshape([-1 if i == ax else 1 for i in range(3)]))
    return out


def ellipsoid(shape: Sequence[int], affine: np.ndarray, centre_mm, radii_mm) -> np.ndarray:
    """Boolean ellipsoid (axis-aligned in world mm) on the grid."""
    x = world_coords(shape, affine)
    r = sum(((x[i] - centre_mm[i]) / radii_mm[i]) ** 2 for i in range(3))
    return r <= 1.0


def head_model(
    brain: np.ndarray,
    affine: np.ndarray,
    rng: np.random.Generator,
    cavities: Sequence[tuple[Sequence[float], Sequence[float]]] | None = MNI_AIR_CAVITIES,
    csf_gap_mm: tuple[float, float] = (1.5, 3.0),
    skull_mm: tuple[float, float] = (5.0, 8.0),
    scalp_mm: tuple[float, float] = (4.0, 7.0),
    neck: bool = True,
    chi_air: float = CHI_AIR_MINUS_TISSUE,
    chi_bone: float = CHI_BONE_MINUS_TISSUE,
    cavity_jitter_mm: float = 3.0,
) -> HeadModel:
    """Build soft tissue, skull and air cavities around ``brain`` (bool, X,Y,Z) on the grid ``affine``.

    Layers outward from a smooth envelope of the brain: CSF/meninges gap, bone shell, scalp, then air.
    Thicknesses (mm) are drawn uniformly from the given ranges per subject. ``neck`` extends soft tissue
    below the brain (the MNI brain is cut at the brainstem; without a neck an unrealistic air gap would
    sit under it). ``cavities``: (centre_mm, radii_mm) ellipsoids of air, jittered by
    ``cavity_jitter_mm`` and scaled 0.8-1.2 per subject, kept at least 2 mm from the brain.
    """
    brain = np.asarray(brain, dtype=bool)
    shape = brain.shape
    vs = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    # A smooth envelope closes sulci, as the inner skull surface does.
    env = ndimage.gaussian_filter(brain.astype(np.float32), sigma=4.0 / vs) > 0.25
    env = ndimage.binary_fill_holes(env | brain)
    d = ndimage.distance_transform_edt(~env, sampling=vs).astype(np.float32)
    gap, bone, scalp_t = (float(rng.uniform(*r)) for r in (csf_gap_mm, skull_mm, scalp_mm))
    skull = (d > gap) & (d <= gap + bone)
    head = d <= gap + bone + scalp_t
    if neck and brain.any():
        x = world_coords(shape, affine)
        zb = float(np.min(np.where(brain.any(axis=(0, 1)))[0])) * affine[2, 2] + affine[2, 3]
        cx, cy = (float(np.mean(np.where(brain.any(axis=a))[0])) * affine[i, i] + affine[i, 3]
                  for i, a in ((0, (1, 2)), (1, (0, 2))))
        below = x[2] < zb + 15.0
        neck_region = below & ((((x[0] - cx) / 45.0) ** 2 + ((x[1] - cy) / 50.0) ** 2) <= 1.0)
        head |= neck_region
        skull &= ~neck_region
    cav = np.zeros(shape, dtype=bool)
    if cavities:
        near_brain = ndimage.distance_transform_edt(~brain, sampling=vs) <= 2.0
        for centre, radii in cavities:
            c = np.asarray(centre, float) + rng.normal(0.0, cavity_jitter_mm, 3)
            r = np.asarray(radii, float) * rng.uniform(0.8, 1.2)
            cav |= ellipsoid(shape, affine, c, r)
        cav &= head & ~near_brain
    scalp = head & ~brain & ~skull & ~cav
    chi_bg = np.zeros(shape, dtype=np.float32)
    chi_bg[head] = -chi_air
    chi_bg[skull & ~cav] += chi_bone
    chi_bg[cav] = 0.0
    return HeadModel(chi_bg=chi_bg, head=head, skull=skull & ~cav, cavities=cav, scalp=scalp)
