"""Read an offline W&B run file (``run-<id>.wandb``) back: config, history, summary, exit code.

wandb 0.31 has no Python reader for its transaction log (the old ``wandb.sdk.internal.datastore`` is
gone; the Go core writes the file), but it ships the record schema, ``wandb.proto.wandb_internal_pb2.
Record``. The container is a LevelDB-style log, as W&B documents for its datastore:

- a 7-byte file header: ``b":W&B"``, the magic ``0xBEE1`` (uint16, little endian), version ``0`` (uint8);
- 32 KiB blocks of chunks, each with a 7-byte header ``crc32 (uint32) | length (uint16) | type (uint8)``;
  type 1 = FULL record, 2/3/4 = FIRST/MIDDLE/LAST fragments of a record split across blocks. A block
  tail shorter than a chunk header is zero padding. The CRC is zlib's crc32 of the data seeded with the
  crc32 of the type byte; a chunk whose CRC does not match ends the read (a run killed mid-write).

Used by the tests (a sweep's trials must be recorded in W&B) and handy for a user who wants to check an
offline run before ``wandb sync``.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK = 32 * 1024
MAGIC = (b":W&B", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class WandbRun:
    """What one offline run recorded. ``history``: one dict per ``log`` call (keys as logged)."""

    path: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    files: list[str] = field(default_factory=list)

    def series(self, key: str) -> list[Any]:
        """Values of ``key`` over the history rows that logged it, in order."""
        return [row[key] for row in self.history if key in row]


def iter_records(path: str | Path):
    """Yield each ``wandb_internal_pb2.Record`` of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < HEADER.size or HEADER.unpack_from(data) != MAGIC:
        raise ValueError(f"{path}: not a W&B run file (bad header)")
    off, pending = HEADER.size, b""
    while off < len(data):
        left = BLOCK - off % BLOCK
        if left < CHUNK.size:  # block tail padding
            off += left
            continue
        crc, length, kind = CHUNK.unpack_from(data, off)
        start, off = off + CHUNK.size, off + CHUNK.size + length
        if kind == 0 and length == 0:  # zero-filled space (pre-allocated or padding)
            continue
        chunk = data[start:off]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            return  # truncated or torn write: everything before it is intact
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _set(target: dict, item) -> None:
    value = json.loads(item.value_json)
    if item.nested_key and len(item.nested_key) > 1:
        node = target
        for k in item.nested_key[:-1]:
            node = node.setdefault(k, {})
        node[item.nested_key[-1]] = value
    else:
        target[_key(item)] = value


def read_run(path: str | Path) -> WandbRun:
    """Parse a run file (or an ``offline-run-*`` folder holding one) into a :class:`WandbRun`."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.wandb"))
        if not found:
            raise FileNotFoundError(f"{path}: no .wandb file")
        path = found[0]
    run = WandbRun(path=path)
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.name, run.group, run.project = r.run_id, r.display_name, r.run_group, r.project
            for it in r.config.update:
                _set(run.config, it)
        elif kind == "config":
            for it in rec.config.update:
                _set(run.config, it)
            for it in rec.config.remove:
                run.config.pop(_key(it), None)
        elif kind == "history":
            row: dict = {}
            for it in rec.history.item:
                row[_key(it)] = json.loads(it.value_json)
            run.history.append(row)
        elif kind == "summary":
            for it in rec.summary.update:
                _set(run.summary, it)
            for it in rec.summary.remove:
                run.summary.pop(_key(it), None)
        elif kind == "exit":
            run.exit_code = int(rec.exit.exit_code)
        elif kind == "files":
            run.files.extend(f.path for f in rec.files.files)
    run.config.pop("_wandb", None)
    # W&B stores config values as {"value": v} (+ "desc"): unwrap for readers
    run.config = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in run.config.items()}
    return run


def find_runs(root: str | Path) -> list[WandbRun]:
    """Every offline run under ``root`` (recursively), sorted by file path."""
    return [read_run(p) for p in sorted(Path(root).rglob("run-*.wandb"))]
