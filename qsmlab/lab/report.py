"""Sweep results: ``trials.csv``, ``report.md``, the objective-vs-parameter figure and the history.

``trials.csv`` (one row per trial: ``number, state, value, params.<key>..., val/<metric>..., seconds,
fit_seconds, last_intermediate, error, retry_of, run_dir``) is everything the figures and tables need, so
``qsmlab compare`` can rebuild them without Optuna or W&B.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qsmlab.lab.figures import history_figure, objective_vs_params


def trials_frame(study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        r: dict[str, Any] = {"number": t.number, "state": t.state.name, "value": t.value}
        r.update({f"params.{k}": v for k, v in t.params.items()})
        r.update(t.user_attrs.get("metrics", {}))
        r["seconds"] = t.user_attrs.get("seconds")
        r["fit_seconds"] = t.user_attrs.get("fit_seconds")
        r["cpu_seconds"] = t.user_attrs.get("cpu_seconds")
        r["fit_cpu_seconds"] = t.user_attrs.get("fit_cpu_seconds")
        r["wall_seconds"] = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        r["worker"] = t.user_attrs.get("qsmlab.worker")
        r["last_intermediate"] = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        r["error"] = t.user_attrs.get("error")
        r["retry_of"] = t.user_attrs.get("qsmlab.retry_of")
        r["seed_of"] = t.user_attrs.get("qsmlab.seed_of")
        r["seed_offset"] = t.user_attrs.get("qsmlab.seed")
        r["run_dir"] = t.user_attrs.get("run_dir")
        rows.append(r)
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    """A DataFrame as a GitHub Markdown table (no extra dependency)."""
    def cell(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else floatfmt.format(v)
        return "" if v is None else str(v).replace("|", "\\|")

    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _searched(frame: pd.DataFrame) -> pd.DataFrame:
    """Finished trials of the search itself (seed re-runs of the best trial left out)."""
    done = frame[frame["state"] == "COMPLETE"]
    return done[done["seed_of"].isna()] if "seed_of" in done else done


def _best(frame: pd.DataFrame, direction: str):
    done = _searched(frame)
    if not len(done):
        return None
    return done.loc[done["value"].idxmin() if direction == "minimize" else done["value"].idxmax()]


def interior(frame: pd.DataFrame, param: str, direction: str) -> bool | None:
    """Whether the best value of ``param`` has finished trials on both sides (the budget brackets it)."""
    best = _best(frame, direction)
    done = _searched(frame)
    col = f"params.{param}"
    if best is None or col not in done or not np.issubdtype(done[col].dtype, np.number):
        return None
    return bool((done[col] < best[col]).any() and (done[col] > best[col]).any())


def spread_and_seed_noise(frame: pd.DataFrame, param: str | None, direction: str) -> dict | None:
    """Is the optimum a real one? The objective's spread over the search's finished trials; per side of the
    best ``param`` value, the margins by which the best beats the finished trials there (``nearest``: the
    best of them, ``largest``: the worst of them; positive = the best is better); and the seed noise: the
    values of the best parameters over the best trial and its seed re-runs (sd and range).

    ``verdict``: ``"minimum"`` when on both sides some finished trial is worse than the best by more than
    the seed range (the objective rises out of the noise on both sides: the issue's test, "the best beats
    a finished trial at a smaller and one at a larger value"); ``"flat"`` when the whole spread is within
    the seed range; ``"edge"`` when no finished trial lies on one side; ``"within noise"`` otherwise;
    ``"no seed noise"`` without re-runs. ``resolved`` says whether the nearest neighbours are also beaten
    by more than the noise (else the optimum's position is only known to lie between them)."""
    best = _best(frame, direction)
    if best is None:
        return None
    done = _searched(frame)
    sign = 1.0 if direction == "minimize" else -1.0
    out: dict[str, Any] = {"spread": float(done["value"].max() - done["value"].min()), "n": int(len(done)),
                           "best": float(best["value"])}
    runs = frame[(frame["state"] == "COMPLETE") & (frame.get("seed_of") == best["number"])] \
        if "seed_of" in frame else frame.iloc[:0]
    vals = [float(best["value"])] + [float(v) for v in runs["value"]]
    out["seed_values"] = vals
    out["seed_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
    out["seed_range"] = float(max(vals) - min(vals)) if len(vals) > 1 else float("nan")
    col = f"params.{param}" if param else None
    margins: dict[str, dict | None] = {}
    if col and col in done and np.issubdtype(done[col].dtype, np.number):
        for side, sel in (("smaller", done[col] < best[col]), ("larger", done[col] > best[col])):
            m = sign * (done[sel]["value"] - best["value"])
            margins[side] = {"nearest": float(m.min()), "largest": float(m.max())} if len(m) else None
    out["margins"] = margins
    noise = out["seed_range"]
    out["resolved"] = bool(margins) and all(v is not None and v["nearest"] > noise for v in margins.values())
    if margins and any(v is None for v in margins.values()):
        out["verdict"] = "edge"
    elif not np.isfinite(noise):
        out["verdict"] = "no seed noise"
    elif out["spread"] <= noise:
        out["verdict"] = "flat"
    elif margins and all(v["largest"] > noise for v in margins.values()):
        out["verdict"] = "minimum"
    else:
        out["verdict"] = "within noise"
    return out


def spread_lines(sp: dict, param: str | None) -> list[str]:
    """The report's lines on :func:`spread_and_seed_noise`."""
    if not sp:
        return []
    lines = [f"- Objective spread over the {sp['n']} finished search trials: {sp['spread']:.3g} points."]
    if len(sp["seed_values"]) > 1:
        lines.append(f"- Seed noise: the best parameters over {len(sp['seed_values'])} seeds gave "
                     + ", ".join(f"{v:.4g}" for v in sp["seed_values"])
                     + f" (sd {sp['seed_sd']:.3g}, range {sp['seed_range']:.3g} points).")
    for side, v in sp["margins"].items():
        if v is not None:
            lines.append(f"- At a {side} `{param}` the finished trials are worse than the best by "
                         f"{v['nearest']:.3g} (nearest) to {v['largest']:.3g} points.")
    verdict = {
        "minimum": "a real minimum: on both sides the objective rises above the seed noise"
                   + ("." if sp.get("resolved") else "; the nearest trials are within it, so the optimum's "
                      "position is known to lie between them."),
        "flat": f"**flat**: the objective's whole spread is within the seed noise; `{param}` does not matter here.",
        "within noise": "**not resolved**: on one side no finished trial is worse than the best by more than the "
                        "seed noise.",
        "edge": "at the edge of the sampled values: no finished trial on one side.",
        "no seed noise": "no seed re-runs (`seed_reruns` in the sweep file): the spread cannot be set against "
                         "seed noise.",
    }[sp["verdict"]]
    lines.append(f"- Verdict: {verdict}")
    return lines


def write_report(study, spec, study_dir: Path) -> dict:
    """Write trials.csv, the two figures and report.md under ``study_dir``; return a summary dict."""
    study_dir = Path(study_dir)
    frame = trials_frame(study)
    frame.to_csv(study_dir / "trials.csv", index=False)
    (study_dir / "study.json").write_text(json.dumps(
        {"study": spec.study, "experiment": str(spec.experiment), "metric": spec.metric, "direction": spec.direction,
         "params": list(spec.search_space), "log_params": spec.log_params, "n_trials": spec.n_trials}, indent=2))
    params = list(spec.search_space)
    out: dict[str, Any] = {"trials": frame, "csv": study_dir / "trials.csv", "best": None,
                           "counts": frame["state"].value_counts().to_dict() if len(frame) else {}}
    if len(frame) and (frame["state"] == "COMPLETE").any():
        out["objective_figure"] = objective_vs_params(frame, params, spec.metric, study_dir / "objective_vs_params.png",
                                                      log_params=spec.log_params, direction=spec.direction)
        out["history_figure"] = history_figure(frame, spec.metric, study_dir / "history.png", spec.direction)
        out["best"] = _best(frame, spec.direction)
        out["interior"] = {p: interior(frame, p, spec.direction) for p in params}
        first = params[0] if len(params) == 1 else None
        out["spread"] = spread_and_seed_noise(frame, first, spec.direction)
    (study_dir / "report.md").write_text(report_markdown(out, spec))
    return out


def best_frame(rep: dict, spec) -> pd.DataFrame:
    b = rep["best"]
    rows = [("trial", str(int(b["number"])))]
    rows += [(p, f"{b[f'params.{p}']:.4g}" if isinstance(b[f"params.{p}"], float) else str(b[f"params.{p}"]))
             for p in spec.search_space]
    rows += [(k, f"{b[k]:.4g}") for k in rep["trials"].columns
             if k.startswith("val/") and k != "val/n_volumes" and pd.notna(b[k])]
    return pd.DataFrame(rows, columns=["", "best"])


def report_markdown(rep: dict, spec) -> str:
    frame = rep["trials"]
    counts = ", ".join(f"{n} {s.lower()}" for s, n in rep["counts"].items()) or "no trials"
    lines = [f"# Sweep `{spec.study}`", "",
             f"Experiment `{Path(spec.experiment).stem}` (profile `{spec.profile}`), objective `{spec.metric}` "
             f"({spec.direction}), sampler `{spec.sampler['name']}`, pruner `{spec.pruner['name']}`, "
             f"{len(frame)} trials ({counts}).", ""]
    if rep["best"] is not None:
        lines += ["## Best trial", "", markdown_table(best_frame(rep, spec)), ""]
        for p, inside in rep.get("interior", {}).items():
            if inside is not None:
                lines.append(f"- `{p}`: the optimum is {'interior (finished trials on both sides)' if inside else 'at the edge of the sampled range: widen the search or add trials'}.")
        lines += spread_lines(rep.get("spread"), next(iter(spec.search_space), None))
        lines += ["", "![objective vs parameters](objective_vs_params.png)", "", "![history](history.png)", ""]
    cols = ["number", "state", "value", "seed_of", "seed_offset"] + [f"params.{p}" for p in spec.search_space] + \
           [c for c in frame.columns if c.startswith("val/")] + ["wall_seconds", "cpu_seconds", "error"]
    if len(frame):
        lines += ["## All trials", "", markdown_table(frame[[c for c in cols if c in frame.columns]]), ""]
    return "\n".join(lines)


def print_best(rep: dict, spec) -> None:
    frame = rep["trials"]
    counts = ", ".join(f"{n} {s.lower()}" for s, n in rep["counts"].items()) or "no trials"
    print(f"[{spec.study}] {len(frame)} trials ({counts}); report: {rep['csv'].parent / 'report.md'}")
    if rep["best"] is None:
        print(f"[{spec.study}] no completed trial yet")
        return
    print(markdown_table(best_frame(rep, spec)))
    for p, inside in rep.get("interior", {}).items():
        if inside is not None:
            print(f"[{spec.study}] {p}: optimum {'interior' if inside else 'AT THE EDGE of the sampled values'}")
    for line in spread_lines(rep.get("spread"), next(iter(spec.search_space), None)):
        print(f"[{spec.study}] {line[2:]}")
