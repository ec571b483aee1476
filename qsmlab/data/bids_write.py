"""Synthetic scans written as a BIDS raw dataset (``qsmlab simulate --bids``), ground truth as derivatives.

Layout (BIDS 1.9, anat MEGRE)::

    DIR/dataset_description.json                                   DatasetType raw
    DIR/sub-<s>/[ses-<x>/]anat/sub-<s>[_ses-<x>][_acq-..][_run-..]_echo-<n>_part-{mag,phase}_MEGRE.nii.gz
        + .json sidecars: EchoTime (s), MagneticFieldStrength (T), Units (phase: rad | arbitrary)
    DIR/derivatives/qsmlab-truth/dataset_description.json          DatasetType derivative
    DIR/derivatives/qsmlab-truth/sub-<s>/[ses-<x>/]anat/<prefix>_desc-truth_Chimap.nii.gz    chi, ppm
                                                       <prefix>_desc-brain_mask.nii.gz       brain mask
                                                       <prefix>_desc-local_fieldmap.nii.gz   ppm
                                                       <prefix>_desc-total_fieldmap.nii.gz   ppm

Geometry: an oblique head (``tilt_deg``) is written the way a scanner writes an oblique slab: voxels in the
head's frame and the affine rotated by the tilt about i, so that B0 (world z) in voxel axes is
``(0, sin t, cos t)`` — :func:`qsmlab.physics.geometry.b0_dir_from_affine` recovers it from the header; no
``B0_dir`` key is written. Phase is stored in radians, or with ``Units: arbitrary`` as vendor integers
-4096..4095 (``round(phase / pi * 4096)``, clipped).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qsmlab import __version__
from qsmlab.data.bids import build_name
from qsmlab.data.nifti import atomic_write_text, save_nifti
from qsmlab.errors import QSMInputError
from qsmlab.physics.geometry import rotation_matrix

BIDS_VERSION = "1.9.0"
TRUTH_PIPELINE = "qsmlab-truth"


@dataclass
class ScanSpec:
    """One simulated acquisition: BIDS entities (``sub`` required) and the in-vivo-like subject's settings."""

    entities: dict[str, str]
    seed: int = 0
    tilt_deg: float = 0.0
    extra: dict = field(default_factory=dict)


def parse_scan_spec(text: str, index: int = 0) -> ScanSpec:
    """``sub=01,ses=1,run=1,tilt=15,seed=3`` -> :class:`ScanSpec` (seed defaults to ``index``)."""
    ents: dict[str, str] = {}
    seed, tilt = index, 0.0
    for item in (p.strip() for p in text.split(",") if p.strip()):
        if "=" not in item:
            raise QSMInputError(f"--scan {text!r}: expected key=value pairs, e.g. sub=01,ses=1,run=1,tilt=15")
        k, v = (s.strip() for s in item.split("=", 1))
        try:
            if k == "seed":
                seed = int(v)
            elif k == "tilt":
                tilt = float(v)
            elif k in ("sub", "ses", "acq", "rec", "run"):
                ents[k] = v
            else:
                raise ValueError
        except ValueError:
            raise QSMInputError(f"--scan {text!r}: bad {k}={v!r}; keys: sub, ses, acq, rec, run, tilt, seed") from None
    if "sub" not in ents:
        raise QSMInputError(f"--scan {text!r}: sub=LABEL is required")
    build_name(ents, "MEGRE")  # labels alphanumeric
    return ScanSpec(entities=ents, seed=seed, tilt_deg=tilt)


def oblique_affine(affine: np.ndarray, tilt_deg: float) -> np.ndarray:
    """``affine`` rotated about world x by ``tilt_deg`` (a head pitched in a fixed magnet, seen as oblique)."""
    r = np.eye(4)
    r[:3, :3] = rotation_matrix((1.0, 0.0, 0.0), tilt_deg)
    return r @ np.asarray(affine, dtype=np.float64)


def _folder(root: Path, ents: Mapping[str, str]) -> Path:
    p = root / f"sub-{ents['sub']}"
    if "ses" in ents:
        p = p / f"ses-{ents['ses']}"
    return p / "anat"


def _json(path: Path, meta: Mapping) -> None:
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")


def write_description(root: Path, name: str, derivative: bool, extra: Mapping | None = None) -> Path:
    """``dataset_description.json`` (raw or derivative) with GeneratedBy qsmlab."""
    doc = {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative" if derivative else "raw",
           "GeneratedBy": [{"Name": "qsmlab", "Version": __version__,
                            "Description": "synthetic in-vivo-like multi-echo GRE (qsmlab.data.invivo_like)"}],
           **(extra or {})}
    return atomic_write_text(root / "dataset_description.json", json.dumps(doc, indent=2) + "\n")


def write_megre(root: str | Path, entities: Mapping[str, str], magnitude: np.ndarray, phase: np.ndarray,
                te: Sequence[float], b0_tesla: float, affine: np.ndarray, phase_units: str = "rad",
                extra_meta: Mapping | None = None) -> list[Path]:
    """Write one MEGRE acquisition (per echo: part-mag and part-phase NIfTI + JSON). Returns the files.

    ``magnitude``/``phase``: (X, Y, Z, E), phase wrapped in rad; ``te`` in s; ``b0_tesla`` in T.
    """
    root = Path(root)
    if phase_units not in ("rad", "arbitrary"):
        raise QSMInputError(f"phase_units {phase_units!r}: expected rad or arbitrary")
    folder = _folder(root, entities)
    files = []
    for e, t in enumerate(te):
        for part, data in (("mag", magnitude[..., e]), ("phase", phase[..., e])):
            ents = {**entities, "echo": str(e + 1), "part": part}
            path = folder / build_name(ents, "MEGRE")
            meta = {"EchoTime": float(t), "MagneticFieldStrength": float(b0_tesla), "EchoNumber": e + 1,
                    **(extra_meta or {})}
            if part == "phase":
                meta["Units"] = phase_units
                if phase_units == "arbitrary":
                    data = np.clip(np.round(np.asarray(data) / np.pi * 4096.0), -4096, 4095)
            save_nifti(path, data, affine=affine, dtype=np.int16 if part == "phase" and phase_units == "arbitrary"
                       else np.float32)
            _json(folder / build_name(ents, "MEGRE", ".json"), meta)
            files.append(path)
    return files


def write_invivo_like_bids(root: str | Path, scans: Sequence[ScanSpec], voxel_size: Sequence[float] = (2.0, 2.0, 2.0),
                           shape: Sequence[int] | None = None, phase_units: str = "rad", quiet: bool = True) -> Path:
    """Simulate each :class:`ScanSpec` with :func:`qsmlab.data.invivo_like.invivo_like_subject` and write
    a BIDS raw dataset with the ground truth as derivatives (see module docstring). Returns ``root``."""
    from tqdm.auto import tqdm

    from qsmlab.data.invivo_like import invivo_like_subject

    root = Path(root)
    keys = [tuple(sorted(s.entities.items())) for s in scans]
    if len(set(keys)) != len(keys):
        raise QSMInputError("--scan: two scans with the same entities")
    if not scans:
        raise QSMInputError("simulate --bids: no scan to write")
    truth = root / "derivatives" / TRUTH_PIPELINE
    write_description(root, "qsmlab synthetic in-vivo-like dataset", derivative=False)
    write_description(truth, "qsmlab ground truth", derivative=True)
    for spec in tqdm(scans, desc="simulate --bids", disable=quiet, dynamic_ncols=True):
        s = invivo_like_subject(spec.seed, voxel_size=voxel_size, tilt_deg=spec.tilt_deg, shape=shape)
        aff = oblique_affine(s.affine, spec.tilt_deg)
        write_megre(root, spec.entities, s.magnitude, s.phase, s.te, s.b0_tesla, aff, phase_units)
        folder = _folder(truth, spec.entities)
        sources = [f"bids:raw:{p.relative_to(root)}" for p in sorted(_folder(root, spec.entities).glob(
            build_name({**spec.entities, "echo": "1", "part": "phase"}, "MEGRE")))]
        common = {"Sources": sources, "Seed": spec.seed, "TiltDeg": spec.tilt_deg,
                  "B0_dir": [float(x) for x in s.b0_dir], "NoiseStdPpm": s.noise_std_ppm}
        for desc, suffix, data, units in (("truth", "Chimap", s.chi * s.mask, "ppm"),
                                          ("brain", "mask", s.mask, "1"),
                                          ("local", "fieldmap", s.local_field, "ppm"),
                                          ("total", "fieldmap", s.total_field, "ppm")):
            ents = {**spec.entities, "desc": desc}
            save_nifti(folder / build_name(ents, suffix), data, affine=aff)
            _json(folder / build_name(ents, suffix, ".json"), {**common, "Units": units})
    return root
