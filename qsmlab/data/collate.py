"""Typed batches: a list of TorchIO subjects/patches -> :class:`QSMBatch`.

Tensors (``B`` = batch size; fields and chi in ppm):

- ``field``: [B, 1, X, Y, Z] float32 (required), ``mask``: [B, 1, X, Y, Z] float32 (0/1, required)
- ``chi``, ``magnitude``, ``total_field``: [B, 1, X, Y, Z] float32, or None
- ``seg``: [B, 1, X, Y, Z] int64, or None
- ``b0_dir``: [B, 3] float32 (unit, voxel axes), ``voxel_size``: [B, 3] float32 (mm)
- ``phase_scale``: [B] float32 (rad/ppm; NaN where unknown)
- ``affine``: [B, 4, 4] float64 voxel-to-world of each item (TorchIO shifts a patch's origin by its crop)
- ``location``: [B, 6] int64 ``(i0, j0, k0, i1, j1, k1)`` for patches, else None
- ``subject``, ``key``, ``source``: lists of str

An optional image enters the batch only if every item has it (re-simulated synthetic rows lose
``total_field``, for instance). The batch is a dataclass, so Lightning moves it to the device; it also
supports ``batch["field"]`` and ``"chi" in batch`` for code written against dicts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torchio as tio

OPTIONAL_IMAGES = ("chi", "magnitude", "total_field", "seg")


@dataclass
class QSMBatch:
    field: torch.Tensor
    mask: torch.Tensor
    b0_dir: torch.Tensor
    voxel_size: torch.Tensor
    phase_scale: torch.Tensor
    affine: torch.Tensor
    chi: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    total_field: torch.Tensor | None = None
    seg: torch.Tensor | None = None
    location: torch.Tensor | None = None
    subject: list[str] = dataclasses.field(default_factory=list)
    key: list[str] = dataclasses.field(default_factory=list)
    source: list[str] = dataclasses.field(default_factory=list)

    def __getitem__(self, name: str):
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: str) -> bool:
        return name in self.keys()

    def get(self, name: str, default=None):
        return getattr(self, name, default) if name in self.keys() else default

    def keys(self) -> list[str]:
        """Names of the fields that are present (not None)."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __len__(self) -> int:
        return int(self.field.shape[0])


def _image(subject: tio.Subject, name: str) -> torch.Tensor:
    return subject[name].data


def collate_subjects(items: Sequence[tio.Subject]) -> QSMBatch:
    """Stack subjects or patches (each image [C, X, Y, Z]) into a :class:`QSMBatch`."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    opt = {}
    for name in OPTIONAL_IMAGES:
        if all(name in s for s in items):
            t = torch.stack([_image(s, name) for s in items])
            opt[name] = t.long() if name == "seg" else t.float()
    loc = None
    if all("location" in s for s in items):
        loc = torch.stack([torch.as_tensor(s["location"]).long() for s in items])
    ps = [s.get("phase_scale") for s in items]
    return QSMBatch(
        field=torch.stack([_image(s, "field") for s in items]).float(),
        mask=torch.stack([_image(s, "mask") for s in items]).float().gt_(0.5),  # in place: no extra copy
        b0_dir=torch.tensor([list(s["b0_dir"]) for s in items], dtype=torch.float32),
        voxel_size=torch.tensor([list(s["voxel_size"]) for s in items], dtype=torch.float32),
        phase_scale=torch.tensor([math.nan if v is None else float(v) for v in ps], dtype=torch.float32),
        affine=torch.from_numpy(np.stack([np.asarray(s["field"].affine, dtype=np.float64) for s in items])),
        location=loc,
        subject=[str(s.get("subject", "")) for s in items],
        key=[str(s.get("key", "")) for s in items],
        source=[str(s.get("source", "")) for s in items],
        **opt,
    )
