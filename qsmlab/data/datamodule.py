"""``QSMDataModule``: manifest -> TorchIO queue of patches for training, full volumes for evaluation.

- train: ``tio.Queue`` over the training scans (augmented by :func:`build_augmentation`), patches drawn
  by ``tio.UniformSampler`` (``sampler="uniform"``) or ``tio.WeightedSampler(probability_map="mask")``
  (``sampler="mask"``: patch centres inside the brain), batched into :class:`QSMBatch`.
- val / test / predict: one full, un-augmented volume per batch (``batch_size=1``), for full-volume
  metrics (DESIGN.md section 5). Synthetic rows never enter the test set.

Splits: ``train_subjects`` / ``val_subjects`` / ``test_subjects``, or ``folds`` (a file from
:func:`qsmlab.data.folds.write_folds`, checked against the manifest's hash) plus ``fold`` (index or
name). With neither, every scan trains, nothing validates or tests, and predict covers all scans.

DDP: the queue shards subjects (all their scans together) across ranks (:mod:`qsmlab.data.sampling`) and reseeds per rank, so the
trainer **must** be built with ``use_distributed_sampler=False`` (see
:func:`qsmlab.data.sampling.trainer_kwargs`); a trainer that would replace the sampler is refused.
Validation is not sharded: every rank evaluates all validation volumes (identical metrics on every
rank, no padding duplicates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning as L
import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader

from qsmlab.data.collate import collate_subjects
from qsmlab.data.folds import get_fold, read_folds
from qsmlab.data.manifest import ManifestTable, Row, load_manifest
from qsmlab.data.sampling import (
    SubjectShardSampler,
    destroy_process_group_at_exit,
    reseed_for_rank,
    world_and_rank,
)
from qsmlab.data.subjects import subjects_from_rows
from qsmlab.data.transforms import build_augmentation
from qsmlab.errors import QSMInputError

SAMPLERS = ("uniform", "mask")
CACHE_LIMIT_BYTES = 2 * 1024**3  # per rank, float32: the default decides to cache below this


class QSMDataModule(L.LightningDataModule):
    """Patches for training, full volumes for evaluation, from a manifest CSV.

    Args:
        manifest: manifest CSV path (see :mod:`qsmlab.data.manifest`).
        patch_size: training patch edge in voxels (int or 3 ints), default 64.
        samples_per_volume: patches drawn from each loaded (augmented) volume, default 8.
        queue_length: patches held in the queue (memory: ~ queue_length * patch voxels * images * 4 B).
        batch_size: patches per training batch, default 2.
        num_workers: processes that load and augment volumes for the queue (and the eval loaders).
        sampler: ``"uniform"`` or ``"mask"`` (weighted by the brain mask).
        train_subjects, val_subjects, test_subjects: subject IDs per split (see module docstring).
        folds, fold: a folds file and the fold to use (instead of explicit subject lists).
        augment: mapping for :func:`qsmlab.data.transforms.build_augmentation`, e.g.
            ``{"flip": {"p": 0.5}, "linearity": {}, "field_noise": {"std_ppm": 0.005}}``.
        eval_field_noise: ppm; > 0 adds deterministic Gaussian noise (per subject, from ``seed``) to the
            field of validation and test volumes, so they look measured (see
            :class:`qsmlab.data.transforms.noise.EvalFieldNoise`). Default 0: the manifest's field as is.
        cache_volumes: load each training scan once and keep it in memory (decompressed), so that every
            pass of the queue only copies and augments it; reading .nii.gz dominates queue time
            (measured: 120 patches/s from files, 420 cached). ``None`` (default) caches when this
            rank's training images need at most ``CACHE_LIMIT_BYTES`` (2 GiB) as float32.
        seed: data seed (subject shuffling, patch locations, augmentation), offset per rank; it reseeds
            the global torch/numpy/random RNGs of each rank when the train loader is built. None leaves a
            single process's RNGs alone (under DDP each rank is still offset from its current seed).
    """

    def __init__(
        self,
        manifest: str,
        patch_size: int | Sequence[int] = 64,
        samples_per_volume: int = 8,
        queue_length: int = 64,
        batch_size: int = 2,
        num_workers: int = 0,
        sampler: str = "uniform",
        train_subjects: list[str] | None = None,
        val_subjects: list[str] | None = None,
        test_subjects: list[str] | None = None,
        folds: str | None = None,
        fold: int | str | None = None,
        augment: Mapping | None = None,
        cache_volumes: bool | None = None,
        seed: int = 0,
        eval_field_noise: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if sampler not in SAMPLERS:
            raise QSMInputError(f"sampler: expected one of {list(SAMPLERS)}, got {sampler!r}")
        ps = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        if len(ps) != 3 or min(ps) < 1:
            raise QSMInputError(f"patch_size: expected a positive int or 3 ints, got {patch_size!r}")
        for name, v in (("samples_per_volume", samples_per_volume), ("queue_length", queue_length),
                        ("batch_size", batch_size)):
            if int(v) < 1:
                raise QSMInputError(f"{name}: expected a positive integer, got {v}")
        if folds is not None and any(s is not None for s in (train_subjects, val_subjects, test_subjects)):
            raise QSMInputError("folds: give either a folds file or train/val/test_subjects, not both")
        if folds is not None and fold is None:
            raise QSMInputError("fold: required with folds (index or name)")
        self.manifest = manifest
        self.patch_size = ps
        self.samples_per_volume = int(samples_per_volume)
        self.queue_length = int(queue_length)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.sampler = sampler
        self.augment = dict(augment) if augment else None
        self.cache_volumes = cache_volumes
        self.seed = seed
        if not (float(eval_field_noise) >= 0):
            raise QSMInputError(f"eval_field_noise: expected a number of ppm >= 0, got {eval_field_noise!r}")
        self.eval_field_noise = float(eval_field_noise)
        self._splits = (train_subjects, val_subjects, test_subjects)
        self._folds, self._fold = folds, fold
        self.table: ManifestTable | None = None
        self.rows: dict[str, list[Row]] = {}

    # -- splits ---------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        destroy_process_group_at_exit()  # in each DDP process: see its docstring
        if self.table is not None:
            return
        self.table = load_manifest(self.manifest)
        if self._folds is not None:
            f = get_fold(read_folds(self._folds, self.table), self._fold)
            train, val, test = f.train, f.val, f.test
        else:
            train, val, test = self._splits
            known = set(self.table.subjects)
            for name, ids in zip(("train_subjects", "val_subjects", "test_subjects"), self._splits):
                bad = [s for s in (ids or []) if s not in known]
                if bad:
                    raise QSMInputError(f"{name}: subjects {bad[:3]} not in manifest {self.manifest}")
            if train is None:
                held = set(val or []) | set(test or [])
                train = [s for s in self.table.subjects if s not in held]
        self.rows = {
            "train": self.table.select(train),
            "val": self.table.select(val or []),
            "test": [r for r in self.table.select(test or []) if not r.synthetic],
            "predict": self.table.select(test) if test else list(self.table.rows),
        }
        # A supervised method drops the training rows without chi (see training_rows)
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        self.rows["train"] = self.training_rows(model)

    def training_rows(self, model=None) -> list[Row]:
        """The training rows ``model`` trains on (after :meth:`setup`): a supervised method (its ``requires``
        names chi) trains only on rows with chi, since the in-vivo rows of a hybrid manifest (qsmlab bids,
        qsmlab manifest merge) carry none; uQSM trains on all rows. A one-line QSMInputError when a supervised
        method has rows but none with chi."""
        rows = self.rows.get("train", [])
        if "chi" not in tuple(getattr(model, "requires", ()) or ()):
            return rows
        kept = [r for r in rows if r.chi is not None]
        if rows and not kept:
            raise QSMInputError(f"{self.manifest}: the method is supervised (needs chi) and no training row "
                                f"has chi ({len(rows)} without, e.g. {rows[0].key})")
        return kept

    def check_fit(self, model=None) -> None:
        """Every check of the training split that needs no trainer, for ``model`` (after :meth:`setup`):
        its rows (:meth:`training_rows`) and the patch size against each training volume. ``qsmlab fit``
        runs it before the run folder exists."""
        self._check_patch_fits(self.training_rows(model))

    # -- loaders --------------------------------------------------------------------------------------
    def _patch_sampler(self) -> tio.data.PatchSampler:
        if self.sampler == "mask":
            return tio.WeightedSampler(self.patch_size, probability_map="mask")
        return tio.UniformSampler(self.patch_size)

    def _check_trainer(self, world: int) -> None:
        t = self.trainer
        connector = getattr(t, "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise QSMInputError("Trainer(use_distributed_sampler=True) would replace the queue's subject "
                                "sampler; QSMDataModule requires Trainer(use_distributed_sampler=False)")

    def _check_patch_fits(self, rows: list[Row]) -> None:
        import nibabel as nib

        for r in rows:
            shape = nib.load(str(r.field)).shape[:3]
            if any(p > s for p, s in zip(self.patch_size, shape)):
                raise QSMInputError(f"patch_size {self.patch_size} exceeds the grid {shape} of row {r.index} "
                                    f"(subject {r.subject}) in {self.manifest}")

    def train_queue(self) -> tio.Queue:
        """The training ``tio.Queue`` for this rank (shard of scans, rank-specific seed)."""
        if self.table is None:
            self.setup("fit")
        rows = self.rows["train"]
        if not rows:
            raise QSMInputError(f"{self.manifest}: no training scans in this split")
        self._check_patch_fits(rows)
        world, rank = world_and_rank(self.trainer)
        self._check_trainer(world)
        if len({r.subject for r in rows}) < world:
            raise QSMInputError(f"{self.manifest}: {len({r.subject for r in rows})} training subjects cannot be "
                                f"sharded over {world} ranks; need at least one subject per rank")
        if self.seed is not None:
            reseed_for_rank(self.seed, rank)
        elif world > 1:  # no data seed: still give each rank its own stream (they would crop alike)
            reseed_for_rank(torch.initial_seed() % (2**31 - 1), rank)
        # copy=False: SubjectsDataset already hands the transform a fresh deep copy of each subject
        augment = build_augmentation(self.augment, copy=False)
        subjects = subjects_from_rows(rows)
        dataset = tio.SubjectsDataset(subjects, transform=augment)
        subject_sampler = SubjectShardSampler(
            [r.subject for r in rows], num_replicas=world, rank=rank, seed=int(self.seed or 0),
            epoch_fn=self._epoch)
        if self._should_cache([rows[i] for i in subject_sampler]):
            # Only this rank's shard is loaded; SubjectsDataset deep-copies a subject before augmenting
            # it, so the cached tensors are never modified.
            for i in subject_sampler:
                subjects[i].load()
        return tio.Queue(
            dataset, max_length=self.queue_length, samples_per_volume=self.samples_per_volume,
            sampler=self._patch_sampler(), subject_sampler=subject_sampler, num_workers=self.num_workers,
            shuffle_subjects=False, shuffle_patches=True, start_background=False,
        )

    def _should_cache(self, rows: list[Row]) -> bool:
        if self.cache_volumes is not None:
            return bool(self.cache_volumes)
        import nibabel as nib

        total = 0
        for r in rows:
            for key in ("field", "mask", "chi", "magnitude", "total_field", "seg"):
                path = getattr(r, key, None)
                if path is not None:
                    total += 4 * int(np.prod(nib.load(str(path)).shape))
        return total <= CACHE_LIMIT_BYTES

    def _epoch(self) -> int:
        t = self.trainer
        return int(t.current_epoch) if t is not None else 0

    def train_dataloader(self) -> DataLoader:
        # Patches are popped from the queue in the main process: the outer loader must have 0 workers.
        return DataLoader(self.train_queue(), batch_size=self.batch_size, num_workers=0,
                          collate_fn=collate_subjects)

    def _volume_loader(self, split: str) -> DataLoader | list:
        if self.table is None:
            self.setup(split)
        rows = self.rows[split]
        if not rows:
            return []
        transform = None
        if self.eval_field_noise > 0 and split in ("val", "test"):
            from qsmlab.data.transforms.noise import EvalFieldNoise

            transform = EvalFieldNoise(self.eval_field_noise, seed=self.seed)
        ds = tio.SubjectsDataset(subjects_from_rows(rows), transform=transform)
        return DataLoader(ds, batch_size=1, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_subjects)

    def val_dataloader(self):
        return self._volume_loader("val")

    def test_dataloader(self):
        return self._volume_loader("test")

    def predict_dataloader(self):
        return self._volume_loader("predict")

    # -- summary --------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """Scans per split and the manifest hash (for logs and experiment records)."""
        if self.table is None:
            self.setup()
        out = {k: len(v) for k, v in self.rows.items()}
        out["manifest_sha256"] = self.table.hash
        return out
