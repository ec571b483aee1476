"""A profile's bf16-mixed falls back to float32 where the machine would emulate bf16; the user's choice is kept."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from _datasets import make_dataset
from _tiny_method import write_tiny_experiment

from qsmlab.cli import main
from qsmlab.lab import precision as P


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(P, "_cpu_native_bf16", lambda: False)


def _cfg(precision="bf16-mixed", accelerator="cpu"):
    return {"trainer": {"precision": precision, "accelerator": accelerator, "max_steps": 3}, "model": {"x": 1}}


def test_emulated_bf16_falls_back_and_the_input_is_not_modified(no_native_bf16):
    cfg = _cfg()
    out, msg = P.resolve_precision(cfg)
    assert out["trainer"]["precision"] == "32-true" and out["trainer"]["max_steps"] == 3 and out["model"] == {"x": 1}
    assert cfg["trainer"]["precision"] == "bf16-mixed"  # a copy was changed
    assert msg.startswith("trainer.precision bf16-mixed -> 32-true: this CPU") and "\n" not in msg
    for acc in ("auto", "CPU"):  # auto on a machine without a GPU is the CPU
        if acc == "auto" and torch.cuda.is_available():
            continue
        assert P.resolve_precision(_cfg(accelerator=acc))[0]["trainer"]["precision"] == "32-true"


def test_kept_where_native_set_by_the_user_or_not_bf16(monkeypatch, no_native_bf16):
    # the user's --trainer.precision is never changed
    out, msg = P.resolve_precision(_cfg(), given={"trainer.precision": "bf16-mixed"})
    assert out["trainer"]["precision"] == "bf16-mixed" and msg is None
    for prec in ("32-true", "16-mixed", "64-true"):
        assert P.resolve_precision(_cfg(prec)) == (_cfg(prec), None)
    assert P.resolve_precision({"model": {}}) == ({"model": {}}, None)  # no trainer section
    # mps / custom accelerators are left to Lightning
    assert P.resolve_precision(_cfg(accelerator="mps"))[1] is None
    monkeypatch.setattr(P, "_cpu_native_bf16", lambda: True)
    assert P.resolve_precision(_cfg()) == (_cfg(), None)


def test_gpu_without_native_bf16_falls_back(monkeypatch, no_native_bf16):
    seen = {}

    def bf16_supported(including_emulation=True):
        seen["emulation"] = including_emulation
        return False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU at all: left to Lightning's error
    assert P.resolve_precision(_cfg(accelerator="gpu"))[1] is None and not seen
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out, msg = P.resolve_precision(_cfg(accelerator="gpu"))
    assert out["trainer"]["precision"] == "32-true" and "GPU" in msg and seen["emulation"] is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert P.resolve_precision(_cfg(accelerator="cuda"))[1] is None


def test_cpu_probe_matches_torch():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert P._cpu_native_bf16() is bool(expected)


def test_fit_records_the_fallback(tmp_path, monkeypatch, no_native_bf16):
    monkeypatch.chdir(tmp_path)
    manifest = make_dataset(tmp_path / "data", n_subjects=3, shape=(16, 16, 16), sources=["invivo"] * 3)
    exp = write_tiny_experiment(tmp_path, manifest, epochs=1)
    args = ["fit", str(exp), "--trainer.limit_val_batches", "1", "--loggers", "csv"]
    spec = yaml.safe_load(exp.read_text())
    spec.setdefault("trainer", {})["precision"] = "bf16-mixed"  # as a profile sets it
    exp.write_text(yaml.safe_dump(spec))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    assert any(issubclass(w.category, P.PrecisionFallbackWarning) for w in caught)
    run = tmp_path / "runs" / "tiny" / "quick" / "version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == "32-true"
    assert "bf16-mixed -> 32-true" in json.loads((run / "run_info.json").read_text())["precision_fallback"]
    # given on the command line, bf16 runs as asked (Lightning's CPU autocast), and nothing is recorded
    assert main([*args, "--trainer.precision", "bf16-mixed"]) == 0
    run = tmp_path / "runs" / "tiny" / "quick" / "version_1"
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == "bf16-mixed"
    assert "precision_fallback" not in json.loads((run / "run_info.json").read_text())
