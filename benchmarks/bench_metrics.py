"""Cost of each masked metric on a full volume: numpy (scipy.ndimage) vs torch (conv3d), and the
separable LoG against a dense 15^3 correlation (what a literal port of ``compute_hfen.m`` costs).

For each grid n^3 (float64 numpy; float32 torch on CPU, and on CUDA when present), prints the median
time per metric and the ratio torch/numpy as a markdown table; asserts nothing.

    .venv/bin/python benchmarks/bench_metrics.py [--sizes 96 160] [--repeats 3] [--dense]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np
import torch
from scipy import ndimage

from qsmlab.metrics import NUMPY_METRICS, TORCH_METRICS
from qsmlab.metrics._filters import correlate_numpy, dense_kernel, log_kernel


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def phantom(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ref = ndimage.gaussian_filter(rng.normal(0, 0.3, (n, n, n)), 1.5)
    pred = 0.9 * ref + rng.normal(0, 0.01, ref.shape)
    z = np.indices(ref.shape) - (n - 1) / 2
    mask = (z**2).sum(0) < (0.4 * n) ** 2
    return pred, ref, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 160])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense", action="store_true", help="also time a dense 15^3 LoG (slow)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("| n | metric | numpy [s] | " + " | ".join(f"torch {d} f32 [s] | ratio" for d in devices) + " |")
    print("|---|---|---|" + "---|---|" * len(devices))
    for n in args.sizes:
        pred, ref, mask = phantom(n, rng)
        tensors = {
            d: [torch.from_numpy(a)[None, None].to(d, torch.float32 if a.dtype != bool else torch.bool)
                for a in (pred, ref, mask)]
            for d in devices
        }
        for name, fn in NUMPY_METRICS.items():
            t_np = median_time(partial(fn, pred, ref, mask), args.repeats)
            cells = []
            for d in devices:
                t_t = median_time(partial(TORCH_METRICS[name], *tensors[d]), args.repeats)
                cells.append(f"{t_t:.4f} | {t_t / t_np:.2f}")
            print(f"| {n} | {name} | {t_np:.4f} | " + " | ".join(cells) + " |")
        if args.dense:
            terms = log_kernel(15, 1.5)
            t_sep = median_time(partial(correlate_numpy, ref, terms), 1)
            t_dense = median_time(partial(ndimage.correlate, ref, dense_kernel(terms), mode="constant"), 1)
            print(f"| {n} | LoG dense / separable | {t_dense:.2f} / {t_sep:.3f} = {t_dense / t_sep:.0f}x | |")


if __name__ == "__main__":
    main()
