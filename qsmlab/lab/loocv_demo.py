"""The leave-one-out demo (``qsmlab loocv EXP --demo``, ``make loocv`` without MANIFEST).

A newcomer's first leave-one-out batch, with nothing to download: four in-vivo-like heads at 2 mm
(:mod:`qsmlab.data.invivo_like`; skull, scalp, air, 5 echoes at 3 T, tilts 0/15 deg) are written as a BIDS
raw dataset (:func:`qsmlab.data.bids_write.write_invivo_like_bids`), prepared by the same code as
``qsmlab bids`` (automatic masks; their simulated chi found as a reference derivative, so the held-out
scores are real), merged with the anatomical rows of the embedded synthetic dataset (``source=synthetic``,
always training) into a hybrid manifest, and each in-vivo subject is held out in turn
(:func:`qsmlab.lab.loocv.run_loocv`). The experiment's quick profile runs with ``DEMO_STEPS`` steps
(a demo of the batch, not a benchmark of the method), TV's weight is searched over two values.

Everything lands in ``<out>/demo/`` (``bids/``, ``derivatives/``, ``hybrid.csv``) beside the LOO results;
every step is skipped when its output exists, so a rerun only aggregates.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from qsmlab.lab.config import RUNS_DIR

DEMO_SUBJECTS = 4
DEMO_VOXEL_MM = 2.0  # the embedded dataset's grid
#: The embedded dataset's 2 mm grid: a profile whose patch is larger (the quick profiles' whole volumes of their
#: 1.5 mm realistic heads, 112 x 112 x 104) trains on whole 2 mm volumes in the demo.
DEMO_WHOLE_VOLUME = [93, 111, 98]
DEMO_STEPS = 20
DEMO_TV_ALPHAS = (1e-4, 1e-3)
"""TV's weight is tuned per fold over these (each TV solve of a 2 mm head is the demo's largest cost)."""


def demo_manifest(work: Path, quiet: bool = False) -> Path:
    """Build (or reuse) the demo's hybrid manifest under ``work``; returns its path."""
    from qsmlab.data.bids_prepare import PrepareConfig, prepare_dataset
    from qsmlab.data.bids_write import TRUTH_PIPELINE, ScanSpec, write_invivo_like_bids
    from qsmlab.data.manifest import merge_manifests
    from qsmlab.data.nifti import atomic_write_text
    from qsmlab.data.recipe import ensure_dataset

    hybrid = work / "hybrid.csv"
    if hybrid.is_file():
        return hybrid
    raw, deriv = work / "bids", work / "derivatives"
    t0 = time.time()
    if not (raw / "dataset_description.json").is_file():
        scans = [ScanSpec({"sub": f"ivl{i + 1:02d}"}, seed=100 + i, tilt_deg=15.0 * (i % 2)) for i in range(DEMO_SUBJECTS)]
        write_invivo_like_bids(raw, scans, voxel_size=(DEMO_VOXEL_MM,) * 3, quiet=quiet)
    manifest, _, failed = prepare_dataset(raw, deriv, PrepareConfig(), reference=raw / "derivatives" / TRUTH_PIPELINE,
                                          quiet=quiet)
    if failed:
        raise RuntimeError(f"loocv demo: qsmlab bids failed on {failed[0]}")
    # the embedded dataset's anatomical rows (the 64^3 shape phantoms do not fit the whole-volume patch)
    synth = Path(ensure_dataset())
    with synth.open() as f:
        rows = [r for r in csv.DictReader(f) if r["group"] == "anatomical"]
        cols = list(rows[0])
    lines = [",".join(cols)] + [",".join(str(Path(synth.parent, r[c]).resolve()) if c in
                                         ("field", "total_field", "chi", "mask", "magnitude", "phase", "seg") and r[c]
                                         else r[c] for c in cols) for r in rows]
    anat = atomic_write_text(work / "synthetic_anatomical.csv", "\n".join(lines) + "\n")
    merge_manifests([anat, manifest], hybrid)
    if not quiet:
        print(f"[loocv demo] {DEMO_SUBJECTS} in-vivo-like subjects as BIDS -> qsmlab bids -> {hybrid} "
              f"({time.time() - t0:.0f} s)", flush=True)
    return hybrid


def run_demo(experiment: str, out: str | Path | None = None, overrides=(), quiet: bool = False, **kw):
    """Build the demo manifest and run the leave-one-out batch on it (see module docstring)."""
    from qsmlab.lab import config as C
    from qsmlab.lab.loocv import run_loocv

    exp_name = C.experiment_path(experiment).stem
    out = Path(out) if out else RUNS_DIR / f"loocv-{exp_name}-demo"
    hybrid = demo_manifest(out / "demo", quiet=quiet)
    ov = [("trainer.max_steps", DEMO_STEPS), ("trainer.val_check_interval", None)]
    profile = kw.get("profile") or (C.DEFAULT_PROFILE if C.DEFAULT_PROFILE in C.profiles_of(experiment) else None)
    patch = C.get_dotted(C.load_experiment(experiment, profile), "data.patch_size")
    if isinstance(patch, (list, tuple)) and len(patch) == 3 and any(int(a) > b for a, b in zip(patch, DEMO_WHOLE_VOLUME)):
        ov.append(("data.patch_size", DEMO_WHOLE_VOLUME))  # a whole-volume patch larger than the demo's volumes
    ov += list(overrides)
    kw.setdefault("tv_alphas", DEMO_TV_ALPHAS)
    return run_loocv(experiment, str(hybrid), out=out, overrides=ov, quiet=quiet, **kw)
