"""Physics-safe augmentation: after every transform the pair still satisfies field = A(chi) (* mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
from _datasets import ellipsoid_mask, smooth_chi

from qsmlab.data.transforms import (
    ElasticResimulate,
    FieldNoise,
    LinearityScaling,
    MagnitudeNoise,
    PhysicsSafeFlip,
    RotateAndResimulate,
    build_augmentation,
    flip_subject,
    rotate_subject,
)
from qsmlab.errors import QSMInputError
from qsmlab.physics import DipoleOperator, normalize_b0_dir

OBLIQUE = normalize_b0_dir((0.35, -0.45, 0.82))  # all three components non-zero
SHAPE = (24, 20, 22)
VS = (1.0, 1.1, 0.9)


def _subject(pad_factor=2.0, source="synthetic", masked=False, shape=SHAPE, b0=OBLIQUE, vs=VS) -> tio.Subject:
    chi = smooth_chi(shape, seed=3)
    mask = ellipsoid_mask(shape)
    field = DipoleOperator(vs, b0, pad_factor=pad_factor).A(chi)
    if masked:
        chi, field = chi * mask, field * mask
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32)[None])  # noqa: E731
    return tio.Subject(chi=tio.ScalarImage(tensor=t(chi)), field=tio.ScalarImage(tensor=t(field)),
                       magnitude=tio.ScalarImage(tensor=t(np.where(mask, 0.8 - chi, 0.05))),
                       mask=tio.LabelMap(tensor=t(mask)), b0_dir=[float(v) for v in b0],
                       voxel_size=list(vs), subject="s0", source=source, phase_scale=None)


def _residual(s: tio.Subject, b0, pad_factor=2.0, masked=False) -> float:
    chi = s["chi"].data[0].double().numpy()
    field = s["field"].data[0].double().numpy()
    pred = DipoleOperator(s["voxel_size"], b0, pad_factor=pad_factor).A(chi)
    if masked:
        pred = pred * (s["mask"].data[0].numpy() > 0.5)
    return float(np.linalg.norm(pred - field) / np.linalg.norm(field))


@pytest.mark.parametrize("pad_factor", [1.0, 2.0])
@pytest.mark.parametrize("axes", [[0], [1], [2], [0, 2], [0, 1, 2]])
def test_flip_keeps_field_consistent_with_negated_b0(pad_factor, axes):
    s = flip_subject(_subject(pad_factor), axes)
    b = np.asarray(s["b0_dir"])
    expected = OBLIQUE.copy()
    expected[axes] *= -1
    np.testing.assert_allclose(b, expected, atol=1e-12)
    assert _residual(s, b, pad_factor) <= 1e-5  # float32 storage of chi/field is the only error
    naive = _residual(s, OBLIQUE, pad_factor)
    if len(axes) == 3:
        # flipping every axis negates all of b0, and D depends on b0 only through (k.b)^2
        assert naive <= 1e-5
    else:
        # the same flip without updating b0 breaks the physics: the pair no longer matches
        assert naive > 0.05, naive


def test_random_flip_p1_flips_all_axes_and_records_them():
    s0 = _subject()
    s = PhysicsSafeFlip(axes=(0, 1, 2), p=1.0)(s0)
    np.testing.assert_allclose(s["b0_dir"], -OBLIQUE, atol=1e-12)
    assert s["flipped_axes"] == [0, 1, 2]
    torch.testing.assert_close(s["chi"].data, torch.flip(s0["chi"].data, dims=[1, 2, 3]))
    assert s0["b0_dir"] == [float(v) for v in OBLIQUE]  # the input subject is not modified
    s = PhysicsSafeFlip(p=0.0)(s0)
    assert s["b0_dir"] == s0["b0_dir"] and "flipped_axes" not in s


def test_linearity_scaling_keeps_pair_and_magnitude():
    s0 = _subject()
    torch.manual_seed(0)
    s = LinearityScaling(scale_range=(1.5, 3.0), p_sign=1.0)(s0)
    f = s["chi_scale"]
    assert -3.0 <= f <= -1.5
    torch.testing.assert_close(s["chi"].data, s0["chi"].data * f)
    torch.testing.assert_close(s["magnitude"].data, s0["magnitude"].data)
    assert _residual(s, OBLIQUE) <= 1e-5


def test_field_and_magnitude_noise_levels():
    s0 = _subject()
    torch.manual_seed(1)
    s = FieldNoise(std_ppm=0.01)(s0)
    d = (s["field"].data - s0["field"].data).flatten()
    assert abs(float(d.std()) - 0.01) < 0.001 and abs(float(d.mean())) < 0.001
    torch.testing.assert_close(s["chi"].data, s0["chi"].data)  # the label stays clean
    s = MagnitudeNoise(std=0.05)(s0)
    m, m0 = s["magnitude"].data, s0["magnitude"].data
    assert float(m.min()) >= 0.0
    sigma = 0.05 * float(torch.quantile(m0.flatten(), 0.99))
    bright = m0 > 10 * sigma  # Rician ~ Gaussian at high SNR
    assert abs(float((m - m0)[bright].std()) / sigma - 1.0) < 0.1


def test_rotate_and_resimulate_keeps_field_equal_to_A_chi_times_mask():
    s0 = _subject(masked=True)
    torch.manual_seed(2)
    s = RotateAndResimulate(max_deg=25.0)(s0)
    assert not torch.allclose(s["chi"].data, s0["chi"].data, atol=1e-3)  # chi really moved
    assert set(torch.unique(s["mask"].data).tolist()) <= {0.0, 1.0}
    assert _residual(s, OBLIQUE, masked=True) <= 1e-5
    # an in-vivo row's field is a measurement: it must not be touched
    v0 = _subject(masked=True, source="invivo")
    v = RotateAndResimulate(max_deg=25.0)(v0)
    torch.testing.assert_close(v["field"].data, v0["field"].data, rtol=0, atol=0)


def test_rotation_geometry_matches_rot90():
    s0 = _subject(shape=(20, 20, 16), vs=(1.0, 1.0, 1.0))
    s = rotate_subject(_subject(shape=(20, 20, 16), vs=(1.0, 1.0, 1.0)), (0, 0, 1), 90.0)
    expected = np.rot90(s0["chi"].data[0].numpy(), 1, axes=(0, 1))
    # interior only: at the border the exact-90-degree lookup lands 1e-16 outside and reads the 0 fill
    np.testing.assert_allclose(s["chi"].data[0].numpy()[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1e-5)


def test_elastic_resimulate_keeps_field_equal_to_A_chi_times_mask():
    s0 = _subject(masked=True)
    torch.manual_seed(3)
    s = ElasticResimulate(max_displacement_mm=3.0, num_control_points=5)(s0)
    assert not torch.allclose(s["chi"].data, s0["chi"].data, atol=1e-4)
    assert _residual(s, OBLIQUE, masked=True) <= 1e-5


def test_build_augmentation():
    aug = build_augmentation({"field_noise": {"std_ppm": 0.001}, "flip": True, "linearity": None})
    names = [type(t).__name__ for t in aug.transforms]
    assert names == ["PhysicsSafeFlip", "FieldNoise"]
    assert build_augmentation({}) is None
    with pytest.raises(QSMInputError, match="augment: unknown"):
        build_augmentation({"rotation": {}})
    with pytest.raises(QSMInputError, match="augment.flip"):
        build_augmentation({"flip": {"p": 2.0}})
