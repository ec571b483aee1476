"""DDP-correct subject sampling for the TorchIO queue.

Under DDP every rank builds its own ``tio.Queue``. Sharding must be by *subject* (scan), not by patch
(DESIGN.md section 5): each rank loads and augments only its share of the volumes, so no two ranks train
on patches of the same scan in one epoch. The queue's ``subject_sampler`` is a
``DistributedSampler`` over the subjects dataset:

- ``drop_last=True``: every rank gets the same number of scans, hence the same number of patches and
  batches (unequal counts would hang DDP's gradient all-reduce); no scan is duplicated across ranks.
  The few dropped scans change every epoch because the permutation is reshuffled.
- the epoch is read from the trainer each time the queue starts a new pass over its subjects: Lightning
  calls ``set_epoch`` only on samplers of the loaders it builds, never on a queue's inner sampler.
- the patch sampler and the augmentations draw from the global torch RNG of the rank (and of the queue's
  workers, which are seeded from it), so :func:`reseed_for_rank` gives each rank its own stream; with the
  same seed everywhere (``seed_everything``) all ranks would otherwise crop the same patch locations.

Lightning must not replace the sampler: build the trainer with ``Trainer(**trainer_kwargs())``, i.e.
``use_distributed_sampler=False``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler


def trainer_kwargs() -> dict:
    """Keyword arguments the :class:`~qsmlab.data.datamodule.QSMDataModule` requires of ``Trainer``."""
    return {"use_distributed_sampler": False}


def world_and_rank(trainer=None) -> tuple[int, int]:
    """(world size, global rank) from the trainer, else torch.distributed, else (1, 0)."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class EpochSyncedDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that sets its epoch from ``epoch_fn()`` whenever it is iterated.

    The queue iterates its subject sampler at the start of each pass over the subjects (and to count
    patches in ``len(queue)``), so the shuffle follows the trainer's epoch with no callback to forget.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int,
                 epoch_fn: Callable[[], int] | None = None, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.epoch_fn = epoch_fn

    def __iter__(self):
        if self.epoch_fn is not None:
            self.set_epoch(int(self.epoch_fn()))
        return super().__iter__()


def reseed_for_rank(seed: int, rank: int, epoch: int = 0) -> int:
    """Seed torch, numpy and random with a rank-specific value; returns it.

    The offset is a large prime multiple so that nearby user seeds never collide across ranks.
    """
    s = (int(seed) + 1_000_003 * int(rank) + 7919 * int(epoch)) % (2**31 - 1)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    return s
