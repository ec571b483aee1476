"""What is saved with every run so it can be reproduced: code version, packages, data, seed.

``run_info.json`` (written by :func:`write_run_info`) holds the git commit of the qsmlab checkout (or
``"unknown"`` outside one) and whether it had uncommitted changes, the versions of the packages that
decide the numbers, the manifest path and its sha256, the seed LightningCLI used, the command line, the
host, start/end times (UTC, ISO 8601), the status and the final metrics.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("qsmlab", "torch", "lightning", "torchio", "monai", "numpy", "scipy", "nibabel", "optuna",
            "optuna-integration", "wandb", "torchmetrics", "jsonargparse")
_REPO = Path(__file__).resolve().parents[2]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit(path: str | Path = _REPO) -> dict[str, Any]:
    """``{"commit": sha or "unknown", "dirty": bool | None}`` of the checkout holding ``path``."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return {"commit": "unknown", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": bool(status) if status is not None else None}


def package_versions(names=PACKAGES) -> dict[str, str]:
    """Installed version of each package (``"absent"`` when not installed) plus Python's."""
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "absent"
    return out


def manifest_info(manifest: str | Path | None) -> dict[str, Any]:
    """Path and sha256 of the manifest CSV (the dataset's identity, see :mod:`qsmlab.data.manifest`)."""
    if not manifest:
        return {"manifest": None, "manifest_sha256": None}
    from qsmlab.data.manifest import manifest_hash

    p = Path(manifest)
    return {"manifest": str(p.resolve()), "manifest_sha256": manifest_hash(p) if p.is_file() else None}


def run_info(*, subcommand: str, seed: Any, manifest: str | Path | None, experiment: str | None = None,
             profile: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The provenance record of one run (see the module docstring)."""
    info: dict[str, Any] = {
        "subcommand": subcommand,
        "experiment": experiment,
        "profile": profile,
        "seed": seed,
        **manifest_info(manifest),
        "git": git_commit(),
        "packages": package_versions(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now_iso(),
        "status": "running",
    }
    if extra:
        info.update(extra)
    return info


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Atomic JSON write (temporary file, then rename): a crash never leaves half a record."""
    from qsmlab.data.nifti import atomic_write_text

    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return repr(o)
