"""Masked QSM metrics: hand-computed values, perfect scores, invariances, numpy/torch agreement, errors.

The LoG, Gaussian window and HFEN are also checked against a dense re-implementation of the 2016
challenge formulas (Langkammer et al., MRM 2018) written out here independently of the package.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from qsmlab.metrics import (
    METRIC_INFO,
    NUMPY_METRICS,
    TORCH_METRICS,
    challenge2016_rescale,
    compute_all,
    compute_all_torch,
    corr,
    hfen,
    nrmse,
    nrmse_demeaned,
    nrmse_detrended,
    psnr,
    ssim,
    ssim_map,
    ssim_map_torch,
    xsim,
)
from qsmlab.metrics._filters import correlate_numpy, dense_kernel, gaussian_window, log_kernel

SHAPE = (16, 16, 16)
KEYS = ["psnr", "nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen", "ssim", "xsim", "corr"]


def _box_mask(shape=SHAPE, lo=(3, 4, 2), hi=(13, 12, 14)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def _smooth_chi(rng, shape=SHAPE) -> np.ndarray:
    """A smooth-ish susceptibility-like map (ppm): blurred noise plus a positive blob."""
    chi = ndimage.gaussian_filter(rng.normal(0, 0.3, shape), 1.0)
    z = np.indices(shape).astype(float) - np.array(shape)[:, None, None, None] / 2
    return chi + 0.15 * np.exp(-(z**2).sum(0) / 8.0)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    ref = _smooth_chi(rng)
    pred = 0.8 * ref + 0.02 + rng.normal(0, 0.02, SHAPE)
    return pred, ref, _box_mask()


def _t(*arrays) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays))[:, None]


# --- filters: the 2016-challenge kernels, written out densely -------------------------------------


def _reference_log(size=15, sigma=1.5) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2
    x, y, z = np.meshgrid(t, t, t, indexing="ij")
    r2 = x**2 + y**2 + z**2
    h = np.exp(-r2 / (2 * sigma**2))
    h /= h.sum()
    big_h = h * (r2 - 3 * sigma**2) / sigma**4
    return big_h - big_h.mean()


def test_log_kernel_is_the_2016_challenge_kernel():
    ref_kernel = _reference_log()
    np.testing.assert_allclose(dense_kernel(log_kernel(15, 1.5)), ref_kernel, rtol=0, atol=1e-15)
    assert abs(ref_kernel.sum()) < 1e-15  # zero mean: constants are not high frequency


def test_separable_filtering_equals_dense_zero_boundary_correlation():
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(12, 14, 16))
    for terms in (log_kernel(15, 1.5), gaussian_window(5, 1.5), gaussian_window(7, 1.5)):
        dense = ndimage.correlate(vol, dense_kernel(terms), mode="constant", cval=0.0)
        np.testing.assert_allclose(correlate_numpy(vol, terms), dense, rtol=0, atol=1e-13)
    assert dense_kernel(gaussian_window(5, 1.5)).sum() == pytest.approx(1.0, abs=1e-15)


def test_log_of_a_linear_ramp_vanishes_in_the_interior():
    # A symmetric zero-mean kernel annihilates a + b.x; only voxels within 7 of the zero boundary see it.
    i, j, k = np.indices((24, 24, 24)).astype(float)
    out = correlate_numpy(0.3 * i - 0.2 * j + 0.1 * k + 2.0, log_kernel(15, 1.5))
    assert np.abs(out[7:-7, 7:-7, 7:-7]).max() < 1e-12
    assert np.abs(out).max() > 1e-2


# --- hand-computed values ------------------------------------------------------------------------


def test_nrmse_hand_values(data):
    _, ref, m = data
    assert nrmse(2 * ref, ref, m) == pytest.approx(100.0, rel=1e-12)
    assert nrmse(np.zeros_like(ref), ref, m) == pytest.approx(100.0, rel=1e-12)
    outside = np.where(m, ref, 123.0)  # values outside the mask do not count
    assert nrmse(1.1 * ref, outside, m) == pytest.approx(10.0, rel=1e-12)


def test_nrmse_demeaned_hand_value(data):
    _, ref, m = data
    # (3 + 2 ref) demeaned is 2 * (ref demeaned): error = 1 * ||ref_d||
    assert nrmse_demeaned(3.0 + 2.0 * ref, ref, m) == pytest.approx(100.0, rel=1e-12)
    assert nrmse(3.0 + 2.0 * ref, ref, m) > 150.0  # the 2016 RMSE does see the offset


def test_nrmse_detrended_hand_value(data):
    _, ref, m = data
    rng = np.random.default_rng(2)
    rd = ref[m] - ref[m].mean()
    e = rng.normal(0, 0.05, rd.shape)
    e -= e.mean()
    e -= rd * (e @ rd) / (rd @ rd)  # zero-mean error orthogonal to ref: the LS slope is exactly 1
    x = np.zeros_like(ref)
    x[m] = ref[m] + e
    expected = 100 * np.linalg.norm(e) / np.linalg.norm(rd)
    assert nrmse_detrended(x, ref, m) == pytest.approx(expected, rel=1e-10)
    assert nrmse_detrended(-2.5 * x + 0.7, ref, m) == pytest.approx(expected, rel=1e-10)
    assert nrmse_detrended(2.0 * ref + 1.0, ref, m) == pytest.approx(0.0, abs=1e-10)


def test_psnr_constant_error_hand_value():
    rng = np.random.default_rng(3)
    m = _box_mask()
    ref = np.full(SHAPE, 5.0)  # outside the mask: ignored by both peak and RMSE
    ref[m] = rng.uniform(0.1, 0.9, m.sum())
    idx = np.argwhere(m)
    ref[tuple(idx[0])], ref[tuple(idx[1])] = 0.0, 1.0  # data range inside the mask: exactly 1
    sign = np.where(rng.random(SHAPE) < 0.5, -1.0, 1.0)
    pred = ref + 0.1 * sign  # |error| = 0.1 everywhere -> RMSE 0.1
    pred[~m] = -40.0
    assert psnr(pred, ref, m) == pytest.approx(20.0, abs=1e-10)  # 20 log10(1 / 0.1)


def test_pearson_hand_value():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    m = np.zeros(SHAPE, bool)
    pts = [(1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12)]
    for p, xv, yv in zip(pts, (1.0, 2.0, 3.0, 4.0), (1.0, 3.0, 2.0, 4.0)):
        m[p], x[p], y[p] = True, xv, yv
    # d = (-1.5, -.5, .5, 1.5), (-1.5, .5, -.5, 1.5): r = 4 / 5
    assert corr(x, y, m) == pytest.approx(0.8, abs=1e-12)
    assert corr(-x, y, m) == pytest.approx(-0.8, abs=1e-12)


def test_hfen_matches_dense_2016_formula_and_hand_values(data):
    pred, ref, m = data
    big_h = _reference_log()

    def log(v):
        return ndimage.correlate(v, big_h, mode="constant", cval=0.0)

    expected = 100 * np.linalg.norm(log(pred * m) - log(ref * m)) / np.linalg.norm(log(ref * m))
    assert hfen(pred, ref, m) == pytest.approx(expected, rel=1e-10)
    assert hfen(2 * ref, ref, m) == pytest.approx(100.0, rel=1e-10)  # linearity
    assert hfen(np.zeros_like(ref), ref, m) == pytest.approx(100.0, rel=1e-10)


def test_ssim_map_of_constants_in_the_interior():
    a, b = 0.1, 0.2
    for window, k, L in ((7, (0.01, 0.001), 1.0), (5, (0.01, 0.03), 255.0)):
        c1 = (k[0] * L) ** 2
        smap = ssim_map(np.full(SHAPE, a), np.full(SHAPE, b), window, k, L)
        h = window // 2
        np.testing.assert_allclose(smap[h:-h, h:-h, h:-h], (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-10)
        assert not np.allclose(smap[0, 0, 0], smap[h, h, h])  # zero boundary reaches the edge


def test_ssim_map_brute_force_at_an_edge_voxel():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(9, 9, 9)), rng.normal(size=(9, 9, 9))
    t = np.arange(7) - 3
    w = np.exp(-(t[:, None, None] ** 2 + t[None, :, None] ** 2 + t[None, None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    xp, yp = np.pad(x, 3), np.pad(y, 3)  # zero boundary
    p = (1, 2, 0)
    wx, wy = xp[p[0] : p[0] + 7, p[1] : p[1] + 7, p[2] : p[2] + 7], yp[p[0] : p[0] + 7, p[1] : p[1] + 7, p[2] : p[2] + 7]
    mx, my = (w * wx).sum(), (w * wy).sum()
    sx, sy, sxy = (w * wx**2).sum() - mx**2, (w * wy**2).sum() - my**2, (w * wx * wy).sum() - mx * my
    c1, c2 = 0.01**2, 0.001**2
    expected = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sx + sy + c2))
    assert ssim_map(x, y, 7, (0.01, 0.001), 1.0)[p] == pytest.approx(expected, rel=1e-10)


def test_challenge2016_rescale_hand_values():
    xs, ys = challenge2016_rescale(np.array([0.0, -1.0, 1.0]), np.array([0.0, 1.0, 3.0]))
    # min = -1; nonzero voxels shifted: x -> (0, 0, 2), ref -> (0, 2, 4); scaled by 255 / 4
    np.testing.assert_allclose(xs, [0.0, 0.0, 127.5])
    np.testing.assert_allclose(ys, [0.0, 127.5, 255.0])


def _reference_ssim_map(x, y, size, k1, k2, L, sigma=1.5):
    """Wang et al. 2004 with a dense normalised Gaussian window, zero boundary, 'same' size."""
    t = np.arange(size) - (size - 1) / 2
    w = np.exp(-(t[:, None, None] ** 2 + t[None, :, None] ** 2 + t[None, None, :] ** 2) / (2 * sigma**2))
    w /= w.sum()

    def g(v):
        return ndimage.correlate(v, w, mode="constant", cval=0.0)

    mx, my = g(x), g(y)
    sx, sy, sxy = g(x * x) - mx**2, g(y * y) - my**2, g(x * y) - mx * my
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    return (2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sx + sy + c2))


def test_ssim_and_xsim_match_the_challenge_definitions_written_out(data):
    pred, ref, m = data
    x, r = pred * m, ref * m
    # 2016: shift nonzero voxels by -min of both, scale to 255, 5^3 window, K=(.01,.03), L=255,
    # averaged over the reconstruction's nonzero voxels after the shift
    lo = min(x.min(), r.min())
    xs, rs = np.where(x != 0, x - lo, 0.0), np.where(r != 0, r - lo, 0.0)
    hi = max(xs.max(), rs.max())
    xs, rs = 255 * xs / hi, 255 * rs / hi
    expected_ssim = _reference_ssim_map(xs, rs, 5, 0.01, 0.03, 255.0)[xs != 0].mean()
    assert ssim(pred, ref, m) == pytest.approx(expected_ssim, rel=1e-10)
    # challenge 2.0: native ppm, 7^3 window, K=(.01,.001), L=1, averaged over the mask
    expected_xsim = _reference_ssim_map(x, r, 7, 0.01, 0.001, 1.0)[m].mean()
    assert xsim(pred, ref, m) == pytest.approx(expected_xsim, rel=1e-10)


def test_ssim_is_invariant_to_a_common_positive_scale(data):
    pred, ref, m = data
    assert ssim(3.7 * pred, 3.7 * ref, m) == pytest.approx(ssim(pred, ref, m), rel=1e-10)
    assert xsim(3.7 * pred, 3.7 * ref, m) != pytest.approx(xsim(pred, ref, m), rel=1e-3)  # native ppm, L = 1


# --- perfect scores and invariances --------------------------------------------------------------


def test_identical_maps_score_perfectly(data):
    _, ref, m = data
    scores = compute_all(ref, ref, m)
    assert list(scores) == KEYS
    assert scores["psnr"] == np.inf
    for key in ("nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen"):
        assert scores[key] == 0.0
    for key in ("ssim", "xsim", "corr"):
        assert scores[key] == pytest.approx(1.0, abs=1e-12)


def test_imperfect_maps_score_imperfectly(data):
    pred, ref, m = data
    s = compute_all(pred, ref, m)
    assert 0 < s["nrmse_detrended"] < s["nrmse"] and 0 < s["hfen"] and s["psnr"] < 60
    assert s["ssim"] < 1 and s["xsim"] < 1 and 0.5 < s["corr"] < 1


def test_demeaned_nrmse_ignores_a_constant_offset(data):
    pred, ref, m = data
    assert nrmse_demeaned(pred + 0.37, ref, m) == pytest.approx(nrmse_demeaned(pred, ref, m), rel=1e-10)
    assert nrmse(pred + 0.37, ref, m) != pytest.approx(nrmse(pred, ref, m), rel=1e-3)


@pytest.mark.parametrize("c, d", [(3.0, -0.2), (-0.5, 1.0), (1e-3, 0.0)])
def test_detrended_nrmse_ignores_affine_rescaling(data, c, d):
    pred, ref, m = data
    assert nrmse_detrended(c * pred + d, ref, m) == pytest.approx(nrmse_detrended(pred, ref, m), rel=1e-9)


# --- numpy and torch agree -----------------------------------------------------------------------


def _batch(rng):
    refs = [_smooth_chi(rng), _smooth_chi(rng)]
    preds = [0.9 * refs[0] + rng.normal(0, 0.03, SHAPE), 1.2 * refs[1] - 0.05 + rng.normal(0, 0.05, SHAPE)]
    masks = [_box_mask(), _box_mask(lo=(1, 2, 5), hi=(15, 9, 16))]
    masks[1][5:7, 3:5, 8:10] = False  # a hole
    return preds, refs, masks


def test_numpy_and_torch_agree_batched_float64():
    preds, refs, masks = _batch(np.random.default_rng(6))
    out = compute_all_torch(_t(*preds), _t(*refs), _t(*masks))
    for b in range(2):
        expected = compute_all(preds[b], refs[b], masks[b])
        for key in KEYS:
            assert out[key].shape == (2,) and out[key].dtype == torch.float64
            np.testing.assert_allclose(out[key][b].item(), expected[key], rtol=1e-5, atol=1e-12, err_msg=key)
    assert out["nrmse"][0] != pytest.approx(out["nrmse"][1].item(), rel=1e-2)  # the elements differ


def test_torch_perfect_scores_float32_and_broadcast_mask(data):
    _, ref, m = data
    r = _t(ref, 2 * ref).float()
    out = compute_all_torch(r, r, torch.from_numpy(m)[None, None])  # mask batch 1, broadcast
    assert torch.isinf(out["psnr"]).all() and (out["nrmse"] == 0).all() and (out["hfen"] == 0).all()
    for key in ("ssim", "xsim", "corr"):
        torch.testing.assert_close(out[key], torch.ones(2), rtol=0, atol=1e-5)


def test_torch_float32_is_close_to_numpy_float64(data):
    pred, ref, m = data
    out = compute_all_torch(_t(pred).float(), _t(ref).float(), _t(m))
    expected = compute_all(pred, ref, m)
    for key in KEYS:
        assert out[key].dtype == torch.float32
        assert out[key].item() == pytest.approx(expected[key], rel=1e-3), key


def test_torch_metrics_build_no_autograd_graph(data):
    pred, ref, m = data
    p = _t(pred).requires_grad_(True)
    for name, fn in TORCH_METRICS.items():
        assert not fn(p, _t(ref), _t(m)).requires_grad, name


def test_ssim_map_torch_matches_numpy(data):
    pred, ref, _ = data
    out = ssim_map_torch(_t(pred), _t(ref), 7, (0.01, 0.001), 1.0)[0, 0].numpy()
    np.testing.assert_allclose(out, ssim_map(pred, ref, 7, (0.01, 0.001), 1.0), rtol=1e-10)


# --- registry ------------------------------------------------------------------------------------


def test_metric_info_covers_every_metric():
    assert list(METRIC_INFO) == KEYS == list(NUMPY_METRICS) == list(TORCH_METRICS)
    for name, (unit, higher, definition) in METRIC_INFO.items():
        assert isinstance(unit, str) and isinstance(higher, bool) and definition and "\n" not in definition
        assert higher == (name in ("psnr", "ssim", "xsim", "corr"))


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KEYS)
def test_numpy_shape_errors_name_the_argument(name, data):
    pred, ref, m = data
    fn = NUMPY_METRICS[name]
    with pytest.raises(ValueError, match=r"pred has shape \(16, 16, 15\)"):
        fn(pred[..., :15], ref, m)
    with pytest.raises(ValueError, match=r"mask has shape \(16, 16\)"):
        fn(pred, ref, m[..., 0])
    with pytest.raises(ValueError, match=r"ref has shape \(16, 16\); expected a 3-D"):
        fn(pred[..., 0], ref[..., 0], m[..., 0])
    with pytest.raises(ValueError, match="mask is empty"):
        fn(pred, ref, np.zeros(SHAPE, bool))


def test_numpy_rejects_a_non_binary_mask(data):
    pred, ref, m = data
    with pytest.raises(ValueError, match="other than 0 and 1"):
        nrmse(pred, ref, 0.5 * m)
    assert nrmse(pred, ref, m.astype(np.uint8)) == nrmse(pred, ref, m)  # 0/1 integers are fine


@pytest.mark.parametrize("name", KEYS)
def test_torch_shape_and_empty_mask_errors(name, data):
    pred, ref, m = data
    fn = TORCH_METRICS[name]
    p, r, mk = _t(pred, pred), _t(ref, ref), _t(m, m)
    with pytest.raises(ValueError, match=r"ref has shape \(2, 16, 16, 16\); expected \[B, 1, X, Y, Z\]"):
        fn(p[:, 0], r[:, 0], mk[:, 0])
    with pytest.raises(ValueError, match=r"pred has shape \(1, 1, 16, 16, 16\)"):
        fn(p[:1], r, mk)
    with pytest.raises(ValueError, match=r"mask has shape"):
        fn(p, r, mk[..., :8])
    mk[1] = False
    with pytest.raises(ValueError, match=r"mask is empty .* batch element\(s\) \[1\]"):
        fn(p, r, mk)


def test_volume_metrics_epoch_mean_matches_numpy():
    from qsmlab.metrics import VolumeMetrics, nrmse, psnr

    rng = np.random.default_rng(7)
    ref = rng.normal(0, 0.05, (3, 1, 12, 12, 12))
    pred = ref + rng.normal(0, 0.01, ref.shape)
    mask = np.zeros(ref.shape, bool)
    mask[..., 2:10, 2:10, 2:10] = True
    m = VolumeMetrics(["nrmse", "psnr"])
    m.update(torch.tensor(pred[:2]), torch.tensor(ref[:2]), torch.tensor(mask[:2]))
    m.update(torch.tensor(pred[2:]), torch.tensor(ref[2:]), torch.tensor(mask[2:]))
    out = m.compute()
    exp_nrmse = np.mean([nrmse(pred[i, 0], ref[i, 0], mask[i, 0]) for i in range(3)])
    exp_psnr = np.mean([psnr(pred[i, 0], ref[i, 0], mask[i, 0]) for i in range(3)])
    assert float(out["nrmse"]) == pytest.approx(exp_nrmse, rel=1e-9)
    assert float(out["psnr"]) == pytest.approx(exp_psnr, rel=1e-9)
    # a perfect volume gives PSNR = inf: excluded from the mean, counted
    m.update(torch.tensor(ref[:1]), torch.tensor(ref[:1]), torch.tensor(mask[:1]))
    assert float(m.compute()["psnr"]) == pytest.approx(exp_psnr, rel=1e-9)
    assert int(m.nonfinite_psnr) == 1
    with pytest.raises(ValueError, match="unknown metric"):
        VolumeMetrics(["psnrr"])
