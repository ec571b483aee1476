"""Figures of the platform: orthogonal chi slices side by side, objective vs parameters, history.

Matplotlib with the Agg backend (no display needed); every function writes a PNG and returns its path.
Slices: the three central orthogonal planes through the mask's centre of mass, chi on a common
window (ppm) for every method, errors (method - reference, ppm) on a symmetric window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _centre(mask: np.ndarray | None, shape) -> tuple[int, int, int]:
    if mask is None or not np.any(mask):
        return tuple(s // 2 for s in shape)
    idx = np.argwhere(mask > 0)
    return tuple(int(round(v)) for v in idx.mean(axis=0))


def _planes(vol: np.ndarray, c) -> list[np.ndarray]:
    # rot90 so that the second voxel axis points up in the sagittal/coronal views
    return [np.rot90(vol[c[0], :, :]), np.rot90(vol[:, c[1], :]), np.rot90(vol[:, :, c[2]])]


def slice_figure(maps: Mapping[str, np.ndarray], path: str | Path, *, reference: np.ndarray | None = None,
                 mask: np.ndarray | None = None, window: float | None = None, title: str = "",
                 annotations: Mapping[str, str] | None = None) -> Path:
    """One column per map (plus the reference), rows = 3 orthogonal planes; with a reference, 3 more
    rows of errors (map - reference). ``window``: chi display range +-window ppm (default: the
    reference's 99th percentile of |chi| in the mask)."""
    plt = _plt()
    names = list(maps)
    cols = ([("reference", reference)] if reference is not None else []) + [(n, maps[n]) for n in names]
    shape = cols[0][1].shape
    m = mask if mask is not None else np.ones(shape, bool)
    c = _centre(mask, shape)
    if window is None:
        src = reference if reference is not None else cols[0][1]
        vals = np.abs(src[m > 0]) if np.any(m) else np.abs(src)
        window = float(np.percentile(vals, 99)) or 0.1
    rows = 3 + (3 if reference is not None else 0)
    fig, axes = plt.subplots(rows, len(cols), figsize=(2.3 * len(cols), 2.1 * rows), squeeze=False)
    for j, (name, vol) in enumerate(cols):
        v = np.where(m > 0, vol, 0.0)
        for i, plane in enumerate(_planes(v, c)):
            im = axes[i, j].imshow(plane, cmap="gray", vmin=-window, vmax=window)
        label = name + (f"\n{annotations[name]}" if annotations and name in annotations else "")
        axes[0, j].set_title(label, fontsize=8)
        if reference is not None and j > 0:
            err = np.where(m > 0, vol - reference, 0.0)
            for i, plane in enumerate(_planes(err, c)):
                em = axes[3 + i, j].imshow(plane, cmap="RdBu_r", vmin=-window / 2, vmax=window / 2)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("chi (ppm)", fontsize=8)
    if reference is not None:
        for i in range(3):  # the reference has no error map: its column's error rows stay empty
            axes[3 + i, 0].axis("off")
        axes[3, 1].set_ylabel("error (ppm)", fontsize=8)
        fig.colorbar(em, ax=axes[3:, :].ravel().tolist(), shrink=0.6, label="ppm")
    fig.colorbar(im, ax=axes[:3, :].ravel().tolist(), shrink=0.6, label="ppm")
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def objective_vs_params(trials, params: Sequence[str], objective: str, path: str | Path,
                        log_params: Sequence[str] = (), direction: str = "minimize") -> Path:
    """Objective of each finished trial against each searched parameter (log axis for log-scale
    parameters); the best trial is circled. ``trials``: a DataFrame with ``value``, ``state`` and one
    ``params.<name>`` column per parameter (as :func:`qsmlab.lab.report.trials_frame` writes)."""
    plt = _plt()
    done = trials[trials["state"] == "COMPLETE"]
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.4), squeeze=False)
    best = None
    if len(done):
        best = done.loc[done["value"].idxmin() if direction == "minimize" else done["value"].idxmax()]
    for ax, p in zip(axes[0], params):
        col = f"params.{p}"
        x = done[col]
        numeric = np.issubdtype(np.asarray(x).dtype, np.number)
        xs = x if numeric else x.astype(str)
        ax.scatter(xs, done["value"], c=done["number"], cmap="viridis", s=28)
        pruned = trials[trials["state"] == "PRUNED"]
        if len(pruned) and "last_intermediate" in pruned:
            px = pruned[col] if numeric else pruned[col].astype(str)
            ax.scatter(px, pruned["last_intermediate"], marker="x", c="grey", s=24, label="pruned (last value)")
            ax.legend(fontsize=7)
        if best is not None:
            bx = best[col] if numeric else str(best[col])
            ax.scatter([bx], [best["value"]], s=140, facecolors="none", edgecolors="red", label="best")
        if p in log_params:
            ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def history_figure(trials, objective: str, path: str | Path, direction: str = "minimize") -> Path:
    """Objective per trial number and the best so far (Optuna's optimisation history)."""
    plt = _plt()
    done = trials[trials["state"] == "COMPLETE"].sort_values("number")
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.scatter(done["number"], done["value"], s=22, label="trial")
    if len(done):
        best = done["value"].cummin() if direction == "minimize" else done["value"].cummax()
        ax.step(done["number"], best, where="post", color="red", label="best so far")
    for state, marker in (("PRUNED", "x"), ("FAIL", "v")):
        n = trials[trials["state"] == state]["number"]
        if len(n) and len(done):
            ax.scatter(n, [done["value"].max()] * len(n), marker=marker, color="grey", s=24, label=state.lower())
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def box_plot(frame, metrics: Sequence[str], path: str | Path, method_col: str = "method") -> Path:
    """One panel per metric, one box per method (values: one per fold)."""
    plt = _plt()
    methods = list(dict.fromkeys(frame[method_col]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        data = [frame[frame[method_col] == meth][m].dropna().to_numpy() for meth in methods]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
