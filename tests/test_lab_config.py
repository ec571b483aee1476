"""Experiment YAML layering: bases, profiles, dotted overrides through init_args, helpful errors."""

import pytest

from qsmlab.errors import QSMInputError
from qsmlab.lab.config import flatten, get_dotted, load_experiment, set_dotted


@pytest.fixture()
def exp(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "trainer.yaml").write_text(
        "trainer:\n  max_epochs: 10\n  accelerator: auto\nprofiles:\n  quick:\n    trainer: {max_epochs: 1}\n")
    (tmp_path / "m.yaml").write_text(
        "base: [base/trainer.yaml]\n"
        "model:\n  class_path: x.Y\n  init_args:\n    loss: {lambda_tv: 0.001, dc: nonlinear}\n"
        "profiles:\n  full:\n    trainer: {max_epochs: 100}\n")
    return tmp_path / "m.yaml"


def test_layers_and_profiles(exp):
    cfg = load_experiment(exp, profile=None)
    assert cfg["trainer"] == {"max_epochs": 10, "accelerator": "auto"}
    assert load_experiment(exp, "quick")["trainer"]["max_epochs"] == 1  # profile from the base
    assert load_experiment(exp, "full")["trainer"]["max_epochs"] == 100
    with pytest.raises(QSMInputError, match="unknown profile 'fast'"):
        load_experiment(exp, "fast")


def test_dotted_keys_skip_init_args(exp):
    cfg = load_experiment(exp, "quick", overrides=["model.loss.lambda_tv=3e-3"])
    assert cfg["model"]["init_args"]["loss"]["lambda_tv"] == pytest.approx(3e-3)
    assert get_dotted(cfg, "model.loss.dc") == "nonlinear"
    assert "model.loss.lambda_tv" in flatten(cfg)
    with pytest.raises(QSMInputError, match="closest: 'model.loss.lambda_tv'"):
        set_dotted(cfg, "model.loss.lamda_tv", 1.0)
    set_dotted(cfg, "model.width", 8, create=True)
    assert cfg["model"]["init_args"]["width"] == 8
