"""A bounded cache of parameter-free network inputs, keyed by the exact bytes they are computed from.

NeXtQSM's background net gets channels computed from the total field and the mask alone (the SHARP
residual, V-SHARP): deterministic, without parameters or gradient, and expensive (V-SHARP at 112 x 112 x
104: 11 ball filters on a padded grid, 0.47 s of a ~3 s quick training step on 2 threads, 16 %; profiled in
session 25). Training on whole heads sees the same few volumes again and again (4 heads x 8 flips in the
quick profile), so the channels of a volume already seen are looked up instead of recomputed.

The key is a BLAKE2b digest of the input tensors' bytes (and of the parameters that define the channel),
not a subject name: a flip, a noise draw, a different patch or a changed voxel size is a different key, and
a hit returns exactly the tensor a recomputation would give, so training with and without the cache is the
same computation. Hashing costs ~6 ms per 112 x 112 x 104 float32 volume (one thread); a volume that never
comes back (random patches, simulated patch fields) costs that and its slot in the bounded memory.
Why not ``functools.lru_cache``: tensors are not hashable by value, and the bound is in bytes, not entries.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch


def digest(tensors: Sequence[torch.Tensor], extra: tuple = ()) -> str:
    """BLAKE2b (128 bit) of the tensors' dtypes, shapes and bytes (copied to the host if needed) and
    ``repr(extra)``."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(extra).encode())
    for t in tensors:
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TensorCache:
    """Least-recently-used cache of tensors, at most ``max_mb`` MiB of values (0: off, nothing stored).

    ``get_or_compute(key_tensors, extra, compute)`` returns ``compute()``'s tensor, stored under the digest of
    ``key_tensors`` and ``extra``; counts ``hits`` and ``misses``. A value larger than the whole bound is
    returned and not stored.
    """

    def __init__(self, max_mb: float = 512.0):
        if not (isinstance(max_mb, int | float) and max_mb >= 0):
            raise ValueError(f"TensorCache: max_mb must be a number >= 0, got {max_mb!r}")
        self.max_bytes = int(max_mb * 2**20)
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0

    def get_or_compute(self, key_tensors: Sequence[torch.Tensor], extra: tuple,
                       compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.max_bytes <= 0:
            return compute()
        key = digest(key_tensors, extra)
        hit = self._store.get(key)
        if hit is not None:
            self._store.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        value = compute().detach()
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return value
        while self._store and self.bytes + size > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self._store[key] = value
        self.bytes += size
        return value
