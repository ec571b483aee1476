"""Shared helpers of the qsmlab.methods tests: a tiny generated dataset, tiny trainers, one-line CLI runs.

The dataset comes from the real data engine (:func:`qsmlab.data.recipe.generate_dataset`): random-shape
phantoms on a 24^3 grid at 2 mm, background sources, multi-echo GRE with noise, so the manifests carry
``te``/``b0_tesla`` (hence ``phase_scale``), magnitudes and chi labels. Generation is cached by recipe
hash under the session's temporary root, so every test file of a session shares one copy.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import lightning as L

TINY_RECIPE = {
    "name": "methods_tiny",
    "seed": 11,
    "te": [0.005, 0.010, 0.015],
    "snr": 200.0,
    "compress": False,
    "subjects": [{"kind": "shapes", "name": "shape", "count": 4, "shape": [24, 24, 24],
                  "voxel_size": [2.0, 2.0, 2.0], "n_shapes": [6, 12], "chi_range": [-0.1, 0.15]}],
}
VAL_SUBJECT = "shape004"


def tiny_dataset(root: Path) -> Path:
    from qsmlab.data.recipe import generate_dataset, load_recipe, recipe_hash

    resolved, _ = load_recipe(TINY_RECIPE)
    return generate_dataset(TINY_RECIPE, out_dir=Path(root) / recipe_hash(resolved), quiet=True)


def tiny_datamodule(manifest: Path, **kw):
    from qsmlab.data.datamodule import QSMDataModule

    args = dict(patch_size=16, samples_per_volume=2, queue_length=4, batch_size=2, val_subjects=[VAL_SUBJECT],
                seed=0, cache_volumes=True)
    args.update(kw)
    return QSMDataModule(str(manifest), **args)


def tiny_trainer(root: Path, max_steps: int = 4, val_every: int | None = None, logger=True, **kw) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    args = dict(
        max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=1, use_distributed_sampler=False,
        default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, check_val_every_n_epoch=None, val_check_interval=val_every or max_steps,
        logger=CSVLogger(str(root), name="logs") if logger else False, enable_checkpointing=False,
        log_every_n_steps=1,
    )
    args.update(kw)
    return L.Trainer(**args)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``qsmlab <argv>`` in-process: (exit status, stdout, stderr)."""
    from qsmlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()
