"""Acquisition physics of the realistic subjects (qsmlab.data.realistic.acquisition).

- the k-space crop preserves low frequencies exactly: a band-limited field sampled on the fine grid comes
  out as the same field sampled at the scan's voxel centres (the centres of the fine blocks);
- the crop preserves the mean, and the taper is 1 over the output crop and 0 at the region's border;
- noise scales as specified: sigma = mean first-echo brain magnitude / SNR, and the sd of the echo-fit
  field equals the weighted-least-squares prediction sigma / sqrt(sum m^2 (TE - TE_w)^2) and halves when
  the SNR doubles.
"""

import numpy as np
import pytest

from qsmlab.data.invivo_like import field_noise_ppm
from qsmlab.data.realistic import acquisition as acq
from qsmlab.physics.units import ppm_to_rad


def _band_limited(coords_mm, fov_mm, rng, complex_=False):
    """Sum of plane waves with frequencies strictly below the scan's Nyquist (periodic on the FOV)."""
    out = 0.0
    for _ in range(6):
        k = [rng.integers(-int(L[1]) // 2 + 1, int(L[1]) // 2) / L[0] for L in fov_mm]  # cycles/mm
        ph = sum(k[i] * coords_mm[i] for i in range(3))
        amp = rng.normal() + (1j * rng.normal() if complex_ else 0.0)
        out = out + amp * np.exp(2j * np.pi * ph) + (0 if complex_ else np.conj(amp) * np.exp(-2j * np.pi * ph))
    return out if complex_ else out.real


@pytest.mark.parametrize("n,factor,vs", [((16, 12, 10), (2, 2, 2), (1.0, 1.0, 1.0)),
                                          ((15, 12, 9), (2, 3, 1), (0.5, 0.5, 2.0))])
@pytest.mark.parametrize("complex_", [False, True])
def test_kspace_crop_keeps_a_band_limited_signal(n, factor, vs, complex_):
    rng = np.random.default_rng(3)
    fov = [(n[i] * vs[i], n[i]) for i in range(3)]
    coarse = np.meshgrid(*[np.arange(n[i]) * vs[i] for i in range(3)], indexing="ij")
    # fine voxel i sits at coarse index (i - (f - 1)/2) / f
    fine = np.meshgrid(*[(np.arange(n[i] * factor[i]) - (factor[i] - 1) / 2) / factor[i] * vs[i]
                         for i in range(3)], indexing="ij")
    x_f = _band_limited(fine, fov, np.random.default_rng(3), complex_)
    x_c = _band_limited(coarse, fov, np.random.default_rng(3), complex_)
    out = acq.kspace_crop(x_f, factor)
    assert out.shape == n
    np.testing.assert_allclose(out, x_c, atol=1e-10 * np.abs(x_c).max())
    # and the fine affine says the same: fine voxel (f-1)/2 of each block maps to the coarse centre
    a = np.diag([*vs, 1.0])
    fa = acq.fine_affine(a, factor)
    np.testing.assert_allclose(fa @ np.array([(factor[0] - 1) / 2, (factor[1] - 1) / 2, (factor[2] - 1) / 2, 1]),
                               [0, 0, 0, 1], atol=1e-12)
    del rng


def test_kspace_crop_preserves_the_mean_and_boxes_a_nearest_upsampled_constant():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 16, 12)).astype(np.float32)
    assert acq.kspace_crop(x, 2).mean() == pytest.approx(x.mean(), abs=1e-6)
    c = np.full((8, 8, 8), 0.7, np.float32)
    np.testing.assert_allclose(acq.kspace_crop(acq.upsample_nearest(c, 2), 2), c, atol=1e-6)


def test_taper_is_one_over_the_crop_and_zero_at_the_border():
    prof = acq.taper_profiles((20, 20, 20), 2, (8, 0, 4), (8, 8, 0), 6)
    p0 = prof[0]
    assert p0[0] < 0.01 and p0[-1] < 0.01 and np.all(np.diff(p0[:16]) >= 0)  # falls to 0 at a margined border
    assert np.all(p0[2 * 8:2 * 12] == 1.0)                         # the output crop
    assert np.all(prof[1][: 2 * 12] == 1.0) and np.all(prof[2][-8:] == 1.0)  # sides without margin


def _fit_sd(snr, seed=0):
    n = (24, 24, 24)
    te, b0 = (0.004, 0.009, 0.014, 0.019, 0.024), 3.0
    m0 = np.full(n, 0.8, np.float32)
    r2 = np.full(n, 25.0, np.float32)
    g = np.meshgrid(*[np.linspace(-1, 1, k) for k in n], indexing="ij")
    field = (0.02 * g[0] + 0.01 * g[1] * g[2]).astype(np.float32)
    phi0 = (0.3 * g[2]).astype(np.float32)
    clean = acq.acquire(field, m0, r2, phi0, te, b0, 1)
    mask = np.ones(n, bool)
    noisy, sigma = acq.add_noise(clean, snr, mask, np.random.default_rng(seed))
    ref = np.stack([phi0 + ppm_to_rad(1.0, t, b0) * field for t in te], -1)
    from qsmlab.recon.echo_fit import fit_field

    fit = fit_field(acq.reference_unwrap(np.angle(noisy), ref), te, b0, np.abs(noisy), mask)
    pred = field_noise_ppm(np.abs(clean), te, b0, sigma)
    return float(np.std(fit.field - field)), float(np.median(pred)), sigma, float(np.abs(clean[..., 0]).mean())


def test_noise_sd_matches_the_weighted_least_squares_prediction_and_scales_as_one_over_snr():
    sd60, pred60, sigma60, s1 = _fit_sd(60.0)
    sd120, pred120, sigma120, _ = _fit_sd(120.0)
    assert sigma60 == pytest.approx(s1 / 60.0, rel=1e-6) and sigma120 == pytest.approx(sigma60 / 2, rel=1e-6)
    assert sd60 == pytest.approx(pred60, rel=0.05)       # 13824 voxels: sampling error ~1 %
    assert sd120 == pytest.approx(pred120, rel=0.05)
    assert sd60 / sd120 == pytest.approx(2.0, rel=0.06)
