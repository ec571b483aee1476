"""``kind: realistic`` recipe groups: realistic in-vivo-like subjects written as a dataset (qsmlab simulate).

A group (see data_manifests/invivo_realistic_recipe.yaml) takes the recipe's ``te``, ``snr`` and
``b0_tesla`` and its own keys (:data:`REALISTIC_GROUP`): ``voxel_size``, ``shape`` (a crop around the
brain's centre; None = the whole head), ``orientations`` (head rotations [rx, ry, rz] deg, one run each;
the same head and noise seed per run), ``components`` (mapping name -> bool, :data:`COMPONENTS`), ``cosmos``
and ``label`` (``chi`` | ``cosmos``), and the component settings of :class:`RealismParams`. The recipe's
``chi_ranges`` do not apply: the anatomy is the clean in-vivo-like subject's (INVIVO_CHI_RANGES).

Files per subject ``<sid>/``: ``chi`` (the scalar truth, the tensor mean), ``mask`` (brain), ``seg``, and
per run ``run-NN_``: ``field`` (the local field a method receives: echo fit + V-SHARP, zero outside the
valid mask), ``mask`` (that valid, eroded mask: the manifest's ``mask`` column), ``total_field`` (echo fit),
``phase`` (4-D, wrapped), ``magnitude`` (echo-combined RMS). With ``cosmos: true`` the subject's COSMOS
map, fitted over ``cosmos_rotations_deg`` on top of the first run's orientation, is written as ``cosmos``;
the ``chi`` sidecar names it (``Cosmos``) and, with ``label: cosmos``, the manifest's ``chi`` column points
to it instead of the scalar truth (real supervised training uses COSMOS labels), the truth staying
in ``chi`` (sidecar ``ScalarTruth``).

Each subject's seed is ``SeedSequence(recipe seed, spawn_key=(group, subject)).generate_state(1)[0]``.
:data:`ENGINE` is stored in the resolved group, so the recipe hash changes whenever this engine's output
does, without touching the hash of other recipes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from qsmlab.data.realistic.subject import COMPONENTS, RealismParams

ENGINE = "realistic-1"
_P = RealismParams()
REALISTIC_GROUP: dict = {
    "kind": None, "count": 1, "name": None, "voxel_size": [1.0, 1.0, 1.0], "shape": [128, 128, 128],
    "orientations": [[0.0, 0.0, 0.0]], "components": {c: True for c in COMPONENTS}, "cosmos": False,
    "label": "chi", "delta_chi_ppm": list(_P.delta_chi_ppm), "vein_chi_ppm": list(_P.vein_chi_ppm),
    "microstructure_ppm": _P.microstructure_ppm, "factor": _P.factor, "margin": _P.margin,
    "cosmos_rotations_deg": [list(r) for r in _P.cosmos_rotations_deg],
}


def resolve_group(c, key: str, r: dict) -> dict:
    """Validate a ``kind: realistic`` group (``c`` the recipe's checker, ``r`` defaults merged in)."""
    comp = r["components"]
    c.keys(f"{key}.components", comp, COMPONENTS)
    r["components"] = {k: c.boolean(f"{key}.components.{k}", comp.get(k, True)) for k in COMPONENTS}
    r["cosmos"] = c.boolean(f"{key}.cosmos", r["cosmos"])
    if r["label"] not in ("chi", "cosmos"):
        c.fail(f"{key}.label", f"expected 'chi' or 'cosmos', got {r['label']!r}")
    if r["label"] == "cosmos" and not r["cosmos"]:
        c.fail(f"{key}.label", "label: cosmos needs cosmos: true")
    r["delta_chi_ppm"] = c.pair(f"{key}.delta_chi_ppm", r["delta_chi_ppm"], lo=0, hi=0.2)
    r["vein_chi_ppm"] = c.pair(f"{key}.vein_chi_ppm", r["vein_chi_ppm"], lo=0, hi=2.0)
    r["microstructure_ppm"] = c.number(f"{key}.microstructure_ppm", r["microstructure_ppm"], lo=-0.1, hi=0.1)
    r["factor"] = c.number(f"{key}.factor", r["factor"], lo=2, hi=4, integer=True)
    r["margin"] = c.number(f"{key}.margin", r["margin"], lo=0, hi=64, integer=True)
    rots = r["cosmos_rotations_deg"]
    if not isinstance(rots, list) or len(rots) < 3:
        c.fail(f"{key}.cosmos_rotations_deg", f"expected a list of >= 3 head rotations [rx, ry, rz] (deg), got {rots!r}")
    r["cosmos_rotations_deg"] = [c.numbers(f"{key}.cosmos_rotations_deg[{i}]", o, n=3, lo=-90, hi=90)
                                 for i, o in enumerate(rots)]
    r["engine"] = ENGINE
    return r


def subject_seed(recipe_seed: int, gi: int, si: int) -> int:
    return int(np.random.SeedSequence(int(recipe_seed), spawn_key=(gi, si)).generate_state(1)[0])


def write_subject(out: Path, sid: str, gi: int, si: int, group: Mapping, resolved: Mapping, h: str,
                  generator: str, fmt) -> list[dict]:
    """Simulate one subject of a realistic group and write its files (module docstring); manifest rows."""
    from qsmlab.data.nifti import atomic_write_text, save_nifti
    from qsmlab.data.realistic.subject import realistic_subject

    params = RealismParams(delta_chi_ppm=tuple(group["delta_chi_ppm"]), vein_chi_ppm=tuple(group["vein_chi_ppm"]),
                           microstructure_ppm=float(group["microstructure_ppm"]), factor=int(group["factor"]),
                           margin=int(group["margin"]),
                           cosmos_rotations_deg=tuple(tuple(o) for o in group["cosmos_rotations_deg"]))
    seed = subject_seed(resolved["seed"], gi, si)
    ext = ".nii.gz" if resolved["compress"] else ".nii"
    sdir = out / sid
    common = {"Source": "synthetic", "Kind": "realistic", "RecipeHash": h, "RecipeName": resolved["name"],
              "EchoTime": list(resolved["te"]), "MagneticFieldStrength": resolved["b0_tesla"],
              "VoxelSize": list(group["voxel_size"]), "Generator": generator, "Engine": ENGINE,
              "Components": dict(group["components"]), "SubjectSeed": seed}
    rows: list[dict] = []
    written: dict[str, str] = {}
    for ri, rot in enumerate(group["orientations"], start=1):
        s = realistic_subject(seed, voxel_size=group["voxel_size"], shape=group["shape"],
                              components=group["components"], snr=resolved["snr"], te=resolved["te"],
                              b0_tesla=resolved["b0_tesla"], cosmos=bool(group["cosmos"]) and ri == 1,
                              params=params, head_rotation_deg=rot)

        def write(name: str, data, units: str, extra: dict | None = None, s=s) -> str:
            rel = f"{sid}/{sid}_{name}{ext}"
            save_nifti(out / rel, data, affine=s.affine)
            side = {**common, "B0_dir": [float(x) for x in s.b0_dir], "Units": units, **(extra or {})}
            atomic_write_text(sdir / f"{sid}_{name}.json", json.dumps(side, indent=2) + "\n")
            return rel

        if ri == 1:
            extra = {"DeltaChiPpm": s.delta_chi_ppm, "Veins": s.meta["veins_per_family"],
                     "ScalarTruth": "trace/3 of the susceptibility tensor, veins partial-volumed"}
            if s.cosmos is not None:
                written["cosmos"] = write("cosmos", s.cosmos, "ppm (COSMOS fit)",
                                          {"CosmosB0Dirs": [list(map(float, b)) for b in s.cosmos_b0_dirs]})
                extra["Cosmos"] = written["cosmos"]
            written["chi"] = write("chi", s.chi, "ppm (relative to CSF)", extra)
            written["mask"] = write("mask", s.mask, "1")
            written["seg"] = write("seg", s.labels, "label")
        tag = f"run-{ri:02d}"
        extra = {"HeadRotationDeg": list(map(float, rot)), "NoiseSigma": s.noise_sigma,
                 "NoiseStdPpm": s.noise_std_ppm, "TimingsS": s.meta["timings_s"]}
        mag = np.sqrt(np.mean(s.magnitude.astype(np.float64) ** 2, axis=-1)).astype(np.float32)
        rows.append({
            "subject": sid, "session": "", "run": str(ri), "source": "synthetic",
            "field": write(f"{tag}_field", s.local_field, "ppm", extra),
            "total_field": write(f"{tag}_total_field", s.total_field * s.mask, "ppm", extra),
            "chi": written["cosmos"] if group["label"] == "cosmos" else written["chi"],
            "mask": write(f"{tag}_mask", s.valid_mask, "1", extra),
            "magnitude": write(f"{tag}_magnitude", mag, "a.u.", extra),
            "phase": write(f"{tag}_phase", s.phase, "rad", extra),
            "seg": written["seg"], "te": fmt(resolved["te"]), "b0_tesla": f"{resolved['b0_tesla']:g}",
            "b0_dir": fmt(s.b0_dir), "voxel_size": fmt(s.voxel_size), "group": "realistic",
        })
    return rows
