"""Forward dipole operator cost as a ratio to a bare rfftn + irfftn pair on the same grid.

For each grid (160^3, 256^3, float32) and backend (scipy.fft with workers=-1, torch.fft):
  - bare:      median time of rfftn(x) -> irfftn on the n^3 grid (the FFT floor)
  - periodic:  DipoleOperator(pad_factor=1).A(x); ratio to bare        (target <= 1.3x)
  - padded:    DipoleOperator(pad_factor=2).A(x); ratio to bare on n^3, and to a bare pair on the
               padded grid (the work padding adds is FFT work, by design)
Kernels are cached, so the first (warm-up) call is excluded. Prints a markdown table; asserts nothing.

    .venv/bin/python benchmarks/bench_physics.py [--sizes 160 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.fft
import torch

from qsmlab.physics import DipoleOperator, padded_shape, tilted_b0_dir


def median_times(fns, repeats: int) -> list[float]:
    """Median seconds of each function, timed in interleaved rounds so that load drifts on a shared
    machine hit all of them alike (ratios are then far steadier than from separate runs)."""
    for fn in fns:
        fn()  # warm-up: kernel cache, FFT plans
    ts = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def bench(n: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n, n)).astype(np.float32)
    xt = torch.from_numpy(x)
    b0 = tilted_b0_dir(20.0)
    per = DipoleOperator((1, 1, 1), b0, pad_factor=1.0)
    pad = DipoleOperator((1, 1, 1), b0, pad_factor=2.0)
    ps = padded_shape((n, n, n), 2.0)
    rows = []
    for backend in ("numpy", "torch"):
        if backend == "numpy":
            def bare(s=(n, n, n)):
                scipy.fft.irfftn(scipy.fft.rfftn(x, s=s, workers=-1), s=s, workers=-1)
            arr = x
        else:
            def bare(s=(n, n, n)):
                torch.fft.irfftn(torch.fft.rfftn(xt, s=s), s=s)
            arr = xt
        with torch.inference_mode():
            t_bare, t_per = median_times([bare, lambda a=arr: per.A(a)], repeats)
            t_bare_pad, t_pad = median_times([lambda: bare(ps), lambda a=arr: pad.A(a)], max(1, repeats // 2))
        rows.append(dict(n=n, backend=backend, bare=t_bare, periodic=t_per, ratio_per=t_per / t_bare,
                         padded=t_pad, padded_grid=ps[0], ratio_pad=t_pad / t_bare,
                         ratio_pad_same_grid=t_pad / t_bare_pad))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[160, 256])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"threads: torch={torch.get_num_threads()}, scipy workers=-1; float32; oblique B0 (20 deg)")
    print("| grid | backend | bare rfftn+irfftn (s) | A periodic (s) | ratio | A pad x2 (s) | padded grid | "
          "ratio to bare n^3 | ratio to bare on padded grid |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for r in bench(n, args.repeats):
            print(f"| {r['n']}^3 | {r['backend']} | {r['bare']:.4f} | {r['periodic']:.4f} | {r['ratio_per']:.2f} | "
                  f"{r['padded']:.3f} | {r['padded_grid']}^3 | {r['ratio_pad']:.2f} | {r['ratio_pad_same_grid']:.2f} |")


if __name__ == "__main__":
    main()
