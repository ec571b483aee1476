"""Every experiment under experiments/ runs through the training entry point as a user types it:
``qsmlab fit experiments/<m>.yaml --trainer.fast_dev_run=true`` (one training and one validation batch,
then the end-of-fit prediction of the first validation volume written as NIfTI on its grid).

Parametrised over the folder, so a new experiment is covered without editing this file. Sizes come down
through command-line keys only: the data (a tiny generated dataset: two anatomical phantoms and one
shape phantom at 5 mm, shared with the method tests' cache), 16^3 patches, and per model class the
network's widths (a class not listed below runs with its quick profile's sizes).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _methods import run_cli

from qsmlab.data.datamodule import QSMDataModule
from qsmlab.data.recipe import ensure_dataset
from qsmlab.lab.config import (
    EXPERIMENTS_DIR,
    _read,
    flatten,
    get_dotted,
    load_experiment,
    load_layers,
    profiles_of,
)
from qsmlab.methods.registry import _import

# the recipe of tests/test_methods_pedqnet.py and test_methods_nextqsm.py (same hash: one cached copy);
# anatomical phantoms carry the segmentation PedQ-NET trains on
TINY_RECIPE = {
    "name": "methods-tiny", "seed": 11, "te": [0.004, 0.008], "snr": 100,
    "subjects": [
        {"kind": "anatomical", "count": 2, "voxel_size": [5.0, 5.0, 5.0], "veins": [1, 2]},
        {"kind": "shapes", "count": 1, "shape": [24, 24, 24], "voxel_size": [5.0, 5.0, 5.0]},
    ],
}
TRAIN, VAL = "anat001", "anat002"

#: network sizes per model class (command-line keys), so each case takes a few seconds
TINY_MODEL = {
    "UQSM": {"depth": 2, "width": 4},
    "UQSMDIP": {"depth": 2, "width": 4},
    "QSMnet": {"depth": 2, "width": 4},
    "QSMnetPlus": {"depth": 2, "width": 4},
    "NeXtQSM": {"bg_width": 4, "bg_depth": 2, "steps": 1, "reg_width": 4, "reg_depth": 1},
    "PedQNet": {"filters": "[4, 8, 16]", "seg_img_size": 16, "seg_feature_size": 4, "seg_hidden_size": 32,
                "seg_mlp_dim": 32, "seg_num_heads": 2},
    "BrainMaskNet": {"img_size": 16, "feature_size": 4, "hidden_size": 32, "mlp_dim": 32, "num_heads": 2},
}
EXPERIMENTS = sorted(EXPERIMENTS_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def manifest() -> Path:
    return ensure_dataset(TINY_RECIPE).resolve()


def test_every_experiment_is_collected():
    assert len(EXPERIMENTS) >= 10 and all(p.suffix == ".yaml" for p in EXPERIMENTS)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_fast_dev_run(path: Path, manifest: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cls = str(get_dotted(load_experiment(path), "model.class_path")).rsplit(".", 1)[-1]
    argv = ["fit", str(path), "--trainer.fast_dev_run=true", "--loggers", "none",
            "--data.manifest", str(manifest), f"--data.train_subjects=[{TRAIN}]", f"--data.val_subjects=[{VAL}]",
            "--data.patch_size", "16", "--data.samples_per_volume", "1", "--data.queue_length", "2",
            "--data.batch_size", "1"]
    for key, value in TINY_MODEL.get(cls, {}).items():
        argv += [f"--model.{key}", str(value)]
    rc, out, err = run_cli(argv)
    assert rc == 0, err[-2000:]
    run = tmp_path / "runs" / path.stem / "quick" / "version_0"
    assert json.loads((run / "run_info.json").read_text())["status"] == "finished"
    # the end-of-fit prediction: the validation volume's primary map, on the volume's grid
    preds = sorted((run / "predictions").glob(f"{VAL}*.nii.gz"))
    assert preds, sorted(p.name for p in run.rglob("*"))
    ref = nib.load(next(r for r in manifest.parent.rglob(f"{VAL}*mask*.nii*")))
    for p in preds:
        img = nib.load(p)
        assert img.shape[:3] == ref.shape and np.allclose(img.affine, ref.affine), p.name
        assert img.get_data_dtype() == np.float32 and np.isfinite(np.asarray(img.dataobj)).all(), p.name


def test_checkpoints_are_named_best_step_and_last(manifest: Path, tmp_path, monkeypatch):
    """The experiments' ModelCheckpoint writes ``best-step=<n>.ckpt`` (not ``best-stepstep=<n>``) next to
    the resume point ``last.ckpt``."""
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "uqsm", "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--loggers", "csv",
            "--data.manifest", str(manifest), f"--data.train_subjects=[{TRAIN}]", f"--data.val_subjects=[{VAL}]",
            "--data.patch_size", "16", "--data.samples_per_volume", "1", "--data.queue_length", "2",
            "--data.batch_size", "1", "--run_dir", "run"] + [f"--model.{k}={v}" for k, v in TINY_MODEL["UQSM"].items()]
    rc, out, err = run_cli(argv)
    assert rc == 0, err[-2000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best-step=2.ckpt", "last.ckpt"]


def test_checking_the_splits_leaves_the_datamodule_to_the_trainer(manifest: Path, tmp_path):
    """The entry point tries the splits before the run folder exists (an unknown subject fails there) but
    on a copy: the datamodule is set up by the trainer, with the model attached, so a supervised method
    still drops training rows without chi (QSMDataModule.setup reads trainer.lightning_module)."""
    from qsmlab.errors import QSMInputError
    from qsmlab.lab.run import RunOptions, prepare

    cfg = load_experiment("qsmnet", "quick", overrides={"data.manifest": str(manifest), "data.patch_size": 32,
                                                        "data.train_subjects": [TRAIN], "data.val_subjects": [VAL]})
    cli = prepare(RunOptions("fit", cfg, tmp_path / "run"))
    assert cli.datamodule.table is None and cli.datamodule.rows == {}  # not set up yet
    assert not (tmp_path / "run").exists()
    cfg["data"]["val_subjects"] = ["nobody"]
    with pytest.raises(QSMInputError, match="val_subjects.*nobody"):
        prepare(RunOptions("fit", cfg, tmp_path / "run"))
    # a patch larger than a training volume also fails here, before the run folder exists
    cfg["data"].update(val_subjects=[VAL], patch_size=[112, 112, 104])
    with pytest.raises(QSMInputError, match="exceeds the grid"):
        prepare(RunOptions("fit", cfg, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_supervised_fit_without_chi_rows_fails_before_the_run_folder(manifest: Path, tmp_path):
    """QSMnet (supervised) on a manifest whose rows carry no chi (in-vivo scans): one line from
    QSMDataModule.check_fit, before the run folder exists; uQSM (self-supervised) trains on the same rows."""
    import csv

    from qsmlab.data.manifest import IMAGE_COLUMNS
    from qsmlab.errors import QSMInputError
    from qsmlab.lab.run import RunOptions, prepare

    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # absolute paths, and no chi: what qsmlab bids writes for in-vivo scans
        for col in IMAGE_COLUMNS:
            if r.get(col):
                r[col] = str((manifest.parent / r[col]).resolve())
        r["chi"], r["source"] = "", "invivo"
    invivo = tmp_path / "invivo.csv"
    with open(invivo, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    over = {"data.manifest": str(invivo), "data.patch_size": 16, "data.train_subjects": [TRAIN],
            "data.val_subjects": [VAL]}
    with pytest.raises(QSMInputError, match="supervised \\(needs chi\\) and no training row has chi"):
        prepare(RunOptions("fit", load_experiment("qsmnet", "quick", overrides=over), tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    cli = prepare(RunOptions("fit", load_experiment("uqsm_tv", "quick", overrides=over), tmp_path / "run"))
    probe = cli.datamodule
    probe.setup("fit")
    assert [r.subject for r in probe.training_rows(cli.model)] == [TRAIN]


PROFILES = [(p, prof) for p in EXPERIMENTS for prof in profiles_of(p)]


def _build_model(cfg: dict):
    """The config's model, built as the CLI would from its class_path and init_args (no data, no trainer)."""
    return _import(str(get_dotted(cfg, "model.class_path")))(**cfg["model"].get("init_args", {}))


@pytest.mark.parametrize("path,profile", PROFILES, ids=[f"{p.stem}-{prof}" for p, prof in PROFILES])
def test_every_profile_builds_its_model_and_names_known_data_keys(path: Path, profile: str):
    """Only the quick profile runs above; every other profile (cpu, cpu_cosmos, *_truth, full) must at least
    build its model from its init_args (a misspelt key is a TypeError naming it), name only QSMDataModule
    arguments under data:, and point at a recipe or manifest that exists (relative to the repository root,
    where `qsmlab fit` runs)."""
    cfg = load_experiment(path, profile)
    model = _build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    unknown = set(cfg.get("data", {})) - set(inspect.signature(QSMDataModule.__init__).parameters)
    assert not unknown, f"{path.stem} --profile {profile}: data keys {sorted(unknown)}"
    manifest = str(cfg["data"]["manifest"])
    if manifest != "default":
        assert (EXPERIMENTS_DIR.parent / manifest.removeprefix("recipe:")).is_file(), manifest
    # the last step is validated (a step count that is not a multiple of the interval trains steps that no
    # validation scores, and the best checkpoint cannot be among them)
    steps, every = get_dotted(cfg, "trainer.max_steps"), get_dotted(cfg, "trainer.val_check_interval")
    if isinstance(every, int) and steps > 0:
        assert steps % every == 0, f"{path.stem} --profile {profile}: max_steps {steps}, val_check_interval {every}"


def test_a_misspelt_profile_key_fails_the_profile_check(tmp_path):
    """The check above can fail: a profile naming an init_arg no class accepts does not build."""
    exp = tmp_path / "typo.yaml"
    exp.write_text(f"base: [{EXPERIMENTS_DIR / 'uqsm_tv.yaml'}]\nprofiles:\n  cpu:\n    model:\n      init_args:\n"
                   "        patch_feilds: simulate\n")
    with pytest.raises(TypeError, match="patch_feilds"):
        _build_model(load_experiment(exp, "cpu"))


def _keys_left_to_the_parent(path: Path) -> dict[str, list[str]]:
    """Profile -> config keys an experiment built on another experiment (``base: [uqsm_tv.yaml]``) overrides
    in some of its own profiles but leaves to the parent in this one, where the parent's profile sets them.
    Such a profile silently runs the parent's value: uqsm (NDI, no TV) inheriting uqsm_tv's cpu_cosmos ran
    with TV 2.6e-3 until its own cpu_cosmos set it back to 0."""
    raw = _read(path)  # the experiment's own layer, as the config loader reads it
    bases = [path.parent / b for b in raw.get("base") or [] if not str(b).startswith("base/")]
    if not bases:
        return {}
    own = {name: set(flatten(p)) for name, p in (raw.get("profiles") or {}).items()}
    overridden = set().union(*own.values()) if own else set()
    left = {}
    for name, prof in load_layers(bases)[1].items():
        missing = sorted((overridden & set(flatten(prof))) - own.get(name, set()))
        if missing:
            left[name] = missing
    return left


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_an_experiment_overrides_its_keys_in_every_profile_it_inherits(path: Path):
    assert not _keys_left_to_the_parent(path), f"{path.stem}: {_keys_left_to_the_parent(path)}"


def test_a_profile_left_to_the_parent_fails_the_inheritance_check(tmp_path):
    """The check above can fail: NDI overriding the TV weight in quick and cpu, not in uqsm_tv's cpu_cosmos."""
    exp = tmp_path / "ndi.yaml"
    exp.write_text(f"base: [{EXPERIMENTS_DIR / 'uqsm_tv.yaml'}]\nprofiles:\n"
                   "  quick: {model: {init_args: {loss: {lambda_tv: 0.0}}}}\n"
                   "  cpu: {model: {init_args: {loss: {lambda_tv: 0.0}}}}\n")
    assert _keys_left_to_the_parent(exp) == {"cpu_cosmos": ["model.loss.lambda_tv"]}


def test_quick_and_cosmos_profiles_learn_from_cosmos_and_truth_profiles_from_the_truth():
    """What ``qsmlab fit --help`` says of the profiles: on the realistic heads, ``quick`` and ``*_cosmos`` profiles
    read the COSMOS manifest (labels, or the fields simulated from it) and ``*_truth`` profiles the scalar truth's."""
    cosmos, truth = "train_realistic_cosmos_recipe.yaml", "train_realistic_recipe.yaml"
    seen = 0
    for path in EXPERIMENTS:
        for profile in profiles_of(path):
            manifest = str(load_experiment(path, profile)["data"]["manifest"])
            if "realistic" not in manifest:
                continue  # the embedded default (full profiles, uQSM-DIP, the brain-mask net)
            seen += 1
            if profile == "quick" or profile.endswith("_cosmos"):
                assert manifest.endswith(cosmos), f"{path.stem} --profile {profile}: {manifest}"
            if profile.endswith("_truth"):
                assert manifest.endswith(truth), f"{path.stem} --profile {profile}: {manifest}"
    assert seen >= 20
