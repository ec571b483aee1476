"""In-vivo-like subjects (qsmlab.data.invivo_like): the physics contract on the output grid, a harmonic
background (also when a crop cuts brain and skull away), phase that encodes the total field, a noise level
that matches the stated SNR and field noise, the tilt geometry, and the recipe kept in step with the module.
Fast tests run at 2 mm; the 1 mm and 0.5 x 0.5 x 2 mm checks of the in-vivo amplitudes are ``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmlab.data.invivo_like import (
    INVIVO_CHI_RANGES,
    INVIVO_SNR,
    INVIVO_TE,
    INVIVO_TEXTURE_PPM,
    INVIVO_VEINS,
    field_noise_ppm,
    invivo_like_subject,
)
from qsmlab.data.phantoms.anatomical import LABEL_IDS
from qsmlab.data.recipe import DEFAULT_RECIPE, load_recipe
from qsmlab.data.simulate import wrap_phase
from qsmlab.physics import DipoleOperator
from qsmlab.physics.units import ppm_to_rad
from qsmlab.recon.echo_fit import fit_field

VS = (2.0, 2.0, 2.0)
CROP = (40, 44, 36)


@pytest.fixture(scope="module")
def full():
    return invivo_like_subject(3, voxel_size=VS, tilt_deg=25.0, snr=None)


@pytest.fixture(scope="module")
def crop():
    return invivo_like_subject(3, voxel_size=VS, tilt_deg=25.0, snr=None, shape=CROP)


def _lap_ratio(bg, local, mask, vs) -> float:
    inner = ndimage.binary_erosion(mask, iterations=2)

    def lap(f):
        return sum((np.roll(f, 1, a) + np.roll(f, -1, a) - 2.0 * f) / vs[a] ** 2 for a in range(3))

    return float(np.std(lap(bg.astype(np.float64))[inner]) / np.std(lap(local.astype(np.float64))[inner]))


@pytest.mark.parametrize("which", ["full", "crop"])
def test_contract_geometry_and_phase(which, request):
    s = request.getfixturevalue(which)
    n = s.chi.shape
    assert s.phase.shape == n + (len(INVIVO_TE),) and s.magnitude.shape == s.phase.shape and s.te == INVIVO_TE
    for a in (s.chi, s.local_field, s.background_field, s.total_field, s.phase, s.magnitude):
        assert a.dtype == np.float32
    t = np.deg2rad(25.0)
    np.testing.assert_allclose(s.b0_dir, [0.0, np.sin(t), np.cos(t)], atol=1e-12)  # pitch about i
    op = DipoleOperator(voxel_size=VS, b0_dir=s.b0_dir, pad_factor=2.0)
    np.testing.assert_array_equal(s.local_field, op.A(s.chi * s.mask).astype(np.float32))  # exact label
    np.testing.assert_allclose(s.total_field, s.local_field + s.background_field, atol=1e-6)
    # noiseless: the wrapped phase is phi0 + 2 pi gamma B0 TE * total
    model = s.phase_offset[..., None] + np.stack([ppm_to_rad(s.total_field, te, 3.0) for te in s.te], -1)
    signal = s.magnitude > 1e-6  # air has no signal and no defined phase
    assert signal[s.mask].all() and np.abs(wrap_phase(model - s.phase))[signal].max() < 1e-4
    assert s.phase.max() <= np.pi and s.phase.min() > -np.pi
    decay = [float(s.magnitude[..., e][s.mask].mean()) for e in range(len(s.te))]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    # background: harmonic in the brain, even with cut-away brain and skull around a crop
    assert _lap_ratio(s.background_field, s.local_field, s.mask, VS) <= 0.10


def test_healthy_susceptibilities(full):
    m = full.mask
    assert not np.isin(full.labels, [LABEL_IDS["haemorrhage"], LABEL_IDS["calcification"]]).any()
    assert (full.labels == LABEL_IDS["vein"]).sum() > 0
    lo, hi = np.percentile(full.chi[m], [1, 99])
    assert -0.1 <= lo < 0 < hi <= 0.2
    gp = full.chi[full.labels == LABEL_IDS["globus_pallidus"]].mean()
    wm = full.chi[full.labels == LABEL_IDS["wm"]].mean()
    assert 0.1 < gp < 0.22 and -0.07 < wm < -0.03


def test_crop_is_a_window_of_the_same_head(full, crop):
    sl = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(full.chi.shape, CROP))
    np.testing.assert_array_equal(crop.chi, full.chi[sl])
    start = np.array([s.start for s in sl], dtype=float)
    np.testing.assert_allclose(crop.affine[:3, 3], full.affine[:3, 3] + full.affine[:3, :3] @ start)
    # the same measurement split differently: the crop's background carries the cut-away brain, so the
    # totals agree away from the crop faces (they differ by A vs exact voxel field of that tissue)
    inner = np.zeros(CROP, bool)
    inner[3:-3, 3:-3, 3:-3] = True
    m = inner & crop.mask
    d = crop.total_field - full.total_field[sl]
    assert np.std(d[m]) < 0.1 * np.std(crop.local_field[m])
    assert np.abs(crop.background_field[m]).std() > 2 * np.abs(crop.local_field[m]).std()  # strong background


def test_same_seed_same_head_and_noise_at_any_tilt():
    a = invivo_like_subject(3, voxel_size=VS, tilt_deg=0.0, shape=CROP)
    b = invivo_like_subject(3, voxel_size=VS, tilt_deg=20.0, shape=CROP)
    np.testing.assert_array_equal(a.chi, b.chi)
    np.testing.assert_array_equal(a.phase_offset, b.phase_offset)
    assert a.noise_sigma == pytest.approx(b.noise_sigma, rel=1e-6)
    assert np.abs(a.background_field - b.background_field)[a.mask].max() > 0.05  # the field did change


def test_noise_matches_snr_and_field_noise():
    s = invivo_like_subject(3, voxel_size=VS, tilt_deg=10.0, shape=CROP)  # default SNR 60
    assert s.snr_per_echo[0] == pytest.approx(INVIVO_SNR, rel=1e-4)
    assert all(b < a for a, b in zip(s.snr_per_echo, s.snr_per_echo[1:])) and s.snr_per_echo[-1] > 35
    # unwrap with the truth, fit over TE: the field error is the stated noise floor
    truth = s.phase_offset[..., None] + np.stack([ppm_to_rad(s.total_field, te, 3.0) for te in s.te], -1)
    unwrapped = s.phase + 2 * np.pi * np.round((truth - s.phase) / (2 * np.pi))
    fit = fit_field(unwrapped, s.te, 3.0, s.magnitude, s.mask)
    err = (fit.field - s.total_field)[s.mask]
    robust_sd = 1.4826 * np.median(np.abs(err - np.median(err)))
    assert robust_sd == pytest.approx(s.noise_std_ppm, rel=0.25)
    # the formula: equal magnitudes over two echoes -> sigma * sqrt(2) / (m * dTE) in rad/s
    m = np.ones((1, 1, 1, 2))
    expect = 0.1 * np.sqrt(2) / 0.01 / ppm_to_rad(1.0, 1.0, 3.0)
    assert float(field_noise_ppm(m, (0.01, 0.02), 3.0, 0.1)[0, 0, 0]) == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("kw, match", [
    ({"seed": -1}, "seed"), ({"seed": 0, "te": (0.01, 0.005)}, "te"),
    ({"seed": 0, "shape": (4, 4, 4)}, "shape"),
    ({"seed": 0, "voxel_size": (1.0, 0.0, 1.0)}, "voxel_size"),
])
def test_bad_arguments_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        invivo_like_subject(**kw)


def test_recipe_generates_the_same_kind_of_data():
    r, _ = load_recipe(DEFAULT_RECIPE.parent / "invivo_like_recipe.yaml")
    assert r["te"] == list(INVIVO_TE) and r["snr"] == INVIVO_SNR and r["b0_tesla"] == 3.0
    for k, v in INVIVO_CHI_RANGES.items():
        assert r["chi_ranges"][k] == list(v), k
    (g,) = r["subjects"]
    assert g["kind"] == "anatomical" and g["veins"] == list(INVIVO_VEINS)
    assert g["texture_ppm"] == INVIVO_TEXTURE_PPM
    assert g["haemorrhage_probability"] == 0 and g["calcification_probability"] == 0
    assert g["count"] == 4 and min(g["voxel_size"]) >= 1.5  # small: generates in well under a minute
    assert [0.0, 0.0, 0.0] in g["orientations"] and any(0 < abs(o[0]) <= 30 for o in g["orientations"])


@pytest.mark.slow
@pytest.mark.parametrize("vs, shape", [((1.0, 1.0, 1.0), (96, 96, 96)), ((0.5, 0.5, 2.0), (192, 192, 48))])
def test_invivo_amplitudes_at_clinical_resolution(vs, shape):
    s = invivo_like_subject(0, voxel_size=vs, tilt_deg=20.0, shape=shape)
    m = s.mask
    p1, p99 = np.percentile(s.local_field[m], [1, 99])
    print(f"{vs} {shape}: local field 1st/99th percentile {p1:.4f} / {p99:.4f} ppm, background sd "
          f"{s.background_field[m].std():.3f} ppm, SNR per echo {np.round(s.snr_per_echo, 1).tolist()}, "
          f"field noise {s.noise_std_ppm:.4f} ppm")
    assert -0.05 <= p1 <= -0.025 and 0.025 <= p99 <= 0.05  # in-vivo 3 T local fields: +-0.03-0.05 ppm
    assert _lap_ratio(s.background_field, s.local_field, m, vs) <= 0.10
