"""Test-time mirroring (qsmlab.methods.inference.flips): which flips keep the dipole kernel, the mirrored mean,
and the option through predict_volume / MethodOptions / qsmlab predict."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from qsmlab.errors import QSMInputError
from qsmlab.methods import UQSM
from qsmlab.methods.inference.flips import kernel_preserving_flips, mirror_averaged
from qsmlab.methods.predict import predict_volume
from qsmlab.physics import DipoleOperator, tilted_b0_dir
from qsmlab.recon.inversion import tkd


def _chi(shape=(20, 24, 16), seed=0):
    rng = np.random.default_rng(seed)
    chi = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = (g[0] / 0.8) ** 2 + (g[1] / 0.7) ** 2 + (g[2] / 0.75) ** 2 <= 1
    return 0.05 * chi / np.abs(chi).max() * mask, mask


def _flip(a, axes):
    return np.flip(a, axis=axes) if axes else a


@pytest.mark.parametrize("b0, n", [((0, 0, 1), 8), ((1, 0, 0), 8), (tuple(tilted_b0_dir(20)), 4),
                                   ((0.2, 0.3, 0.93), 2)])
def test_kept_flips_are_exactly_those_that_commute_with_the_dipole_field(b0, n):
    """A(flip chi) == flip A(chi) for each kept flip (the analytic field of a flipped source), and not for the
    others: the selection is the physics, not a table."""
    chi, _ = _chi()
    vs = (1.0, 1.2, 0.9)
    op = DipoleOperator(vs, b0)
    field = op.A(chi)
    kept = kernel_preserving_flips(b0)
    assert len(kept) == n and kept[0] == ()
    scale = np.abs(field).max()
    for s in [s for k in range(4) for s in itertools.combinations(range(3), k)]:
        err = np.abs(op.A(_flip(chi, s)) - _flip(field, s)).max() / scale
        if s in kept:
            assert err < 1e-10, (s, err)
        else:
            assert err > 1e-3, (s, err)


def test_b0_free_inputs_get_every_flip():
    assert len(kernel_preserving_flips(None)) == 8


def test_mirrored_mean_symmetrises_and_keeps_an_equivariant_map():
    x = torch.randn(1, 1, 6, 5, 4)
    flips = kernel_preserving_flips((0, 0, 1))
    # an equivariant map (pointwise) is unchanged
    same = mirror_averaged(lambda t: {"y": 2 * t["x"] + 1}, {"x": x}, flips)["y"]
    torch.testing.assert_close(same, 2 * x + 1)
    # a map that is not (a fixed ramp added) comes back as the mean of the ramp's flips: its odd part cancels
    ramp = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1, 1).expand(1, 1, 6, 5, 4)
    out = mirror_averaged(lambda t: {"y": t["x"] + ramp}, {"x": x}, flips)["y"]
    torch.testing.assert_close(out, x + 2.5 * torch.ones_like(x))
    with pytest.raises(ValueError, match="no flips"):
        mirror_averaged(lambda t: t, {"x": x}, [])


@pytest.mark.parametrize("b0", [(0.0, 0.0, 1.0), tuple(tilted_b0_dir(20))])
def test_tkd_prior_network_is_unchanged_by_mirroring_and_a_random_one_is_averaged(b0):
    """An untrained prior-tkd network is TKD, which commutes with the kept flips: mirroring returns it. A
    trained-looking (random output layer) network comes back as the mean of its flipped passes."""
    chi, mask = _chi(seed=1)
    vs = (1.0, 1.0, 1.0)
    field = (DipoleOperator(vs, b0).A(chi) * mask).astype(np.float32)
    m = UQSM(width=4, depth=2, field_scale=0.01, prior="tkd", voxel_resampling="never").eval()
    m.set_statistics(0.01, b0, vs)
    one = predict_volume(m, field, mask, vs, b0, tta="none")
    mirrored = predict_volume(m, field, mask, vs, b0, tta="flips")
    ref = tkd(field, mask, voxel_size=vs, b0_dir=b0, pad_factor=2.0)
    np.testing.assert_allclose(one, ref, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(mirrored, ref, atol=1e-5 * np.abs(ref).max())

    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flips = kernel_preserving_flips(b0)
    manual = np.mean([_flip(predict_volume(m, np.ascontiguousarray(_flip(field, s)),
                                           np.ascontiguousarray(_flip(mask, s)), vs, b0, tta="none"), s)
                      for s in flips], axis=0)
    got = predict_volume(m, field, mask, vs, b0, tta="flips")
    single = predict_volume(m, field, mask, vs, b0, tta="none")
    np.testing.assert_allclose(got, manual, atol=1e-5 * np.abs(manual).max())
    assert np.abs(got - single).max() > 1e-4 * np.abs(single).max()  # mirroring did something
    # the checkpoint's option is the default of a call
    m.options = dataclasses.replace(m.options, tta="flips")
    np.testing.assert_allclose(predict_volume(m, field, mask, vs, b0), got, atol=1e-6 * np.abs(got).max())


def test_bad_tta_is_one_line_error():
    chi, mask = _chi()
    m = UQSM(width=4, depth=2, field_scale=0.01, voxel_resampling="never").eval()
    with pytest.raises(QSMInputError, match="tta: expected one of"):
        predict_volume(m, chi.astype(np.float32), mask, tta="mirror")
    with pytest.raises(QSMInputError, match="model.tta"):
        UQSM(width=4, depth=2, tta="all")
