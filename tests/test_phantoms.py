"""Phantoms: seeded determinism, tissue susceptibilities within the recipe ranges, grids and affines,
random shapes, and the background head model (air / bone / tissue susceptibilities)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmlab.data.phantoms import (
    DEFAULT_CHI_RANGES,
    LABELS,
    anatomical_phantom,
    head_model,
    random_shapes_phantom,
)
from qsmlab.data.phantoms.anatomical import LABEL_IDS
from qsmlab.data.phantoms.background import CHI_AIR_MINUS_TISSUE, CHI_BONE_MINUS_TISSUE
from qsmlab.physics import voxel_size_from_affine

VS = (3.0, 3.0, 3.0)
NUCLEI = ("caudate", "putamen", "globus_pallidus", "thalamus", "red_nucleus", "substantia_nigra", "dentate")


@pytest.fixture(scope="module")
def anat():
    """Two phantoms of seed 0 and one of seed 1, 3 mm, haemorrhage forced so every label can occur."""
    kw = dict(voxel_size=VS, haemorrhage_probability=1.0, calcification_probability=1.0)
    return (anatomical_phantom(np.random.default_rng(0), **kw), anatomical_phantom(np.random.default_rng(0), **kw),
            anatomical_phantom(np.random.default_rng(1), **kw))


def test_anatomical_deterministic_per_seed_and_differs_across_seeds(anat):
    a, b, c = anat
    for name in ("chi", "labels", "m0", "r2star", "chi_bg", "mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.shape == c.shape  # same recipe grid ...
    assert np.abs(a.chi - c.chi).mean() > 1e-3  # ... different anatomy (deformation) and susceptibilities
    assert (a.labels != c.labels).mean() > 0.01


def test_anatomical_label_means_within_recipe_ranges_and_nuclei_present(anat):
    for p in anat:
        assert set(np.unique(p.labels)) <= set(LABELS)
        for name, (lo, hi) in DEFAULT_CHI_RANGES.items():
            sel = p.labels == LABEL_IDS[name]
            if name in NUCLEI + ("csf", "cortical_gm", "wm", "haemorrhage", "calcification"):
                assert sel.sum() > 0, f"label {name} empty"
            if sel.any():
                m = float(p.chi[sel].mean())
                # texture is zero-mean per class; lesions painted afterwards can shift a mean by < 1e-3
                assert lo - 2e-3 <= m <= hi + 2e-3, f"{name}: mean chi {m:.4f} outside [{lo}, {hi}]"
        assert np.all(p.chi[~p.mask] == 0) and np.all(p.labels[~p.mask] == 0)
        # anatomy: a brain of plausible size (the ICBM152 mask, ~1.7-1.9 L incl. CSF), WM diamagnetic
        vol_l = p.mask.sum() * np.prod(VS) / 1e6
        assert 1.3 < vol_l < 2.3, vol_l
        assert p.chi[p.labels == LABEL_IDS["wm"]].mean() < 0 < p.chi[p.labels == LABEL_IDS["globus_pallidus"]].mean()


def test_anatomical_magnitude_and_r2star_follow_tissue(anat):
    p = anat[0]
    lab = p.labels
    m = {n: float(p.m0[lab == LABEL_IDS[n]].mean()) for n in ("csf", "cortical_gm", "wm")}
    assert m["csf"] > m["cortical_gm"] > m["wm"] > 0  # GRE proton density order
    r = {n: float(np.median(p.r2star[lab == LABEL_IDS[n]])) for n in ("wm", "globus_pallidus", "vein")}
    assert r["vein"] > r["globus_pallidus"] > r["wm"]  # iron and deoxyhaemoglobin shorten T2*
    assert np.all(p.m0[p.chi_bg == 0] == 0)  # no signal from air


def test_anatomical_grid_affine_anisotropic_and_crop_pad():
    kw = dict(deform_mm=0.0, rotate_deg=0.0, scale=0.0, veins=(0, 0), haemorrhage_probability=0.0,
              calcification_probability=0.0, background=False)
    iso = anatomical_phantom(np.random.default_rng(0), voxel_size=(3.0, 3.0, 3.0), **kw)
    ani = anatomical_phantom(np.random.default_rng(0), voxel_size=(2.5, 3.0, 4.0), shape=(64, 60, 40), **kw)
    assert ani.shape == (64, 60, 40)
    np.testing.assert_allclose(voxel_size_from_affine(ani.affine), (2.5, 3.0, 4.0))

    def centroid_mm(p):
        c = np.argwhere(p.mask).mean(0)
        return p.affine[:3, :3] @ c + p.affine[:3, 3]

    # the same anatomy lands at the same world position whatever the grid
    np.testing.assert_allclose(centroid_mm(iso), centroid_mm(ani), atol=2.0)
    vol_iso, vol_ani = iso.mask.sum() * 27.0, ani.mask.sum() * 30.0
    assert abs(vol_ani / vol_iso - 1) < 0.05


def test_random_shapes_deterministic_and_in_mask():
    kw = dict(shape=(32, 32, 32), voxel_size=(2.0, 2.0, 2.0), n_shapes=(15, 25))
    a = random_shapes_phantom(np.random.default_rng(5), **kw)
    b = random_shapes_phantom(np.random.default_rng(5), **kw)
    c = random_shapes_phantom(np.random.default_rng(6), **kw)
    np.testing.assert_array_equal(a.chi, b.chi)
    np.testing.assert_array_equal(a.chi_bg, b.chi_bg)
    assert np.abs(a.chi - c.chi).mean() > 1e-3
    assert a.shape == (32, 32, 32)
    assert np.all(a.chi[~a.mask] == 0)
    assert len(np.unique(a.chi[a.mask])) > 5  # many overlapping constant-chi shapes
    assert len(set(np.unique(a.labels)) - {0, 1}) >= 2  # several shape kinds
    assert (a.chi != 0).sum() > 0.05 * a.mask.sum()


def test_random_shapes_single_shape_values_within_range():
    p = random_shapes_phantom(np.random.default_rng(2), shape=(24, 24, 24), voxel_size=(2.0, 2.0, 2.0),
                              n_shapes=(1, 1), chi_range=(0.1, 0.2), background=False)
    vals = np.unique(p.chi[p.mask])
    assert set(vals) - {0.0}, "the one shape must be visible"
    assert np.all((vals == 0) | ((vals >= 0.1) & (vals <= 0.2)))
    assert np.all(p.chi_bg == 0)


def test_head_model_susceptibilities_and_geometry():
    shape, vs = (40, 40, 40), 3.0
    affine = np.diag([vs, vs, vs, 1.0])
    affine[:3, 3] = -vs * 19.5
    g = np.indices(shape).astype(float) - 19.5
    brain = (g[0] / 11) ** 2 + (g[1] / 13) ** 2 + (g[2] / 10) ** 2 <= 1
    cav = [((0.0, 13 * vs + 8.0, 0.0), (8.0, 5.0, 8.0))]  # an air pocket in front of the "brain"
    hm = head_model(brain, affine, np.random.default_rng(0), cavities=cav, neck=False)
    assert np.all(hm.chi_bg[brain] == -CHI_AIR_MINUS_TISSUE)  # tissue relative to air
    assert np.all(hm.chi_bg[~hm.head] == 0)  # air outside
    assert np.allclose(hm.chi_bg[hm.skull], -CHI_AIR_MINUS_TISSUE + CHI_BONE_MINUS_TISSUE)
    assert hm.cavities.sum() > 5 and np.all(hm.chi_bg[hm.cavities] == 0)
    assert hm.skull.sum() > 0.3 * brain.sum()
    d = ndimage.distance_transform_edt(~brain, sampling=vs)
    assert d[hm.cavities].min() > 2.0 and d[hm.skull].min() > 1.0  # nothing outside the brain touches it
    assert hm.head.sum() > brain.sum() + hm.skull.sum()  # a scalp layer beyond the skull
