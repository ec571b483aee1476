"""QSMDataModule: patches of the configured size with every key; full-volume eval; splits and folds."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from _datasets import make_dataset

from qsmlab.data.collate import QSMBatch
from qsmlab.data.datamodule import QSMDataModule
from qsmlab.data.folds import loso_folds, write_folds
from qsmlab.data.manifest import load_manifest
from qsmlab.errors import QSMInputError
from qsmlab.physics import DipoleOperator, phase_scale


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    return make_dataset(root, n_subjects=4, shape=(20, 20, 20), voxel_size=(1.0, 1.0, 1.2), tilt_deg=20,
                        sources=["invivo", "invivo", "invivo", "synthetic"])


def test_train_patches_have_configured_size_and_all_keys(manifest):
    dm = QSMDataModule(str(manifest), patch_size=(12, 10, 8), samples_per_volume=3, queue_length=6,
                       batch_size=2, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 4 * 3 // 2
    batches = list(loader)
    assert len(batches) == 6
    table = load_manifest(manifest)
    for b in batches:
        assert isinstance(b, QSMBatch)
        for k in ("field", "mask", "chi", "magnitude"):
            assert b[k].shape == (2, 1, 12, 10, 8) and b[k].dtype == torch.float32, k
        assert b.total_field is None and b.seg is None and "total_field" not in b
        assert b.b0_dir.shape == (2, 3) and b.voxel_size.shape == (2, 3)
        np.testing.assert_allclose(b.b0_dir[0].numpy(), table.rows[0].b0_dir, atol=1e-6)
        np.testing.assert_allclose(b.voxel_size[0].numpy(), (1.0, 1.0, 1.2), atol=1e-6)
        np.testing.assert_allclose(b.phase_scale.numpy(), [phase_scale(0.004, 3.0)] * 2, rtol=1e-6)
        loc = b.location
        assert loc.shape == (2, 6) and torch.all(loc[:, 3:] - loc[:, :3] == torch.tensor([12, 10, 8]))
        assert len(b.subject) == 2 and set(b.subject) <= set(table.subjects)
    seen = [s for b in batches for s in b.subject]
    assert sorted(set(seen)) == table.subjects and all(seen.count(s) == 3 for s in set(seen))


def test_patch_content_matches_volume_at_location(manifest):
    dm = QSMDataModule(str(manifest), patch_size=8, samples_per_volume=2, queue_length=8, batch_size=1)
    b = next(iter(dm.train_dataloader()))
    row = next(r for r in load_manifest(manifest).rows if r.subject == b.subject[0])
    vol = np.asarray(nib.load(str(row.field)).dataobj)
    i0, j0, k0, i1, j1, k1 = b.location[0].tolist()
    np.testing.assert_allclose(b.field[0, 0].numpy(), vol[i0:i1, j0:j1, k0:k1])


def test_mask_sampler_centres_patches_in_brain(manifest):
    dm = QSMDataModule(str(manifest), patch_size=8, samples_per_volume=4, queue_length=16, batch_size=4,
                       sampler="mask")
    for b in dm.train_dataloader():
        assert torch.all(b.mask[:, 0, 4, 4, 4] == 1.0)


def test_eval_loaders_are_full_volumes_and_test_excludes_synthetic(tmp_path, manifest):
    table = load_manifest(manifest)
    folds = loso_folds(table, val_subjects=["sub-02"])
    fpath = write_folds(tmp_path / "folds.json", folds, table)
    dm = QSMDataModule(str(manifest), patch_size=8, folds=str(fpath), fold="loso-sub-01")
    dm.setup("fit")
    assert [r.subject for r in dm.rows["train"]] == ["sub-00", "sub-03"]
    (v,) = list(dm.val_dataloader())
    assert v.field.shape == (1, 1, 20, 20, 20) and v.location is None and v.subject == ["sub-02"]
    (t,) = list(dm.test_dataloader())
    assert t.subject == ["sub-01"]
    dm = QSMDataModule(str(manifest), patch_size=8, test_subjects=["sub-01", "sub-03"])
    assert [b.subject[0] for b in dm.test_dataloader()] == ["sub-01"]  # synthetic sub-03 dropped
    assert [b.subject[0] for b in dm.predict_dataloader()] == ["sub-01", "sub-03"]


def test_flip_augmentation_reaches_the_batch_consistently(manifest):
    dm = QSMDataModule(str(manifest), patch_size=20, samples_per_volume=1, queue_length=4, batch_size=1,
                       augment={"flip": {"axes": [1], "p": 1.0}, "linearity": {"scale_range": [2, 2],
                                                                                 "p_sign": 0.0}})
    table = load_manifest(manifest)
    b = next(iter(dm.train_dataloader()))
    expected = np.asarray(table.rows[0].b0_dir) * np.array([1, -1, 1])
    np.testing.assert_allclose(b.b0_dir[0].numpy(), expected, atol=1e-6)
    # full-volume patch: the augmented pair still obeys the forward model with the batch's geometry
    op = DipoleOperator(b.voxel_size[0].double(), b.b0_dir[0].double())
    pred = op.A(b.chi[0, 0].double()) * b.mask[0, 0]
    rel = float(torch.linalg.norm(pred - b.field[0, 0]) / torch.linalg.norm(b.field[0, 0]))
    assert rel < 1e-5
    row = next(r for r in table.rows if r.subject == b.subject[0])
    chi = np.asarray(nib.load(str(row.chi)).dataobj)
    np.testing.assert_allclose(b.chi[0, 0].numpy(), 2.0 * chi[:, ::-1, :], atol=1e-7)  # flipped, x2


def test_bad_configuration_errors(manifest):
    with pytest.raises(QSMInputError, match="patch_size .* exceeds the grid"):
        QSMDataModule(str(manifest), patch_size=32).train_dataloader()
    with pytest.raises(QSMInputError, match="sampler"):
        QSMDataModule(str(manifest), sampler="random")
    with pytest.raises(QSMInputError, match="test_subjects"):
        QSMDataModule(str(manifest), test_subjects=["nobody"]).setup()
    assert math.isclose(phase_scale(0.004, 3.0), 2 * math.pi * 42.5775 * 3 * 0.004)


def test_cached_volumes_give_the_same_patches_and_stay_unmodified(manifest):
    kw = dict(patch_size=8, samples_per_volume=2, queue_length=8, batch_size=1, seed=3,
              augment={"linearity": {}, "flip": {}})
    plain = [b for b in QSMDataModule(str(manifest), **kw).train_dataloader()]
    dm = QSMDataModule(str(manifest), cache_volumes=True, **kw)
    queue = dm.train_queue()
    cached_before = {s["subject"]: s["field"].data.clone() for s in queue.subjects_dataset._subjects}
    cached = [b for b in QSMDataModule(str(manifest), cache_volumes=True, **kw).train_dataloader()]
    assert len(plain) == len(cached)
    for a, b in zip(plain, cached):
        assert a.subject == b.subject and torch.equal(a.location, b.location)
        torch.testing.assert_close(a.field, b.field)
    list(DataLoaderProbe(queue))  # a full pass with augmentation must not alter the cached volumes
    for s in queue.subjects_dataset._subjects:
        assert torch.equal(s["field"].data, cached_before[s["subject"]])


def DataLoaderProbe(queue):  # noqa: N802  (reads as a constructor)
    from torch.utils.data import DataLoader

    from qsmlab.data.collate import collate_subjects

    return DataLoader(queue, batch_size=2, collate_fn=collate_subjects)


def test_cache_default_depends_on_size(manifest, monkeypatch):
    import qsmlab.data.datamodule as dmod

    kw = dict(patch_size=8, samples_per_volume=1, queue_length=4, batch_size=1)
    q = QSMDataModule(str(manifest), **kw).train_queue()  # 4 tiny scans: cached by default
    assert all(s["field"]._loaded for s in q.subjects_dataset._subjects)
    monkeypatch.setattr(dmod, "CACHE_LIMIT_BYTES", 1000)
    q = QSMDataModule(str(manifest), **kw).train_queue()
    assert not any(s["field"]._loaded for s in q.subjects_dataset._subjects)
    q = QSMDataModule(str(manifest), cache_volumes=True, **kw).train_queue()  # explicit wins
    assert all(s["field"]._loaded for s in q.subjects_dataset._subjects)


def test_eval_field_noise_is_deterministic_and_only_on_evaluation_volumes(manifest):
    kw = dict(patch_size=8, val_subjects=["sub-02"], seed=3)
    (clean,) = list(QSMDataModule(str(manifest), **kw).val_dataloader())
    dm = QSMDataModule(str(manifest), eval_field_noise=0.01, **kw)
    (a,) = list(dm.val_dataloader())
    (b,) = list(QSMDataModule(str(manifest), eval_field_noise=0.01, **kw).val_dataloader())
    d = (a.field - clean.field).numpy()
    assert 0.008 < d.std() < 0.012 and torch.equal(a.field, b.field)  # same noise in every loader
    (other,) = list(QSMDataModule(str(manifest), eval_field_noise=0.01, **{**kw, "seed": 4}).val_dataloader())
    assert not torch.equal(other.field, a.field)
    assert torch.equal(a.mask, clean.mask) and torch.equal(a.chi, clean.chi) if clean.chi is not None else True
    with pytest.raises(QSMInputError, match="eval_field_noise"):
        QSMDataModule(str(manifest), eval_field_noise=-1, **kw)
