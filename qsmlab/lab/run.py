"""One run (fit / validate / test / predict) of a resolved experiment config, in one folder.

:func:`execute` is the single code path of ``qsmlab fit``, every sweep trial and every LOO fold: the caller
builds the config in memory (a dict) and describes the run with :class:`RunOptions`; :func:`execute`
builds :class:`~qsmlab.lab.lightning_cli.QSMLabCLI` from it (every key, type and value checked, the
datamodule's splits set up) *before* the run folder is created, so a bad value writes nothing. Then it
records the config and provenance, runs the trainer, and saves the final metrics (``run_info.json``, W&B
summary) and, after ``fit``, the maps of the first validation volume (NIfTI with the volume's affine: chi
in ppm for a QSM method, the mask and class probabilities for a segmentation method) with a slice figure
(also logged to W&B as ``final/chi``). W&B runs are always finished, with exit code 1 when the run raised
(a pruned trial is not a failure).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import BasePredictionWriter

from qsmlab.data.nifti import save_nifti
from qsmlab.errors import QSMInputError
from qsmlab.lab import provenance as P
from qsmlab.lab.config import flatten
from qsmlab.lab.config_errors import config_error
from qsmlab.lab.figures import slice_figure
from qsmlab.lab.lightning_cli import QSMLabCLI
from qsmlab.lab.precision import PrecisionFallbackWarning, resolve_precision
from qsmlab.lab.tracking import DEFAULT_LOGGERS, finish_wandb, make_loggers, wandb_run
from qsmlab.metrics import nrmse

SUBCOMMANDS = ("fit", "validate", "test", "predict")


@dataclass
class RunOptions:
    """What :func:`execute` runs, where, and how it is recorded.

    Attributes:
        subcommand: fit | validate | test | predict.
        config: the resolved config (``data.manifest`` a CSV path); not modified.
        run_dir: the run folder (created only once the config has been checked).
        given: ``{dotted key: value}`` the user set (command-line overrides, a trial's parameters): error
            messages name these keys the way the user wrote them.
        experiment, profile: recorded in ``run_info.json``.
        ckpt_path: passed to the trainer (``last`` resumes from ``<run_dir>/checkpoints/last.ckpt``).
        output_dir: ``predict``: where the maps go (default ``<run_dir>/predictions``).
        loggers: names for :func:`qsmlab.lab.tracking.make_loggers`.
        callbacks: extra Lightning callbacks (e.g. a pruning callback).
        after_fit: ``f(cli)`` called after a successful ``trainer.fit`` (e.g. ``check_pruned``).
        save_predictions: after ``fit``, write the maps of the first validation volume.
        wandb_init: ``wandb.init`` arguments (``name``, ``group``, ``job_type``, ...).
        record: added to the W&B run config and to ``run_info.json`` (study, trial, fold, params, ...).
    """

    subcommand: str
    config: Mapping[str, Any]
    run_dir: Path
    given: Mapping[str, Any] = field(default_factory=dict)
    experiment: str | None = None
    profile: str | None = None
    ckpt_path: str | None = None
    output_dir: Path | None = None
    loggers: Sequence[str] = DEFAULT_LOGGERS
    callbacks: Sequence = ()
    after_fit: Callable[[QSMLabCLI], None] | None = None
    save_predictions: bool = True
    wandb_init: Mapping[str, Any] = field(default_factory=dict)
    record: Mapping[str, Any] = field(default_factory=dict)


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


def output_maps(prediction: Any, primary: str | None = None) -> dict[str, torch.Tensor]:
    """The volume maps ``{name: [B, C, X, Y, Z]}`` of a ``predict_step`` output, ``primary`` first.

    A tensor is chi (ppm); a mapping keeps every 5-D tensor it holds (``chi``; a segmentation method's
    ``mask`` and ``mask_logits``; ...); a tuple's first tensor is chi.
    """
    if isinstance(prediction, torch.Tensor):
        maps = {"chi": prediction}
    elif isinstance(prediction, Mapping):
        maps = {k: v for k, v in prediction.items() if isinstance(v, torch.Tensor) and v.ndim == 5}
    elif isinstance(prediction, (tuple, list)) and prediction and isinstance(prediction[0], torch.Tensor):
        maps = {"chi": prediction[0]}
    else:
        maps = {}
    if not maps:
        raise TypeError(f"predict_step returned {type(prediction).__name__} without a [B, C, X, Y, Z] map; "
                        "expected a chi tensor or a dict of maps")
    first = primary if primary in maps else ("chi" if "chi" in maps else next(iter(maps)))
    return {first: maps[first], **{k: v for k, v in maps.items() if k != first}}


def chi_of(prediction: Any) -> torch.Tensor:
    """The chi tensor [B, 1, X, Y, Z] (ppm) of a ``predict_step`` output (a tensor or a dict with 'chi')."""
    maps = output_maps(prediction)
    if "chi" not in maps:
        raise TypeError(f"predict_step returned maps {sorted(maps)}; expected a chi map")
    return maps["chi"]


def map_volumes(maps: Mapping[str, torch.Tensor], i: int) -> dict[str, np.ndarray]:
    """Item ``i`` of each map as a float32 volume to write: one channel -> (X, Y, Z); several -> (X, Y, Z, C)
    (NIfTI's 4th axis); ``<name>_logits`` -> ``<name>_prob`` (softmax over the channels)."""
    out = {}
    for name, t in maps.items():
        v = t[i].detach().float().cpu()
        if name.endswith("_logits") and v.shape[0] > 1:
            name, v = name[: -len("_logits")] + "_prob", torch.softmax(v, dim=0)
        arr = v.numpy()
        out[name] = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    return out


def _file_stem(batch, i: int) -> str:
    key = (batch.key[i] if getattr(batch, "key", None) else "") or (batch.subject[i] if batch.subject else f"item{i}")
    return key.replace("/", "_")


def write_maps(out_dir: Path, batch, maps: Mapping[str, torch.Tensor]) -> list[Path]:
    """Each map of each volume of ``batch`` as ``<out_dir>/<subject_session_run>_<map>.nii.gz`` (float32,
    the volume's affine)."""
    written = []
    for i in range(next(iter(maps.values())).shape[0]):
        for name, vol in map_volumes(maps, i).items():
            written.append(save_nifti(out_dir / f"{_file_stem(batch, i)}_{name}.nii.gz", vol,
                                      affine=batch.affine[i].cpu().numpy()))
    return written


class NiftiPredictionWriter(BasePredictionWriter):
    """Writes each predicted map as ``<out_dir>/<subject_session_run>_<map>.nii.gz`` (``_chi``: ppm)."""

    def __init__(self, out_dir: str | Path):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.written: list[Path] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        maps = output_maps(prediction, getattr(pl_module, "primary_output", None))
        self.written.extend(write_maps(self.out_dir, batch, maps))


@torch.no_grad()
def predict_first_val(model, datamodule, out_dir: Path) -> dict[str, Any] | None:
    """The maps of the first validation volume (full volume) -> NIfTI + slice figure of the primary map
    (chi, or a segmentation method's mask); None without validation data."""
    if datamodule is None:
        return None
    loader = datamodule.val_dataloader()
    if not loader:
        return None
    batch = next(iter(loader))
    was_training = model.training
    model.eval()
    try:
        maps = output_maps(model.predict_step(move_data_to_device(batch, model.device), 0),
                           getattr(model, "primary_output", None))
    finally:
        model.train(was_training)
    paths = write_maps(out_dir, batch, maps)
    primary = next(iter(maps))
    vol = map_volumes({primary: maps[primary]}, 0)[primary]
    stem = _file_stem(batch, 0)
    ref_t = getattr(batch, primary, None) if primary in ("chi", "mask", "seg") else None
    ref = ref_t[0, 0].float().cpu().numpy() if ref_t is not None and vol.ndim == 3 else None
    mask = batch.mask[0, 0].cpu().numpy() > 0
    metrics = {}
    if primary == "chi" and ref is not None and mask.any():
        # NRMSE only for the caption: the run's metrics were logged by its validation (SSIM/HFEN cost seconds)
        metrics = {"nrmse": float(nrmse(vol, ref, mask))}
    note = f"NRMSE {metrics['nrmse']:.1f} %" if metrics else ""
    shown = vol if vol.ndim == 3 else vol[..., -1]
    fig = slice_figure({"prediction": shown}, out_dir.parent / "final_chi.png", reference=ref,
                       mask=mask if primary == "chi" else None, window=None if primary == "chi" else 1.0,
                       title=f"{stem} {primary}  {note}", annotations={"prediction": note})
    row = datamodule.rows["val"][0]
    return {"subject": stem, "path": paths[0], "paths": paths, "figure": fig, "metrics": metrics,
            "reference": str(row.chi) if primary == "chi" and ref is not None else None, "mask": str(row.mask)}


@contextmanager
def _held_logs(names: Sequence[str] = ("lightning.pytorch", "lightning.fabric")):
    """Hold Lightning's log lines (seed, devices, tips) until the block succeeds: a rejected config then
    prints its one error line alone."""
    held: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    saved = []
    for n in names:
        lg = logging.getLogger(n)
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers, lg.propagate = [_Hold()], False
    ok = False
    try:
        yield
        ok = True
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        if ok:
            for record in held:
                logging.getLogger(record.name).handle(record)


def prepare(opts: RunOptions, loggers: Sequence = (), callbacks: Sequence = ()) -> QSMLabCLI:
    """The model, datamodule and trainer of ``opts`` with every value checked and the datamodule's splits
    tried (unknown subjects fail here); writes nothing. Raises a one-line ConfigError."""
    with _held_logs():
        cli = QSMLabCLI(opts.config, run_dir=opts.run_dir, loggers=loggers, callbacks=callbacks, given=opts.given)
        if cli.datamodule is not None:
            # the splits are checked on a copy: the datamodule itself is set up by the trainer, once the
            # model is attached (a supervised method drops training rows without chi there)
            probe = copy.copy(cli.datamodule)
            try:
                probe.setup("fit" if opts.subcommand == "fit" else opts.subcommand)
                if opts.subcommand == "fit" and hasattr(probe, "check_fit"):
                    # the rows the model trains on and a patch larger than a training volume fail here,
                    # before the run folder exists
                    probe.check_fit(cli.model)
            except QSMInputError as e:
                raise config_error(e, flatten(opts.config), opts.given, section="data") from None
    return cli


def execute(opts: RunOptions) -> RunResult:
    """Run ``opts.subcommand`` of ``opts.config`` in ``opts.run_dir`` (see :class:`RunOptions`).

    Returns:
        :class:`RunResult`; exceptions (training errors, ``optuna.TrialPruned``) propagate after
        ``run_info.json`` and W&B have recorded them. A bad config raises before anything is written.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = Path(opts.run_dir)
    sub = opts.subcommand
    if sub not in SUBCOMMANDS:
        raise ValueError(f"subcommand {sub!r} is not one of {SUBCOMMANDS}")
    config, fallback = resolve_precision(opts.config, opts.given)
    if fallback is not None:  # a profile's bf16 on a machine that would emulate it (qsmlab.lab.precision)
        warnings.warn(fallback, PrecisionFallbackWarning, stacklevel=2)
        opts = dataclasses.replace(opts, config=config, record={**dict(opts.record), "precision_fallback": fallback})
    wkw = {"name": run_dir.name, "job_type": sub, **dict(opts.wandb_init)}
    lgs = make_loggers(run_dir, opts.loggers, wandb_kwargs=wkw)  # nothing written before the first log
    cbs = list(opts.callbacks)
    writer = None
    if sub == "predict":
        writer = NiftiPredictionWriter(opts.output_dir or run_dir / "predictions")
        cbs.append(writer)
    try:
        cli = prepare(opts, loggers=lgs, callbacks=cbs)
    except BaseException:
        finish_wandb(lgs, exit_code=1)
        raise
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "experiment.yaml").write_text(yaml.safe_dump(dict(opts.config), sort_keys=False))
    (run_dir / "config.yaml").write_text(cli.dump_config())
    manifest = getattr(cli.datamodule, "manifest", None)
    info = P.run_info(subcommand=sub, seed=cli.seed, manifest=manifest, experiment=opts.experiment,
                      profile=opts.profile, extra={"run_dir": str(run_dir.resolve()), "ckpt_path": opts.ckpt_path,
                                                   **dict(opts.record)})
    P.write_json(run_dir / "run_info.json", info)
    run = wandb_run(lgs)
    if run is not None:
        run.config.update({**flatten(opts.config), **dict(opts.record), "seed_everything": cli.seed,
                           "git_commit": info["git"]["commit"], "manifest_sha256": info["manifest_sha256"]},
                          allow_val_change=True)
    result = RunResult(run_dir=run_dir, status="running", seed=cli.seed)
    status, exit_code = "finished", 0
    try:
        t_fit, c_fit = time.perf_counter(), time.process_time()
        getattr(cli.trainer, sub)(cli.model, datamodule=cli.datamodule, ckpt_path=opts.ckpt_path)
        result.fit_seconds = time.perf_counter() - t_fit
        result.fit_cpu_seconds = time.process_time() - c_fit
        if sub == "fit" and opts.after_fit is not None:
            opts.after_fit(cli)
        result.metrics = _floats(cli.trainer.callback_metrics)
        if sub == "fit" and opts.save_predictions and cli.trainer.is_global_zero:
            pred = predict_first_val(cli.model, cli.datamodule, run_dir / "predictions")
            if pred is not None:
                result.predictions.extend(pred["paths"])
                info["prediction"] = {k: _jsonable(v) for k, v in pred.items()}
                if run is not None:
                    import wandb  # only when a W&B run exists (its import costs ~1 s)

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


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def load_chi(path: str | Path) -> np.ndarray:
    """A saved map as float32 (X, Y, Z) (ppm for chi)."""
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
