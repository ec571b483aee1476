"""``qsmlab bids``: every MEGRE acquisition of a BIDS dataset through the classical pipeline, out as BIDS
derivatives plus an in-vivo manifest.

Per acquisition (prefix ``P = sub-<s>[_ses-<x>][_acq-..][_rec-..][_run-..]``, folder ``sub-<s>/[ses-<x>/]anat``
under OUT_DIR), float32 NIfTI with the first echo's affine, each with a JSON sidecar (``Units``,
``Sources``)::

    P_Chimap.nii.gz                 chi (ppm), inside the valid mask
    P_desc-total_fieldmap.nii.gz    unwrapped, echo-fitted total field (ppm)
    P_desc-local_fieldmap.nii.gz    local field after background removal (ppm), inside the valid mask
    P_desc-brain_mask.nii.gz        the brain mask used (given, or automatic)
    P_desc-valid_mask.nii.gz        where the local field and chi are defined (the manifest's mask)
    P_part-mag_desc-rss_MEGRE.nii.gz  RSS-combined magnitude (a.u.)

``P_Chimap.json`` is written last and carries the pipeline's provenance and the hash of the configuration:
an acquisition whose Chimap sidecar has the current hash is finished and skipped on a rerun.
``dataset_description.json`` (DatasetType derivative, GeneratedBy qsmlab with its version and the exact
configuration) and ``manifest.csv`` (one ``source=invivo`` row per finished acquisition, DESIGN.md §3;
``chi`` = a reference chi map found under ``--reference``) are rewritten at the end of every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qsmlab import __version__
from qsmlab.data.bids import Acquisition, build_name, find_acquisitions, parse_name
from qsmlab.data.bids_write import BIDS_VERSION
from qsmlab.data.nifti import (
    atomic_write_text,
    check_mask,
    check_ndim,
    check_same_grid,
    load_nifti,
    save_nifti,
)
from qsmlab.errors import QSMInputError

PIPELINE_NAME = "qsmlab"
OUTPUTS = {  # key -> (entities added to the prefix, suffix, units)
    "chi": ({}, "Chimap", "ppm"),
    "total_field": ({"desc": "total"}, "fieldmap", "ppm"),
    "local_field": ({"desc": "local"}, "fieldmap", "ppm"),
    "mask": ({"desc": "brain"}, "mask", "1"),
    "valid_mask": ({"desc": "valid"}, "mask", "1"),
    "magnitude": ({"part": "mag", "desc": "rss"}, "MEGRE", "arbitrary"),
}
MATCH_IGNORED = ("desc", "space", "res", "den", "label", "part", "echo")
"""Entities of a given mask/reference that do not have to match the acquisition's."""


@dataclass
class PrepareConfig:
    """Everything that decides the derivatives (recorded in GeneratedBy and hashed)."""

    mask: str = "auto"
    unwrap: str = "region"
    bfr: str = "vsharp"
    inversion: str = "tv"
    unwrap_params: dict = field(default_factory=dict)
    bfr_params: dict = field(default_factory=dict)
    inv_params: dict = field(default_factory=dict)
    mask_params: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


def output_paths(out: Path, acq: Acquisition) -> dict[str, Path]:
    """Derivative file of each output key for ``acq`` under ``out``."""
    folder = out / acq.folder
    return {k: folder / build_name({**acq.entities, **ents}, suffix) for k, (ents, suffix, _) in OUTPUTS.items()}


def sidecar(path: Path) -> Path:
    return path.with_name(path.name.replace(".nii.gz", ".json").replace(".nii", ".json"))


def is_done(out: Path, acq: Acquisition, cfg: PrepareConfig) -> bool:
    """All outputs present and the Chimap sidecar written by the same configuration."""
    paths = output_paths(out, acq)
    side = sidecar(paths["chi"])
    if not side.is_file() or not all(p.is_file() for p in paths.values()):
        return False
    try:
        return json.loads(side.read_text()).get("ConfigurationHash") == cfg.hash
    except json.JSONDecodeError:
        return False


def find_derivative(folder: Path, acq: Acquisition, suffix: str, desc: str | None, what: str) -> Path | None:
    """The file under ``folder`` (recursive) with ``suffix`` (and ``desc``) whose entities match ``acq``'s.

    Entities in :data:`MATCH_IGNORED` are not compared; the others must equal the acquisition's, so a
    ``sub-01_ses-1_desc-brain_mask`` serves every run of that session. The most specific match wins; two
    equally specific matches are an error naming both.
    """
    best: list[tuple[int, Path]] = []
    for ext in (".nii.gz", ".nii"):
        for p in folder.rglob(f"sub-{acq.subject}_*_{suffix}{ext}"):
            n = parse_name(p.name)
            if n is None or n.suffix != suffix or (desc is not None and n.get("desc") != desc):
                continue
            ents = {k: v for k, v in n.entities if k not in MATCH_IGNORED}
            if all(acq.entities.get(k) == v for k, v in ents.items()):
                best.append((len(ents), p))
    if not best:
        return None
    best.sort(key=lambda t: -t[0])
    if len(best) > 1 and best[0][0] == best[1][0]:
        raise QSMInputError(f"{what} {folder}: {best[0][1].name} and {best[1][1].name} both match {acq.key}")
    return best[0][1]


def load_acquisition(acq: Acquisition) -> tuple[np.ndarray, np.ndarray, object]:
    """Phase (rad) and magnitude (X, Y, Z, E) float64, and the first echo's phase :class:`Volume`.

    Every echo file must be 3-D on the first echo's grid; phase with ``Units: arbitrary`` is rescaled from
    the file's range to [-pi, pi); phase without ``Units`` must already span at most 2 pi (radians).
    """
    from qsmlab.recon.pipeline import check_phase_radians

    ref = None
    phases, mags = [], []
    for e, units in zip(acq.echoes, acq.phase_units):
        vols = []
        for p in (e.phase, e.mag):
            v = load_nifti(p)
            check_ndim(v, (3,), "echo image")
            if ref is None:
                ref = v
            check_same_grid(ref, v)
            vols.append(v)
        ph = vols[0].data
        if not np.all(np.isfinite(ph)) or not np.all(np.isfinite(vols[1].data)):
            raise QSMInputError(f"{e.phase}: NaN/Inf in the phase or its magnitude")
        if units == "arbitrary":
            lo, hi = float(ph.min()), float(ph.max())
            if hi <= lo:
                raise QSMInputError(f"{e.phase}: constant phase image (Units arbitrary cannot be rescaled)")
            ph = (ph - lo) / (hi - lo) * (2.0 * np.pi) - np.pi
        else:
            check_phase_radians(ph, str(e.phase) + (" (Units rad)" if units == "rad" else
                                                    " (no Units in its sidecar: expected rad)"))
        phases.append(ph)
        mags.append(vols[1].data)
    return np.stack(phases, -1), np.stack(mags, -1), ref


def prepare_one(root: Path, out: Path, acq: Acquisition, cfg: PrepareConfig, reference: Path | None = None,
                reference_desc: str | None = None) -> dict:
    """Run the pipeline on one acquisition and write its derivatives; returns its manifest row."""
    from qsmlab.physics.geometry import b0_dir_from_affine
    from qsmlab.recon.pipeline import run_pipeline

    phase, mag, ref = load_acquisition(acq)
    mask = None
    mask_file = None
    if cfg.mask != "auto":
        mask_file = find_derivative(Path(cfg.mask), acq, "mask", "brain", "--mask")
        if mask_file is None:
            raise QSMInputError(f"--mask {cfg.mask}: no sub-{acq.subject}…_desc-brain_mask.nii[.gz] matches {acq.key}")
        mv = load_nifti(mask_file)
        check_same_grid(ref, mv)
        mask = check_mask(mv)
    b0_dir = acq.b0_dir if acq.b0_dir is not None else tuple(b0_dir_from_affine(ref.affine))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the choices are in the provenance; one line per acquisition only
        res = run_pipeline(phase, mag, acq.te, acq.b0_tesla, mask=mask, voxel_size=tuple(ref.voxel_size),
                           b0_dir=b0_dir, unwrap=cfg.unwrap, unwrap_params=cfg.unwrap_params, bfr=cfg.bfr,
                           bfr_params=cfg.bfr_params, inversion=cfg.inversion, inv_params=cfg.inv_params,
                           mask_params=cfg.mask_params or None, quiet=True)
    paths = output_paths(out, acq)
    sources = [f"bids:raw:{p.relative_to(root)}" for e in acq.echoes for p in (e.mag, e.phase)]
    for key in ("magnitude", "total_field", "local_field", "mask", "valid_mask", "chi"):
        _, suffix, units = OUTPUTS[key]
        save_nifti(paths[key], res[key], like=ref)
        meta = {"Units": units, "Sources": sources}
        if key == "mask" and mask_file is not None:
            meta["Sources"] = [str(mask_file)]
        if key != "chi":
            atomic_write_text(sidecar(paths[key]), json.dumps(meta, indent=2) + "\n")
    chi_meta = {"Units": "ppm", "Sources": sources, "EchoTime": list(acq.te),
                "MagneticFieldStrength": acq.b0_tesla, "B0_dir": [float(x) for x in res["provenance"]["b0_dir"]],
                "VoxelSize": list(res["provenance"]["voxel_size_mm"]), "Configuration": cfg.as_dict(),
                "ConfigurationHash": cfg.hash, "QSMlabVersion": __version__, "Provenance": res["provenance"]}
    atomic_write_text(sidecar(paths["chi"]), json.dumps(chi_meta, indent=2) + "\n")  # last: marks it done
    return manifest_row(out, acq, reference, reference_desc)


def _fmt(v) -> str:
    return " ".join(f"{float(x):.9g}" for x in np.ravel(v))


def manifest_row(out: Path, acq: Acquisition, reference: Path | None = None, reference_desc: str | None = None) -> dict:
    """The manifest row of a finished acquisition (paths relative to ``out``, geometry from its sidecar)."""
    paths = output_paths(out, acq)
    meta = json.loads(sidecar(paths["chi"]).read_text())
    rel = {k: os.path.relpath(p, out) for k, p in paths.items()}
    chi = ""
    if reference is not None:
        ref = find_derivative(reference, acq, "Chimap", reference_desc, "--reference")
        chi = os.path.relpath(ref.resolve(), out.resolve()) if ref is not None else ""
    rest = "_".join(f"{k}-{v}" for k, v in acq.entities.items() if k not in ("sub", "ses"))
    return {"subject": f"sub-{acq.subject}", "session": acq.entities.get("ses", ""), "run": rest,
            "source": "invivo", "field": rel["local_field"], "total_field": rel["total_field"], "chi": chi,
            "mask": rel["valid_mask"], "magnitude": rel["magnitude"], "phase": "", "seg": "",
            "te": _fmt(meta["EchoTime"]), "b0_tesla": f"{meta['MagneticFieldStrength']:g}",
            "b0_dir": _fmt(meta["B0_dir"]), "voxel_size": _fmt(meta["VoxelSize"]), "group": "bids"}


def write_description(out: Path, root: Path, cfg: PrepareConfig) -> Path:
    doc = {"Name": "qsmlab QSM derivatives", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
           "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__,
                            "Description": "multi-echo GRE -> unwrapped total field -> local field -> chi "
                                           "(qsmlab.recon.pipeline); chi and fields in ppm",
                            "Configuration": cfg.as_dict(), "ConfigurationHash": cfg.hash}],
           "SourceDatasets": [{"URL": Path(root).resolve().as_uri()}]}
    return atomic_write_text(out / "dataset_description.json", json.dumps(doc, indent=2) + "\n")


def write_manifest(out: Path, rows: Sequence[dict]) -> Path:
    import csv
    import io

    from qsmlab.data.manifest import COLUMNS

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in COLUMNS})
    return atomic_write_text(out / "manifest.csv", buf.getvalue())


def _job(args):
    root, out, acq, cfg, reference, reference_desc = args
    try:
        return acq.key, prepare_one(root, out, acq, cfg, reference, reference_desc), None
    except QSMInputError as e:
        return acq.key, None, str(e)
    except Exception as e:  # one bad scan must not stop the others; the message is reported
        return acq.key, None, f"{type(e).__name__}: {e}"


def prepare_dataset(root: str | Path, out: str | Path, cfg: PrepareConfig | None = None, *,
                    participant_labels: Sequence[str] | None = None, workers: int = 1,
                    reference: str | Path | None = None, reference_desc: str | None = None,
                    report: Callable[[str], None] = print, quiet: bool = False) -> tuple[Path, list[str], list[str]]:
    """Prepare every acquisition of ``root`` into ``out``; see the module docstring.

    Returns ``(manifest path, keys done now, failure lines)``. Input errors of one acquisition (missing
    sidecar keys, a phase without magnitude, grids that differ, …) are reported through ``report`` in one
    line and the others go on; an empty dataset or an unknown participant label raises.
    """
    from tqdm.auto import tqdm

    root, out = Path(root), Path(out)
    cfg = cfg or PrepareConfig()
    if cfg.mask != "auto" and not Path(cfg.mask).is_dir():
        raise QSMInputError(f"--mask {cfg.mask}: expected 'auto' or a folder of BIDS derivatives with "
                            "*_desc-brain_mask.nii[.gz]")
    if reference is not None and not Path(reference).is_dir():
        raise QSMInputError(f"--reference {reference}: folder not found")
    if workers < 1:
        raise QSMInputError(f"--workers: expected a positive integer, got {workers}")
    failures: list[str] = []

    def bad(ents, err):
        line = f"{'_'.join(f'{k}-{v}' for k, v in ents.items())}: {err}"
        failures.append(line)
        report(line)

    acqs = find_acquisitions(root, participant_labels, on_error=bad)
    out.mkdir(parents=True, exist_ok=True)
    write_description(out, root, cfg)
    ref = Path(reference) if reference is not None else None
    todo = [a for a in acqs if not is_done(out, a, cfg)]
    done_now: list[str] = []
    jobs = [(root, out, a, cfg, ref, reference_desc) for a in todo]
    bar = tqdm(total=len(acqs), initial=len(acqs) - len(todo), desc="qsmlab bids", unit="acq",
               disable=quiet, dynamic_ncols=True)
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = [pool.submit(_job, j) for j in jobs]
            results = []
            for f in as_completed(futures):
                results.append(f.result())
                bar.update()
    else:
        results = []
        for j in jobs:
            results.append(_job(j))
            bar.update()
    bar.close()
    for key, _row, err in results:
        if err is not None:
            failures.append(f"{key}: {err}")
            report(failures[-1])
        else:
            done_now.append(key)
    rows = [manifest_row(out, a, ref, reference_desc) for a in acqs if is_done(out, a, cfg)]
    manifest = write_manifest(out, rows) if rows else out / "manifest.csv"
    return manifest, done_now, failures
