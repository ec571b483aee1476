"""Anatomical susceptibility phantoms built from the MNI ICBM152 2009a templates inside nilearn.

Tissue classes come from the templates (:mod:`qsmlab.data.phantoms.templates`): CSF where the brain
mask has low GM + WM probability (ventricles, sulci), grey matter where GM >= WM, white matter
elsewhere. Deep grey nuclei are ellipsoids at their MNI coordinates (both hemispheres, from the
ICBM152 / CIT168 atlases, rounded), intersected with the brain minus CSF and, for caudate and putamen,
with GM probability > 0.3. Per subject (one ``numpy.random.Generator``):

- chi per class drawn uniformly from ``chi_ranges`` (ppm relative to CSF; defaults
  :data:`DEFAULT_CHI_RANGES` from Deistung et al., NeuroImage 2013; Lim et al., NeuroImage 2013;
  Li et al., NeuroImage 2011), plus a smooth zero-mean texture per class;
- a random global affine (rotation, per-axis scale) and a smooth random displacement field (cubic
  B-spline on ~32 mm control points), applied with ``scipy.ndimage.map_coordinates`` in the same pass
  that resamples the 1 mm templates to the output voxel size (order 0 for labels, 1 for intensities);
- veins (thin random tubes), optional haemorrhages (irregular blobs) and calcifications (small balls);
- M0 and R2* per class (GRE proton density and T2* at 3 T, e.g. Peran et al., MRM 2007; Yao et al.,
  NeuroImage 2009), jittered per subject, with a smooth multiplicative bias field;
- the background head model (:mod:`qsmlab.data.phantoms.background`).

The output grid is axis-aligned in MNI world space at ``voxel_size`` (mm), centred on the brain, of
``shape`` (default: the brain's bounding box plus ``margin_mm`` on each side); the affine is exact for
that grid, so a crop/pad just moves the origin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from qsmlab.data.phantoms import Phantom
from qsmlab.data.phantoms.background import head_model, world_coords
from qsmlab.data.phantoms.templates import load_mni_templates

LABELS: dict[int, str] = {
    0: "background", 1: "csf", 2: "cortical_gm", 3: "wm", 4: "caudate", 5: "putamen",
    6: "globus_pallidus", 7: "thalamus", 8: "red_nucleus", 9: "substantia_nigra", 10: "dentate",
    11: "vein", 12: "haemorrhage", 13: "calcification",
}
"""Label id -> tissue name of the anatomical ``seg`` map (0 = outside the brain)."""
LABEL_IDS: dict[str, int] = {v: k for k, v in LABELS.items()}

DEFAULT_CHI_RANGES: dict[str, tuple[float, float]] = {
    "csf": (-0.01, 0.01),
    "cortical_gm": (0.00, 0.05),
    "wm": (-0.05, -0.01),
    "caudate": (0.03, 0.09),
    "putamen": (0.03, 0.10),
    "globus_pallidus": (0.10, 0.25),
    "thalamus": (0.00, 0.05),
    "red_nucleus": (0.06, 0.15),
    "substantia_nigra": (0.08, 0.18),
    "dentate": (0.05, 0.15),
    "vein": (0.30, 0.50),
    "haemorrhage": (0.50, 1.50),
    "calcification": (-0.50, -0.10),
}
"""ppm relative to CSF (Deistung 2013, Lim 2013; veins: deoxygenated blood, Fan et al. 2014;
haemorrhage and calcification: Chen et al., Radiology 2014)."""

# (M0 a.u., T2* ms at 3 T) per class; iron-rich nuclei and blood products have short T2*.
TISSUE_SIGNAL: dict[str, tuple[float, float]] = {
    "csf": (1.00, 150.0), "cortical_gm": (0.86, 50.0), "wm": (0.72, 45.0), "caudate": (0.84, 40.0),
    "putamen": (0.82, 33.0), "globus_pallidus": (0.76, 20.0), "thalamus": (0.80, 42.0),
    "red_nucleus": (0.75, 22.0), "substantia_nigra": (0.74, 20.0), "dentate": (0.75, 24.0),
    "vein": (0.60, 12.0), "haemorrhage": (0.50, 8.0), "calcification": (0.30, 12.0),
}
SCALP_SIGNAL, SKULL_SIGNAL = (0.60, 30.0), (0.05, 1.0)

# name, centre (mm, right hemisphere; mirrored to x < 0), radii (mm), require GM probability > 0.3
NUCLEI: tuple[tuple[str, tuple[float, float, float], tuple[float, float, float], bool], ...] = (
    ("caudate", (13.0, 12.0, 10.0), (4.5, 10.0, 8.0), True),
    ("putamen", (25.0, 3.0, 1.0), (5.5, 14.0, 8.0), True),
    ("thalamus", (11.0, -18.0, 7.0), (7.0, 12.0, 7.0), False),
    ("globus_pallidus", (19.0, -3.0, -1.0), (3.5, 8.0, 4.5), False),
    ("substantia_nigra", (11.0, -16.0, -13.0), (3.0, 6.5, 2.5), False),
    ("red_nucleus", (5.0, -20.0, -9.0), (3.0, 3.5, 3.5), False),
    ("dentate", (15.0, -57.0, -35.0), (6.0, 7.0, 5.0), False),
)
BRAIN_CLASSES = tuple(LABELS[i] for i in range(1, 11))


@lru_cache(maxsize=1)
def template_labels() -> np.ndarray:
    """Tissue labels (:data:`LABELS` 0-10) on the 1 mm MNI template grid (cached, read-only)."""
    t = load_mni_templates()
    lab = np.zeros(t.shape, dtype=np.int16)
    csf = t.brain & (t.gm + t.wm < 0.5)
    lab[t.brain] = LABEL_IDS["wm"]
    lab[t.brain & (t.gm >= t.wm)] = LABEL_IDS["cortical_gm"]
    lab[csf] = LABEL_IDS["csf"]
    tissue = t.brain & ~csf
    for name, centre, radii, need_gm in NUCLEI:
        for sign in (1.0, -1.0):
            c = (sign * centre[0], centre[1], centre[2])
            box = _ellipsoid_box(t.shape, t.affine, c, radii)  # only the ellipsoid's bounding box
            sel = _ellipsoid_mm(t.shape, t.affine, c, radii, box) & tissue[box]
            if need_gm:
                sel &= t.gm[box] > 0.3
            lab[box][sel] = LABEL_IDS[name]
    lab.setflags(write=False)
    return lab


def _ellipsoid_box(shape, affine, centre, radii) -> tuple[slice, slice, slice]:
    """Voxel slices (axis-aligned ``affine``) that contain the ellipsoid."""
    a = np.asarray(affine, dtype=np.float64)
    out = []
    for i in range(3):
        ends = sorted(((centre[i] + s * radii[i]) - a[i, 3]) / a[i, i] for s in (-1.0, 1.0))
        out.append(slice(max(int(np.floor(ends[0])), 0), min(int(np.ceil(ends[1])) + 1, int(shape[i]))))
    return tuple(out)


def _ellipsoid_mm(shape, affine, centre, radii, box=None) -> np.ndarray:
    """Boolean ellipsoid (world mm) on the grid, or on the sub-grid ``box`` (slices) of it."""
    x = world_coords(shape, affine)
    if box is not None:
        x = [x[i][tuple(box[i] if j == i else slice(None) for j in range(3))] for i in range(3)]
    return sum(((x[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1.0


@lru_cache(maxsize=1)
def _brain_box_mm() -> tuple[np.ndarray, np.ndarray]:
    t = load_mni_templates()
    idx = np.argwhere(t.brain)
    lo = t.affine[:3, :3] @ idx.min(0) + t.affine[:3, 3]
    hi = t.affine[:3, :3] @ idx.max(0) + t.affine[:3, 3]
    return lo, hi


def output_grid(voxel_size: Sequence[float], shape: Sequence[int] | None = None,
                margin_mm: float = 20.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """Grid shape and affine at ``voxel_size`` (mm) centred on the MNI brain.

    ``shape=None``: the brain's bounding box plus ``margin_mm`` per side (room for skull and scalp).
    A given ``shape`` crops or pads that field of view symmetrically around the brain centre.
    """
    vs = np.asarray(voxel_size, dtype=np.float64)
    lo, hi = _brain_box_mm()
    if shape is None:
        shape = np.ceil((hi - lo + 2 * margin_mm) / vs).astype(int) + 1
    shape = tuple(int(n) for n in shape)
    centre = (lo + hi) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag(vs)
    affine[:3, 3] = centre - vs * (np.asarray(shape) - 1) / 2.0
    return shape, affine


def _smooth_noise(shape, voxel_size, sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise, normalised to zero mean and unit sd (float32)."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                sigma=np.maximum(sigma_mm / np.asarray(voxel_size), 0.5), mode="reflect")
    return (n - n.mean()) / max(float(n.std()), 1e-12)


def _displacement(shape, voxel_size, deform_mm: float, rng, spacing_mm: float = 32.0) -> list[np.ndarray]:
    """Smooth random displacement (mm) per axis: Gaussian control points, cubic-spline upsampled."""
    ext = np.asarray(shape) * np.asarray(voxel_size)
    ctrl = tuple(int(max(3, np.ceil(e / spacing_mm) + 1)) for e in ext)
    # The cubic-spline zoom is separable: one (out, ctrl) matrix per axis, applied as three small
    # products, gives ndimage.zoom's result (identical to float32 round-off) ~15x faster on 1 mm grids.
    mats = [ndimage.zoom(np.eye(n), (s / n, 1.0), order=3, mode="nearest", grid_mode=True)
            for s, n in zip(shape, ctrl)]
    out = []
    for _ in range(3):
        c = rng.normal(0.0, deform_mm, ctrl).astype(np.float32)
        z = np.einsum("ai,bj,ck,ijk->abc", *mats, c.astype(np.float64), optimize=True).astype(np.float32)
        pad = [(0, max(0, s - zs)) for s, zs in zip(shape, z.shape)]
        z = np.pad(z, pad, mode="edge")[: shape[0], : shape[1], : shape[2]]
        out.append(z)
    return out


def _sample_coords(shape, affine, rng, deform_mm, rotate_deg, scale) -> list[np.ndarray]:
    """Template voxel coordinates for every output voxel: global affine + smooth deformation."""
    t = load_mni_templates()
    lo, hi = _brain_box_mm()
    c = (lo + hi) / 2.0
    rot = Rotation.from_rotvec(rng.normal(0, 1, 3) / np.sqrt(3) * np.deg2rad(rotate_deg)).as_matrix()
    s = np.diag(rng.uniform(1.0 - scale, 1.0 + scale, 3))
    g = np.eye(4)  # output world -> template world: x' = c + S R (x - c)
    g[:3, :3] = s @ rot
    g[:3, 3] = c - s @ rot @ c
    m = np.linalg.inv(t.affine) @ g @ affine  # output voxel -> template voxel
    disp = _displacement(shape, np.sqrt((affine[:3, :3] ** 2).sum(0)), deform_mm, rng) if deform_mm > 0 else None
    ijk = [np.arange(n, dtype=np.float32).reshape([-1 if a == ax else 1 for a in range(3)])
           for ax, n in enumerate(shape)]
    tv = np.sqrt((t.affine[:3, :3] ** 2).sum(0))
    coords = []
    for r in range(3):
        cr = m[r, 0] * ijk[0] + m[r, 1] * ijk[1] + m[r, 2] * ijk[2] + np.float32(m[r, 3])
        cr = np.broadcast_to(cr, shape).astype(np.float32)
        if disp is not None:
            cr = cr + disp[r] / np.float32(tv[r])
        coords.append(cr)
    return coords


def _tube_voxels(points_mm: np.ndarray, radius_mm: float, voxel_size: np.ndarray, shape) -> np.ndarray:
    """Voxel indices (N, 3) within ``radius_mm`` of any of the points (mm, voxel frame)."""
    rv = np.ceil(radius_mm / voxel_size).astype(int)
    off = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in rv], indexing="ij"), -1).reshape(-1, 3)
    base = np.round(points_mm / voxel_size).astype(int)
    cand = (base[:, None, :] + off[None]).reshape(-1, 3)
    pts = np.repeat(points_mm, len(off), axis=0)
    keep = np.linalg.norm(cand * voxel_size - pts, axis=1) <= radius_mm
    keep &= np.all((cand >= 0) & (cand < np.asarray(shape)), axis=1)
    return np.unique(cand[keep], axis=0)


def _add_veins(lab, chi, mask, vs, rng, n_veins, chi_range) -> int:
    inside = np.argwhere(mask)
    step = 0.5 * float(vs.min())
    for _ in range(n_veins):
        p = inside[rng.integers(len(inside))] * vs
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        pts = []
        for _ in range(int(rng.uniform(20.0, 60.0) / step)):
            pts.append(p.copy())
            d = d + rng.normal(0, 0.15, 3)
            d /= np.linalg.norm(d)
            p = p + step * d
            i = np.round(p / vs).astype(int)
            if np.any(i < 0) or np.any(i >= lab.shape) or not mask[tuple(i)]:
                break
        r = max(float(rng.uniform(0.6, 1.2)), 0.55 * float(vs.min()))
        v = _tube_voxels(np.asarray(pts), r, vs, lab.shape)
        v = v[mask[tuple(v.T)]]
        lab[tuple(v.T)] = LABEL_IDS["vein"]
        chi[tuple(v.T)] = rng.uniform(*chi_range)
    return n_veins


def _add_blob(lab, chi, mask, vs, rng, name, radii_mm, irregular, chi_range) -> None:
    cand = np.argwhere(mask & (lab != LABEL_IDS["csf"]))
    if len(cand) == 0:
        return
    c = cand[rng.integers(len(cand))]
    r = np.maximum(np.asarray(radii_mm) / vs, 0.6)
    lo = np.maximum(c - np.ceil(r * 1.5).astype(int), 0)
    hi = np.minimum(c + np.ceil(r * 1.5).astype(int) + 1, lab.shape)
    g = np.meshgrid(*[np.arange(lo[i], hi[i]) - c[i] for i in range(3)], indexing="ij")
    q = np.sqrt(sum((g[i] / r[i]) ** 2 for i in range(3)))
    if irregular:  # lobulated boundary: radius modulated by smooth noise
        q = q + 0.25 * ndimage.gaussian_filter(rng.standard_normal(q.shape), 1.5)
    sl = tuple(slice(lo[i], hi[i]) for i in range(3))
    sel = (q <= 1.0) & mask[sl]
    lab[sl][sel] = LABEL_IDS[name]
    chi[sl][sel] = rng.uniform(*chi_range)


def anatomical_phantom(
    rng: np.random.Generator,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    shape: Sequence[int] | None = None,
    chi_ranges: Mapping[str, Sequence[float]] | None = None,
    margin_mm: float = 20.0,
    deform_mm: float = 2.0,
    rotate_deg: float = 5.0,
    scale: float = 0.05,
    veins: Sequence[int] = (4, 10),
    haemorrhage_probability: float = 0.25,
    calcification_probability: float = 0.25,
    texture_ppm: float = 0.01,
    background: bool = True,
) -> Phantom:
    """One anatomical phantom (see module docstring); everything random comes from ``rng``.

    Args:
        rng: the subject's generator (same seed -> same phantom).
        voxel_size: output voxel size (mm), any (an)isotropic value.
        shape: output grid (X, Y, Z); None = brain bounding box + ``margin_mm``.
        chi_ranges: per-class (lo, hi) ppm overriding :data:`DEFAULT_CHI_RANGES`.
        deform_mm: sd (mm) of the smooth random displacement; 0 disables it.
        rotate_deg, scale: sd of the global rotation (deg) and max per-axis scaling (fraction).
        veins: (min, max) number of veins.
        haemorrhage_probability, calcification_probability: chance of 1-2 haemorrhages / 1-3 calcifications.
        texture_ppm: sd (ppm) of the smooth within-class texture (zero mean per class).
        background: build the head model (skull, air cavities); False leaves ``chi_bg`` zero.
    Returns:
        :class:`Phantom` with ``labels`` in :data:`LABELS`.
    """
    ranges = {**DEFAULT_CHI_RANGES, **{k: tuple(v) for k, v in (chi_ranges or {}).items()}}
    vs = np.asarray(voxel_size, dtype=np.float64)
    shape, affine = output_grid(vs, shape, margin_mm)
    coords = _sample_coords(shape, affine, rng, deform_mm, rotate_deg, scale)
    lab = ndimage.map_coordinates(template_labels(), coords, order=0, mode="constant", cval=0)
    t1 = ndimage.map_coordinates(load_mni_templates().t1, coords, order=1, mode="constant", cval=0.0)
    del coords
    lab = lab.astype(np.int16)
    mask = lab > 0
    drawn = {name: float(rng.uniform(*ranges[name])) for name in BRAIN_CLASSES}
    lut = np.zeros(len(LABELS), dtype=np.float32)
    for name, v in drawn.items():
        lut[LABEL_IDS[name]] = v
    chi = lut[lab]
    if texture_ppm > 0:
        tex = _smooth_noise(shape, vs, 3.0, rng) * np.float32(texture_ppm)
        ids = np.arange(1, 11)
        means = np.zeros(len(LABELS), dtype=np.float32)
        means[ids] = ndimage.mean(tex, lab, ids)
        chi = np.where(mask, chi + tex - means[lab], 0.0).astype(np.float32)
    n_v = int(rng.integers(veins[0], veins[1] + 1)) if veins[1] > 0 else 0
    _add_veins(lab, chi, mask, vs, rng, n_v, ranges["vein"])
    n_h = int(rng.integers(1, 3)) if rng.random() < haemorrhage_probability else 0
    for _ in range(n_h):
        _add_blob(lab, chi, mask, vs, rng, "haemorrhage", rng.uniform(3.0, 10.0, 3), True, ranges["haemorrhage"])
    n_c = int(rng.integers(1, 4)) if rng.random() < calcification_probability else 0
    for _ in range(n_c):
        _add_blob(lab, chi, mask, vs, rng, "calcification", [rng.uniform(1.0, 3.0)] * 3, False,
                  ranges["calcification"])
    # Magnitude and R2*: per-class values, jittered per subject; T1 template adds within-class contrast.
    m0_lut = np.zeros(len(LABELS), dtype=np.float32)
    r2_lut = np.zeros(len(LABELS), dtype=np.float32)
    for name, (m0, t2s) in TISSUE_SIGNAL.items():
        m0_lut[LABEL_IDS[name]] = m0 * rng.uniform(0.9, 1.1)
        r2_lut[LABEL_IDS[name]] = 1000.0 / (t2s * rng.uniform(0.85, 1.15))
    m0 = m0_lut[lab] * (0.9 + 0.2 * t1)
    r2 = r2_lut[lab]
    if background:
        hm = head_model(mask, affine, rng)
        chi_bg = hm.chi_bg
        m0[hm.scalp] = SCALP_SIGNAL[0]
        r2[hm.scalp] = 1000.0 / SCALP_SIGNAL[1]
        m0[hm.skull] = SKULL_SIGNAL[0]
        r2[hm.skull] = 1000.0 / SKULL_SIGNAL[1]
    else:
        chi_bg = np.zeros(shape, dtype=np.float32)
    bias = np.exp(0.15 * _smooth_noise(shape, vs, 40.0, rng))
    m0 = (m0 * bias).astype(np.float32)
    meta = {"chi_drawn_ppm": drawn, "n_veins": n_v, "n_haemorrhages": n_h, "n_calcifications": n_c}
    return Phantom(chi=chi.astype(np.float32), mask=mask, labels=lab, m0=m0, r2star=r2.astype(np.float32),
                   chi_bg=chi_bg, affine=affine, label_names=dict(LABELS), kind="anatomical", meta=meta)
