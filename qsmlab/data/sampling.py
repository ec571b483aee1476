"""DDP-correct subject sampling for the TorchIO queue.

Under DDP every rank builds its own ``tio.Queue``. Sharding must be by *subject*, not by patch
(DESIGN.md section 5): each rank loads and augments only its share of the volumes, and every scan of a
subject (orientations, sessions) goes to the same rank, so no two ranks train on the same head in one
epoch. The queue's ``subject_sampler`` is a :class:`SubjectShardSampler` over the scans dataset
(TorchIO calls the scans "subjects"):

- subjects are shuffled per epoch and dealt greedily to the rank with the fewest scans so far; each
  rank then keeps the same number of scans (the minimum over ranks), because unequal counts would
  give unequal batch counts and hang DDP's gradient all-reduce. The few scans dropped change every
  epoch with the shuffle. No scan and no subject is on two ranks.
- the epoch is read from the trainer each time the queue starts a new pass over its subjects: Lightning
  calls ``set_epoch`` only on samplers of the loaders it builds, never on a queue's inner sampler.
- the patch sampler and the augmentations draw from the global torch RNG of the rank (and of the queue's
  workers, which are seeded from it), so :func:`reseed_for_rank` gives each rank its own stream; with the
  same seed everywhere (``seed_everything``) all ranks would otherwise crop the same patch locations.

Lightning must not replace the sampler: build the trainer with ``Trainer(**trainer_kwargs())``, i.e.
``use_distributed_sampler=False``.
"""

from __future__ import annotations

import atexit
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def trainer_kwargs() -> dict:
    """Keyword arguments the :class:`~qsmlab.data.datamodule.QSMDataModule` requires of ``Trainer``."""
    return {"use_distributed_sampler": False}


_TEARDOWN_REGISTERED = False


def destroy_process_group_at_exit() -> None:
    """Destroy this process's torch.distributed group when the interpreter exits.

    Lightning registers that clean-up for NCCL only. A gloo group left alive races the exit of a
    ``ddp_spawn`` worker: gloo's threads are still joinable when C++ static destructors run, and the
    worker dies with SIGABRT ("terminate called without an active exception") after a finished fit --
    measured on 2 CPU cores in about 1 run of 6 of ``tests/test_ddp_data.py``. Idempotent; a no-op
    outside a distributed run.
    """
    global _TEARDOWN_REGISTERED
    if _TEARDOWN_REGISTERED or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return

    def _destroy() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(_destroy)
    _TEARDOWN_REGISTERED = True


def world_and_rank(trainer=None) -> tuple[int, int]:
    """(world size, global rank) from the trainer, else torch.distributed, else (1, 0)."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class SubjectShardSampler(Sampler[int]):
    """Shards scan indices across ranks by subject group (see the module docstring).

    Args:
        groups: subject ID of each scan (``groups[i]`` for dataset index ``i``).
        num_replicas, rank: world size and this rank.
        seed: shuffle seed, the same on every rank (the assignment must agree across ranks).
        epoch_fn: returns the trainer's current epoch; read at every ``__iter__``.
        shuffle: shuffle subjects (and this rank's scans) per epoch.
    """

    def __init__(self, groups: Sequence[str], num_replicas: int, rank: int, seed: int = 0,
                 epoch_fn: Callable[[], int] | None = None, shuffle: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.groups = list(groups)
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        self.epoch_fn, self.shuffle, self.epoch = epoch_fn, shuffle, 0
        self._subjects = sorted(set(self.groups))
        if len(self._subjects) < self.num_replicas:
            raise ValueError(f"{len(self._subjects)} subjects cannot be sharded over {num_replicas} ranks")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _shards(self) -> list[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self._subjects), generator=g).tolist() if self.shuffle else range(len(self._subjects))
        members: dict[str, list[int]] = {}
        for i, s in enumerate(self.groups):
            members.setdefault(s, []).append(i)
        shards: list[list[int]] = [[] for _ in range(self.num_replicas)]
        for j in order:
            target = min(range(self.num_replicas), key=lambda r: (len(shards[r]), r))
            shards[target].extend(members[self._subjects[j]])
        n = min(len(sh) for sh in shards)
        out = []
        for sh in shards:
            if self.shuffle:
                perm = torch.randperm(len(sh), generator=g).tolist()
                sh = [sh[p] for p in perm]
            out.append(sh[:n])
        return out

    def __iter__(self) -> Iterator[int]:
        if self.epoch_fn is not None:
            self.set_epoch(int(self.epoch_fn()))
        return iter(self._shards()[self.rank])

    def __len__(self) -> int:
        return len(self._shards()[self.rank])


def reseed_for_rank(seed: int, rank: int, epoch: int = 0) -> int:
    """Seed torch, numpy and random with a rank-specific value; returns it.

    The offset is a large prime multiple so that nearby user seeds never collide across ranks.
    """
    s = (int(seed) + 1_000_003 * int(rank) + 7919 * int(epoch)) % (2**31 - 1)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    return s
