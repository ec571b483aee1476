"""Cross-validation folds: grouped by subject, synthetic rows never tested, hash-checked on reload."""

from __future__ import annotations

import pandas as pd
import pytest
from _datasets import make_dataset

from qsmlab.data.folds import get_fold, kfold_folds, loso_folds, read_folds, write_folds
from qsmlab.data.manifest import load_manifest
from qsmlab.errors import QSMInputError

SOURCES = ["invivo", "synthetic", "invivo", "invivo", "synthetic", "invivo"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    return load_manifest(make_dataset(root, n_subjects=6, shape=(8, 8, 8), sources=SOURCES, scans_per_subject=2))


def _assert_grouped(table, folds):
    synth = {f"sub-{i:02d}" for i, s in enumerate(SOURCES) if s == "synthetic"}
    for f in folds:
        splits = [set(f.train), set(f.val), set(f.test)]
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2]), f
        assert set().union(*splits) == set(table.subjects)  # every scan of every subject is somewhere
        assert not (set(f.test) & synth) and not (set(f.val) & synth) and synth <= set(f.train)
        # a subject's scans are never split: each of its rows falls in the split holding the subject
        for r in table.rows:
            assert sum(r.subject in s for s in splits) == 1


def test_loso_holds_out_each_invivo_subject_once(table):
    folds = loso_folds(table)
    assert [f.test for f in folds] == [["sub-00"], ["sub-02"], ["sub-03"], ["sub-05"]]
    _assert_grouped(table, folds)
    folds = loso_folds(table, n_val=1)
    assert [f.val for f in folds] == [["sub-02"], ["sub-03"], ["sub-05"], ["sub-00"]]
    _assert_grouped(table, folds)


def test_fixed_validation_subject_is_never_trained_or_tested(table):
    folds = loso_folds(table, val_subjects=["sub-03"])
    assert len(folds) == 3
    for f in folds:
        assert f.val == ["sub-03"] and "sub-03" not in f.train + f.test
    _assert_grouped(table, folds)
    with pytest.raises(QSMInputError, match="val_subjects"):
        loso_folds(table, val_subjects=["sub-99"])


def test_kfold_partitions_invivo_subjects(table):
    folds = kfold_folds(table, k=2, seed=1, n_val=1)
    tests = [s for f in folds for s in f.test]
    assert sorted(tests) == ["sub-00", "sub-02", "sub-03", "sub-05"]
    _assert_grouped(table, folds)
    with pytest.raises(QSMInputError, match="k=5"):
        kfold_folds(table, k=5)


@pytest.mark.parametrize("ext", [".json", ".yaml"])
def test_write_read_roundtrip_and_stale_hash(tmp_path, ext):
    mpath = make_dataset(tmp_path, n_subjects=3, shape=(8, 8, 8), synthetic=False)
    table = load_manifest(mpath)
    folds = loso_folds(table)
    fpath = write_folds(tmp_path / f"folds{ext}", folds, table)
    assert read_folds(fpath, mpath) == folds
    assert get_fold(folds, "loso-sub-01").test == ["sub-01"] and get_fold(folds, 2).test == ["sub-02"]
    df = pd.read_csv(mpath, dtype=str, keep_default_na=False)
    df.loc[0, "group"] = "site-A"  # any edit of the manifest makes the folds stale
    df.to_csv(mpath, index=False)
    with pytest.raises(QSMInputError, match="stale folds"):
        read_folds(fpath, mpath)
