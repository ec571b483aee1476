"""The simulated COSMOS reference (qsmlab.data.realistic.cosmos_sim).

- the fit is the closed-form per-frequency least squares over orientations,
  chi(k) = sum_o D_o(k) f_o(k) / max(sum_o D_o(k)^2, threshold), checked against a direct numpy solve;
- the orientations are head rotations on top of the scan's tilt (b0 = (R_o R_tilt)^T z);
- on exact scalar fields (every component off) the simulated COSMOS recovers the truth.
"""

import numpy as np
import pytest

from qsmlab.data.realistic import realistic_subject
from qsmlab.data.realistic.cosmos_sim import COSMOS_ROTATIONS_DEG, cosmos_b0_dirs, cosmos_fit
from qsmlab.physics import DipoleOperator, dipole_kernel, padded_shape


def test_cosmos_fit_is_the_closed_form_least_squares():
    rng = np.random.default_rng(0)
    n, vs = (14, 12, 10), (1.0, 1.0, 1.5)
    dirs = cosmos_b0_dirs(10.0)
    fields = [rng.standard_normal(n) for _ in dirs]
    mask = np.ones(n, bool)
    chi, m = cosmos_fit(fields, [mask] * len(dirs), dirs, vs, threshold=0.01, pad_factor=1.0)
    D = [dipole_kernel(n, vs, b) for b in dirs]
    num = sum(d * np.fft.fftn(f) for d, f in zip(D, fields))
    den = np.maximum(sum(d**2 for d in D), 0.01)
    ref = np.fft.ifftn(num / den).real
    np.testing.assert_allclose(chi, ref, atol=1e-5 * np.abs(ref).max())
    # and it minimises the data misfit sum_o ||D_o chi - f_o||^2 (+ the threshold's damping): perturbing
    # the solution along any direction increases the objective
    def obj(x):
        X = np.fft.fftn(x)
        return sum(np.sum(np.abs(d * X - np.fft.fftn(f)) ** 2) for d, f in zip(D, fields)) + \
            np.sum((np.maximum(den, 0) - sum(d**2 for d in D)) * np.abs(X) ** 2)
    base = obj(ref)
    for _ in range(3):
        assert obj(ref + 1e-3 * rng.standard_normal(n)) > base


def test_orientations_rotate_b0_about_the_head():
    dirs = cosmos_b0_dirs(0.0)
    assert len(dirs) == len(COSMOS_ROTATIONS_DEG) >= 3
    np.testing.assert_allclose(dirs[0], [0, 0, 1], atol=1e-12)
    angles = [np.degrees(np.arccos(np.clip(d @ dirs[0], -1, 1))) for d in dirs[1:]]
    assert all(a == pytest.approx(20.0, abs=1e-6) for a in angles)
    tilted = cosmos_b0_dirs(15.0)
    np.testing.assert_allclose(tilted[0], [0, np.sin(np.radians(15)), np.cos(np.radians(15))], atol=1e-12)


def test_simulated_cosmos_of_exact_scalar_fields_is_their_least_squares_fit():
    """Every component off (exact scalar local fields, the whole head at 3 mm): the subject's COSMOS is the
    closed-form fit of the masked fields A_o(chi * mask) * mask, and close to the truth (the masking of the
    fields, as in vivo, is what keeps it from being exact: 0.02 unmasked, 0.17 masked, measured)."""
    vs = (3.0, 3.0, 3.0)
    r = realistic_subject(2, voxel_size=vs, components=[], cosmos=True)
    assert r.cosmos is not None and len(r.cosmos_b0_dirs) == len(COSMOS_ROTATIONS_DEG)
    x = r.chi * r.mask
    fields = [DipoleOperator(vs, b, 2.0).A(x) * r.mask for b in r.cosmos_b0_dirs]
    grid = padded_shape(x.shape, 2.0)  # the fit zero-pads like the operator
    D = [dipole_kernel(grid, vs, b) for b in r.cosmos_b0_dirs]
    pad = [(0, g - n) for g, n in zip(grid, x.shape)]
    num = sum(d * np.fft.fftn(np.pad(f, pad)) for d, f in zip(D, fields))
    ref = np.fft.ifftn(num / np.maximum(sum(d**2 for d in D), 0.01)).real[: x.shape[0], : x.shape[1], : x.shape[2]]
    np.testing.assert_allclose(r.cosmos, ref * r.mask, atol=1e-4 * np.abs(ref).max())
    m = r.cosmos_mask
    a, b = r.cosmos[m] - r.cosmos[m].mean(), r.chi[m] - r.chi[m].mean()
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.25
