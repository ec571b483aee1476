"""Veins: thin paramagnetic tubes with the susceptibility of deoxygenated blood, partial-volumed.

Three families, drawn per subject in world (mm) coordinates from the anatomy, so the same veins are
rasterised onto any grid (the fine simulation grid, or the scan grid with ``acquisition`` off):

- **medullary** (:data:`VEIN_FAMILIES`): many thin veins (diameter 0.2-0.5 mm) running from deep white
  matter towards the cortex (the gradient of the distance to the brain's surface), 10-30 mm long;
- **cortical / pial**: 0.6-2.0 mm, running within 1-3 mm of the brain's surface, tangential to it,
  20-60 mm long;
- **deep**: the paired internal cerebral veins and basal veins of Rosenthal, 1.5-2.2 mm, on an approximate
  MNI course (roof of the third ventricle; around the midbrain), jittered per subject.

Diameters: cortical and deep veins as seen in SWI venography (sub-mm to ~2 mm; e.g. Reichenbach et al.,
Radiology 204:272, 1997), medullary veins 0.1-0.5 mm. Susceptibility: the tube holds blood with
``delta_chi`` (ppm, relative to the surrounding tissue) uniform in :data:`VEIN_CHI_PPM` = 0.3-0.5 ppm, the
in-vivo value of deoxygenated venous blood (Fan et al., MRM 72:149, 2014: ``delta_chi_do Hct (1 - Y)`` with
``delta_chi_do`` = 3.39 ppm, Hct ~0.4, Y ~0.6-0.7). Each voxel gets the *fraction* of its volume inside the
tube (supersampled 4^3 per voxel), so a 0.3 mm vein in a 0.5 mm voxel adds ~0.3 x delta_chi: the partial
volume of the fine grid; the scan's k-space crop then partial-volumes again, as a scanner does.
Blood signal: M0 0.6, T2* 12 ms at 3 T (deoxygenated blood, Y ~0.6; as in the anatomical phantom).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

VEIN_CHI_PPM = (0.3, 0.5)
VEIN_SIGNAL = (0.60, 12.0)  # (M0 a.u., T2* ms at 3 T)
VEIN_FAMILIES: dict[str, dict] = {
    "medullary": {"count": (100, 160), "diameter_mm": (0.2, 0.5), "length_mm": (10.0, 30.0)},
    "cortical": {"count": (30, 50), "diameter_mm": (0.6, 2.0), "length_mm": (20.0, 60.0)},
    "deep": {"count": (4, 4), "diameter_mm": (1.5, 2.2), "length_mm": (0.0, 0.0)},
}
# approximate MNI courses (mm) of the right internal cerebral vein and basal vein; mirrored to x < 0
DEEP_COURSES = (
    ((3.0, 2.0, 17.0), (3.0, -10.0, 17.0), (2.0, -22.0, 14.0), (1.0, -32.0, 9.0)),
    ((18.0, 0.0, -12.0), (20.0, -12.0, -8.0), (16.0, -26.0, -2.0), (8.0, -36.0, 4.0)),
)


@dataclass
class Vein:
    """One vein: centreline points (N, 3) world mm, radius mm, delta_chi ppm, family name."""

    points: np.ndarray
    radius_mm: float
    delta_chi: float
    family: str


def _walk(start, direction, step, n_steps, field_dir, stay) -> np.ndarray:
    """Centreline by a persistent random walk; ``field_dir(p, d)`` returns the next direction,
    ``stay(p)`` whether p is still allowed."""
    pts = [start]
    p, d = np.asarray(start, float), np.asarray(direction, float)
    for _ in range(n_steps):
        d = field_dir(p, d)
        p = p + step * d
        if not stay(p):
            break
        pts.append(p.copy())
    return np.asarray(pts)


def draw_veins(mask: np.ndarray, labels: np.ndarray, voxel_size: Sequence[float], affine: np.ndarray,
               rng: np.random.Generator, families: dict | None = None,
               chi_range: Sequence[float] = VEIN_CHI_PPM) -> list[Vein]:
    """Draw the vein network of one subject on its anatomy (brain ``mask``, tissue ``labels`` of
    :mod:`qsmlab.data.phantoms.anatomical`, axis-aligned ``affine``); see the module docstring."""
    fam = {**VEIN_FAMILIES, **(families or {})}
    vs = np.asarray(voxel_size, dtype=np.float64)
    a = np.asarray(affine, dtype=np.float64)
    dist = ndimage.distance_transform_edt(mask, sampling=vs).astype(np.float32)  # mm to the outside
    grad = [g.astype(np.float32) for g in np.gradient(ndimage.gaussian_filter(dist, 1.0), *vs)]
    shape = np.asarray(mask.shape)

    def vox(p):  # world -> nearest voxel index (or None)
        i = np.round(np.linalg.solve(a[:3, :3], p - a[:3, 3])).astype(int)
        return tuple(i) if np.all(i >= 0) and np.all(i < shape) else None

    def world(i):
        return a[:3, :3] @ np.asarray(i, float) + a[:3, 3]

    def inward(p):
        i = vox(p)
        g = np.array([grad[k][i] for k in range(3)], float) if i is not None else np.zeros(3)
        n = np.linalg.norm(g)
        return g / n if n > 1e-6 else np.zeros(3)

    def inside(p, lo=0.0, hi=np.inf):
        i = vox(p)
        return i is not None and bool(mask[i]) and lo <= dist[i] <= hi

    veins: list[Vein] = []
    step = 0.5

    # medullary: from deep white matter outwards (against the inward normal) to ~2 mm from the surface
    f = fam["medullary"]
    wm = np.argwhere((labels == 3) & (dist > 10.0))
    for _ in range(int(rng.integers(f["count"][0], f["count"][1] + 1)) if len(wm) else 0):
        p0 = world(wm[rng.integers(len(wm))])
        n_steps = int(rng.uniform(*f["length_mm"]) / step)

        def out_dir(p, d):
            d = 0.6 * d - 0.4 * inward(p) + rng.normal(0, 0.1, 3)
            return d / np.linalg.norm(d)

        d0 = -inward(p0) + rng.normal(0, 0.3, 3)
        pts = _walk(p0, d0 / np.linalg.norm(d0), step, n_steps, out_dir, lambda p: inside(p, lo=2.0))
        veins.append(Vein(pts, rng.uniform(*f["diameter_mm"]) / 2, float(rng.uniform(*chi_range)), "medullary"))

    # cortical/pial: within 1-3 mm of the surface, tangential
    f = fam["cortical"]
    shell = np.argwhere(mask & (dist >= 1.0) & (dist <= 3.0))
    for _ in range(int(rng.integers(f["count"][0], f["count"][1] + 1)) if len(shell) else 0):
        p0 = world(shell[rng.integers(len(shell))])
        n_steps = int(rng.uniform(*f["length_mm"]) / step)

        def tangential(p, d):
            nrm = inward(p)
            i = vox(p)
            pull = (2.0 - float(dist[i])) * 0.2 if i is not None else 0.0  # keep ~2 mm deep
            d = d - (d @ nrm) * nrm + rng.normal(0, 0.08, 3) + pull * nrm
            return d / max(np.linalg.norm(d), 1e-9)

        d0 = rng.normal(size=3)
        pts = _walk(p0, d0 / np.linalg.norm(d0), step, n_steps, tangential, lambda p: inside(p, lo=0.5, hi=4.0))
        veins.append(Vein(pts, rng.uniform(*f["diameter_mm"]) / 2, float(rng.uniform(*chi_range)), "cortical"))

    # deep: fixed courses (both hemispheres), jittered 2 mm, resampled every 0.5 mm
    f = fam["deep"]
    for course in DEEP_COURSES:
        for sign in (1.0, -1.0):
            c = np.array(course, float) * np.array([sign, 1.0, 1.0]) + rng.normal(0, 1.0, 3)
            seg = [np.linspace(c[k], c[k + 1], int(np.linalg.norm(c[k + 1] - c[k]) / step) + 1)
                   for k in range(len(c) - 1)]
            pts = np.concatenate(seg)
            keep = np.array([inside(p) for p in pts])
            if keep.sum() >= 4:
                veins.append(Vein(pts[keep], rng.uniform(*f["diameter_mm"]) / 2, float(rng.uniform(*chi_range)),
                                  "deep"))
    return veins


def rasterise_veins(veins: Sequence[Vein], shape: Sequence[int], affine: np.ndarray, supersample: int = 4
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Volume fraction (0-1) and ``delta_chi`` map (ppm, = max over veins of fraction x delta_chi) on a grid.

    Each voxel within reach of a centreline is supersampled ``supersample^3`` times; a sub-point is inside
    when it is within the radius of the (densely resampled) centreline. Returns two float32 (X, Y, Z).
    """
    shape = tuple(int(n) for n in shape)
    a = np.asarray(affine, dtype=np.float64)
    vs = np.sqrt((a[:3, :3] ** 2).sum(0))
    inv = np.linalg.inv(a[:3, :3])
    frac = np.zeros(shape, np.float32)
    dchi = np.zeros(shape, np.float32)
    q = int(supersample)
    sub = (np.arange(q) + 0.5) / q - 0.5
    sub = np.stack(np.meshgrid(sub, sub, sub, indexing="ij"), -1).reshape(-1, 3) * vs  # mm offsets
    for v in veins:
        pts = np.asarray(v.points, float)
        if len(pts) < 2:
            continue
        # resample the centreline finely enough that point distance ~ line distance
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        s = np.concatenate([[0.0], np.cumsum(seg)])
        ds = min(0.25 * v.radius_mm, 0.1)
        t = np.arange(0.0, s[-1] + ds / 2, ds)
        line = np.stack([np.interp(t, s, pts[:, k]) for k in range(3)], -1)
        tree = cKDTree(line)
        reach = v.radius_mm + 0.5 * float(np.linalg.norm(vs))
        lo = np.floor(inv @ (line.min(0) - reach - a[:3, 3])).astype(int)
        hi = np.ceil(inv @ (line.max(0) + reach - a[:3, 3])).astype(int) + 1
        lo, hi = np.maximum(np.minimum(lo, hi), 0), np.minimum(np.maximum(lo, hi), shape)
        if np.any(hi <= lo):
            continue
        idx = np.stack(np.meshgrid(*[np.arange(lo[k], hi[k]) for k in range(3)], indexing="ij"), -1).reshape(-1, 3)
        centres = idx @ a[:3, :3].T + a[:3, 3]
        near = tree.query(centres, distance_upper_bound=reach)[0] < reach
        idx, centres = idx[near], centres[near]
        if len(idx) == 0:
            continue
        d = tree.query((centres[:, None, :] + sub[None]).reshape(-1, 3))[0].reshape(len(idx), -1)
        f = (d <= v.radius_mm).mean(1).astype(np.float32)
        keep = f > 0
        ii = tuple(idx[keep].T)
        frac[ii] = np.maximum(frac[ii], f[keep])
        dchi[ii] = np.maximum(dchi[ii], f[keep] * np.float32(v.delta_chi))
    return frac, dchi


def remove_label(labels: np.ndarray, arrays: Sequence[np.ndarray], label: int) -> None:
    """In place: voxels of ``label`` take the label and values of their nearest voxel of another brain label
    (the anatomical phantom's own coarse veins, replaced by this module's network)."""
    sel = labels == label
    if not sel.any():
        return
    _, ind = ndimage.distance_transform_edt(sel | (labels == 0), return_indices=True)
    ii = tuple(ind[k][sel] for k in range(3))
    for arr in (labels, *arrays):
        arr[sel] = arr[ii]
