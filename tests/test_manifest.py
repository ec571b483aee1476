"""Manifest validation: every error names the row and the column; geometry filled from headers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from _datasets import make_dataset, oblique_affine

from qsmlab.cli import main
from qsmlab.data.manifest import check_manifest, load_manifest
from qsmlab.data.nifti import save_nifti
from qsmlab.errors import QSMInputError
from qsmlab.physics import b0_dir_from_affine


def _edit(path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = fn(df)
    df.to_csv(path, index=False)
    return path


def test_valid_manifest_fills_oblique_geometry_from_header(tmp_path):
    p = make_dataset(tmp_path, n_subjects=2, shape=(12, 12, 12), voxel_size=(1.0, 1.2, 1.5), tilt_deg=25)
    t = load_manifest(p)
    assert len(t) == 2 and t.subjects == ["sub-00", "sub-01"]
    expected = b0_dir_from_affine(oblique_affine((1.0, 1.2, 1.5), 25))
    b = np.asarray(t.rows[0].b0_dir)
    np.testing.assert_allclose(b, expected, atol=1e-6)
    assert abs(b[1]) > 0.3  # genuinely oblique: the 25 deg tilt is not lost
    np.testing.assert_allclose(t.rows[0].voxel_size, (1.0, 1.2, 1.5), atol=1e-6)
    assert t.rows[0].te == (0.004, 0.008) and t.rows[0].b0_tesla == 3.0
    assert len(t.hash) == 64 and check_manifest(p) == []


def test_explicit_b0_dir_and_sidecar_take_priority(tmp_path):
    p = make_dataset(tmp_path, n_subjects=2, shape=(12, 12, 12), tilt_deg=25)
    _edit(p, lambda df: df.assign(b0_dir=["1, 0, 0", ""]))
    (tmp_path / "sub-01" / "run-0" / "field.json").write_text(json.dumps({"B0_dir": [0, 1, 0]}))
    t = load_manifest(p)
    np.testing.assert_allclose(t.rows[0].b0_dir, (1, 0, 0))
    np.testing.assert_allclose(t.rows[1].b0_dir, (0, 1, 0))


def test_missing_file_names_row_and_column(tmp_path):
    p = make_dataset(tmp_path, n_subjects=3, shape=(12, 12, 12))
    (tmp_path / "sub-01" / "run-0" / "magnitude.nii.gz").unlink()
    with pytest.raises(QSMInputError, match=r"row 2 \(subject sub-01\), column 'magnitude': file not found"):
        load_manifest(p)


def test_malformed_b0_dir_names_row_and_column(tmp_path):
    p = make_dataset(tmp_path, n_subjects=3, shape=(12, 12, 12))
    _edit(p, lambda df: df.assign(b0_dir=["", "", "0 1"]))
    with pytest.raises(QSMInputError, match=r"row 3 \(subject sub-02\), column 'b0_dir'.*'0 1'"):
        load_manifest(p)


def test_duplicated_row_names_row_and_column(tmp_path):
    p = make_dataset(tmp_path, n_subjects=2, shape=(12, 12, 12))
    _edit(p, lambda df: pd.concat([df, df.iloc[[0]]], ignore_index=True))
    with pytest.raises(QSMInputError, match=r"row 3 \(subject sub-00\), column 'subject': duplicated.*row 1"):
        load_manifest(p)


def test_mismatched_grids_name_row_and_column(tmp_path):
    p = make_dataset(tmp_path, n_subjects=2, shape=(12, 12, 12))
    save_nifti(tmp_path / "sub-01" / "run-0" / "mask.nii.gz", np.ones((12, 12, 10)))
    with pytest.raises(QSMInputError, match=r"row 2 \(subject sub-01\), column 'mask': grid shape"):
        load_manifest(p)
    # same shape, shifted affine
    a = np.eye(4)
    a[0, 3] = 5.0
    save_nifti(tmp_path / "sub-01" / "run-0" / "mask.nii.gz", np.ones((12, 12, 12)), affine=a)
    with pytest.raises(QSMInputError, match=r"row 2 \(subject sub-01\), column 'mask': affine differs"):
        load_manifest(p)


def test_missing_required_column_and_bad_source(tmp_path):
    p = make_dataset(tmp_path, n_subjects=2, shape=(12, 12, 12))
    _edit(p, lambda df: df.assign(source=["synthetic", "phantom"]))
    with pytest.raises(QSMInputError, match=r"row 2 \(subject sub-01\), column 'source'"):
        load_manifest(p)
    _edit(p, lambda df: df.drop(columns=["mask"]))
    with pytest.raises(QSMInputError, match=r"column 'mask': required column missing"):
        load_manifest(p)


def test_check_manifest_reports_all_problems(tmp_path):
    p = make_dataset(tmp_path, n_subjects=4, shape=(12, 12, 12))
    (tmp_path / "sub-00" / "run-0" / "chi.nii.gz").unlink()
    save_nifti(tmp_path / "sub-03" / "run-0" / "magnitude.nii.gz", np.ones((8, 12, 12)))

    def edit(df):
        df.loc[1, "b0_dir"] = "x y z"
        df.loc[2, "te"] = "20"  # ms instead of s
        return pd.concat([df, df.iloc[[1]]], ignore_index=True)

    _edit(p, edit)
    problems = check_manifest(p)
    assert len(problems) == 5, problems
    expect = [("row 1", "'chi'"), ("row 2", "'b0_dir'"), ("row 3", "'te'"), ("row 4", "'magnitude'"),
              ("row 5", "'subject'")]
    for (row, col), line in zip(expect, problems):
        assert row in line and col in line, line

    assert main(["manifest", "check", str(p)]) == 2


def test_cli_summary_and_help(tmp_path, capsys):
    p = make_dataset(tmp_path, n_subjects=2, shape=(12, 12, 12), scans_per_subject=2)
    assert main(["manifest", "check", str(p)]) == 0
    assert capsys.readouterr().out.strip() == "4 rows, 2 subjects, OK"
    with pytest.raises(SystemExit):
        main(["manifest", "--help"])
    out = capsys.readouterr().out
    for col in ("b0_dir", "voxel_size", "source", "te", "subject"):
        assert col in out


def test_te_in_milliseconds_is_named_as_a_unit_error(tmp_path):
    p = make_dataset(tmp_path, n_subjects=2, shape=(12, 12, 12))
    _edit(p, lambda df: df.assign(te=["0.004", "4 8"]))
    with pytest.raises(QSMInputError, match=r"row 2 \(subject sub-01\), column 'te': te must be in seconds"):
        load_manifest(p)
