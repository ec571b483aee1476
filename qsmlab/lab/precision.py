"""bf16 mixed precision only where the machine runs bf16 natively.

The quick profiles train in ``bf16-mixed`` (measured: a NeXtQSM / uqsm_tv step ~0.6-0.7 of a float32 one on a
CPU with AVX512-BF16, `benchmarks/results/cpu_profiles/README.md`). On a CPU without native bf16 (no AVX512-BF16,
no AMX: many desktop and laptop CPUs, AMD before Zen 4) oneDNN emulates the bf16 convolutions, and on a GPU before Ampere CUDA
does, so the same profile would run slower than float32 for nothing. :func:`resolve_precision` keeps a profile's
bf16 where it is native and falls back to ``32-true`` otherwise, with one line saying so; a precision the user
set on the command line (``--trainer.precision``) is always kept.

Lightning does not do this: it runs ``bf16-mixed`` on any CPU (autocast) and only refuses it on a GPU without any
bf16 support.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch


class PrecisionFallbackWarning(UserWarning):
    """A profile's bf16 precision replaced by float32 (the message says why)."""


BF16 = ("bf16-mixed", "bf16-true", "bf16")  # Lightning's bf16 values
FALLBACK = "32-true"


def _cpu_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles (what oneDNN needs for bf16 convolutions faster than float32)."""
    cpu = torch.cpu
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        f = getattr(cpu, probe, None)
        if f is not None and f():
            return True
    return False


def _device_kind(accelerator: Any) -> str:
    """``cpu``, ``cuda`` or ``other`` for a Trainer ``accelerator`` value (``auto`` as Lightning picks)."""
    name = str(accelerator).lower() if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    if name in ("cpu", "cpuaccelerator"):
        return "cpu"
    if name in ("gpu", "cuda", "cudaaccelerator"):
        return "cuda"
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "other"
        return "cpu"
    return "other"  # mps, xla, a custom accelerator: left to Lightning


def native_bf16(accelerator: Any) -> tuple[bool, str]:
    """Whether ``accelerator`` (a Trainer value) runs bf16 natively here, and the device in words."""
    kind = _device_kind(accelerator)
    if kind == "cpu":
        return _cpu_native_bf16(), "this CPU (no AVX512-BF16 or AMX)"
    if kind == "cuda":
        if not torch.cuda.is_available():  # Lightning says so, in one line, when it builds the trainer
            return True, "no GPU"
        return bool(torch.cuda.is_bf16_supported(including_emulation=False)), "this GPU (before Ampere)"
    return True, str(accelerator)


def resolve_precision(config: Mapping[str, Any], given: Mapping[str, Any] | None = None
                      ) -> tuple[dict[str, Any], str | None]:
    """``config`` with ``trainer.precision`` set to ``32-true`` where a profile's bf16 would be emulated.

    Args:
        config: a resolved experiment config (nested ``trainer:`` mapping); not modified.
        given: the dotted keys the user set; a ``trainer.precision`` there is never changed.

    Returns:
        (config, message): a deep copy with the precision replaced and the one-line reason, or a shallow copy
        of ``config`` and None when nothing changes.
    """
    trainer = config.get("trainer") or {}
    precision = trainer.get("precision")
    if str(precision) not in BF16 or "trainer.precision" in (given or {}):
        return dict(config), None
    ok, where = native_bf16(trainer.get("accelerator", "auto"))
    if ok:
        return dict(config), None
    out = copy.deepcopy(dict(config))
    out["trainer"]["precision"] = FALLBACK
    msg = (f"trainer.precision {precision} -> {FALLBACK}: {where} would emulate bf16, slower than float32 "
           f"(--trainer.precision {precision} forces it)")
    return out, msg
