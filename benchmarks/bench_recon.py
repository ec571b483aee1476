"""Time the dipole inversions against the FFT floor (prints a table; asserts nothing).

    .venv/bin/python benchmarks/bench_recon.py [--n 160] [--repeats 5] [--iters 2 6] [--csv out.csv]

- Closed-form methods (tkd, tsvd, cfl2) cost one rfftn + irfftn pair on the grid they transform; their
  ratio is ``median time / median time of a bare scipy.fft rfftn+irfftn pair`` on that grid (target
  <= 1.5), the pair being timed alternately with the method so both see the same machine load. The first call, which builds and caches the kernel and filter, is excluded. cosmos costs
  ``(n_orientations + 1) / 2`` pairs (one rfftn per orientation, one irfftn).
- Iterative methods (lsqr, cg and, when registered, tv, nltv, ndi, medi) run twice with ``tol=0`` and
  ``max_iter = k1, k2`` (``--iter-repeats`` times, median); seconds per iteration is
  ``(t(k2) - t(k1)) / (n_iter(k2) - n_iter(k1))`` (setup cancels; ``n_iter`` from ``last_info``) and its
  ratio is to ``FFT pairs per iteration x pair time`` (target <= 1.5). Pairs per iteration come from the
  method's ``last_info["fft_pairs"]`` when it reports it (MEDI's inner CG makes it data dependent), else
  from the method module's ``FFT_PAIRS_PER_ITER``, else from the table below.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# numpy's BLAS (OpenBLAS) is only used for vector dot products; multi-threaded BLAS on tiny work items
# oversubscribes a loaded machine (scipy's cg/lsqr ran 20x slower per iteration on a shared 2-core box).
# OMP_NUM_THREADS and MKL_NUM_THREADS are left alone: the iterative solvers run their voxel-wise work and
# FFTs on torch's OpenMP/MKL threads (one per core by default), as the reference FFT pair uses every core
# (scipy.fft workers=-1). Set the variables yourself to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import scipy.fft  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _phantom import head_phantom  # noqa: E402

from qsmlab.physics import DipoleOperator, padded_shape, tilted_b0_dir  # noqa: E402
from qsmlab.recon import registry  # noqa: E402

CLOSED_FORM = ("tkd", "tsvd", "cfl2")
ITERATIVE = ("lsqr", "cg", "tv", "nltv", "ndi", "medi")
# FFT pairs one iteration needs, for methods whose module does not say (A and A^T per iteration).
FFT_PAIRS_PER_ITER = {"lsqr": 2, "cg": 2, "tv": 2, "nltv": 2, "ndi": 2, "medi": 2}
# Extra parameters that keep one benchmark iteration bounded (MEDI's inner CG), and fixed regularisation
# weights: this benchmark times iterations, and the default "auto" would add its search to each run
# (auto's own cost is printed by compare_classical.py).
BENCH_PARAMS = {"medi": {"cg_max_iter": 5, "cg_tol": 1e-12, "alpha": 3e-4}, "tv": {"alpha": 3e-4},
                "nltv": {"alpha": 3e-4}, "ndi": {"tikhonov": 0.01}, "cg": {"lam": 0.018}}
CLOSED_PARAMS = {"cfl2": {"lam": 0.018}}


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def fft_pair(shape, dtype):
    """A bare ``irfftn(rfftn(x))`` on ``shape``: the FFT floor."""
    x = np.random.default_rng(0).normal(size=shape).astype(dtype)

    def pair():
        scipy.fft.irfftn(scipy.fft.rfftn(x, workers=-1), s=shape, workers=-1)

    pair()
    return pair


def _pair_time(pair) -> float:
    """One timing of the FFT pair, after a short pause: torch's OpenMP threads spin-wait for a few ms
    after the method's last op and would steal a core from scipy's FFT workers (measured +7 ms per pair
    at 160^3 on 2 cores), inflating the reference."""
    time.sleep(0.03)
    return _median_time(pair, 1)


def interleaved(fn, pair, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and of the FFT pair, timed alternately so that both see the same load
    (on a shared machine the pair time drifts by 2x within a minute)."""
    tf, tp = [], []
    for _ in range(repeats):
        tp.append(_pair_time(pair))
        tf.append(_median_time(fn, 1))
    return statistics.median(tf), statistics.median(tp)


def _torch_threads() -> int | str:
    try:
        import torch
    except ImportError:
        return "n/a"
    return torch.get_num_threads()


def _pairs_per_iter(name: str, fn) -> float | None:
    mod = sys.modules.get(fn.__module__)
    v = getattr(mod, "FFT_PAIRS_PER_ITER", None)
    return float(v) if v is not None else FFT_PAIRS_PER_ITER.get(name)


def _run_iterative(name, fn, field, mask, mag, k: int) -> tuple[float, int, float | None]:
    """Seconds, iterations actually run and FFT pairs used (None when the method does not report them)."""
    params = registry.parameters(fn)
    kw = {"max_iter": k, "quiet": True, **BENCH_PARAMS.get(name, {})}
    if "tol" in params:
        kw["tol"] = 0.0
    kw = {key: v for key, v in kw.items() if key in params or key == "quiet"}
    t = time.perf_counter()
    fn(field, mask, magnitude=mag, **kw)
    dt = time.perf_counter() - t
    info = getattr(sys.modules.get(fn.__module__), "last_info", None) or {}
    return dt, int(info.get("n_iter", k)), info.get("fft_pairs")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=160, help="grid size n^3 (default 160)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per closed-form method (median)")
    ap.add_argument("--iters", type=int, nargs=2, default=(2, 6), metavar=("K1", "K2"),
                    help="max_iter of the two runs of each iterative method (default 2 6)")
    ap.add_argument("--iter-repeats", type=int, default=2,
                    help="(K1, K2) run pairs per iterative method (median of the per-iteration times)")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--methods", nargs="*", help="subset of methods (default: all registered)")
    ap.add_argument("--csv", help="also write the table as CSV")
    args = ap.parse_args(argv)
    dtype = np.dtype(args.dtype)
    k1, k2 = args.iters
    if not 1 <= k1 < k2:
        ap.error("--iters: expected 1 <= K1 < K2")

    ph = head_phantom(args.n)
    mask, chi = ph["mask"], ph["chi"]
    noise = np.random.default_rng(1).normal(0, 0.001, chi.shape)
    field = ((DipoleOperator(pad_factor=2.0).A(chi) + noise) * mask).astype(dtype)
    mag = ph["magnitude"].astype(dtype)
    grid = padded_shape(field.shape, 1.0)  # every method here runs with its default pad_factor=1
    pair = fft_pair(grid, dtype)
    t_pair = _median_time(pair, max(5, args.repeats))
    known = registry.names("inversion")
    wanted = args.methods or known
    rows = []
    print(f"grid {args.n}^3 {args.dtype}, FFT grid {grid}, FFT pair (rfftn+irfftn, workers=-1) "
          f"{t_pair * 1e3:.1f} ms (median at start; ratios use pairs timed next to each method), "
          f"{os.cpu_count()} CPUs, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, torch threads {_torch_threads()}")
    print(f"{'method':8s} {'kind':11s} {'seconds':>9s} {'unit':>10s} {'FFT pairs':>9s} {'pair ms':>8s} "
          f"{'ratio':>6s}")

    def emit(name, kind, sec, unit, pairs, t_floor):
        ratio = sec / (pairs * t_floor) if pairs else float("nan")
        rows.append((name, kind, sec, unit, pairs, t_floor, ratio))
        print(f"{name:8s} {kind:11s} {sec:9.3f} {unit:>10s} {pairs:9.2f} {t_floor * 1e3:8.1f} {ratio:6.2f}",
              flush=True)

    for name in CLOSED_FORM:
        if name in known and name in wanted:
            fn = registry.get("inversion", name)
            kw = CLOSED_PARAMS.get(name, {})
            fn(field, mask, **kw)  # builds and caches the kernel and the filter
            t, tp = interleaved(lambda fn=fn, kw=kw: fn(field, mask, **kw), pair, args.repeats)
            emit(name, "closed", t, "per call", 1.0, tp)
    if "cosmos" in known and "cosmos" in wanted:
        b0s = [np.array([0.0, 0.0, 1.0]), tilted_b0_dir(25, (1, 0, 0)), tilted_b0_dir(25, (0, 1, 0))]
        fields = [field] + [(DipoleOperator(b0_dir=b, pad_factor=2.0).A(chi) * mask).astype(dtype) for b in b0s[1:]]
        cos = registry.get("inversion", "cosmos")
        cos(fields, mask, b0_dirs=b0s)
        t, tp = interleaved(lambda: cos(fields, mask, b0_dirs=b0s), pair, args.repeats)
        emit("cosmos", "closed(3o)", t, "per call", (len(fields) + 1) / 2, tp)
    for name in ITERATIVE:
        if name not in known or name not in wanted:
            continue
        fn = registry.get("inversion", name)
        per_iter, tps = [], []
        for _ in range(args.iter_repeats):
            tps.append(_pair_time(pair))
            t1, n1, p1 = _run_iterative(name, fn, field, mask, mag, k1)
            t2, n2, p2 = _run_iterative(name, fn, field, mask, mag, k2)
            tps.append(_pair_time(pair))
            if n2 <= n1:
                break
            per_iter.append((t2 - t1) / (n2 - n1))
        if not per_iter:
            print(f"{name:8s} stopped after {n2} iterations despite tol=0; not timed")
            continue
        pairs = (p2 - p1) / (n2 - n1) if p1 is not None and p2 is not None else _pairs_per_iter(name, fn)
        emit(name, "iterative", statistics.median(per_iter), "per iter", pairs or float("nan"),
             statistics.median(tps))
    others = sorted(set(known) - set(CLOSED_FORM) - set(ITERATIVE) - {"cosmos"})
    if others:
        print(f"not timed (unknown cost model): {', '.join(others)}")
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "kind", "seconds", "unit", "fft_pairs", "fft_pair_seconds", "ratio_to_fft_floor"])
            w.writerows(rows)
    print("target: ratio <= 1.5 (closed form per call; iterative per iteration)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
