"""Phase unwrapping (Laplacian, region growing, temporal), multi-echo field fit and brain masking.

Physics checked: a wrapped smooth phase of ±15 rad is recovered exactly up to one global 2π·n; temporal
unwrapping makes every echo linear in TE again; the weighted echo fit returns the simulated field (ppm,
through qsmlab.physics.units) and phase offset, and its residual flags low-signal voxels; the brain mask
from the phantom magnitude overlaps the true mask.
"""

import numpy as np
import pytest
from _phantom import head_phantom
from scipy import ndimage

from qsmlab.errors import QSMInputError
from qsmlab.physics import units
from qsmlab.recon import registry
from qsmlab.recon.echo_fit import combine_magnitude, fit_field
from qsmlab.recon.masking import brain_mask, otsu_threshold
from qsmlab.recon.unwrap import unwrap_echoes, unwrap_laplacian, unwrap_region

TWO_PI = 2 * np.pi


def _wrap(x):
    return np.angle(np.exp(1j * x))


def _ellipsoid(n, radii=(0.40, 0.45, 0.38)):
    g = np.meshgrid(*[np.arange(n) - n / 2 + 0.5] * 3, indexing="ij")
    return sum((g[i] / (radii[i] * n)) ** 2 for i in range(3)) <= 1.0


def _smooth_phase(n=48, amplitude=15.0, seed=0):
    """A smooth phase (rad) reaching about ±amplitude in the mask: a positive and a negative Gaussian bump
    (randomly placed) plus a linear ramp; an ellipsoid mask."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(n, dtype=float)] * 3, indexing="ij")
    phi = 2.0 * (g[1] - n / 2) / (n / 2)
    for sign in (1.0, -1.0):
        c = n / 2 + np.array([0.2 * sign, 0.0, 0.0]) * n + rng.uniform(-0.03, 0.03, 3) * n
        w = 0.12 * n
        phi = phi + sign * amplitude * np.exp(-sum((g[i] - c[i]) ** 2 for i in range(3)) / (2 * w * w))
    mask = _ellipsoid(n)
    assert max(np.abs(np.diff(phi, axis=a)).max() for a in range(3)) < 2.5  # unwrappable: steps < π
    return phi, mask


def _assert_global_2pi(unwrapped, truth, region, atol=1e-6):
    d = (unwrapped - truth)[region]
    k = np.round(d.mean() / TWO_PI)
    assert np.abs(d - TWO_PI * k).max() < atol, f"max deviation {np.abs(d - TWO_PI * k).max():.3g} rad"


def test_registered_unwrappers():
    assert {"laplacian", "region"} <= set(registry.names("unwrap"))


@pytest.mark.parametrize("method", ["laplacian", "region"])
def test_spatial_unwrap_exact_up_to_global_2pi(method):
    phi, mask = _smooth_phase(48)
    assert phi[mask].max() > 12 and phi[mask].min() < -12  # about ±15 rad: many wraps in the mask
    wrapped = _wrap(phi)
    assert np.abs(wrapped - phi)[mask].max() > 6.0
    out = registry.get("unwrap", method)(wrapped, mask, voxel_size=(1.0, 1.0, 1.0))
    inner = ndimage.binary_erosion(mask, iterations=3)
    _assert_global_2pi(out, phi, inner)
    # congruent to the input modulo 2π, zero outside the mask
    assert np.abs(_wrap(out - wrapped))[mask].max() < 1e-9
    assert np.all(out[~mask] == 0)


def test_laplacian_estimate_is_smooth_phase_up_to_constant_with_anisotropic_voxels():
    # The raw Schofield-Zhu estimate (snap=False) is the true phase up to a constant (no rounding
    # involved), on anisotropic voxels too: the identity holds for the k-space Laplacian with 1x1x2 mm.
    phi, mask = _smooth_phase(48, amplitude=10.0)
    est = unwrap_laplacian(_wrap(phi), mask, voxel_size=(1.0, 1.0, 2.0), snap=False)
    inner = ndimage.binary_erosion(mask, iterations=3)
    d = (est - phi)[inner]
    assert np.abs(d - d.mean()).max() < 0.01


def test_region_unwrap_with_noise_and_magnitude():
    # A low-signal region with random phase must not spoil the rest: the quality map routes around it.
    phi, mask = _smooth_phase(48, seed=1)
    rng = np.random.default_rng(2)
    mag = np.ones_like(phi)
    g = np.meshgrid(*[np.arange(48)] * 3, indexing="ij")
    hole = (g[0] - 20) ** 2 + (g[1] - 24) ** 2 + (g[2] - 24) ** 2 < 25
    mag[hole] = 0.02
    noisy = _wrap(phi + np.where(hole, rng.uniform(-np.pi, np.pi, phi.shape), 0.0))
    out = unwrap_region(noisy, mask, magnitude=mag)
    good = ndimage.binary_erosion(mask, iterations=3) & ~ndimage.binary_dilation(hole, iterations=2)
    _assert_global_2pi(out, phi, good)


def test_region_unwrap_each_component_from_its_own_seed():
    phi, _ = _smooth_phase(48, amplitude=12.0, seed=3)
    mask = np.zeros(phi.shape, bool)
    mask[4:20, 4:44, 4:44] = True
    mask[26:44, 4:44, 4:44] = True  # two slabs, no edge between them
    out = unwrap_region(_wrap(phi), mask)
    for sl in (np.s_[4:20], np.s_[26:44]):
        comp = np.zeros_like(mask)
        comp[sl] = mask[sl]
        _assert_global_2pi(out, phi, comp)


def _heap_region_growing(phase, mag):
    """Reference: ROMEO-style growth with a heap, one voxel at a time (slow; tiny volumes only)."""
    import heapq

    from qsmlab.recon.unwrap.region_growing import edge_quality

    ref = float(np.percentile(mag, 90))
    shape = phase.shape
    done = np.zeros(shape, bool)
    out = np.zeros(shape)
    nbrs = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]

    def q(a, b):
        return float(edge_quality(np.array([phase[a]]), np.array([phase[b]]), np.array([mag[a]]),
                                  np.array([mag[b]]), ref)[0])

    best = {}
    for v in np.ndindex(shape):
        for d in nbrs:
            w = tuple(np.add(v, d))
            if all(0 <= w[i] < shape[i] for i in range(3)):
                best[v] = max(best.get(v, -1.0), q(v, w))
    seed = max(best, key=best.get)
    done[seed], out[seed] = True, phase[seed]
    heap = []

    def push(v):
        for d in nbrs:
            w = tuple(np.add(v, d))
            if all(0 <= w[i] < shape[i] for i in range(3)) and not done[w]:
                heapq.heappush(heap, (-q(v, w), v, w))

    push(seed)
    while heap:
        _, a, b = heapq.heappop(heap)
        if done[b]:
            continue
        out[b] = out[a] + _wrap(phase[b] - out[a])
        done[b] = True
        push(b)
    return out


def test_region_unwrap_equals_heap_growth():
    # The spanning-tree implementation must give exactly what the priority-queue growth gives.
    rng = np.random.default_rng(5)
    g = np.meshgrid(*[np.arange(8.0)] * 3, indexing="ij")
    phi = 1.3 * g[0] + 0.9 * g[1] - 0.4 * g[2] + rng.normal(0, 1.0, (8, 8, 8))  # noisy: the result depends on the path
    mag = rng.uniform(0.2, 1.0, (8, 8, 8))
    wrapped = _wrap(phi)
    ref = _heap_region_growing(wrapped, mag)
    out = unwrap_region(wrapped, magnitude=mag)
    d = out - ref
    np.testing.assert_allclose(d - d.flat[0], 0.0, atol=1e-9)
    # ...and the path matters here: without the magnitude weights hundreds of voxels differ
    d = unwrap_region(wrapped) - ref
    assert (np.abs(d - d.flat[0]) > 1e-6).sum() > 50


def test_unwrap_errors():
    with pytest.raises(QSMInputError, match="empty"):
        unwrap_region(np.zeros((8, 8, 8)), np.zeros((8, 8, 8), bool))
    with pytest.raises(QSMInputError, match="3-D"):
        unwrap_laplacian(np.zeros((8, 8)))


# -- temporal unwrapping and echo fit -------------------------------------------------------------------

TE = np.array([0.004, 0.008, 0.012, 0.016])
B0 = 3.0


def _low_signal(n):
    g = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    return (g[0] - n // 2) ** 2 + (g[1] - n // 2) ** 2 + (g[2] - n // 3) ** 2 < (n // 8) ** 2


def _multi_echo(n=40, sigma=0.0, seed=0):
    """Field (ppm) whose echo-4 phase spans about ±18 rad, a smooth phase offset, T2* magnitude."""
    rng = np.random.default_rng(seed)
    s = ndimage.gaussian_filter(rng.normal(size=(n, n, n)), 4.0)
    field = s / np.abs(s).max() * 2.0 + 0.1  # ppm
    g = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    offset = 0.6 + 1.2 * g[0] - 0.8 * g[1] ** 2  # rad, within (-π, π)
    mask = _ellipsoid(n)
    mag0 = np.where(mask, 1.0, 0.05)
    mag0[_low_signal(n)] = 0.1
    sig = np.stack([mag0 * np.exp(-t / 0.04) * np.exp(1j * (offset + units.ppm_to_rad(field, t, B0)))
                    for t in TE], axis=-1)
    sig = sig + sigma * (rng.normal(size=sig.shape) + 1j * rng.normal(size=sig.shape))
    return field, offset, mask, np.angle(sig), np.abs(sig)


def test_temporal_unwrap_four_echoes_is_exact():
    field, offset, mask, phase, mag = _multi_echo()
    true_phase = np.stack([offset + units.ppm_to_rad(field, t, B0) for t in TE], -1)
    assert np.ptp(true_phase[..., 3][mask]) > 25  # the last echo wraps many times
    inner = ndimage.binary_erosion(mask, iterations=2)
    for method in ("region", "laplacian"):
        out = unwrap_echoes(phase, TE, registry.get("unwrap", method), mask, magnitude=mag)
        for e in range(4):
            d = (out[..., e] - true_phase[..., e])[inner]
            assert np.abs(d).max() < 1e-6, (method, e)  # exact, and no global 2π either (mean convention)
    # "first" reference: predicts φ_n = φ_1·TE_n/TE_1, exact when the offset is zero
    ph0 = np.stack([_wrap(units.ppm_to_rad(field, t, B0)) for t in TE], -1)
    out = unwrap_echoes(ph0, TE, unwrap_region, mask, reference="first")
    for e in range(4):
        _assert_global_2pi(out[..., e], units.ppm_to_rad(field, TE[e], B0), inner)


def test_echo_fit_noise_free_is_exact():
    field, offset, mask, phase, mag = _multi_echo(32)
    unwrapped = np.stack([offset + units.ppm_to_rad(field, t, B0) for t in TE], -1)
    fit = fit_field(unwrapped, TE, B0, mag)
    np.testing.assert_allclose(fit.field, field, atol=1e-10)
    np.testing.assert_allclose(fit.phase_offset, offset, atol=1e-9)
    assert fit.residual.max() < 1e-9


def test_echo_fit_with_noise_recovers_field_offset_and_flags_low_signal():
    field, offset, mask, phase, mag = _multi_echo(40, sigma=0.02, seed=4)
    out = unwrap_echoes(phase, TE, unwrap_region, mask, magnitude=mag)
    fit = fit_field(out, TE, B0, mag, mask)
    inner = ndimage.binary_erosion(mask, iterations=2)
    low = _low_signal(40)
    good = inner & ~ndimage.binary_dilation(low, iterations=1)
    err = (fit.field - field)[good]
    # phase noise σ/m ≈ 0.02/0.8 rad; slope std ≈ 0.025 rad / sqrt(Σ(TE - mean TE)²) = 2.8 rad/s
    # = 2.8 / (2π·127.7 Hz/ppm) ≈ 3.5e-3 ppm
    assert abs(err.mean()) < 5e-4
    assert err.std() < 4.5e-3
    assert np.abs(_wrap(fit.phase_offset - offset)[good]).mean() < 0.03
    # residual ≈ phase noise σ/m: low where the signal is good, ~10x higher in the low-signal blob
    assert np.median(fit.residual[good]) < 0.03
    assert np.median(fit.residual[low]) > 5 * np.median(fit.residual[good])


def test_echo_fit_errors():
    with pytest.raises(QSMInputError, match="echoes"):
        fit_field(np.zeros((4, 4, 4, 3)), TE, B0)


def test_combine_magnitude_rss_and_t2star():
    t2s = 0.03
    s0 = np.full((4, 4, 4), 2.0)
    mag = np.stack([s0 * np.exp(-t / t2s) for t in TE], -1)
    np.testing.assert_allclose(combine_magnitude(mag), np.sqrt((mag**2).sum(-1)))
    w = TE * np.exp(-TE / t2s)  # Posse et al. 1999, with the fitted T2* equal to the true one
    np.testing.assert_allclose(combine_magnitude(mag, TE, "t2star"), (mag * w).sum(-1) / w.sum(), rtol=1e-9)
    with pytest.raises(QSMInputError, match="t2star"):
        combine_magnitude(mag, None, "t2star")


# -- masking --------------------------------------------------------------------------------------------


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_brain_mask_from_head_phantom():
    p = head_phantom(48)
    rng = np.random.default_rng(0)
    mag = np.abs(p["magnitude"] + 0.02 * (rng.normal(size=p["mask"].shape) + 1j * rng.normal(size=p["mask"].shape)))
    m = brain_mask(mag)
    assert _dice(m, p["mask"]) > 0.9
    # percentile threshold and erosion in mm: 2 mm at 1 mm voxels removes a ~2-voxel rim
    m2 = brain_mask(mag, threshold=0.3, erode_mm=2.0)
    assert m2.sum() < m.sum()
    assert not (m2 & ~ndimage.binary_erosion(m, iterations=1)).any()
    assert _dice(m2, ndimage.binary_erosion(p["mask"], iterations=2)) > 0.85


def test_otsu_threshold_separates_two_classes():
    v = np.concatenate([np.full(1000, 1.0), np.full(500, 5.0)])
    assert 1.0 < otsu_threshold(v) < 5.0


def test_brain_mask_errors():
    with pytest.raises(QSMInputError, match="positive"):
        brain_mask(np.zeros((8, 8, 8)))
    with pytest.raises(QSMInputError, match="threshold"):
        brain_mask(np.ones((8, 8, 8)), threshold=2.0)


def test_cycle_slip_correction_snaps_isolated_jumps_only():
    from qsmlab.recon.echo_fit import correct_cycle_slips, cycle_ppm

    cycle = cycle_ppm([0.004, 0.008, 0.012], 3.0)
    assert cycle == pytest.approx(1 / (42.5775 * 3.0 * 0.004))
    g = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")
    mask = g[0] ** 2 + g[1] ** 2 + g[2] ** 2 < 0.8
    truth = 0.6 * g[0] + 0.4 * g[1] ** 2 - 0.3 * g[2]  # smooth, steep enough to matter (ppm)
    slipped = truth.copy()
    rng = np.random.default_rng(0)
    idx = np.argwhere(mask)[rng.choice(mask.sum(), 12, replace=False)]
    for n, (i, j, k) in zip([1, -1, 2, 1, -1, 1, 1, -2, 1, -1, 1, 1], idx):
        slipped[i, j, k] += n * cycle
    fixed, n = correct_cycle_slips(slipped, mask, cycle)
    assert n == 12
    np.testing.assert_allclose(fixed[mask], truth[mask], atol=1e-12)
    same, n0 = correct_cycle_slips(truth, mask, cycle)  # a clean field is left alone
    assert n0 == 0 and np.array_equal(same, truth)
