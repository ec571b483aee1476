"""Speed and memory of the learned methods on CPU: training throughput, full-volume inference, peak RSS.

Per method, with the network of its experiment's ``quick`` profile (``--profile full`` for the paper
sizes) and ``--threads`` torch threads (2 by default, the target machine):

- training throughput: optimiser steps (forward, loss, backward, AdamW) on batches of two 64^3 patches
  of a synthetic head (random smooth chi in an ellipsoid, its dipole field, magnitude, total field and
  labels), in patches per second; UNETR-based methods get a 64^3 ``img_size`` here (their patch size
  must equal it) with the quick widths;
- full-volume inference at 160^3 (1 mm, B0 along k): ``qsmlab.methods.predict.predict_volume`` as
  ``qsmlab predict`` runs it (padding, or sliding windows for UNETR / volumes above the base's
  ``max_inference_voxels``), seconds for one call after a 32^3 warm-up; target <= 10 s (QSM-CI's CPU
  containers: 103 s for QSMnet, 181 s for NeXtQSM);
- peak resident memory of that inference at 160^3 and 256^3, each in a fresh subprocess
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child at exit: imports + model + inference);
  target <= 4 GB.

uQSM-DIP has no inference step (it fits each volume: its cost is iterations x a training step of the
whole volume), so it is not in the inference columns. Prints a markdown table and writes
``OUT/bench_methods.{md,json}``; asserts nothing.

    python benchmarks/bench_methods.py [--methods nextqsm,pedqnet] [--threads 2] [--sizes 160,256] [--bf16]

``--baseline DIR`` (a checkout of another commit, e.g. ``git worktree add /tmp/old <rev>``) times full-volume
inference of this tree and of DIR side by side instead: fresh processes, alternated (this, DIR, this, ...)
``--repeat`` times per method at the first size, each tree with its own code and experiments; prints the
median seconds of each and their ratio (``OUT/bench_methods_vs_baseline.md``).

    python benchmarks/bench_methods.py --baseline /tmp/old --sizes 96 --repeat 3
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

METHODS = ("uqsm_tv", "qsmnet", "nextqsm", "pedqnet", "brainmask")
TARGET_S, TARGET_GB = 10.0, 4.0


def build(name: str, profile: str, unetr_size: int | None = None):
    """The method of ``experiments/<name>.yaml`` (profile), with 1 mm axial-B0 statistics set."""
    from qsmlab.lab.config import load_experiment

    spec = load_experiment(name, profile)["model"]
    module, _, cls = spec["class_path"].rpartition(".")
    args = dict(spec.get("init_args") or {})
    klass = getattr(importlib.import_module(module), cls)
    if unetr_size:  # UNETR's fixed input size must equal the training patch
        accepted = inspect.signature(klass).parameters
        args.update({k: unetr_size for k in ("seg_img_size", "img_size") if k in accepted})
    args["log_images"] = False
    model = klass(**args)
    model.set_statistics(0.01, (0.0, 0.0, 1.0), (1.0, 1.0, 1.0))
    if hasattr(model, "total_field_scale"):
        model.total_field_scale.fill_(0.4)
    return model


def head(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A synthetic n^3 head at 1 mm: smooth chi (ppm) in an ellipsoid mask, its local field, etc."""
    from scipy import ndimage

    from qsmlab.physics import DipoleOperator

    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32)] * 3, indexing="ij")
    mask = ((g[0] / 0.8) ** 2 + (g[1] / 0.9) ** 2 + (g[2] / 0.75) ** 2 <= 1.0).astype(np.float32)
    chi = ndimage.gaussian_filter(rng.normal(0, 1, (n,) * 3).astype(np.float32), 2.0)
    chi *= 0.05 / chi.std() * mask
    field = DipoleOperator((1.0, 1.0, 1.0), (0.0, 0.0, 1.0)).A(chi) * mask
    seg = np.zeros((n,) * 3, np.float32)
    seg[mask > 0] = 3
    seg[(np.abs(g[0]) < 0.2) & (np.abs(g[1]) < 0.2) & (np.abs(g[2]) < 0.2)] = 4  # a "caudate" block
    return {"chi": chi, "mask": mask, "field": field.astype(np.float32), "magnitude": 0.3 + 0.7 * mask,
            "total_field": (field + 0.5 * g[2] * g[2] + 0.2 * g[0]).astype(np.float32), "seg": seg}


def train_throughput(name: str, profile: str, steps: int, batch: int = 2, patch: int = 64,
                     bf16: bool = False) -> float:
    """Patches per second; ``bf16``: forward and loss under ``torch.autocast("cpu", torch.bfloat16)``, as
    Lightning's ``precision: bf16-mixed`` runs a training step (float32 weights and optimiser)."""
    import contextlib

    import torch

    from qsmlab.data.collate import QSMBatch

    model = build(name, profile, unetr_size=patch)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vols = [head(patch, seed=i) for i in range(batch)]
    t = lambda k, dt=torch.float32: torch.from_numpy(np.stack([v[k] for v in vols]))[:, None].to(dt)  # noqa: E731
    b = QSMBatch(field=t("field"), mask=t("mask"), b0_dir=torch.tensor([[0.0, 0.0, 1.0]] * batch),
                 voxel_size=torch.ones(batch, 3), phase_scale=torch.full((batch,), 3.2),
                 affine=torch.eye(4, dtype=torch.float64).repeat(batch, 1, 1), chi=t("chi"),
                 magnitude=t("magnitude"), total_field=t("total_field"), seg=t("seg", torch.long), key=["x"] * batch)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model.training_step(b, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step builds kernels and allocator pools
            times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def child(name: str, profile: str, n: int) -> dict:
    """Inference at n^3 in this (fresh) process: seconds and peak RSS."""
    import torch

    from qsmlab.methods.predict import predict_volume

    model = build(name, profile).eval()
    small = head(32)
    args = lambda v: dict(magnitude=v["magnitude"], total_field=v["total_field"] if name == "nextqsm" else None)  # noqa: E731
    predict_volume(model, small["field"], small["mask"], (1, 1, 1), (0, 0, 1), **args(small))  # warm-up
    vol = head(n)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = predict_volume(model, vol["field"], vol["mask"], (1, 1, 1), (0, 0, 1), **args(vol))
    sec = time.perf_counter() - t0
    assert out.shape == (n,) * 3 and np.all(np.isfinite(out))
    return {"seconds": sec, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def run_child(name: str, profile: str, n: int, threads: int, tree: Path | None = None) -> dict:
    """Inference in a fresh process of this tree, or of the checkout ``tree`` (its own script and package)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    script = Path(__file__).resolve()
    if tree is not None:
        script = Path(tree).resolve() / "benchmarks" / script.name
        env["PYTHONPATH"] = str(Path(tree).resolve())
    cmd = [sys.executable, str(script), "--child", name, str(n), "--profile", profile, "--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(script.parents[1]))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def versus_baseline(methods: list[str], profile: str, n: int, threads: int, baseline: Path, repeat: int,
                    out: Path) -> None:
    """Inference seconds of this tree and of ``baseline`` side by side (alternated fresh processes)."""
    here = Path(__file__).resolve().parents[1]  # each child imports the package of its own tree
    lines = [f"# Inference at {n}^3, this tree vs {baseline} ({threads} threads, {profile} profile networks, "
             f"median of {repeat} alternated runs)", "", "| method | this (s) | baseline (s) | this / baseline |",
             "|---|---|---|---|"]
    for name in methods:
        ours, theirs = [], []
        for _ in range(repeat):
            ours.append(run_child(name, profile, n, threads, here).get("seconds", float("nan")))
            theirs.append(run_child(name, profile, n, threads, baseline).get("seconds", float("nan")))
        a, b = float(np.median(ours)), float(np.median(theirs))
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.3f} |")
        print(lines[-1], flush=True)
    load = os.getloadavg()
    lines += ["", f"Load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min), "
              f"{os.cpu_count()} CPUs: on a shared machine both columns are upper bounds; the runs alternate, "
              "so the ratio is fairer than either column."]
    text = "\n".join(lines)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_methods_vs_baseline.md").write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--profile", default="quick", choices=("quick", "full"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    ap.add_argument("--bf16", action="store_true",
                    help="also time training steps in bf16 mixed precision (column train_bf16_patches_per_s and "
                         "the ratio bf16_speedup; bf16 is fast on CPUs with AVX512-BF16 or AMX, emulated and slow elsewhere)")
    ap.add_argument("--sizes", default="160,256", help="inference grid edges (the first is the timed target)")
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--baseline", type=Path, help="another checkout: time inference of both trees side by side")
    ap.add_argument("--repeat", type=int, default=3, help="alternated runs per tree with --baseline")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    if a.child:
        print(json.dumps(child(a.child[0], a.profile, int(a.child[1]))))
        return
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if a.baseline:
        versus_baseline([m for m in a.methods.split(",") if m], a.profile, sizes[0], a.threads, a.baseline, a.repeat,
                        a.out)
        return
    rows = []
    for name in [m for m in a.methods.split(",") if m]:
        t0 = time.perf_counter()
        row = {"method": name, "profile": a.profile}
        model = build(name, a.profile)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        del model
        try:
            row["train_patches_per_s"] = train_throughput(name, a.profile, a.steps)
            if a.bf16:
                row["train_bf16_patches_per_s"] = train_throughput(name, a.profile, a.steps, bf16=True)
                row["bf16_speedup"] = row["train_bf16_patches_per_s"] / row["train_patches_per_s"]
        except Exception as e:  # report, do not stop the table
            row["train_error"] = f"{type(e).__name__}: {e}"[:200]
        for n in sizes:
            r = run_child(name, a.profile, n, a.threads)
            row[f"infer_{n}_s"] = r.get("seconds", float("nan"))
            row[f"peak_rss_{n}_gb"] = r.get("peak_rss_gb", float("nan"))
            if "error" in r:
                row[f"error_{n}"] = r["error"]
        rows.append(row)
        print(f"{name}: {json.dumps(row, default=float)} ({time.perf_counter() - t0:.0f} s)", flush=True)

    cols = ["method", "parameters", "train_patches_per_s"] + (["train_bf16_patches_per_s", "bf16_speedup"]
                                                              if a.bf16 else []) + [f"infer_{n}_s" for n in sizes] + \
        [f"peak_rss_{n}_gb" for n in sizes]
    load = os.getloadavg()
    lines = [f"# Learned methods on CPU ({a.threads} threads, {a.profile} profile networks)", "",
             f"Machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) "
             "at the end of the run: on a shared machine the times are upper bounds.", "",
             f"Targets: inference at {sizes[0]}^3 <= {TARGET_S:g} s, peak RSS <= {TARGET_GB:g} GB. Training: batches "
             "of two 64^3 patches.", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:,}" if isinstance(v, int) else f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        t = r.get(f"infer_{sizes[0]}_s", float("nan"))
        mem = max(r.get(f"peak_rss_{n}_gb", float("nan")) for n in sizes)
        lines.append(f"- {r['method']}: inference {sizes[0]}^3 {'PASS' if t <= TARGET_S else 'FAIL'} ({t:.1f} s), "
                     f"memory {'PASS' if mem <= TARGET_GB else 'FAIL'} ({mem:.2f} GB)"
                     + "".join(f"; {k}: {v}" for k, v in r.items() if "error" in k))
    text = "\n".join(lines)
    print("\n" + text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_methods.md").write_text(text + "\n")
    (a.out / "bench_methods.json").write_text(json.dumps({"rows": rows, "loadavg": load, "threads": a.threads},
                                                         indent=2, default=float))


if __name__ == "__main__":
    main()
