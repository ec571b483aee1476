"""Units round trips and B0 direction from (oblique) affines and sidecars."""

import json
import math

import numpy as np
import pytest

from qsmlab.errors import QSMInputError
from qsmlab.physics import (
    GAMMA_BAR_MHZ_PER_T,
    b0_dir_from_affine,
    hz_to_ppm,
    phase_scale,
    ppm_to_hz,
    ppm_to_rad,
    rad_to_hz,
    rad_to_ppm,
    resolve_b0_dir,
    rotation_matrix,
    voxel_size_from_affine,
)


def test_phase_scale_value():
    # 1 ppm at 3 T is 127.7325 Hz; at TE = 10 ms that is 2*pi*1.277325 rad
    assert ppm_to_hz(1.0, 3.0) == pytest.approx(127.7325)
    assert phase_scale(0.010, 3.0) == pytest.approx(2 * math.pi * 1.277325)
    assert GAMMA_BAR_MHZ_PER_T == 42.5775


def test_phase_ppm_round_trip():
    rng = np.random.default_rng(1)
    field = rng.normal(0, 0.1, (5, 5, 5))
    for te, b0 in [(0.004, 3.0), (0.02, 7.0), (0.015, 1.5)]:
        phase = ppm_to_rad(field, te, b0)
        np.testing.assert_allclose(rad_to_ppm(phase, te, b0), field, rtol=1e-14)
        np.testing.assert_allclose(hz_to_ppm(rad_to_hz(phase, te), b0), field, rtol=1e-14)


def test_units_reject_nonpositive():
    with pytest.raises(ValueError, match="te_s"):
        phase_scale(0.0, 3.0)
    with pytest.raises(ValueError, match="b0_tesla"):
        ppm_to_rad(1.0, 0.01, -3.0)


@pytest.mark.parametrize("seed", range(5))
def test_b0_dir_recovered_from_rotated_affine(seed):
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    angle = rng.uniform(-40, 40)
    rot = rotation_matrix(axis, angle)
    vs = rng.uniform(0.5, 2.5, 3)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(vs)
    aff[:3, 3] = rng.normal(size=3) * 50
    # B0 is world z; in voxel axes it is rot^T z
    expected = rot.T @ np.array([0, 0, 1.0])
    np.testing.assert_allclose(b0_dir_from_affine(aff), expected, atol=1e-6)
    np.testing.assert_allclose(voxel_size_from_affine(aff), vs, atol=1e-9)


def test_axis_permuted_affine():
    # voxel axis k runs along world y, axis j along world z (a sagittal-like storage)
    aff = np.array([[1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(b0_dir_from_affine(aff), [0, 1, 0], atol=1e-12)


def test_priority_explicit_sidecar_affine(tmp_path):
    nii = tmp_path / "field.nii.gz"
    nii.touch()
    aff = np.eye(4)
    assert np.allclose(resolve_b0_dir(aff, None, nii), [0, 0, 1])
    (tmp_path / "field.json").write_text(json.dumps({"B0_dir": [0, 2, 0]}))
    assert np.allclose(resolve_b0_dir(aff, None, nii), [0, 1, 0])
    assert np.allclose(resolve_b0_dir(aff, [1, 0, 0], nii), [1, 0, 0])
    (tmp_path / "field.json").write_text(json.dumps({"B0_dir": [0, 0]}))
    with pytest.raises(QSMInputError, match="field.json"):
        resolve_b0_dir(aff, None, nii)
