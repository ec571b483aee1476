"""NIfTI I/O keeps geometry, writes float32 atomically; validators name the file at fault."""

import os

import nibabel as nib
import numpy as np
import pytest

from qsmlab.data.nifti import (
    Volume,
    check_finite,
    check_mask,
    check_ndim,
    check_same_grid,
    load_nifti,
    save_nifti,
)
from qsmlab.errors import QSMInputError
from qsmlab.physics import rotation_matrix


def _oblique_affine():
    aff = np.eye(4)
    aff[:3, :3] = rotation_matrix((1, 0.3, 0), 17.0) @ np.diag([0.8, 0.9, 1.5])
    aff[:3, 3] = (-60, -80, -40)
    return aff


def test_round_trip_keeps_affine_header_and_float32(tmp_path):
    aff = _oblique_affine()
    data = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.int16)  # integer input
    src = nib.Nifti1Image(data, aff)
    src.header.set_xyzt_units("mm", "sec")
    nib.save(src, tmp_path / "in.nii.gz")
    vol = load_nifti(tmp_path / "in.nii.gz")
    out = save_nifti(tmp_path / "out" / "chi.nii.gz", vol.data * 0.5, like=vol)
    img = nib.load(out)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, aff, atol=1e-6)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(np.asarray(img.dataobj), vol.data * 0.5, rtol=1e-6)
    np.testing.assert_allclose(vol.voxel_size, [0.8, 0.9, 1.5], atol=1e-6)
    assert vol.b0_dir().shape == (3,) and abs(np.linalg.norm(vol.b0_dir()) - 1) < 1e-12


def test_scaled_input_is_not_rescaled_on_output(tmp_path):
    img = nib.Nifti1Image(np.arange(27, dtype=np.int16).reshape(3, 3, 3), np.eye(4))
    img.header.set_slope_inter(0.01, -1.0)
    nib.save(img, tmp_path / "scaled.nii")
    vol = load_nifti(tmp_path / "scaled.nii")
    save_nifti(tmp_path / "copy.nii", vol.data, like=vol)
    np.testing.assert_allclose(load_nifti(tmp_path / "copy.nii").data, vol.data, rtol=1e-6)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "chi.nii.gz"
    save_nifti(target, np.ones((3, 3, 3)))
    before = target.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(RuntimeError):
        save_nifti(target, np.zeros((3, 3, 3)))
    assert target.read_bytes() == before
    assert [p for p in os.listdir(tmp_path) if p != "chi.nii.gz"] == []  # no temporary left behind


def test_missing_and_wrong_files(tmp_path):
    with pytest.raises(QSMInputError, match=r"nope\.nii\.gz: file not found"):
        load_nifti(tmp_path / "nope.nii.gz")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(QSMInputError, match="expected a NIfTI"):
        load_nifti(tmp_path / "x.txt")
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(QSMInputError, match="bad.nii.gz: cannot read"):
        load_nifti(tmp_path / "bad.nii.gz", what="--field")


def test_validators_name_the_file():
    a = Volume(np.zeros((4, 4, 4)), np.eye(4), nib.Nifti1Header(), path="a.nii")
    b = Volume(np.zeros((4, 4, 5)), np.eye(4), nib.Nifti1Header(), path="b.nii")
    with pytest.raises(QSMInputError, match=r"^b.nii: grid shape"):
        check_same_grid(a, b)
    aff = np.eye(4)
    aff[0, 3] = 1.0
    c = Volume(np.zeros((4, 4, 4)), aff, nib.Nifti1Header(), path="c.nii")
    with pytest.raises(QSMInputError, match=r"^c.nii: affine differs"):
        check_same_grid(a, c)
    d = Volume(np.full((4, 4, 4), np.nan), np.eye(4), nib.Nifti1Header(), path="d.nii")
    with pytest.raises(QSMInputError, match=r"^d.nii: 64 non-finite"):
        check_finite(d)
    with pytest.raises(QSMInputError, match=r"^a.nii: mask is empty"):
        check_mask(a)
    e = Volume(np.full((4, 4, 4), 0.5), np.eye(4), nib.Nifti1Header(), path="e.nii")
    with pytest.raises(QSMInputError, match="not binary"):
        check_mask(e)
    f = Volume(np.zeros((4, 4, 4, 3)), np.eye(4), nib.Nifti1Header(), path="f.nii")
    with pytest.raises(QSMInputError, match=r"^f.nii: .* is 4-D"):
        check_ndim(f, (3,))
    check_ndim(f, (3, 4))  # echoes last is fine where allowed
    g = Volume(np.ones((4, 4, 4, 1)), np.eye(4), nib.Nifti1Header(), path="g.nii")
    assert check_mask(g).shape == (4, 4, 4)  # trailing singleton dropped
