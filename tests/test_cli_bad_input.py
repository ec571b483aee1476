"""Bad input on every command that runs something: one line naming the option or file at fault, what it got
and what it expects, exit status 2, and nothing written (no run folder, no study, no output file).

Each case runs ``qsmlab ...`` in-process from an empty working directory; the inputs (a tiny dataset, a
sweep file) live elsewhere, so "nothing written" is "the working directory is still empty".
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from _datasets import make_dataset

from qsmlab.cli import main

# (id, argv with {m} = manifest, {f} = field, {k} = mask, {s} = a sweep file with a bad override,
#  {s2} = a sweep file with a bad search key, {d} = a folder without logs; substrings the line must hold)
CASES = [
    # fit: the four of the issue first
    ("fit-config-space", "fit --config experiments/uqsm_tv.yaml --data.manifest {m} --trainer.max_steps -5",
     ["--trainer.max_steps", "-5", "non-negative integer"]),
    ("fit-max-steps", "fit uqsm_tv --data.manifest {m} --trainer.max_steps -5",
     ["--trainer.max_steps", "got -5", "non-negative integer or -1"]),
    ("fit-lambda-str", "fit uqsm_tv --data.manifest {m} --model.loss.lambda_tv abc",
     ["--model.loss.lambda_tv", "got 'abc'", "expected a number"]),
    ("fit-brainmask-bad-size", "fit experiments/brainmask.yaml --data.manifest {m} --model.img_size=-16",
     ["--model.img_size", "-16"]),
    ("fit-unknown-key", "fit uqsm_tv --data.manifest {m} --model.lamda_tv 1e-3",
     ["--model.lamda_tv", "not a parameter of qsmlab.methods.UQSM", "closest: 'model.loss.lambda_tv'"]),
    ("fit-unknown-trainer-key", "fit uqsm_tv --data.manifest {m} --trainer.maxsteps=4",
     ["--trainer.maxsteps", "closest: 'trainer.max_steps'"]),
    ("fit-precision-enum", "fit uqsm_tv --data.manifest {m} --trainer.precision 17",
     ["--trainer.precision", "got 17", "'16-mixed'"]),
    ("fit-upsample-choice", "fit uqsm_tv --data.manifest {m} --model.upsample cubic",
     ["--model.upsample", "nearest, transposed", "'cubic'"]),
    ("fit-loss-dc-choice", "fit uqsm_tv --data.manifest {m} --model.loss.dc bogus",
     ["--model.loss.dc", "'linear', 'weighted', 'nonlinear'", "'bogus'"]),
    ("fit-width-str", "fit --profile=quick --config=experiments/uqsm_tv.yaml --data.manifest={m} --model.width wide",
     ["--model.width", "got 'wide'", "expected an integer"]),
    ("fit-sampler", "fit uqsm_tv --data.manifest {m} --data.sampler weird",
     ["--data.sampler", "'uniform', 'mask'", "'weird'"]),
    ("fit-patch-str", "fit uqsm_tv --data.manifest {m} --data.patch_size abc",
     ["--data.patch_size", "got 'abc'", "an integer or a list"]),
    ("fit-batch-zero", "fit uqsm_tv --data.manifest {m} --data.batch_size 0",
     ["--data.batch_size", "positive integer", "0"]),
    ("fit-unknown-subject", "fit uqsm_tv --data.manifest {m} --data.train_subjects null --data.val_subjects [nobody]",
     ["--data.val_subjects", "nobody", "not in manifest"]),
    ("fit-lr-negative", "fit uqsm_tv --data.manifest {m} --model.lr -1", ["--model.lr", "got -1", "> 0"]),
    ("fit-devices", "fit uqsm_tv --data.manifest {m} --trainer.devices abc", ["--trainer.devices", "'abc'", "int > 0"]),
    ("fit-manifest-missing", "fit uqsm_tv --data.manifest nowhere.csv", ["data.manifest", "nowhere.csv", "not found"]),
    ("fit-profile", "fit uqsm_tv --profile fastest", ["unknown profile 'fastest'", "full", "quick"]),
    ("fit-experiment", "fit uqsm_tvv", ["experiment 'uqsm_tvv'", "did you mean 'uqsm_tv'"]),
    ("fit-config-no-value", "fit uqsm_tv --config", ["--config: missing value"]),
    ("fit-unknown-option", "fit uqsm_tv --profiel quick", ["unknown option --profiel", "did you mean --profile"]),
    ("fit-unknown-section", "fit uqsm_tv --modle.width 8", ["unknown option --modle.width", "trainer, model, data"]),
    ("fit-two-experiments", "fit uqsm_tv qsmnet", ["unexpected argument 'qsmnet'", "--config FILE"]),
    ("fit-no-experiment", "fit --data.manifest {m}", ["name an experiment"]),
    ("fit-loggers", "fit uqsm_tv --data.manifest {m} --loggers wandb,foo", ["--loggers", "'foo'", "csv"]),
    # validate / test
    ("validate-ckpt-missing", "validate uqsm_tv --data.manifest {m} --ckpt_path nowhere.ckpt",
     ["--ckpt_path nowhere.ckpt", "no such file"]),
    ("validate-val-check", "validate uqsm_tv --data.manifest {m} --trainer.val_check_interval=-2",
     ["--trainer.val_check_interval", "-2"]),
    ("test-subjects", "test uqsm_tv --data.manifest {m} --data.train_subjects null --data.val_subjects [sub-01] "
     "--data.test_subjects [ghost]",
     ["--data.test_subjects", "ghost", "not in manifest"]),
    ("test-accelerator", "test uqsm_tv --data.manifest {m} --trainer.accelerator tpu9",
     ["--trainer.accelerator", "tpu9", "cpu"]),
    # predict
    ("predict-ckpt-missing", "predict --ckpt nowhere.ckpt --field {f} --mask {k} -o chi.nii.gz", ["nowhere.ckpt"]),
    ("predict-output-suffix", "predict --ckpt nowhere.ckpt --field {f} --mask {k} -o chi.txt",
     ["-o chi.txt", ".nii or .nii.gz"]),
    ("predict-config-bad-key", "predict --config experiments/uqsm_tv.yaml --data.manifest {m} --trainer.max_steps x",
     ["--trainer.max_steps", "got 'x'", "expected an integer"]),
    ("predict-b0-dir", "predict --ckpt nowhere.ckpt --field {f} --mask {k} -o chi.nii.gz --b0-dir 0 0 x",
     ["--b0-dir", "invalid float value: 'x'"]),
    # sweep
    ("sweep-missing", "sweep no_such_sweep", ["sweep file 'no_such_sweep' not found"]),
    ("sweep-search-key", "sweep {s2}", ["bad_key.yaml", "search_space key 'model.loss.lamda_tv'",
                                        "closest: 'model.loss.lambda_tv'"]),
    ("sweep-override-value", "sweep {s}", ["bad_override.yaml", "overrides.trainer.max_steps", "-5"]),
    ("sweep-n-trials", "sweep uqsm_tv --n-trials 0", ["--n-trials", "positive integer, got 0"]),
    ("sweep-workers", "sweep uqsm_tv --workers 0", ["--workers", "positive integer"]),
    ("sweep-workers-str", "sweep uqsm_tv --workers two", ["--workers", "invalid int value: 'two'"]),
    # loocv
    ("loocv-max-steps", "loocv uqsm_tv --manifest {m} --trainer.max_steps -5 --loggers csv",
     ["--trainer.max_steps", "got -5"]),
    ("loocv-unknown-key", "loocv uqsm_tv --manifest {m} --model.lamda_tv 3", ["--model.lamda_tv", "closest"]),
    ("loocv-manifest", "loocv uqsm_tv --manifest nowhere.csv", ["nowhere.csv", "not found"]),
    ("loocv-params", "loocv uqsm_tv --manifest {m} --params best-of:nostudy", ["--params best-of:nostudy"]),
    ("loocv-tv-alphas", "loocv uqsm_tv --manifest {m} --tv-alphas 1e-3,-1", ["--tv-alphas", "positive numbers"]),
    # compare
    ("compare-missing", "compare nowhere -o report", ["nowhere is not a folder"]),
    ("compare-empty", "compare {d} -o report", ["holds no metrics.csv, trials.csv or loocv_table.csv"]),
    # dip
    ("dip-field-missing", "dip --field nowhere.nii.gz --mask {k} -o chi.nii.gz", ["nowhere.nii.gz"]),
    ("dip-iterations", "dip --field {f} --mask {k} -o chi.nii.gz --iterations 0", ["--iterations 0", "positive"]),
    ("dip-te-without-b0", "dip --field {f} --mask {k} -o chi.nii.gz --te 0.01", ["--te and --b0 go together"]),
    ("dip-dc-choice", "dip --field {f} --mask {k} -o chi.nii.gz --dc cubic", ["--dc", "invalid choice: 'cubic'"]),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_inputs")
    manifest = make_dataset(root / "data", n_subjects=3, shape=(16, 16, 16), sources=["invivo"] * 3)
    sub = manifest.parent / "sub-00" / "run-0"
    (root / "bad_override.yaml").write_text(
        f"experiment: uqsm_tv\noverrides:\n  data.manifest: {manifest}\n  trainer.max_steps: -5\n"
        "search_space:\n  model.loss.lambda_tv: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}\n")
    (root / "bad_key.yaml").write_text(
        "experiment: uqsm_tv\nsearch_space:\n  model.loss.lamda_tv: {type: float, low: 1.0e-5, high: 1.0e-2}\n")
    (root / "empty").mkdir()
    return {"m": str(manifest), "f": str(sub / "field.nii.gz"), "k": str(sub / "mask.nii.gz"),
            "s": str(root / "bad_override.yaml"), "s2": str(root / "bad_key.yaml"), "d": str(root / "empty")}


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors (a type or choice it checks itself)
            rc = e.code
    return rc, err.getvalue()


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, expected, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    words = [w.replace("experiments/", f"{REPO}/experiments/") for w in argv.format(**inputs).split()]
    rc, err = _run(words)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"qsmlab {words[0]}: error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "written: " + ", ".join(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def test_at_least_25_cases_across_every_command():
    cmds = {c[1].split()[0] for c in CASES}
    assert len(CASES) >= 25 and cmds >= {"fit", "validate", "test", "predict", "sweep", "loocv", "compare", "dip"}
