"""``qsmlab fit|validate|test`` take every form LightningCLI takes, in any order, and reach one config.

Forms: the positional experiment (a name under experiments/ or a YAML path), ``--config FILE``,
``--config=FILE``, ``-c FILE``, several ``--config`` layered in order, ``--profile P`` / ``--profile=P`` (or
none: ``quick`` where defined), ``--key value`` / ``--key=value`` with or without ``init_args``, before or
after the experiment. Overrides apply after the files and the profile wherever they stand.
"""

from __future__ import annotations

import pytest
import yaml
from _datasets import make_dataset
from _methods import run_cli
from _tiny_method import write_tiny_experiment

from qsmlab.errors import QSMInputError
from qsmlab.lab.cli import parse_argv, resolve
from qsmlab.lab.config import EXPERIMENTS_DIR


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("forms"), n_subjects=3, shape=(16, 16, 16), sources=["invivo"] * 3)


@pytest.fixture()
def exp(tmp_path, manifest):
    return str(write_tiny_experiment(tmp_path, manifest, epochs=3))


def _resolved(sub: str, argv: list[str]) -> dict:
    cfg, _, profile = resolve(parse_argv(sub, argv))
    return {"profile": profile, **cfg}


FORMS = [  # {e} = the experiment YAML
    "{e} --profile quick --model.lambda_tv 3e-3 --trainer.max_epochs 1",
    "{e} --model.lambda_tv 3e-3 --trainer.max_epochs 1",  # the default profile is quick
    "--config {e} --profile quick --model.lambda_tv 3e-3 --trainer.max_epochs 1",
    "--config={e} --profile=quick --model.lambda_tv=3e-3 --trainer.max_epochs=1",
    "-c {e} --model.lambda_tv 3e-3 --trainer.max_epochs=1",
    "--model.lambda_tv 3e-3 --trainer.max_epochs 1 --config {e} --profile quick",  # overrides first
    "--trainer.max_epochs 1 {e} --model.init_args.lambda_tv 3e-3",  # init_args level spelled out
    "--profile=quick --model.lambda_tv 3e-3 --config={e} --trainer.max_epochs=1",
]


@pytest.mark.parametrize("sub", ["fit", "validate", "test"])
def test_every_form_reaches_the_same_config(sub, exp):
    want = _resolved(sub, FORMS[0].format(e=exp).split())
    assert want["profile"] == "quick" and want["trainer"]["max_epochs"] == 1
    assert want["model"]["init_args"]["lambda_tv"] == pytest.approx(3e-3)
    for form in FORMS[1:]:
        assert _resolved(sub, form.format(e=exp).split()) == want, form


def test_overrides_win_over_profile_and_files_whatever_the_order(exp):
    # the profile sets max_epochs 3; an override given before it still wins
    got = _resolved("fit", ["--trainer.max_epochs", "7", "--profile", "quick", "--config", exp])
    assert got["trainer"]["max_epochs"] == 7
    # the last of two overrides of one key wins, as in LightningCLI
    got = _resolved("fit", [exp, "--model.lambda_tv", "1e-2", "--model.lambda_tv=2e-2"])
    assert got["model"]["init_args"]["lambda_tv"] == pytest.approx(2e-2)


def test_several_configs_merge_in_order(exp, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    lambda_tv: 5.0e-3\ntrainer:\n  max_epochs: 9\n")
    a = _resolved("fit", ["--config", exp, "--config", str(extra), "--profile", "quick"])
    b = _resolved("fit", [exp, "--config", str(extra), "--profile", "quick"])  # positional = first file
    assert a == b and a["model"]["init_args"]["lambda_tv"] == pytest.approx(5e-3)
    assert a["trainer"]["max_epochs"] == 3  # the profile applies after the files
    c = _resolved("fit", ["--config", str(extra), "--config", exp, "--profile", "quick"])
    assert c["model"]["init_args"]["lambda_tv"] == pytest.approx(1e-3)  # the later file wins
    assert parse_argv("fit", ["--config", exp, "--config", str(extra)]).name == "extra"


def test_name_path_and_config_of_a_shipped_experiment_agree(manifest):
    over = ["--data.manifest", str(manifest), "--trainer.max_steps", "5"]
    by_name = _resolved("fit", ["uqsm_tv", *over])
    assert by_name == _resolved("fit", [str(EXPERIMENTS_DIR / "uqsm_tv.yaml"), *over])
    assert by_name == _resolved("fit", ["--config", str(EXPERIMENTS_DIR / "uqsm_tv.yaml"), "--profile=quick", *over])
    assert by_name == _resolved("fit", [*over, f"--config={EXPERIMENTS_DIR / 'uqsm_tv.yaml'}", "--profile", "quick"])
    full = _resolved("fit", ["uqsm_tv", "--profile", "full", *over])
    assert full["profile"] == "full" and full["trainer"]["precision"] == "bf16-mixed"
    assert parse_argv("fit", ["uqsm_tv"]).name == "uqsm_tv"


def test_values_are_yaml(exp):
    got = _resolved("fit", [exp, "--trainer.fast_dev_run=true", "--data.val_subjects=[sub-01, sub-02]",
                            "--trainer.limit_val_batches", "null", "--seed_everything", "7"])
    assert got["trainer"]["fast_dev_run"] is True and got["trainer"]["limit_val_batches"] is None
    assert got["data"]["val_subjects"] == ["sub-01", "sub-02"] and got["seed_everything"] == 7


@pytest.mark.parametrize("argv,match", [
    (["--config"], "--config: missing value"),
    (["--profile"], "--profile: missing value"),
    (["a.yaml", "b.yaml"], "unexpected argument 'b.yaml'"),
    (["--confg", "a.yaml"], "did you mean --config"),
])
def test_malformed_lines_fail_naming_the_token(argv, match):
    with pytest.raises(QSMInputError, match=match):
        parse_argv("fit", argv)


def test_two_forms_run_to_the_same_saved_config(exp, tmp_path, monkeypatch):
    """End to end (validate: no training): the run folders' full LightningCLI configs are identical."""
    monkeypatch.chdir(tmp_path)
    saved = []
    for i, form in enumerate([f"validate {exp} --trainer.limit_val_batches 1 --model.lambda_tv 3e-3",
                              f"validate --model.lambda_tv=3e-3 --config={exp} --profile=quick "
                              "--trainer.limit_val_batches=1"]):
        rc, out, err = run_cli(form.split() + ["--run_dir", f"r{i}", "--loggers", "csv"])
        assert rc == 0, err[-2000:]
        saved.append(yaml.safe_load((tmp_path / f"r{i}" / "config.yaml").read_text()))
    assert saved[0] == saved[1]
    assert saved[0]["model"]["init_args"]["lambda_tv"] == pytest.approx(3e-3)
    assert saved[0]["trainer"]["limit_val_batches"] == 1 and saved[0]["trainer"]["max_epochs"] == 3


def _readme_command_lines() -> list[list[str]]:
    """``qsmlab fit|validate|test ...`` and ``make fit EXP=... FIT_ARGS="..."`` lines of the README, as argv."""
    import re
    import shlex

    text = (EXPERIMENTS_DIR.parent / "README.md").read_text()
    out = []
    for line in text.splitlines():
        line = line.split("  #")[0].strip()
        if re.match(r"^qsmlab (fit|validate|test) ", line):
            out.append(shlex.split(line)[1:])
        elif m := re.match(r'^make fit EXP=(\S+)(?: FIT_ARGS="([^"]*)")?', line):
            out.append(["fit", m.group(1), *shlex.split(m.group(2) or "")])
    return out


def test_every_readme_form_parses_and_resolves():
    """Each documented command line is accepted and its files, profile and keys resolve (no data built)."""
    from qsmlab.lab.config import load_experiment, profiles_of, set_dotted

    lines = _readme_command_lines()
    assert len(lines) >= 5 and any("--config" in a for a in lines) and any(
        any(t.startswith("--config=") or "=" in t for t in a) for a in lines)
    for argv in lines:
        inv = parse_argv(argv[0], argv[1:])
        profile = inv.profile or ("quick" if "quick" in profiles_of(inv.files) else None)
        cfg = load_experiment(inv.files, profile)
        for key, text in inv.overrides:
            set_dotted(cfg, key, text, create=True)
        assert cfg["model"]["class_path"].startswith("qsmlab.methods."), argv
