"""One run (fit / validate / test / predict) of a resolved experiment config, in one folder.

:func:`execute` is the single code path of ``qsmlab fit``, every sweep trial and every LOO fold: it writes
the config, builds :class:`~qsmlab.lab.cli.QSMLabCLI`, records provenance, runs the trainer, then saves the
final metrics (``run_info.json``, W&B summary) and, after ``fit``, the chi of the first validation volume
(NIfTI, ppm, the volume's affine) with its slice figure (also logged to W&B as ``final/chi``). W&B runs are
always finished, with exit code 1 when the run raised (a pruned trial is not a failure).
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import BasePredictionWriter

from qsmlab.lab import provenance as P
from qsmlab.lab.config import flatten
from qsmlab.lab.tracking import DEFAULT_LOGGERS, finish_wandb, make_loggers, wandb_run


@dataclass
class RunResult:
    run_dir: Path
    status: str  # finished | failed | pruned
    metrics: dict[str, float] = field(default_factory=dict)
    seed: Any = None
    seconds: float = 0.0  # wall clock of the whole run (config, provenance, fit, predictions, logs)
    fit_seconds: float = 0.0  # wall clock of trainer.fit/validate/... alone
    cpu_seconds: float = 0.0  # CPU time of this process over the run (all its threads)
    fit_cpu_seconds: float = 0.0  # CPU time of the trainer call alone
    predictions: list[Path] = field(default_factory=list)


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v.item() if hasattr(v, "item") else v)
        except (TypeError, ValueError):
            continue
    return out


def chi_of(prediction: Any) -> torch.Tensor:
    """The chi tensor [B, 1, X, Y, Z] (ppm) of a ``predict_step`` output (a tensor or a dict with 'chi')."""
    if isinstance(prediction, torch.Tensor):
        return prediction
    if isinstance(prediction, Mapping) and "chi" in prediction:
        return prediction["chi"]
    if isinstance(prediction, (tuple, list)) and prediction and isinstance(prediction[0], torch.Tensor):
        return prediction[0]
    raise TypeError(f"predict_step returned {type(prediction).__name__}; expected a chi tensor or {{'chi': ...}}")


def _file_stem(batch, i: int) -> str:
    key = (batch.key[i] if getattr(batch, "key", None) else "") or (batch.subject[i] if batch.subject else f"item{i}")
    return key.replace("/", "_")


class NiftiPredictionWriter(BasePredictionWriter):
    """Writes each predicted chi map as ``<out_dir>/<subject_session_run>_chi.nii.gz`` (float32, ppm,
    the input volume's affine)."""

    def __init__(self, out_dir: str | Path):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.written: list[Path] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        from qsmlab.data.nifti import save_nifti

        chi = chi_of(prediction).detach().float().cpu().numpy()
        for i in range(chi.shape[0]):
            p = save_nifti(self.out_dir / f"{_file_stem(batch, i)}_chi.nii.gz", chi[i, 0],
                           affine=batch.affine[i].cpu().numpy())
            self.written.append(p)


@torch.no_grad()
def predict_first_val(model, datamodule, out_dir: Path) -> dict[str, Any] | None:
    """chi of the first validation volume (full volume) -> NIfTI + slice figure; None without val data."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from qsmlab.data.nifti import save_nifti
    from qsmlab.lab.figures import slice_figure
    from qsmlab.metrics import nrmse

    if datamodule is None:
        return None
    loader = datamodule.val_dataloader()
    if not loader:
        return None
    batch = next(iter(loader))
    was_training = model.training
    model.eval()
    try:
        chi_t = chi_of(model.predict_step(move_data_to_device(batch, model.device), 0))
    finally:
        model.train(was_training)
    chi = chi_t[0, 0].float().cpu().numpy()
    mask = batch.mask[0, 0].cpu().numpy() > 0
    stem = _file_stem(batch, 0)
    pred_path = save_nifti(out_dir / f"{stem}_chi.nii.gz", chi, affine=batch.affine[0].numpy())
    ref = batch.chi[0, 0].cpu().numpy() if batch.chi is not None else None
    # NRMSE only for the caption: the run's metrics were logged by its validation (SSIM/HFEN cost seconds)
    metrics = {"nrmse": float(nrmse(chi, ref, mask))} if ref is not None and mask.any() else {}
    note = f"NRMSE {metrics['nrmse']:.1f} %" if metrics else ""
    fig = slice_figure({"prediction": chi}, out_dir.parent / "final_chi.png", reference=ref, mask=mask,
                       title=f"{stem}  {note}", annotations={"prediction": note})
    return {"subject": stem, "path": pred_path, "figure": fig, "metrics": metrics,
            "reference": str(datamodule.rows["val"][0].chi) if ref is not None else None,
            "mask": str(datamodule.rows["val"][0].mask)}


def execute(subcommand: str, config: Mapping[str, Any], run_dir: str | Path, *,
            extra_args: Sequence[str] = (), ckpt_path: str | None = None,
            loggers: Sequence[str] = DEFAULT_LOGGERS, wandb_kwargs: Mapping[str, Any] | None = None,
            wandb_config: Mapping[str, Any] | None = None, callbacks: Sequence = (),
            experiment: str | None = None, profile: str | None = None, output_dir: str | Path | None = None,
            save_predictions: bool = True, info_extra: Mapping[str, Any] | None = None,
            after_fit=None) -> RunResult:
    """Run ``subcommand`` of the resolved experiment ``config`` (a dict, manifest resolved) in ``run_dir``.

    Args:
        extra_args: LightningCLI-style ``--key value`` pairs applied after the config (class defaults).
        ckpt_path: passed to the trainer (``last`` resumes from ``<run_dir>/checkpoints/last.ckpt``).
        loggers: names for :func:`qsmlab.lab.tracking.make_loggers`.
        wandb_kwargs: ``wandb.init`` arguments (``name``, ``group``, ``job_type``, ...).
        wandb_config: added to the W&B run config (the resolved config's dotted keys are always there).
        callbacks: extra Lightning callbacks (e.g. a pruning callback).
        after_fit: ``f(cli)`` called after a successful ``trainer.fit`` (e.g. ``check_pruned``).
    Returns:
        :class:`RunResult`; exceptions (bad config, training errors, ``optuna.TrialPruned``) propagate
        after ``run_info.json`` and W&B have recorded them.
    """
    from qsmlab.lab.cli import QSMLabCLI

    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    exp_path = run_dir / "experiment.yaml"
    exp_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    wkw = dict(wandb_kwargs or {})
    wkw.setdefault("name", run_dir.name)
    wkw.setdefault("job_type", subcommand)
    lgs = make_loggers(run_dir, loggers, wandb_kwargs=wkw)
    cbs = list(callbacks)
    writer = None
    if subcommand == "predict":
        writer = NiftiPredictionWriter(output_dir or run_dir / "predictions")
        cbs.append(writer)
    try:
        cli = QSMLabCLI(args=["--config", str(exp_path), *extra_args], run_dir=run_dir, loggers=lgs, callbacks=cbs)
    except BaseException:
        finish_wandb(lgs, exit_code=1)
        if created:  # a config error leaves no half-made run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    (run_dir / "config.yaml").write_text(cli.dump_config())
    manifest = getattr(cli.datamodule, "manifest", None)
    info = P.run_info(subcommand=subcommand, seed=cli.seed, manifest=manifest, experiment=experiment,
                      profile=profile, extra={"run_dir": str(run_dir.resolve()), "ckpt_path": ckpt_path,
                                              **dict(info_extra or {})})
    P.write_json(run_dir / "run_info.json", info)
    run = wandb_run(lgs)
    if run is not None:
        run.config.update({**flatten(config), **dict(wandb_config or {}), "seed_everything": cli.seed,
                           "git_commit": info["git"]["commit"], "manifest_sha256": info["manifest_sha256"]},
                          allow_val_change=True)
    result = RunResult(run_dir=run_dir, status="running", seed=cli.seed)
    status, exit_code = "finished", 0
    try:
        t_fit, c_fit = time.perf_counter(), time.process_time()
        getattr(cli.trainer, subcommand)(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        result.fit_seconds = time.perf_counter() - t_fit
        result.fit_cpu_seconds = time.process_time() - c_fit
        if subcommand == "fit" and after_fit is not None:
            after_fit(cli)
        result.metrics = _floats(cli.trainer.callback_metrics)
        if subcommand == "fit" and save_predictions and cli.trainer.is_global_zero:
            pred = predict_first_val(cli.model, cli.datamodule, run_dir / "predictions")
            if pred is not None:
                result.predictions.append(pred["path"])
                info["prediction"] = {k: str(v) if isinstance(v, Path) else v for k, v in pred.items()}
                if run is not None:
                    import wandb

                    run.log({"final/chi": wandb.Image(str(pred["figure"]))})
        if writer is not None:
            result.predictions.extend(writer.written)
    except BaseException as e:
        result.metrics = _floats(cli.trainer.callback_metrics)
        status = "pruned" if type(e).__name__ == "TrialPruned" else "failed"
        exit_code = 0 if status == "pruned" else 1
        info["error"] = f"{type(e).__name__}: {e}"
        (run_dir / "error.txt").write_text(traceback.format_exc())
        raise
    finally:
        result.status = status
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = time.process_time() - c0
        info.update(status=status, ended=P.now_iso(), seconds=round(result.seconds, 2),
                    fit_seconds=round(result.fit_seconds, 2), cpu_seconds=round(result.cpu_seconds, 2),
                    fit_cpu_seconds=round(result.fit_cpu_seconds, 2),
                    metrics=result.metrics,
                    predictions=[str(p) for p in result.predictions])
        P.write_json(run_dir / "run_info.json", info)
        for lg in lgs:
            if type(lg).__name__ != "WandbLogger":
                lg.finalize(status if status != "finished" else "success")
        finish_wandb(lgs, exit_code=exit_code, summary={**result.metrics, "status": status})
    return result


def read_metrics_csv(run_dir: str | Path):
    """``metrics.csv`` of a run as a DataFrame (empty when absent)."""
    import pandas as pd

    p = Path(run_dir) / "metrics.csv"
    return pd.read_csv(p) if p.is_file() else pd.DataFrame()


def last_values(frame, prefix: str = "val/") -> dict[str, float]:
    """Last logged value of every column starting with ``prefix`` (NaN rows skipped)."""
    out = {}
    for c in frame.columns:
        if c.startswith(prefix):
            s = frame[c].dropna()
            if len(s):
                out[c] = float(s.iloc[-1])
    return out


def load_chi(path: str | Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
