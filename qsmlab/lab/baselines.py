"""Classical baselines scored on the same held-out volumes as the learned methods (LOO tables).

- TKD (``qsmlab.recon`` registry, its default threshold 0.19).
- TV (ADMM, FANSI weighted-linear) with its weight ``alpha`` tuned on the **training** subjects of each fold
  only: every scan with a reference chi is inverted for each alpha of :data:`TV_ALPHAS` (log grid,
  1e-5...1e-2), the alpha with the lowest mean NRMSE over the fold's training scans is applied to the
  held-out scan. Scores are cached per (scan, alpha) in a CSV, so the grid costs ``scans x alphas``
  inversions for all folds together, the held-out scans' included (each is a training scan elsewhere).

Scores come from :func:`qsmlab.metrics.compute_all` on the full volume inside the mask, the same function
that scores the learned methods' predictions.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsmlab.data.manifest import Row

TV_ALPHAS = tuple(float(a) for a in np.logspace(-5, -2, 7))


@dataclass
class Scan:
    key: str
    field: np.ndarray
    mask: np.ndarray
    chi: np.ndarray | None
    magnitude: np.ndarray | None
    voxel_size: tuple
    b0_dir: tuple
    affine: np.ndarray


def load_scan(row: Row) -> Scan:
    from qsmlab.data.nifti import load_nifti

    f = load_nifti(row.field, np.float32, what=f"row {row.index} field")

    def opt(path, what):
        return None if path is None else load_nifti(path, np.float32, what=f"row {row.index} {what}").data

    return Scan(key=row.key, field=f.data, mask=load_nifti(row.mask, np.float32).data > 0, chi=opt(row.chi, "chi"),
                magnitude=opt(row.magnitude, "magnitude"), voxel_size=tuple(row.voxel_size),
                b0_dir=tuple(row.b0_dir), affine=f.affine)


def tkd(scan: Scan) -> np.ndarray:
    from qsmlab.recon import registry

    return registry.get("inversion", "tkd")(scan.field, scan.mask, voxel_size=scan.voxel_size,
                                            b0_dir=scan.b0_dir, quiet=True)


def tv(scan: Scan, alpha: float) -> np.ndarray:
    from qsmlab.recon import registry

    return registry.get("inversion", "tv")(scan.field, scan.mask, voxel_size=scan.voxel_size, b0_dir=scan.b0_dir,
                                           magnitude=scan.magnitude, alpha=alpha, quiet=True)


class TVGrid:
    """Metrics of TV per (scan key, alpha) (all of :func:`qsmlab.metrics.compute_all`), each computed once
    and kept in ``path`` (CSV), so every fold reads the inversions it shares with the others."""

    def __init__(self, path: str | Path, alphas: Sequence[float] = TV_ALPHAS):
        self.path, self.alphas = Path(path), tuple(float(a) for a in alphas)
        self.table: dict[tuple[str, float], dict[str, float]] = {}
        if self.path.is_file():
            with open(self.path) as f:
                for r in csv.DictReader(f):
                    key, alpha = r.pop("key"), float(r.pop("alpha"))
                    self.table[(key, alpha)] = {k: float(v) for k, v in r.items()}

    def metrics(self, scan: Scan, alpha: float) -> dict[str, float]:
        from qsmlab.metrics import compute_all

        k = (scan.key, float(alpha))
        if k not in self.table:
            m = {n: float(v) for n, v in compute_all(tv(scan, alpha), scan.chi, scan.mask).items()}
            self.table[k] = m
            new = not self.path.is_file()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", newline="") as f:  # one short append: safe with parallel folds
                w = csv.writer(f)
                if new:
                    w.writerow(["key", "alpha", *m])
                w.writerow([scan.key, repr(float(alpha)), *(repr(v) for v in m.values())])
        return self.table[k]

    def best_alpha(self, train_scans: Sequence[Scan]) -> tuple[float, dict[float, float]]:
        """Alpha minimising the mean NRMSE over the training scans that have a reference chi."""
        scans = [s for s in train_scans if s.chi is not None]
        if not scans:
            return 5e-5, {}  # the inversion's own default when nothing can be tuned on
        means = {a: float(np.mean([self.metrics(s, a)["nrmse"] for s in scans])) for a in self.alphas}
        return min(means, key=means.get), means
