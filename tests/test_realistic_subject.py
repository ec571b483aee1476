"""Realistic in-vivo-like subjects (qsmlab.data.realistic): each component switches off cleanly.

Small on purpose: 2 mm, a 32^3 crop (64^3 fine grid), seconds per subject.

- all components off: exactly the clean subject (chi, local field = A(chi * mask), background, phase and
  magnitude per echo);
- anisotropy alone: the scalar truth is the clean chi (the tensor's mean); with delta_chi = 0 the field is
  the clean one, with delta_chi > 0 it differs by a field the scalar model cannot make;
- acquisition alone: on the fine grid and k-space cropped, the physical local field still equals the scalar
  kernel applied to the (band-limited) truth: the crop and the dipole kernel commute at low frequency;
- veins alone: chi changes only where the new veins are or where the clean phantom's coarse veins were;
- noise alone: the field a method receives is the pipeline's (eroded valid mask inside the brain), off the
  exact field by about the noise.
"""

import numpy as np
import pytest

from qsmlab.data.invivo_like import invivo_like_subject
from qsmlab.data.phantoms.anatomical import LABEL_IDS
from qsmlab.data.realistic import RealismParams, realistic_subject, resolve_components
from qsmlab.physics import DipoleOperator

KW = {"voxel_size": (2.0, 2.0, 2.0), "tilt_deg": 20.0, "shape": (32, 32, 32)}


@pytest.fixture(scope="module")
def clean():
    return invivo_like_subject(1, **KW)


def _rel(a, b, m):
    a, b = a[m] - a[m].mean(), b[m] - b[m].mean()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_components_resolve():
    assert all(resolve_components(None).values())
    assert resolve_components(["veins"]) == {"anisotropy": False, "veins": True, "acquisition": False,
                                             "noise": False}
    assert resolve_components({"noise": False})["noise"] is False
    with pytest.raises(ValueError, match="unknown realism component"):
        resolve_components(["vein"])


def test_all_off_is_the_clean_subject(clean):
    r = realistic_subject(1, components=[], **KW)
    np.testing.assert_array_equal(r.chi, clean.chi)
    np.testing.assert_array_equal(r.mask, clean.mask)
    np.testing.assert_allclose(r.local_field, clean.local_field * clean.mask, atol=1e-9)
    np.testing.assert_allclose(r.local_field_exact, clean.local_field, atol=1e-9)
    np.testing.assert_allclose(r.local_field_scalar, clean.local_field, atol=1e-9)
    np.testing.assert_allclose(r.background_field, clean.background_field, atol=1e-9)
    np.testing.assert_allclose(r.phase, clean.phase, atol=1e-5)
    np.testing.assert_allclose(r.magnitude, clean.magnitude, atol=1e-6)
    assert r.noise_sigma == pytest.approx(clean.noise_sigma)
    op = DipoleOperator((2.0, 2.0, 2.0), r.b0_dir, pad_factor=2.0)
    np.testing.assert_allclose(r.local_field_exact, op.A(r.chi * r.mask), atol=1e-7)


def test_anisotropy_alone_keeps_the_scalar_truth_and_adds_a_tensor_field(clean):
    r0 = realistic_subject(1, components=["anisotropy"], params=RealismParams(delta_chi_ppm=(0.0, 0.0)), **KW)
    np.testing.assert_allclose(r0.local_field_exact, clean.local_field, atol=1e-7)
    r = realistic_subject(1, components=["anisotropy"], **KW)
    assert 0.01 <= r.delta_chi_ppm <= 0.02
    np.testing.assert_array_equal(r.chi, clean.chi)
    np.testing.assert_allclose(r.local_field_scalar, clean.local_field, atol=1e-7)
    d = (r.local_field_exact - r.local_field_scalar)[r.mask]
    wm = (r.labels == LABEL_IDS["wm"])[r.mask]
    # of the order delta_chi / 3 in white matter, several times smaller than the field itself
    assert 0.05 * r.delta_chi_ppm < np.sqrt(np.mean(d[wm] ** 2)) < 0.5 * r.delta_chi_ppm
    assert np.sqrt(np.mean(d**2)) < 0.5 * np.sqrt(np.mean(clean.local_field[clean.mask] ** 2))


def test_acquisition_alone_crop_commutes_with_the_dipole_kernel(clean):
    r = realistic_subject(1, components=["acquisition"], **KW)
    assert r.meta["fine_shape"] == [2 * (32 + 16)] * 3
    inner = np.zeros(r.mask.shape, bool)
    inner[4:-4, 4:-4, 4:-4] = True
    m = r.mask & inner
    assert _rel(r.local_field_exact, r.local_field_scalar, m) < 0.05
    # the band-limited truth is the clean chi seen through the scan's band: close, not equal
    assert 0.0 < _rel(r.chi, clean.chi, m) < 0.35


def test_veins_alone_change_chi_only_at_veins(clean):
    r = realistic_subject(1, components=["veins"], **KW)
    assert r.meta["n_veins"] > 50 and r.vein_fraction.max() > 0.5
    changed = np.abs(r.chi - clean.chi) > 1e-7
    allowed = (r.vein_fraction > 0) | (clean.labels == LABEL_IDS["vein"])
    assert changed.any() and not (changed & ~allowed).any()
    # partial volume: chi rises by fraction x delta_chi, delta_chi of blood 0.3-0.5 ppm relative to tissue
    sel = (r.vein_fraction > 0.3) & (clean.labels != LABEL_IDS["vein"]) & r.mask
    ratio = (r.chi - clean.chi)[sel] / r.vein_fraction[sel]
    assert sel.sum() > 20 and 0.3 - 1e-4 <= np.median(ratio) <= 0.5 + 1e-4


def test_noise_alone_hands_over_the_pipeline_field(clean):
    r = realistic_subject(1, components=["noise"], **KW)
    assert r.valid_mask.sum() < r.mask.sum() and not (r.valid_mask & ~r.mask).any()
    v = r.valid_mask
    err = (r.local_field - r.local_field_exact)[v]
    err = err - err.mean()
    assert r.noise_std_ppm > 0
    assert np.sqrt(np.mean(err**2)) > 0.5 * r.noise_std_ppm
    assert np.sqrt(np.mean(err**2)) < 0.5 * np.sqrt(np.mean(clean.local_field[v] ** 2))
