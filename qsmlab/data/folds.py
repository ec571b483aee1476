"""Cross-validation folds grouped by subject (DESIGN.md sections 3 and 5).

Rules:
- every scan (session, orientation, run) of a subject lies in one fold: folds list *subjects*;
- synthetic rows never enter a test fold: only subjects with at least one in-vivo row are test
  candidates; purely synthetic subjects are always in train. (A subject with both kinds of row follows
  its subject: when it is held out its synthetic rows leave train too, and the data module drops
  synthetic rows from test sets.)
- an optional fixed validation set (``val_subjects``) is never trained or tested on; or ``n_val`` test
  candidates following the held-out one (cyclically) validate each fold.

Folds are saved with the manifest's sha256 (:func:`write_folds`, JSON or YAML by extension) and
:func:`read_folds` refuses folds written for a different manifest version.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from qsmlab.data.manifest import ManifestTable, load_manifest
from qsmlab.data.nifti import atomic_write_text
from qsmlab.errors import QSMInputError


@dataclass
class Fold:
    """Subjects per split of one fold."""

    name: str
    train: list[str]
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)


def _candidates(table: ManifestTable) -> tuple[list[str], list[str]]:
    """(test-eligible subjects: have an in-vivo row, synthetic-only subjects)."""
    invivo = list(dict.fromkeys(r.subject for r in table.rows if not r.synthetic))
    synth = [s for s in table.subjects if s not in set(invivo)]
    return invivo, synth


def _check_val(table: ManifestTable, val_subjects: Sequence[str] | None) -> list[str]:
    val = list(val_subjects or [])
    unknown = [s for s in val if s not in set(table.subjects)]
    if unknown:
        raise QSMInputError(f"val_subjects: {unknown} not in manifest {table.path}")
    return val


def _make(name: str, table: ManifestTable, test: list[str], val: list[str]) -> Fold:
    held = set(test) | set(val)
    return Fold(name=name, train=[s for s in table.subjects if s not in held], val=val, test=test)


def loso_folds(table: ManifestTable, val_subjects: Sequence[str] | None = None, n_val: int = 0) -> list[Fold]:
    """Leave-one-subject-out: one fold per in-vivo subject (not in ``val_subjects``).

    Args:
        val_subjects: fixed validation subjects (excluded from train and test of every fold).
        n_val: without ``val_subjects``, validate on the next ``n_val`` candidates (cyclic order).
    """
    fixed = _check_val(table, val_subjects)
    cands = [s for s in _candidates(table)[0] if s not in set(fixed)]
    if not cands:
        raise QSMInputError(f"{table.path}: no in-vivo subject to hold out (synthetic rows never enter test)")
    if not fixed and n_val >= len(cands):
        raise QSMInputError(f"n_val={n_val}: needs fewer than the {len(cands)} in-vivo subjects")
    folds = []
    for i, s in enumerate(cands):
        val = fixed or [cands[(i + j) % len(cands)] for j in range(1, n_val + 1)]
        folds.append(_make(f"loso-{s}", table, [s], list(val)))
    return folds


def kfold_folds(table: ManifestTable, k: int, seed: int = 0, val_subjects: Sequence[str] | None = None,
                n_val: int = 0) -> list[Fold]:
    """k folds of in-vivo subjects (shuffled with ``seed``), every scan of a subject in one fold.

    ``n_val``: without fixed ``val_subjects``, the first ``n_val`` subjects of the next fold validate.
    """
    fixed = _check_val(table, val_subjects)
    cands = [s for s in _candidates(table)[0] if s not in set(fixed)]
    if not 2 <= k <= len(cands):
        raise QSMInputError(f"k={k}: expected 2 <= k <= {len(cands)} (in-vivo subjects available)")
    order = [cands[i] for i in np.random.default_rng(seed).permutation(len(cands))]
    groups = [list(g) for g in np.array_split(np.array(order, dtype=object), k)]
    folds = []
    for i, g in enumerate(groups):
        val = fixed or groups[(i + 1) % k][:n_val]
        folds.append(_make(f"kfold-{i}", table, list(g), list(val)))
    return folds


def write_folds(path: str | Path, folds: Sequence[Fold], table: ManifestTable) -> Path:
    """Write folds + the manifest's hash and path; ``.yaml``/``.yml`` -> YAML, else JSON (atomic)."""
    p = Path(path)
    doc = {"manifest": str(table.path), "manifest_sha256": table.hash, "folds": [asdict(f) for f in folds]}
    if p.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(doc, sort_keys=False)
    else:
        text = json.dumps(doc, indent=2) + "\n"
    return atomic_write_text(p, text)


def read_folds(path: str | Path, manifest: ManifestTable | str | Path) -> list[Fold]:
    """Read folds and check they were made for this exact manifest (sha256 of its bytes)."""
    p = Path(path)
    if not p.is_file():
        raise QSMInputError(f"{p}: folds file not found")
    table = manifest if isinstance(manifest, ManifestTable) else load_manifest(manifest)
    try:
        doc = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
        folds = [Fold(**f) for f in doc["folds"]]
        stored = doc["manifest_sha256"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise QSMInputError(f"{p}: not a folds file ({type(e).__name__}: {e})") from None
    if stored != table.hash:
        raise QSMInputError(f"{p}: stale folds: written for manifest sha256 {stored[:12]}…, but "
                            f"{table.path} is now {table.hash[:12]}…; regenerate the folds")
    known = set(table.subjects)
    for f in folds:
        bad = [s for s in f.train + f.val + f.test if s not in known]
        if bad:
            raise QSMInputError(f"{p}: fold {f.name} names subjects {bad[:3]} not in {table.path}")
    return folds


def get_fold(folds: Sequence[Fold], fold: int | str) -> Fold:
    """A fold by index or name."""
    if isinstance(fold, int) or (isinstance(fold, str) and fold.isdigit()):
        i = int(fold)
        if not 0 <= i < len(folds):
            raise QSMInputError(f"fold: index {i} out of range (0..{len(folds) - 1})")
        return folds[i]
    for f in folds:
        if f.name == fold:
            return f
    raise QSMInputError(f"fold: no fold named {fold!r}; have {[f.name for f in folds][:5]}…")
