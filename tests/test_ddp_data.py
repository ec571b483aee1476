"""DDP data sharding: under a 2-process Lightning run the ranks train on disjoint scans, draw different
patch locations, and reshuffle the shard every epoch (the queue's sampler follows the trainer's epoch)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from _datasets import make_dataset

from qsmlab.data.datamodule import QSMDataModule
from qsmlab.data.sampling import trainer_kwargs
from qsmlab.errors import QSMInputError


class Recorder(L.LightningModule):
    """Records (epoch, subject, patch location) per rank; a scalar weight keeps DDP's all-reduce real."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.out_dir = out_dir

    def training_step(self, batch, batch_idx):
        with open(Path(self.out_dir) / f"rank{self.global_rank}.jsonl", "a") as f:
            for s, loc in zip(batch.subject, batch.location.tolist()):
                f.write(json.dumps({"epoch": self.current_epoch, "subject": s, "loc": loc}) + "\n")
        return (self.w * batch.field).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ddp_ranks_get_disjoint_subjects_and_different_patches(tmp_path):
    manifest = make_dataset(tmp_path / "data", n_subjects=6, shape=(16, 16, 16))
    out = tmp_path / "rec"
    out.mkdir()
    dm = QSMDataModule(str(manifest), patch_size=8, samples_per_volume=2, queue_length=6, batch_size=2, seed=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2,
                        limit_train_batches=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), **trainer_kwargs())
    trainer.fit(Recorder(str(out)), datamodule=dm)

    r0, r1 = _read(out / "rank0.jsonl"), _read(out / "rank1.jsonl")
    assert len(r0) == len(r1) == 2 * 3 * 2  # epochs x batches x batch size: equal work per rank
    shards = {}
    for epoch in (0, 1):
        s0 = {r["subject"] for r in r0 if r["epoch"] == epoch}
        s1 = {r["subject"] for r in r1 if r["epoch"] == epoch}
        assert len(s0) == len(s1) == 3 and not (s0 & s1), (epoch, s0, s1)
        shards[epoch] = s0
        l0 = [r["loc"] for r in r0 if r["epoch"] == epoch]
        l1 = [r["loc"] for r in r1 if r["epoch"] == epoch]
        assert l0 != l1
    # set_epoch took effect: DistributedSampler(seed=1) gives rank 0 subjects {1, 2, 3} at epoch 0 and
    # {0, 1, 4} at epoch 1; without set_epoch both epochs would repeat the first shard
    assert shards == {0: {"sub-01", "sub-02", "sub-03"}, 1: {"sub-00", "sub-01", "sub-04"}}


def _fake_trainer(rank: int, epoch: int = 0, use_distributed_sampler: bool = False):
    return SimpleNamespace(world_size=2, global_rank=rank, current_epoch=epoch,
                           _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler))


def test_queue_shards_without_spawning(tmp_path):
    """The same sharding logic, checked in-process with stand-in trainers (fast, no process group)."""
    manifest = make_dataset(tmp_path, n_subjects=5, shape=(12, 12, 12))
    seen = {}
    for rank in (0, 1):
        dm = QSMDataModule(str(manifest), patch_size=8, samples_per_volume=2, queue_length=4, batch_size=2)
        dm.trainer = _fake_trainer(rank)
        loader = dm.train_dataloader()
        assert len(loader) == 2  # 5 scans over 2 ranks: 2 each (drop_last keeps ranks in step), 2 patches each
        seen[rank] = {s for b in loader for s in b.subject}
    assert len(seen[0]) == len(seen[1]) == 2 and not (seen[0] & seen[1])


def test_trainer_that_replaces_the_sampler_is_refused(tmp_path):
    manifest = make_dataset(tmp_path, n_subjects=2, shape=(12, 12, 12))
    dm = QSMDataModule(str(manifest), patch_size=8)
    dm.trainer = _fake_trainer(0, use_distributed_sampler=True)
    with pytest.raises(QSMInputError, match="use_distributed_sampler=False"):
        dm.train_dataloader()
    dm = QSMDataModule(str(manifest), patch_size=8)
    dm.trainer = _fake_trainer(0)
    dm.trainer.world_size = 3
    with pytest.raises(QSMInputError, match="cannot be sharded over 3 ranks"):
        dm.train_dataloader()


def test_subject_shard_sampler_keeps_subjects_together_and_balances():
    from qsmlab.data.sampling import SubjectShardSampler

    # 5 subjects with 1-3 scans each (orientations/sessions)
    groups = ["a", "a", "a", "b", "c", "c", "d", "e", "e"]
    epochs = []
    for epoch in range(4):
        shards = []
        for rank in range(2):
            s = SubjectShardSampler(groups, num_replicas=2, rank=rank, seed=7, epoch_fn=lambda e=epoch: e)
            idx = list(iter(s))
            assert len(idx) == len(s)
            shards.append(idx)
        assert len(shards[0]) == len(shards[1]) > 0  # equal batch counts on every rank
        subj = [{groups[i] for i in sh} for sh in shards]
        assert not subj[0] & subj[1]  # no subject on two ranks
        assert not set(shards[0]) & set(shards[1])
        epochs.append(tuple(sorted(subj[0])))
    assert len(set(epochs)) > 1  # the split changes across epochs
    with pytest.raises(ValueError, match="cannot be sharded"):
        SubjectShardSampler(["a", "a"], num_replicas=2, rank=0)
