"""Random-shape susceptibility phantoms (DeepQSM / NeXtQSM style), on any grid, seeded.

Following Bollmann et al., "DeepQSM", NeuroImage 2019 (random spheres/cuboids with random
susceptibility) and Cognolato et al., "NeXtQSM", MedIA 2023 (overlapping random shapes): spheres,
ellipsoids, cylinders and cuboids with random size, position and 3-D orientation, each with a random chi,
*added* where they overlap, inside an ellipsoidal "brain" mask. A head model (soft tissue, skull, random
air cavities next to the mask) supplies background sources, as for the anatomical phantoms.
M0 is smooth and nearly flat; R2* grows with |chi| (iron/blood-like), 20 + 150 |chi| 1/s at 3 T.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from qsmlab.data.phantoms import Phantom
from qsmlab.data.phantoms.background import head_model, world_coords

SHAPE_KINDS = ("sphere", "ellipsoid", "cylinder", "cuboid")
SHAPE_LABELS: dict[int, str] = {0: "background", 1: "inside", 2: "sphere", 3: "ellipsoid", 4: "cylinder",
                                5: "cuboid"}
"""Label id -> name of the random-shape ``seg`` map (the kind of the last shape painted there)."""


def centred_affine(shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """Axis-aligned affine with the grid centre at world (0, 0, 0) mm."""
    vs = np.asarray(voxel_size, dtype=np.float64)
    a = np.eye(4)
    a[:3, :3] = np.diag(vs)
    a[:3, 3] = -vs * (np.asarray(shape) - 1) / 2.0
    return a


def _shape_mask(kind: str, local: list[np.ndarray], r: float, rng: np.random.Generator) -> np.ndarray:
    """Inside test in the shape's own (rotated, centred) frame; ``local`` = 3 coordinate arrays (mm)."""
    u, v, w = local
    if kind == "sphere":
        return u**2 + v**2 + w**2 <= r**2
    if kind == "ellipsoid":
        a = r * rng.uniform(0.3, 1.0, 3)
        return (u / a[0]) ** 2 + (v / a[1]) ** 2 + (w / a[2]) ** 2 <= 1.0
    if kind == "cylinder":
        rad, half = r * rng.uniform(0.15, 0.5), r * rng.uniform(0.8, 2.0)
        return (u**2 + v**2 <= rad**2) & (np.abs(w) <= half)
    a = r * rng.uniform(0.3, 1.0, 3)  # cuboid half-sides
    return (np.abs(u) <= a[0]) & (np.abs(v) <= a[1]) & (np.abs(w) <= a[2])


def random_shapes_phantom(
    rng: np.random.Generator,
    shape: Sequence[int] = (64, 64, 64),
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    n_shapes: Sequence[int] = (20, 40),
    chi_range: Sequence[float] = (-0.2, 0.3),
    size_range: Sequence[float] = (0.03, 0.15),
    mask_fraction: float = 0.32,
    background: bool = True,
) -> Phantom:
    """A random-shape phantom; everything random comes from ``rng``.

    Args:
        rng: generator (same seed -> same phantom).
        shape: grid (X, Y, Z); voxel_size: mm.
        n_shapes: (min, max) number of shapes.
        chi_range: (lo, hi) ppm of each shape's susceptibility (added where shapes overlap).
        size_range: (lo, hi) characteristic shape size as a fraction of the smallest FOV extent.
        mask_fraction: semi-axes of the ellipsoidal mask as a fraction of the FOV extent per axis.
        background: add the head model (skull, 1-3 air cavities next to the mask).
    Returns:
        :class:`Phantom` with ``labels`` in :data:`SHAPE_LABELS`.
    """
    shape = tuple(int(n) for n in shape)
    vs = np.asarray(voxel_size, dtype=np.float64)
    affine = centred_affine(shape, vs)
    x = world_coords(shape, affine)
    semi = mask_fraction * np.asarray(shape) * vs
    mask = sum((x[i] / semi[i]) ** 2 for i in range(3)) <= 1.0
    chi = np.zeros(shape, dtype=np.float32)
    lab = mask.astype(np.int16)
    fov = float(np.min(np.asarray(shape) * vs))
    inside = np.argwhere(mask)
    n = int(rng.integers(n_shapes[0], n_shapes[1] + 1))
    kinds = []
    for _ in range(n):
        kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        kinds.append(kind)
        r = float(rng.uniform(*size_range)) * fov
        c = inside[rng.integers(len(inside))]
        rot = Rotation.random(random_state=rng).as_matrix()
        half = np.ceil(2.0 * r / vs).astype(int)  # bounding box covers every kind's extent (<= 2r)
        lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, shape)
        g = [(np.arange(lo[i], hi[i]) - c[i]).astype(np.float32) * vs[i] for i in range(3)]
        g = [g[i].reshape([-1 if a == i else 1 for a in range(3)]) for i in range(3)]
        local = [rot[0, j] * g[0] + rot[1, j] * g[1] + rot[2, j] * g[2] for j in range(3)]  # R^T (x - c)
        sel = _shape_mask(kind, local, r, rng)
        sl = tuple(slice(lo[i], hi[i]) for i in range(3))
        chi[sl][sel] += np.float32(rng.uniform(*chi_range))
        lab[sl][sel & mask[sl]] = 2 + SHAPE_KINDS.index(kind)
    chi *= mask
    m0 = np.where(mask, 0.8, 0.0).astype(np.float32)
    r2 = np.where(mask, 20.0 + 150.0 * np.abs(chi), 0.0).astype(np.float32)
    chi_bg = np.zeros(shape, dtype=np.float32)
    if background:
        cav = []
        for _ in range(int(rng.integers(1, 4))):
            u = rng.normal(size=3)
            u /= np.linalg.norm(u)
            surface = u / np.sqrt(np.sum((u / semi) ** 2))
            cav.append((surface + u * rng.uniform(6.0, 12.0), rng.uniform(4.0, 10.0, 3)))
        hm = head_model(mask, affine, rng, cavities=cav, neck=False)
        chi_bg = hm.chi_bg
        m0[hm.scalp] = 0.6
        r2[hm.scalp] = 1000.0 / 30.0
        m0[hm.skull] = 0.05
        r2[hm.skull] = 1000.0
    meta = {"n_shapes": n, "kinds": kinds}
    return Phantom(chi=chi, mask=mask, labels=lab, m0=m0, r2star=r2, chi_bg=chi_bg, affine=affine,
                   label_names=dict(SHAPE_LABELS), kind="shapes", meta=meta)
