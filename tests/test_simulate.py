"""Simulation and datasets: fields from the one dipole operator, multi-echo phase that converts back to
the field, the COSMOS orientation equivalence, and the `qsmlab simulate` command (files, manifest,
affines, cache, recipe errors)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from qsmlab.cli import main
from qsmlab.data.phantoms import random_shapes_phantom
from qsmlab.data.recipe import MANIFEST_COLUMNS, ensure_dataset, recipe_hash, resolve_recipe
from qsmlab.data.simulate import (
    background_field,
    orientation_b0_dirs,
    simulate_fields,
    simulate_gre,
    simulate_scans,
    wrap_phase,
)
from qsmlab.errors import QSMInputError
from qsmlab.physics import DipoleOperator, voxel_size_from_affine
from qsmlab.physics.units import phase_scale, rad_to_ppm

TE = (0.004, 0.005, 0.006, 0.020)  # 1 ms spacing first: echo differences stay inside (-pi, pi]


@pytest.fixture(scope="module")
def shapes():
    return random_shapes_phantom(np.random.default_rng(3), shape=(32, 32, 32), voxel_size=(2.0, 2.0, 2.5),
                                 n_shapes=(10, 20))


def test_local_field_is_dipole_operator_of_chi(shapes):
    b0 = (0.2, -0.1, 1.0)
    f = simulate_fields(shapes.chi, shapes.mask, shapes.chi_bg, shapes.voxel_size, b0, pad_factor=2.0)
    op = DipoleOperator(voxel_size=shapes.voxel_size, b0_dir=np.array(b0) / np.linalg.norm(b0), pad_factor=2.0)
    ref = op.A(shapes.chi.astype(np.float64) * shapes.mask)
    np.testing.assert_allclose(f.local, ref, atol=2e-6 * np.abs(ref).max())
    np.testing.assert_allclose(f.total, f.local + f.background, atol=1e-6)
    # the background is the exact field of the voxelised sources (not A: see test_background_harmonic)
    np.testing.assert_array_equal(f.background, background_field(shapes.chi_bg, shapes.voxel_size, b0))
    # the background (air/bone outside the mask) dominates the field inside the brain, as in vivo
    assert np.abs(f.background[shapes.mask]).std() > 3 * np.abs(f.local[shapes.mask]).std()


def test_wrapped_multi_echo_phase_converts_back_to_total_field(shapes):
    b0_t = 3.0
    scans = simulate_scans(shapes, np.random.default_rng(0), TE, b0_t, snr=None, phase_offset_rad=1.0)
    sc = scans[0]
    m = shapes.mask
    total = sc.fields.total
    assert sc.phase.shape == shapes.shape + (len(TE),) and sc.phase.dtype == np.float32
    assert sc.phase.max() <= np.pi and sc.phase.min() > -np.pi
    # absolute phase at the last echo wraps (several turns), so a naive conversion would fail ...
    assert np.abs(phase_scale(TE[-1], b0_t) * total[m]).max() > 2 * np.pi
    # ... but consecutive-echo differences (1 ms) do not: dphi / (2 pi gamma B0 dTE) == field
    d = wrap_phase(sc.phase[..., 1] - sc.phase[..., 0])
    field = rad_to_ppm(d, TE[1] - TE[0], b0_t)
    np.testing.assert_allclose(field[m], total[m], atol=2e-4)
    # np.unwrap along the three closely spaced echoes: a linear phase with slope 2 pi gamma B0 field
    un = np.unwrap(sc.phase[..., :3], axis=-1)
    slope = (un[..., 2] - un[..., 0]) / (TE[2] - TE[0])
    np.testing.assert_allclose(rad_to_ppm(slope, 1.0, b0_t)[m], total[m], atol=2e-4)


def test_gre_magnitude_decay_and_noise_level(shapes):
    te, b0 = (0.005, 0.015, 0.025), 7.0
    field = np.zeros(shapes.shape, np.float32)
    sig, sigma = simulate_gre(field, shapes.m0, shapes.r2star, te, b0, np.random.default_rng(0), snr=None)
    assert sigma == 0
    m = shapes.mask
    expect = shapes.m0[..., None] * np.exp(-np.array(te) * shapes.r2star[..., None] * b0 / 3.0)
    np.testing.assert_allclose(np.abs(sig)[m], expect[m], rtol=1e-5)
    noisy, sigma = simulate_gre(field, shapes.m0, shapes.r2star, te, b0, np.random.default_rng(0), snr=50.0,
                                mask=m)
    assert sigma == pytest.approx(np.abs(sig[..., 0])[m].mean() / 50.0)
    resid = (noisy - sig)[m]
    assert resid.real.std() == pytest.approx(sigma, rel=0.05) and resid.imag.std() == pytest.approx(sigma, rel=0.05)


def test_orientation_equivalence_rotating_object_vs_b0_dir():
    """Scanning chi rotated by R (B0 along z) == the field for b0 = R^T z on chi's grid, rotated by R."""
    p = random_shapes_phantom(np.random.default_rng(1), shape=(24, 24, 24), voxel_size=(2.0, 2.0, 2.0),
                              n_shapes=(8, 12), background=False)
    # np.rot90(.., axes=(1, 2)) is the rotation R = +90 deg about x (y -> z)
    chi_rot = np.rot90(p.chi, 1, axes=(1, 2))
    (b_obj,) = orientation_b0_dirs([[90.0, 0.0, 0.0]])
    np.testing.assert_allclose(b_obj, (0.0, 1.0, 0.0), atol=1e-12)
    f_scan = simulate_fields(chi_rot, np.ones_like(p.mask), None, p.voxel_size, (0, 0, 1)).local
    f_obj = simulate_fields(p.chi, np.ones_like(p.mask), None, p.voxel_size, b_obj).local
    np.testing.assert_allclose(f_scan, np.rot90(f_obj, 1, axes=(1, 2)), atol=1e-6)
    # and the orientation matters: B0 along z on the unrotated object is a different field
    f_z = simulate_fields(p.chi, np.ones_like(p.mask), None, p.voxel_size, (0, 0, 1)).local
    assert np.abs(f_z - f_obj).max() > 0.1 * np.abs(f_z).max()


# -- recipe and the CLI --------------------------------------------------------------------------------

SMALL = {
    "name": "tiny", "seed": 7, "te": [0.004, 0.008, 0.012], "snr": 80,
    "subjects": [
        {"kind": "anatomical", "count": 1, "voxel_size": [4.0, 4.0, 4.0], "veins": [1, 2]},
        {"kind": "shapes", "count": 1, "shape": [24, 24, 20], "voxel_size": [3.0, 3.0, 3.5],
         "orientations": [[0, 0, 0], [20, 0, 0]]},
    ],
}


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_hash_identifies_resolved_recipe():
    r = resolve_recipe(SMALL)
    explicit = {**SMALL, "b0_tesla": 3.0, "pad_factor": 2.0}  # defaults spelled out: same data, same hash
    assert recipe_hash(resolve_recipe(explicit)) == recipe_hash(r)
    assert recipe_hash(resolve_recipe({**SMALL, "seed": 8})) != recipe_hash(r)
    assert r["subjects"][0]["voxel_size"] == [4.0, 4.0, 4.0] and r["chi_ranges"]["globus_pallidus"] == [0.10, 0.25]


def test_generator_version_is_part_of_the_hash(monkeypatch):
    """A new data engine (qsmlab-sim-2: exact voxel-box backgrounds) must not reuse cached datasets."""
    import qsmlab.data.recipe as recipe_mod

    r = resolve_recipe(SMALL)
    h = recipe_hash(r)
    assert recipe_mod.GENERATOR_VERSION != "qsmlab-sim-1"
    monkeypatch.setattr(recipe_mod, "GENERATOR_VERSION", "qsmlab-sim-1")
    assert recipe_hash(r) != h


@pytest.mark.parametrize("change, key", [
    ({"subjects": [{"kind": "anatomical", "voxelsize": 2}]}, "subjects[0].voxelsize"),
    ({"te": [0.01, 0.005]}, "te"),
    ({"chi_ranges": {"putamen": [0.2, 0.1]}}, "chi_ranges.putamen"),
    ({"chi_ranges": {"pallidum": [0.1, 0.2]}}, "chi_ranges.pallidum"),
    ({"subjects": [{"kind": "blobs"}]}, "subjects[0].kind"),
    ({"b0": 3}, "b0"),
])
def test_bad_recipe_is_one_line_error_naming_the_key(tmp_path, capsys, change, key):
    rec = _write(tmp_path / "bad.yaml", {**SMALL, **change})
    with pytest.raises(QSMInputError, match=key.replace("[", r"\[").replace("]", r"\]")):
        resolve_recipe(yaml.safe_load(rec.read_text()), str(rec))
    rc = main(["simulate", str(rec), "-o", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and key in err and "bad.yaml" in err, err
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_simulate_cli_writes_dataset_manifest_and_is_cached(tmp_path, capsys, monkeypatch):
    rec = _write(tmp_path / "tiny.yaml", SMALL)
    out = tmp_path / "ds"
    assert main(["simulate", str(rec), "-o", str(out), "--quiet"]) == 0
    manifest = out / "manifest.csv"
    assert capsys.readouterr().out.strip() == str(manifest)
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        rows = list(reader)
    assert [(r["subject"], r["run"]) for r in rows] == [("anat001", "1"), ("shape001", "1"), ("shape001", "2")]
    for r in rows:
        assert r["source"] == "synthetic" and r["te"] == "0.004 0.008 0.012" and r["b0_tesla"] == "3"
        vs = np.array(r["voxel_size"].split(), float)
        b0 = np.array(r["b0_dir"].split(), float)
        imgs = {c: nib.load(out / r[c]) for c in ("field", "total_field", "chi", "mask", "magnitude", "phase", "seg")}
        ref = imgs["chi"].affine
        for c, img in imgs.items():
            assert img.get_data_dtype() == np.float32, c
            np.testing.assert_allclose(img.affine, ref, err_msg=c)
            assert img.shape[:3] == imgs["chi"].shape, c
        np.testing.assert_allclose(voxel_size_from_affine(ref), vs)
        assert imgs["phase"].shape[3] == 3
        side = json.loads((out / r["field"].replace(".nii.gz", ".json")).read_text())
        np.testing.assert_allclose(side["B0_dir"], b0, atol=1e-8)
        assert side["EchoTime"] == [0.004, 0.008, 0.012] and side["MagneticFieldStrength"] == 3.0
        mask = np.asarray(imgs["mask"].dataobj) > 0
        assert np.all(np.asarray(imgs["field"].dataobj)[~mask] == 0)
    # the second orientation is tilted by 20 deg about x, on the same grid
    assert np.degrees(np.arccos(np.array(rows[2]["b0_dir"].split(), float)[2])) == pytest.approx(20.0)
    # E's manifest validator accepts it (when present)
    try:
        from qsmlab.data.manifest import load_manifest
    except ImportError:
        load_manifest = None
    if load_manifest is not None:
        assert len(load_manifest(manifest).rows) == 3

    # cached: a second run reuses the folder and generates nothing
    import qsmlab.data.recipe as recipe_mod

    def boom(*a, **k):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(recipe_mod, "_write_subject", boom)
    mtime = manifest.stat().st_mtime_ns
    assert main(["simulate", str(rec), "-o", str(out), "--quiet"]) == 0
    assert manifest.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="regenerated"):  # --force does regenerate
        main(["simulate", str(rec), "-o", str(out), "--quiet", "--force"])


def test_ensure_dataset_caches_under_recipe_hash(tmp_path, monkeypatch):
    small = {**SMALL, "subjects": [SMALL["subjects"][1] | {"orientations": [[0, 0, 0]], "shape": [16, 16, 16]}]}
    m1 = ensure_dataset(small, root=tmp_path)
    assert m1 == tmp_path / recipe_hash(resolve_recipe(small)) / "manifest.csv" and m1.is_file()
    assert (m1.parent / ".complete").read_text().strip() == recipe_hash(resolve_recipe(small))
    import qsmlab.data.recipe as recipe_mod

    monkeypatch.setattr(recipe_mod, "_write_subject", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert ensure_dataset(small, root=tmp_path) == m1


def test_default_recipe_is_valid_and_small():
    from qsmlab.data.recipe import DEFAULT_RECIPE, load_recipe, subject_plan

    r, _ = load_recipe(DEFAULT_RECIPE)
    kinds = [g["kind"] for _, _, _, g in subject_plan(r)]
    assert kinds.count("anatomical") == 4 and kinds.count("shapes") == 2
    assert all(min(g["voxel_size"]) >= 2.0 for g in r["subjects"])  # small enough for two CPU cores
