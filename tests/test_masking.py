"""Automatic brain mask on heads with scalp, skull and air: the R2* step (qsmlab.recon.masking)."""

from __future__ import annotations

import numpy as np
import pytest

from qsmlab.errors import QSMInputError
from qsmlab.recon.echo_fit import combine_magnitude
from qsmlab.recon.masking import brain_mask, r2star_map


def test_r2star_map_known_decay():
    te = np.array([0.004, 0.009, 0.014, 0.019, 0.024])
    r2 = np.array([5.0, 20.0, 33.0, 80.0])
    mag = 0.8 * np.exp(-te[None, :] * r2[:, None])
    got = r2star_map(mag.reshape(4, 1, 1, 5), te).ravel()
    assert got == pytest.approx(r2, rel=1e-9)
    assert np.isnan(r2star_map(np.zeros((2, 2, 2, 5)), te)).all()
    with pytest.raises(QSMInputError):
        r2star_map(mag.reshape(4, 1, 1, 5), te[:3])


def _shells(n=48):
    """A sphere of brain (R2* 20 /s) with a 2-voxel shell of attached soft tissue (33 /s, as bright)."""
    g = np.indices((n, n, n)) - (n - 1) / 2
    r = np.sqrt((g**2).sum(0))
    brain = r < 14
    tissue = (r < 16) & ~brain
    te = np.array([0.004, 0.009, 0.014, 0.019, 0.024])
    r2 = np.where(brain, 20.0, np.where(tissue, 33.0, 0.0))
    m0 = np.where(brain | tissue, 1.0, 0.0)
    mag = m0[..., None] * np.exp(-te * r2[..., None]) + 0.01 * np.random.default_rng(0).random((n, n, n, 5))
    return mag, te, brain


def test_r2star_step_drops_attached_tissue():
    mag, te, brain = _shells()
    rss = combine_magnitude(mag, te, "rss")
    plain = brain_mask(rss)
    with_r2 = brain_mask(rss, r2star=r2star_map(mag, te))
    dice = lambda m: 2 * (m & brain).sum() / (m.sum() + brain.sum())  # noqa: E731
    assert (plain & ~brain).sum() > 0.3 * brain.sum()  # magnitude alone keeps the shell
    assert (with_r2 & ~brain).sum() < 0.02 * brain.sum() and dice(with_r2) > 0.98
    # the limit scales with B0: at 7 T (70 /s) a 33 /s shell is not extra-cerebral by R2* and stays
    at7 = brain_mask(rss, r2star=r2star_map(mag, te), b0_tesla=7.0)
    assert (at7 & ~brain).sum() > 0.3 * brain.sum()


def test_invivo_like_head_mask():
    """A simulated head (skull, scalp, neck, air) at 4 mm: Dice with the true brain mask > 0.95."""
    from qsmlab.data.invivo_like import invivo_like_subject

    s = invivo_like_subject(3, voxel_size=(4.0, 4.0, 4.0), tilt_deg=10.0)
    rss = combine_magnitude(s.magnitude, s.te, "rss")
    m = brain_mask(rss, voxel_size=s.voxel_size, r2star=r2star_map(s.magnitude, s.te), b0_tesla=s.b0_tesla)
    old = brain_mask(rss, voxel_size=s.voxel_size)
    dice = lambda x: 2 * (x & s.mask).sum() / (x.sum() + s.mask.sum())  # noqa: E731
    assert dice(m) > 0.95 and (m & ~s.mask).sum() < 0.05 * s.mask.sum(), (dice(m), dice(old))
    assert dice(m) > dice(old) + 0.03
