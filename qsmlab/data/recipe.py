"""Dataset recipes: YAML -> validated, resolved recipe -> hash -> generated dataset (NIfTI + manifest).

A recipe names everything that determines a synthetic dataset (see data_manifests/README.md): global
acquisition settings (``b0_tesla``, ``te`` in s, ``snr``, ``pad_factor``, ``phase_offset_rad``), the
susceptibility ranges ``chi_ranges`` (ppm) and a list of subject groups (``kind: anatomical | shapes``,
``count``, ``voxel_size`` mm, ``shape``, ``orientations`` deg, phantom options). Defaults are filled in
(:func:`resolve_recipe`) and the *resolved* recipe plus :data:`GENERATOR_VERSION` is hashed, so the hash
identifies the data: same hash -> same files. Each subject draws from its own generator,
``SeedSequence(seed, spawn_key=(group, subject))``, so adding subjects never changes existing ones.

:func:`generate_dataset` writes, per subject (``<out>/<subject>/``): ``chi``, ``mask``, ``seg`` and per
orientation (``run-NN``): ``field`` (local, masked), ``total_field`` (masked), ``phase`` (4-D wrapped,
rad), ``magnitude`` (echo-combined) as float32 NIfTI (atomic writes), each with a JSON sidecar
(``EchoTime``, ``MagneticFieldStrength``, ``B0_dir``, ``VoxelSize``, ``RecipeHash``), then
``manifest.csv`` (DESIGN.md §3 columns) and a ``.complete`` marker. :func:`ensure_dataset` reuses a
complete dataset under ``<root>/<hash>/`` (root default ``$QSMLAB_CACHE/datasets``, ``cache/datasets``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qsmlab.errors import QSMInputError

GENERATOR_VERSION = "qsmlab-sim-2"
"""Bumped whenever generation code changes the output for the same recipe (invalidates caches).
sim-2: backgrounds are the exact field of the voxelised sources, harmonic in the brain at any tilt and
voxel size, with sources at the FOV continued (qsmlab.data.simulate.background_field)."""
MANIFEST_COLUMNS = ("subject", "session", "run", "source", "field", "total_field", "chi", "mask", "magnitude",
                    "phase", "seg", "te", "b0_tesla", "b0_dir", "voxel_size", "group")
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "data_manifests" / "default_recipe.yaml"

TOP_DEFAULTS: dict[str, Any] = {
    "name": "dataset", "seed": 0, "b0_tesla": 3.0, "te": [0.004, 0.008, 0.012, 0.016, 0.020], "snr": 100.0,
    "pad_factor": 2.0, "phase_offset_rad": 1.0, "compress": True, "chi_ranges": {}, "subjects": None,
}
COMMON_GROUP = {"kind": None, "count": 1, "name": None, "voxel_size": [2.0, 2.0, 2.0], "shape": None,
                "orientations": [[0.0, 0.0, 0.0]], "background": True}
GROUP_DEFAULTS: dict[str, dict[str, Any]] = {
    "anatomical": {**COMMON_GROUP, "margin_mm": 20.0, "deform_mm": 2.0, "rotate_deg": 5.0, "scale": 0.05,
                   "veins": [4, 10], "haemorrhage_probability": 0.25, "calcification_probability": 0.25,
                   "texture_ppm": 0.01},
    "shapes": {**COMMON_GROUP, "shape": [64, 64, 64], "n_shapes": [20, 40], "chi_range": [-0.2, 0.3],
               "size_range": [0.03, 0.15], "mask_fraction": 0.32},
}
SHORT = {"anatomical": "anat", "shapes": "shape", "realistic": "real"}
KINDS = ("anatomical", "shapes", "realistic")
"""``realistic``: qsmlab.data.realistic.recipe_group (its defaults live there; imported only when used)."""


def _group_defaults(kind: str) -> dict:
    if kind == "realistic":
        from qsmlab.data.realistic.recipe_group import REALISTIC_GROUP

        return REALISTIC_GROUP
    return GROUP_DEFAULTS[kind]


# -- validation ------------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, src: str):
        self.src = src

    def fail(self, key: str, msg: str):
        raise QSMInputError(f"recipe {self.src}: {key}: {msg}")

    def number(self, key, v, lo=None, hi=None, integer=False, lo_open=False) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
            self.fail(key, f"expected {'an integer' if integer else 'a number'}, got {v!r}")
        v = int(v) if integer else float(v)
        if not np.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
                (hi is not None and v > hi):
            rng = f"{'>' if lo_open else '>='} {lo}" if lo is not None else ""
            rng += (" and " if rng and hi is not None else "") + (f"<= {hi}" if hi is not None else "")
            self.fail(key, f"expected a number {rng}, got {v!r}")
        return v

    def numbers(self, key, v, n=None, **kw) -> list:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and n is not None:
            v = [v] * n  # a scalar voxel size means isotropic
        if not isinstance(v, (list, tuple)) or (n is not None and len(v) != n) or len(v) == 0:
            self.fail(key, f"expected a list of {n or 'one or more'} numbers, got {v!r}")
        return [self.number(f"{key}[{i}]", x, **kw) for i, x in enumerate(v)]

    def pair(self, key, v, **kw) -> list:
        p = self.numbers(key, v, n=2, **kw)
        if p[0] > p[1]:
            self.fail(key, f"expected [low, high] with low <= high, got {v!r}")
        return p

    def boolean(self, key, v) -> bool:
        if not isinstance(v, bool):
            self.fail(key, f"expected true or false, got {v!r}")
        return v

    def keys(self, key, d, allowed):
        if not isinstance(d, Mapping):
            self.fail(key, f"expected a mapping, got {type(d).__name__}")
        for k in d:
            if k not in allowed:
                self.fail(f"{key}.{k}" if key else str(k), f"unknown key (expected one of: {', '.join(allowed)})")


def resolve_recipe(recipe: Mapping, src: str = "<dict>") -> dict:
    """Validate ``recipe`` and fill defaults; raises a one-line :class:`QSMInputError` naming the key."""
    from qsmlab.data.phantoms.anatomical import DEFAULT_CHI_RANGES

    c = _Checker(src)
    c.keys("", recipe, TOP_DEFAULTS)
    r = {**TOP_DEFAULTS, **dict(recipe)}
    if not isinstance(r["name"], str) or not r["name"]:
        c.fail("name", f"expected a non-empty string, got {r['name']!r}")
    r["seed"] = c.number("seed", r["seed"], lo=0, integer=True)
    r["b0_tesla"] = c.number("b0_tesla", r["b0_tesla"], lo=0, hi=20, lo_open=True)
    te = c.numbers("te", r["te"] if isinstance(r["te"], list) else [r["te"]], lo=0, hi=1.0, lo_open=True)
    if any(b <= a for a, b in zip(te, te[1:])):
        c.fail("te", f"echo times (s) must be strictly increasing, got {te}")
    r["te"] = te
    if r["snr"] is not None:
        r["snr"] = c.number("snr", r["snr"], lo=0, lo_open=True)
    r["pad_factor"] = c.number("pad_factor", r["pad_factor"], lo=1, hi=4)
    r["phase_offset_rad"] = c.number("phase_offset_rad", r["phase_offset_rad"], lo=0, hi=10)
    r["compress"] = c.boolean("compress", r["compress"])
    c.keys("chi_ranges", r["chi_ranges"] or {}, DEFAULT_CHI_RANGES)
    r["chi_ranges"] = {**{k: list(v) for k, v in DEFAULT_CHI_RANGES.items()},
                       **{k: c.pair(f"chi_ranges.{k}", v, lo=-20, hi=20) for k, v in (r["chi_ranges"] or {}).items()}}
    groups = r["subjects"]
    if not isinstance(groups, list) or not groups:
        c.fail("subjects", "expected a non-empty list of subject groups (each with 'kind' and 'count')")
    r["subjects"] = [_resolve_group(c, f"subjects[{i}]", g) for i, g in enumerate(groups)]
    names = [g["name"] for g in r["subjects"]]
    for i, n in enumerate(names):
        if n in names[:i]:
            c.fail(f"subjects[{i}].name", f"duplicate group name {n!r}; give each group a distinct 'name'")
    return r


def _resolve_group(c: _Checker, key: str, g) -> dict:
    if not isinstance(g, Mapping):
        c.fail(key, f"expected a mapping with 'kind' and 'count', got {g!r}")
    kind = g.get("kind")
    if kind not in KINDS:
        c.fail(f"{key}.kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    defaults = _group_defaults(kind)
    c.keys(key, g, defaults)
    r = {**defaults, **dict(g)}
    r["count"] = c.number(f"{key}.count", r["count"], lo=1, hi=100000, integer=True)
    r["name"] = r["name"] or SHORT[kind]
    if not isinstance(r["name"], str) or not r["name"].isidentifier():
        c.fail(f"{key}.name", f"expected a short alphanumeric name, got {r['name']!r}")
    r["voxel_size"] = c.numbers(f"{key}.voxel_size", r["voxel_size"], n=3, lo=0.1, hi=10.0)
    if r["shape"] is not None:
        r["shape"] = c.numbers(f"{key}.shape", r["shape"], n=3, lo=8, hi=1024, integer=True)
    ori = r["orientations"]
    if not isinstance(ori, list) or not ori:
        c.fail(f"{key}.orientations", f"expected a list of [rx, ry, rz] head rotations (deg), got {ori!r}")
    r["orientations"] = [c.numbers(f"{key}.orientations[{i}]", o, n=3, lo=-180, hi=180) for i, o in enumerate(ori)]
    if kind == "realistic":
        from qsmlab.data.realistic.recipe_group import resolve_group

        return resolve_group(c, key, r)
    r["background"] = c.boolean(f"{key}.background", r["background"])
    if kind == "anatomical":
        for k, hi in (("margin_mm", 200), ("deform_mm", 20), ("rotate_deg", 45), ("scale", 0.5),
                      ("texture_ppm", 1.0), ("haemorrhage_probability", 1.0), ("calcification_probability", 1.0)):
            r[k] = c.number(f"{key}.{k}", r[k], lo=0, hi=hi)
        r["veins"] = [int(v) for v in c.pair(f"{key}.veins", r["veins"], lo=0, hi=200, integer=True)]
    else:
        if r["shape"] is None:
            c.fail(f"{key}.shape", "random-shape phantoms need a grid shape [X, Y, Z]")
        r["n_shapes"] = [int(v) for v in c.pair(f"{key}.n_shapes", r["n_shapes"], lo=0, hi=1000, integer=True)]
        r["chi_range"] = c.pair(f"{key}.chi_range", r["chi_range"], lo=-20, hi=20)
        r["size_range"] = c.pair(f"{key}.size_range", r["size_range"], lo=0.001, hi=1.0)
        r["mask_fraction"] = c.number(f"{key}.mask_fraction", r["mask_fraction"], lo=0.05, hi=0.5)
    return r


def load_recipe(recipe: str | Path | Mapping) -> tuple[dict, str]:
    """A recipe from a YAML path (or a dict), resolved; returns ``(resolved, source label)``."""
    if isinstance(recipe, Mapping):
        return resolve_recipe(recipe), "<dict>"
    p = Path(recipe)
    if not p.is_file():
        raise QSMInputError(f"recipe {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise QSMInputError(f"recipe {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise QSMInputError(f"recipe {p}: expected a mapping of recipe keys at the top level")
    return resolve_recipe(data, str(p)), str(p)


def recipe_hash(resolved: Mapping) -> str:
    """12 hex digits of sha256 over the canonical JSON of the resolved recipe and the generator version."""
    text = json.dumps({"recipe": resolved, "generator": GENERATOR_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# -- generation ------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    return " ".join(f"{float(x):.9g}" for x in np.ravel(v))


def subject_plan(resolved: Mapping) -> list[tuple[str, int, int, dict]]:
    """``(subject_id, group_index, subject_index, group)`` for every subject, in manifest order."""
    plan = []
    for gi, g in enumerate(resolved["subjects"]):
        for si in range(g["count"]):
            plan.append((f"{g['name']}{si + 1:03d}", gi, si, g))
    return plan


def make_phantom(resolved: Mapping, group: Mapping, rng: np.random.Generator):
    """The phantom of one subject of ``group`` (see :mod:`qsmlab.data.phantoms`)."""
    from qsmlab.data.phantoms import anatomical_phantom, random_shapes_phantom

    if group["kind"] == "anatomical":
        return anatomical_phantom(
            rng, voxel_size=group["voxel_size"], shape=group["shape"], chi_ranges=resolved["chi_ranges"],
            margin_mm=group["margin_mm"], deform_mm=group["deform_mm"], rotate_deg=group["rotate_deg"],
            scale=group["scale"], veins=group["veins"], haemorrhage_probability=group["haemorrhage_probability"],
            calcification_probability=group["calcification_probability"], texture_ppm=group["texture_ppm"],
            background=group["background"])
    return random_shapes_phantom(
        rng, shape=group["shape"], voxel_size=group["voxel_size"], n_shapes=group["n_shapes"],
        chi_range=group["chi_range"], size_range=group["size_range"], mask_fraction=group["mask_fraction"],
        background=group["background"])


def _write_subject(out: Path, sid: str, gi: int, si: int, group: Mapping, resolved: Mapping, h: str) -> list[dict]:
    from qsmlab.data.nifti import atomic_write_text, save_nifti
    from qsmlab.data.simulate import orientation_b0_dirs, simulate_scans

    rng = np.random.default_rng(np.random.SeedSequence(resolved["seed"], spawn_key=(gi, si)))
    ph = make_phantom(resolved, group, rng)
    b0_dirs = orientation_b0_dirs(group["orientations"])
    scans = simulate_scans(ph, rng, resolved["te"], resolved["b0_tesla"], resolved["snr"], b0_dirs,
                           resolved["pad_factor"], resolved["phase_offset_rad"])
    ext = ".nii.gz" if resolved["compress"] else ".nii"
    sdir = out / sid
    common = {"Source": "synthetic", "Kind": ph.kind, "RecipeHash": h, "RecipeName": resolved["name"],
              "EchoTime": list(resolved["te"]), "MagneticFieldStrength": resolved["b0_tesla"],
              "VoxelSize": list(ph.voxel_size), "Generator": GENERATOR_VERSION}

    def write(name: str, data, b0, units: str, extra: dict | None = None) -> str:
        rel = f"{sid}/{sid}_{name}{ext}"
        save_nifti(out / rel, data, affine=ph.affine)
        side = {**common, "B0_dir": [float(x) for x in b0], "Units": units, **(extra or {})}
        atomic_write_text(sdir / f"{sid}_{name}.json", json.dumps(side, indent=2) + "\n")
        return rel

    b_ref = scans[0].b0_dir
    chi = write("chi", ph.chi, b_ref, "ppm (relative to CSF)",
                {"ChiDrawn": ph.meta.get("chi_drawn_ppm"), "PhantomMeta": ph.meta})
    mask = write("mask", ph.mask, b_ref, "1")
    seg = write("seg", ph.labels, b_ref, "label", {"Labels": {str(k): v for k, v in ph.label_names.items()}})
    rows = []
    for ri, sc in enumerate(scans, start=1):
        tag = f"run-{ri:02d}"
        extra = {"HeadRotationDeg": group["orientations"][ri - 1], "NoiseSigma": sc.sigma}
        rows.append({
            "subject": sid, "session": "", "run": str(ri), "source": "synthetic",
            "field": write(f"{tag}_field", sc.fields.local * ph.mask, sc.b0_dir, "ppm", extra),
            "total_field": write(f"{tag}_total_field", sc.fields.total * ph.mask, sc.b0_dir, "ppm", extra),
            "chi": chi, "mask": mask,
            "magnitude": write(f"{tag}_magnitude", sc.magnitude, sc.b0_dir, "a.u.", extra),
            "phase": write(f"{tag}_phase", sc.phase, sc.b0_dir, "rad", extra),
            "seg": seg, "te": _fmt(resolved["te"]), "b0_tesla": f"{resolved['b0_tesla']:g}",
            "b0_dir": _fmt(sc.b0_dir), "voxel_size": _fmt(ph.voxel_size), "group": group["kind"],
        })
    return rows


def generate_dataset(recipe: str | Path | Mapping, out_dir: str | Path | None = None, force: bool = False,
                     quiet: bool = False, root: str | Path | None = None) -> Path:
    """Generate the dataset of ``recipe`` into ``out_dir`` (default ``<root>/<hash>``); returns manifest.csv.

    A folder with a ``.complete`` marker of the same recipe hash is reused unless ``force``.
    """
    from tqdm.auto import tqdm

    from qsmlab.data.nifti import atomic_write_text

    resolved, _ = load_recipe(recipe)
    h = recipe_hash(resolved)
    out = Path(out_dir) if out_dir is not None else default_root(root) / h
    marker, manifest = out / ".complete", out / "manifest.csv"
    if not force and marker.is_file() and manifest.is_file():
        if marker.read_text().strip() != h:
            raise QSMInputError(f"{out}: holds a dataset of another recipe (hash {marker.read_text().strip()}, "
                                f"this recipe {h}); choose another -o folder or pass --force")
        if not quiet:
            print(f"reusing complete dataset {out} (recipe hash {h}; --force regenerates)", file=sys.stderr)
        return manifest
    if marker.exists():
        marker.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
    rows: list[dict] = []
    plan = subject_plan(resolved)
    for sid, gi, si, g in tqdm(plan, desc=f"simulate {resolved['name']}", disable=quiet, unit="subject"):
        if g["kind"] == "realistic":
            from qsmlab.data.realistic.recipe_group import write_subject

            rows.extend(write_subject(out, sid, gi, si, g, resolved, h, GENERATOR_VERSION, _fmt))
        else:
            rows.extend(_write_subject(out, sid, gi, si, g, resolved, h))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(manifest, buf.getvalue())
    atomic_write_text(marker, h + "\n")
    return manifest


def default_root(root: str | Path | None = None) -> Path:
    """Dataset cache root: ``root``, else ``$QSMLAB_CACHE/datasets``, else ``cache/datasets``."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("QSMLAB_CACHE", "cache")) / "datasets"


def ensure_dataset(recipe: str | Path | Mapping | None = None, root: str | Path | None = None,
                   quiet: bool = True) -> Path:
    """Path to ``manifest.csv`` of ``recipe`` (default: the embedded default), generating it if not cached."""
    return generate_dataset(DEFAULT_RECIPE if recipe is None else recipe, root=root, quiet=quiet)
