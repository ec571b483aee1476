"""Orthogonal mid-slices of a validation volume, logged as an image to whatever logger is attached.

The figure has one row per plane through the mask's centre (i-, j-, k-slices) and columns field (ppm),
prediction (ppm), reference and error (prediction - reference, ppm) when a reference exists. Prediction
and reference share one colour range (the reference's 1st-99th percentile in the mask), so contrast is
comparable. Rendered with matplotlib's Agg canvas (no pyplot, no display, thread-safe).

Loggers: anything with ``log_image`` (W&B, Neptune) gets an RGB array; TensorBoard gets ``add_image``;
a CSV logger gets a PNG under ``<log_dir>/images/``; other loggers are skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _centre(mask: np.ndarray | None, shape) -> tuple[int, int, int]:
    if mask is not None and mask.any():
        idx = np.argwhere(mask)
        return tuple(int(v) for v in np.round(idx.mean(axis=0)))
    return tuple(n // 2 for n in shape)


def _planes(vol: np.ndarray, c) -> list[np.ndarray]:
    # Transposed so that the second voxel axis is vertical, as radiological viewers show axial slices.
    return [vol[c[0], :, :].T, vol[:, c[1], :].T, vol[:, :, c[2]].T]


def slice_figure(field: np.ndarray, pred: np.ndarray, ref: np.ndarray | None = None,
                 mask: np.ndarray | None = None, title: str = ""):
    """A matplotlib ``Figure`` of the orthogonal mid-slices (arrays (X, Y, Z) in ppm)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = None if mask is None else np.asarray(mask) > 0.5
    c = _centre(m, field.shape)
    inside = (lambda a: a[m]) if m is not None and m.any() else (lambda a: a.ravel())
    cols = [("field (ppm)", field, "gray")]
    show = ref if ref is not None else pred
    lo, hi = np.percentile(inside(show), [1, 99]) if inside(show).size else (-0.1, 0.1)
    cols.append(("prediction (ppm)", pred, "gray"))
    if ref is not None:
        cols.append(("reference (ppm)", ref, "gray"))
        cols.append(("error (ppm)", (pred - ref) * (m if m is not None else 1), "RdBu_r"))
    fig = Figure(figsize=(3.0 * len(cols), 8.4), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, len(cols), squeeze=False)
    f_lim = np.percentile(np.abs(inside(field)), 99) if inside(field).size else 1.0
    e_lim = max(abs(lo), abs(hi)) * 0.5
    for j, (name, vol, cmap) in enumerate(cols):
        if name.startswith("field"):
            vmin, vmax = -f_lim, f_lim
        elif name.startswith("error"):
            vmin, vmax = -e_lim, e_lim
        else:
            vmin, vmax = lo, hi
        for i, sl in enumerate(_planes(np.asarray(vol, dtype=np.float32), c)):
            ax = axes[i, j]
            im = ax.imshow(sl, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=axes[:, j].tolist(), shrink=0.6)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def figure_to_rgb(fig) -> np.ndarray:
    """(H, W, 3) uint8 rendering of a figure."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def log_figure(loggers, fig, tag: str, step: int) -> list[str]:
    """Send ``fig`` to each logger; returns what was done (for tests and debugging)."""
    done = []
    rgb = None
    for lg in loggers or []:
        name = type(lg).__name__
        if hasattr(lg, "log_image"):  # W&B, Neptune, ...
            rgb = figure_to_rgb(fig) if rgb is None else rgb
            lg.log_image(key=tag, images=[rgb], step=step)
            done.append(name)
        elif hasattr(getattr(lg, "experiment", None), "add_image"):  # TensorBoard
            rgb = figure_to_rgb(fig) if rgb is None else rgb
            lg.experiment.add_image(tag, rgb, global_step=step, dataformats="HWC")
            done.append(name)
        elif getattr(lg, "log_dir", None):  # CSV and other file loggers
            out = Path(lg.log_dir) / "images" / f"{tag.replace('/', '_')}_step{step:07d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out)
            done.append(str(out))
    return done
