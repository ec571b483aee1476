"""``qsmlab compare``: tables and figures from run folders' CSV logs alone (no W&B, no Optuna needed).

Accepted folders (mixed freely):

- a run folder (``metrics.csv`` as :class:`qsmlab.lab.tracking.AppendingCSVLogger` writes it; optional
  ``run_info.json`` naming the experiment and the saved prediction): one table row with the last value of
  every ``val/*`` and ``test/*`` metric, the best ``val/nrmse`` and its step;
- a sweep folder (``trials.csv``): its trials table, the objective against each parameter and the
  history (redrawn from the CSV), and its best trial's run folder joins the runs table;
- a LOO folder (``loocv_table.csv``): its methods x metrics table is copied into the report;
- any other folder: the run folders below it.

Outputs in ``REPORT_DIR``: ``runs.csv``, ``report.md``, ``curves.png`` (validation NRMSE against step for
every run) and ``slices.png`` (the same orthogonal slices of every run's saved prediction next to the
reference, with error maps) when the runs saved predictions of a common scan.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from qsmlab.errors import QSMInputError
from qsmlab.lab.report import markdown_table

KEY_METRICS = ("val/psnr", "val/nrmse", "val/hfen", "val/ssim")


def _info(run: Path) -> dict:
    p = run / "run_info.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _label(run: Path, info: dict, taken: set[str]) -> str:
    base = info.get("experiment") or run.parent.name
    label = f"{base}/{run.name}" if base != run.name else run.name
    if "trial" in info:
        label = f"{info.get('study', base)}/trial-{info['trial']}"
    while label in taken:
        label += "'"
    taken.add(label)
    return label


def run_row(run: Path, label: str) -> dict:
    """One run's summary from its metrics.csv."""
    m = pd.read_csv(run / "metrics.csv")
    row = {"run": label, "folder": str(run)}
    row["steps"] = int(m["step"].max()) + 1 if "step" in m and len(m) else 0
    for c in m.columns:
        if c.startswith(("val/", "test/")):
            s = m[c].dropna()
            if len(s):
                row[c] = float(s.iloc[-1])
    if "val/nrmse" in m and m["val/nrmse"].notna().any():
        i = m["val/nrmse"].idxmin()
        row["best val/nrmse"] = float(m.loc[i, "val/nrmse"])
        row["best step"] = int(m.loc[i, "step"])
    return row


def collect(dirs: Sequence[str | Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """(run folders, sweep folders, LOO folders) named by or found under ``dirs``."""
    runs, sweeps, loos = [], [], []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise QSMInputError(f"compare: {d} is not a folder")
        if (d / "trials.csv").is_file():
            sweeps.append(d)
        elif (d / "loocv_table.csv").is_file():
            loos.append(d)
        elif (d / "metrics.csv").is_file():
            runs.append(d)
        else:
            found = sorted(p.parent for p in d.rglob("metrics.csv"))
            if not found:
                raise QSMInputError(f"compare: {d} holds no metrics.csv, trials.csv or loocv_table.csv")
            runs.extend(found)
    return runs, sweeps, loos


def _sweep_section(d: Path, out: Path, runs: list[Path]) -> list[str]:
    from qsmlab.lab.figures import history_figure, objective_vs_params

    t = pd.read_csv(d / "trials.csv")
    params = [c[len("params."):] for c in t.columns if c.startswith("params.")]
    done = t[t["state"] == "COMPLETE"]
    name = d.name
    lines = [f"## Sweep `{name}` ({len(t)} trials, {len(done)} complete)", ""]
    meta = json.loads((d / "study.json").read_text()) if (d / "study.json").is_file() else {}
    metric, direction = meta.get("metric", "objective"), meta.get("direction", "minimize")
    if len(done):
        # the sweep's log-scale parameters, else those whose sampled values span over two decades
        logp = meta.get("log_params") or [
            p for p in params if np.issubdtype(done[f"params.{p}"].dtype, np.number)
            and (done[f"params.{p}"] > 0).all() and done[f"params.{p}"].max() / done[f"params.{p}"].min() > 100]
        objective_vs_params(t, params, metric, out / f"{name}_objective_vs_params.png", log_params=logp,
                            direction=direction)
        history_figure(t, metric, out / f"{name}_history.png", direction)
        minimize = direction == "minimize"
        best = done.loc[done["value"].idxmin() if minimize else done["value"].idxmax()]
        if isinstance(best.get("run_dir"), str):
            rd = Path(best["run_dir"])
            rd = rd if rd.is_dir() else d / "trials" / rd.name  # the study folder may have moved
            if (rd / "metrics.csv").is_file():
                runs.append(rd)
        lines += [f"![{name} objective](" + f"{name}_objective_vs_params.png)", "",
                  f"![{name} history]({name}_history.png)", ""]
    cols = ["number", "state", "value"] + [f"params.{p}" for p in params] + [c for c in t.columns if c.startswith("val/")]
    lines += [markdown_table(t[[c for c in cols if c in t.columns]]), ""]
    return lines


def _slices(runs: list[Path], labels: dict[Path, str], out: Path) -> Path | None:
    """Side-by-side slices of the runs' saved predictions of one common scan (first found)."""
    from qsmlab.lab.figures import slice_figure
    from qsmlab.lab.run import load_chi
    from qsmlab.metrics import nrmse

    preds = {}
    for r in runs:
        p = _info(r).get("prediction") or {}
        path = Path(p["path"]) if p.get("path") else None
        if path is not None and not path.is_absolute():
            path = r / "predictions" / path.name
        if path is not None and path.is_file():
            preds[r] = (p.get("subject"), path, p.get("reference"), p.get("mask"))
    if not preds:
        return None
    subjects = [v[0] for v in preds.values()]
    common = max(set(subjects), key=subjects.count)
    sel = {r: v for r, v in preds.items() if v[0] == common}
    ref_path, mask_path = next((v[2], v[3]) for v in sel.values())
    ref = load_chi(ref_path) if ref_path and Path(ref_path).is_file() else None
    mask = load_chi(mask_path) > 0 if mask_path and Path(mask_path).is_file() else None
    maps = {labels[r]: load_chi(v[1]) for r, v in sel.items()}
    notes = {k: f"NRMSE {nrmse(v, ref, mask):.1f} %" for k, v in maps.items()} if ref is not None and mask is not None else {}
    return slice_figure(maps, out / "slices.png", reference=ref, mask=mask, title=f"scan {common}", annotations=notes)


def _curves(runs: list[Path], labels: dict[Path, str], out: Path, metric: str = "val/nrmse") -> Path | None:
    from qsmlab.lab.figures import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = 0
    for r in runs:
        m = pd.read_csv(r / "metrics.csv")
        if metric in m and m[metric].notna().any():
            s = m.dropna(subset=[metric])
            ax.plot(s["step"], s[metric], marker="o", ms=3, label=labels[r])
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    return out / "curves.png"


def compare(dirs: Sequence[str | Path], out: str | Path) -> pd.DataFrame:
    """Build the report (see the module docstring); returns the runs table."""
    out = Path(out)
    runs, sweeps, loos = collect(dirs)  # every input checked before the report folder exists
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# qsmlab comparison", "", "Built from the CSV logs of: " + ", ".join(f"`{d}`" for d in dirs), ""]
    sweep_lines: list[str] = []
    for d in sweeps:
        sweep_lines += _sweep_section(d, out, runs)
    runs = list(dict.fromkeys(r.resolve() for r in runs))
    taken: set[str] = set()
    labels = {r: _label(r, _info(r), taken) for r in runs}
    table = pd.DataFrame([run_row(r, labels[r]) for r in runs])
    if len(table):
        table.to_csv(out / "runs.csv", index=False)
        shown = ["run", "steps"] + [c for c in KEY_METRICS if c in table] + \
                [c for c in table.columns if c.startswith("test/") and c.split("/")[1] in ("psnr", "nrmse", "hfen", "ssim")] + \
                [c for c in ("best val/nrmse", "best step") if c in table]
        lines += ["## Runs (last validation; best val/nrmse over the run)", "", markdown_table(table[shown]), ""]
        if _curves(runs, labels, out):
            lines += ["![validation curves](curves.png)", ""]
        if _slices(runs, labels, out):
            lines += ["![slices](slices.png)", ""]
    lines += sweep_lines
    for d in loos:
        t = pd.read_csv(d / "loocv_table.csv")
        lines += [f"## Leave-one-out `{d.name}`", "", markdown_table(t), ""]
    (out / "report.md").write_text("\n".join(lines))
    return table
