"""``qsmlab loocv``: leave-one-subject-out cross-validation of an experiment, with classical baselines.

One fold per held-out subject (:func:`qsmlab.data.folds.loso_folds`: every scan of a subject in one fold,
synthetic subjects always train). Per fold, in ``<out>/folds/<fold>/``:

- the experiment trains on the fold's training subjects (``train/``: a normal run folder with its CSV log,
  checkpoints and a W&B run in group ``loocv-<experiment>``, name ``fold-<subject>``);
- the trained model predicts every held-out scan on its full volume (``pred/<scan>_chi.nii.gz``), and TKD
  and TV (alpha tuned on the fold's training subjects only, :mod:`qsmlab.lab.baselines`) invert the same
  field; all are scored by :func:`qsmlab.metrics.compute_all` inside the mask against the scan's chi;
- ``result.csv`` (method x metrics for the fold) is written last: a fold with it is finished and a rerun
  skips it, so a killed batch or a cluster array job (``--fold i``) resumes where it stopped.

Then ``<out>/loocv_folds.csv`` (every fold, method, metric), ``loocv_table.csv`` / ``.md`` (methods x
PSNR/NRMSE/HFEN/SSIM, mean +- sd over folds, as Table 1 of the uQSM paper) and ``loocv_box.png``.
``--workers N`` runs folds as N local processes (threads per process = cores // N).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qsmlab.errors import QSMInputError
from qsmlab.lab import config as C

TABLE_METRICS = ("psnr", "nrmse", "hfen", "ssim")
NO_REFERENCE_METRICS = ("dc", "nrmse_vs_classical", "corr_vs_classical")
"""Scores of every held-out scan, the only ones of a scan without a reference chi (never a fake PSNR):
``dc`` = 100 ||M (A chi - f)|| / ||M f|| (%, data consistency with the scan's own local field), and the
NRMSE (%) and Pearson correlation inside the mask against the classical default (the pipeline's TV with
alpha by the discrepancy principle, :func:`classical_default`)."""


def best_params(spec: str, storage: str | None = None) -> dict[str, Any]:
    """``best-of:STUDY`` -> the best trial's parameters of that study (journal under runs/STUDY, or ``storage``)."""
    import optuna

    from qsmlab.lab.storage import journal_path, open_storage

    if not spec.startswith("best-of:"):
        raise QSMInputError(f"--params {spec!r}: expected best-of:STUDY (e.g. best-of:uqsm_tv)")
    name = spec.split(":", 1)[1]
    sdir = C.RUNS_DIR / name
    jp = journal_path(sdir, storage)
    if jp is not None and not jp.is_file():
        raise QSMInputError(f"--params {spec}: no study journal at {jp} (run the sweep first, or give --storage)")
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage, sdir))
        return dict(study.best_trial.params)
    except KeyError:
        raise QSMInputError(f"--params {spec}: no study named {name!r} in that storage") from None
    except ValueError:
        raise QSMInputError(f"--params {spec}: study {name!r} has no completed trial yet") from None


def plan(experiment: str, manifest: str, *, profile: str | None, overrides: Sequence[tuple[str, Any]],
         out: Path) -> tuple[dict, list, Path]:
    """Resolved config, the LOSO folds and the folds file; every input check happens here."""
    from qsmlab.data.folds import loso_folds, write_folds
    from qsmlab.data.manifest import load_manifest

    cfg = C.load_experiment(experiment, profile)
    for k, v in overrides:
        try:
            C.set_dotted(cfg, k, v, create=True)
        except QSMInputError as e:
            raise QSMInputError(f"--{k}: {e}") from None
    C.set_dotted(cfg, "data.manifest", str(manifest))
    C.resolve_manifest(cfg)
    table = load_manifest(C.get_dotted(cfg, "data.manifest"))
    if len(table.subjects) < 2:
        raise QSMInputError(f"--manifest {manifest}: leave-one-out needs at least 2 subjects, found "
                            f"{len(table.subjects)} ({', '.join(table.subjects)})")
    folds = loso_folds(table)  # in-vivo subjects are held out; synthetic rows always train
    # A held-out scan without a reference chi (an in-vivo scan from qsmlab bids) is scored by data
    # consistency and agreement with the classical default instead (:func:`score_without_reference`).
    data = cfg["data"].get("init_args", cfg["data"])
    for k in ("train_subjects", "val_subjects", "test_subjects"):
        data.pop(k, None)  # the folds file decides the splits
    _check_classes(cfg, dict(overrides), out)
    out.mkdir(parents=True, exist_ok=True)
    folds_file = write_folds(out / "folds.json", folds, table)
    C.set_dotted(cfg, "data.folds", str(folds_file.resolve()), create=True)
    return cfg, folds, folds_file


def classical_default(scan) -> np.ndarray:
    """The pipeline's default inversion on the scan's local field: TV, alpha ``auto`` (qsmlab.recon)."""
    import warnings

    from qsmlab.recon import registry
    from qsmlab.recon.pipeline import DEFAULT_INVERSION

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return registry.get("inversion", DEFAULT_INVERSION)(
            scan.field, scan.mask, voxel_size=scan.voxel_size, b0_dir=scan.b0_dir, magnitude=scan.magnitude,
            quiet=True)


def score_without_reference(scan, maps: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per method: data consistency ``dc`` (%) and agreement with :func:`classical_default` (see
    :data:`NO_REFERENCE_METRICS`); maps are chi (ppm) on the scan's grid."""
    from qsmlab.metrics import nrmse
    from qsmlab.physics import DipoleOperator

    m = scan.mask
    op = DipoleOperator(voxel_size=scan.voxel_size, b0_dir=scan.b0_dir, pad_factor=2.0)
    f = scan.field * m
    ref = classical_default(scan)
    out = {}
    for name, chi in maps.items():
        r = (op.A(chi * m) - f) * m
        a, b = chi[m] - chi[m].mean(), ref[m] - ref[m].mean()
        out[name] = {"dc": float(100 * np.linalg.norm(r) / max(np.linalg.norm(f), 1e-30)),
                     "nrmse_vs_classical": float(nrmse(chi, ref, m)),
                     "corr_vs_classical": float((a * b).sum() / max(np.sqrt((a**2).sum() * (b**2).sum()), 1e-30))}
    return out


def _check_classes(cfg: dict, given: dict, out: Path) -> None:
    """Build the fold config's model, datamodule and trainer once (nothing written): a bad value fails
    here, in one line naming the option, not in every fold."""
    from qsmlab.lab.config_errors import ConfigError
    from qsmlab.lab.run import RunOptions, prepare

    try:
        prepare(RunOptions("fit", cfg, out / "check", given=given))
    except ConfigError as e:
        raise QSMInputError(e.shown(f"--{e.key}") if e.key in given else str(e)) from None


def _held_out_predictions(fold_dir: Path, exp_name: str):
    """``after_fit`` hook: predict every held-out scan with the trained model, score it, save the map."""
    def hook(cli) -> None:
        import torch
        from lightning.fabric.utilities.apply_func import move_data_to_device

        from qsmlab.data.nifti import save_nifti
        from qsmlab.lab.run import chi_of
        from qsmlab.metrics import compute_all

        model, dm = cli.model, cli.datamodule
        model.eval()
        rows = []
        with torch.no_grad():
            for batch in dm.test_dataloader():
                chi = chi_of(model.predict_step(move_data_to_device(batch, model.device), 0))[0, 0].float().cpu().numpy()
                key = batch.key[0]
                save_nifti(fold_dir / "pred" / f"{key.replace('/', '_')}_chi.nii.gz", chi, affine=batch.affine[0].numpy())
                ref = batch.get("chi")
                m = compute_all(chi, ref[0, 0].numpy(), batch.mask[0, 0].numpy() > 0) if ref is not None else {}
                rows.append({"scan": key, "method": exp_name, **m})
        pd.DataFrame(rows).to_csv(fold_dir / "learned.csv", index=False)
    return hook


def run_fold(cfg: dict, fold, index: int, out: Path, exp_name: str, *, loggers: Sequence[str] = ("wandb", "csv"),
             profile: str | None = None, tv_alphas: Sequence[float] | None = None) -> pd.DataFrame:
    """Train + score one fold (skipped when ``result.csv`` exists); returns the fold's result rows."""
    from qsmlab.data.manifest import load_manifest
    from qsmlab.lab import baselines as B
    from qsmlab.lab.run import RunOptions, execute
    from qsmlab.metrics import compute_all

    fold_dir = out / "folds" / fold.name
    result = fold_dir / "result.csv"
    if result.is_file():
        return pd.read_csv(result)
    fcfg = copy.deepcopy(cfg)
    C.set_dotted(fcfg, "data.fold", fold.name, create=True)
    held = ",".join(fold.test)
    execute(RunOptions(
        "fit", fcfg, fold_dir / "train", experiment=exp_name, profile=profile, loggers=loggers,
        after_fit=_held_out_predictions(fold_dir, exp_name), save_predictions=False,
        wandb_init={"group": f"loocv-{exp_name}", "name": f"fold-{held}", "job_type": "loocv"},
        record={"fold": fold.name, "fold_index": index, "held_out": fold.test}))
    learned = pd.read_csv(fold_dir / "learned.csv")
    table = load_manifest(C.get_dotted(cfg, "data.manifest"))
    grid = B.TVGrid(out / "tv_grid.csv", tv_alphas or B.TV_ALPHAS)
    train_scans = [B.load_scan(r) for r in table.select(fold.train)]
    alpha, _ = grid.best_alpha(train_scans)
    rows = []
    for r in table.select(fold.test):
        scan = B.load_scan(r)
        if scan.chi is not None:
            rows.append({"scan": scan.key, "method": "TKD", **compute_all(B.tkd(scan), scan.chi, scan.mask)})
            rows.append({"scan": scan.key, "method": "TV", "tv_alpha": alpha, **grid.metrics(scan, alpha)})
            continue
        # no reference chi: data consistency and agreement with the classical default, never a fake score
        maps = {"TKD": B.tkd(scan), "TV": B.tv(scan, alpha)}
        pred = fold_dir / "pred" / f"{scan.key.replace('/', '_')}_chi.nii.gz"
        if pred.is_file():
            from qsmlab.data.nifti import load_nifti

            maps[exp_name] = load_nifti(pred, np.float32).data
        extra = score_without_reference(scan, maps)
        rows += [{"scan": scan.key, "method": "TKD", **extra["TKD"]},
                 {"scan": scan.key, "method": "TV", "tv_alpha": alpha, **extra["TV"]}]
        for k, v in extra.get(exp_name, {}).items():
            learned.loc[learned["scan"] == scan.key, k] = v
    frame = pd.concat([learned, pd.DataFrame(rows)], ignore_index=True)
    frame.insert(0, "fold", fold.name)
    frame.insert(1, "subject", held)
    from qsmlab.data.nifti import atomic_write_text

    atomic_write_text(result, frame.to_csv(index=False))  # last: marks the fold finished
    return frame


def aggregate(frames: Sequence[pd.DataFrame], out: Path, metrics: Sequence[str] = TABLE_METRICS) -> pd.DataFrame:
    """Per-fold CSV, methods x metrics mean +- sd (CSV + Markdown) and a box plot."""
    from qsmlab.lab.figures import box_plot
    from qsmlab.lab.report import markdown_table

    allf = pd.concat(frames, ignore_index=True)
    allf.to_csv(out / "loocv_folds.csv", index=False)
    # Only scores that exist: held-out scans without a reference chi have no PSNR/NRMSE/HFEN/SSIM
    metrics = [k for k in metrics if k in allf and allf[k].notna().any()]
    metrics += [k for k in NO_REFERENCE_METRICS if k in allf and allf[k].notna().any() and k not in metrics]
    # one value per fold and method (mean over the held-out subject's scans)
    per_fold = allf.groupby(["fold", "method"], sort=False)[list(metrics)].mean().reset_index()
    methods = list(dict.fromkeys(per_fold["method"]))
    rows = []
    for m in methods:
        sub = per_fold[per_fold["method"] == m]
        r = {"method": m, "folds": len(sub)}
        for k in metrics:
            r[f"{k}_mean"] = float(sub[k].mean())
            r[f"{k}_sd"] = float(sub[k].std(ddof=1)) if len(sub) > 1 else float("nan")
        rows.append(r)
    table = pd.DataFrame(rows)
    table.to_csv(out / "loocv_table.csv", index=False)
    shown = pd.DataFrame({"method": table["method"], "folds": table["folds"],
                          **{k.upper(): [f"{a:.3g} ± {b:.2g}" for a, b in zip(table[f"{k}_mean"], table[f"{k}_sd"])]
                             for k in metrics}})
    units = {"psnr": "dB", "nrmse": "%", "hfen": "%", "ssim": "", "dc": "%", "nrmse_vs_classical": "%",
             "corr_vs_classical": ""}
    md = ["# Leave-one-subject-out", "", f"{len(set(allf['fold']))} folds; mean ± sd over folds, full held-out "
          "volumes inside the mask (" + ", ".join(f"{k.upper()} {u}".strip() for k, u in units.items() if k in metrics)
          + ").", "", markdown_table(shown), "", "![box plot](loocv_box.png)", ""]
    (out / "loocv_table.md").write_text("\n".join(md))
    box_plot(per_fold, list(metrics), out / "loocv_box.png")
    return shown


def run_loocv(experiment: str, manifest: str, *, profile: str | None = None, params: str | None = None,
              storage: str | None = None, workers: int = 1, fold: int | None = None,
              overrides: Sequence[tuple[str, Any]] = (), out: str | Path | None = None,
              loggers: Sequence[str] = ("wandb", "csv"), tv_alphas: Sequence[float] | None = None,
              quiet: bool = False) -> pd.DataFrame | None:
    """``qsmlab loocv``: see the module docstring. Returns the aggregated table (None if no fold is done)."""
    from qsmlab.lab.sweep import threads_per_worker

    exp_name = C.experiment_path(experiment).stem
    if profile is None and C.DEFAULT_PROFILE in C.profiles_of(experiment):
        profile = C.DEFAULT_PROFILE
    ov = list(overrides)
    if params:
        ov = list(best_params(params, storage).items()) + ov
    out = Path(out) if out else C.RUNS_DIR / f"loocv-{exp_name}"
    if workers < 1:
        raise QSMInputError(f"--workers: expected a positive integer, got {workers}")
    cfg, folds, _ = plan(experiment, manifest, profile=profile, overrides=ov, out=out)
    if fold is not None and not 0 <= fold < len(folds):
        raise QSMInputError(f"--fold {fold}: out of range; {manifest} has {len(folds)} folds (0..{len(folds) - 1})")
    todo = [fold] if fold is not None else list(range(len(folds)))
    pending = [i for i in todo if not (out / "folds" / folds[i].name / "result.csv").is_file()]
    if not quiet:
        print(f"[loocv {exp_name}] {len(folds)} folds, {len(todo) - len(pending)} already done, running "
              f"{len(pending)} with {min(workers, max(1, len(pending)))} worker(s); output {out}", flush=True)
    if workers > 1 and len(pending) > 1:
        _spawn(experiment, manifest, pending, workers, profile, params, storage, ov, out, loggers, tv_alphas)
    else:
        import torch

        torch.set_num_threads(threads_per_worker(1))
        for i in pending:
            t0 = time.time()
            fr = run_fold(cfg, folds[i], i, out, exp_name, loggers=loggers, profile=profile, tv_alphas=tv_alphas)
            if not quiet:
                k = "nrmse" if "nrmse" in fr and fr["nrmse"].notna().any() else "dc"
                nr = fr.groupby("method", sort=False)[k].mean()
                print(f"[loocv {exp_name}] fold {i} ({folds[i].name}) done in {time.time() - t0:.0f} s: "
                      f"{'NRMSE' if k == 'nrmse' else 'data consistency'} "
                      + ", ".join(f"{m} {v:.1f} %" for m, v in nr.items()), flush=True)
    frames = [pd.read_csv(p) for f in folds if (p := out / "folds" / f.name / "result.csv").is_file()]
    if not frames:
        return None
    shown = aggregate(frames, out)
    if not quiet:
        from qsmlab.lab.report import markdown_table

        print(f"[loocv {exp_name}] {len(frames)}/{len(folds)} folds; table: {out / 'loocv_table.md'}")
        print(markdown_table(shown))
    return shown


def _spawn(experiment, manifest, pending, workers, profile, params, storage, overrides, out, loggers,
           tv_alphas) -> None:
    """Run pending folds as ``qsmlab loocv ... --fold i`` processes, ``workers`` at a time."""
    from qsmlab.lab.sweep import threads_per_worker

    threads = threads_per_worker(workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    base = [sys.executable, "-m", "qsmlab.cli", "loocv", str(experiment), "--manifest", str(manifest), "--out", str(out),
            "--loggers", ",".join(loggers) or "none"]
    if profile:
        base += ["--profile", profile]
    if storage:
        base += ["--storage", storage]
    if tv_alphas:
        base += ["--tv-alphas", ",".join(repr(float(a)) for a in tv_alphas)]
    for k, v in overrides:  # best-of params are already resolved into overrides
        base += [f"--{k}", str(v)]
    queue, running, failed = list(pending), [], []
    while queue or running:
        while queue and len(running) < workers:
            i = queue.pop(0)
            running.append((i, subprocess.Popen(base + ["--fold", str(i), "--quiet"], env=env)))
        time.sleep(0.5)
        for i, p in list(running):
            if p.poll() is not None:
                running.remove((i, p))
                if p.returncode != 0:
                    failed.append(i)
    if failed:
        raise RuntimeError(f"loocv folds {failed} failed; rerun to retry them (finished folds are kept)")


def numeric_overrides(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, Any]]:
    return [(k, C.parse_scalar(v)) for k, v in pairs]

