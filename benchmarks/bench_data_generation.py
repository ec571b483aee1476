"""Time synthetic data generation: one anatomical subject (phantom + 5-echo GRE simulation) at 2 mm and
1 mm (the full MNI field of view), and the embedded default recipe end to end (NIfTI writing included).

Prints a table; asserts nothing. Usage: ``python benchmarks/bench_data_generation.py [--runs 3] [--no-1mm]``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import numpy as np

from qsmlab.data.phantoms import anatomical_phantom
from qsmlab.data.phantoms.templates import load_mni_templates
from qsmlab.data.recipe import DEFAULT_RECIPE, generate_dataset
from qsmlab.data.simulate import simulate_scans

TE = (0.004, 0.008, 0.012, 0.016, 0.020)


def one_subject(vs: float, seed: int) -> tuple[float, float, tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    p = anatomical_phantom(rng, voxel_size=(vs, vs, vs))
    t1 = time.perf_counter()
    simulate_scans(p, rng, TE, 3.0, snr=100.0)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, p.shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3, help="runs at 2 mm (median reported)")
    ap.add_argument("--no-1mm", action="store_true", help="skip the 1 mm subject")
    args = ap.parse_args()
    t = time.perf_counter()
    load_mni_templates()
    anatomical_phantom(np.random.default_rng(0), voxel_size=(4.0, 4.0, 4.0))  # warm caches (templates, labels)
    print(f"template load + label map (once per process): {time.perf_counter() - t:.2f} s")
    rows = []
    for vs, runs in ((2.0, args.runs), (1.0, 0 if args.no_1mm else 1)):
        if runs == 0:
            continue
        res = [one_subject(vs, s) for s in range(runs)]
        ph = statistics.median(r[0] for r in res)
        sim = statistics.median(r[1] for r in res)
        tot = statistics.median(r[0] + r[1] for r in res)
        rows.append((f"{vs:g} mm", "x".join(map(str, res[0][2])), runs, ph, sim, tot))
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        generate_dataset(DEFAULT_RECIPE, out_dir=d, quiet=True)
        default_s = time.perf_counter() - t
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"\n{'voxel':>6} | {'grid':>13} | {'runs':>4} | {'phantom s':>9} | {'simulate s':>10} | {'total s':>7}")
    print("-" * 66)
    for r in rows:
        print(f"{r[0]:>6} | {r[1]:>13} | {r[2]:>4} | {r[3]:9.2f} | {r[4]:10.2f} | {r[5]:7.2f}")
    print(f"\ndefault recipe ({DEFAULT_RECIPE.name}) end to end, written to disk: {default_s:.1f} s")
    print(f"peak RSS: {peak_gb:.2f} GB   (5 echoes, 3 T, SNR 100, pad_factor 2; medians)")


if __name__ == "__main__":
    main()
