"""``auto``'s weight against scaled weights on the realistic whole heads of ``benchmarks/invivo_like_methods.py``
(160^3 at 1.06 x 1.06 x 1.07 mm, seeds 5 and 6; generated and cached there on first use, ~2.5 min and ~8 GB
each), with the noise ``auto`` estimated against the simulation's true noise.

For each head and method: NRMSE (%, in V-SHARP's valid mask, against the scalar truth) at ``auto``'s weight and
at that weight times each factor, and ``auto``'s noise estimate and source. Prints a markdown table and writes
it to ``OUT``. Asserts nothing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/auto_whole_heads.py --seeds 5 6 --methods tv medi \\
        -o benchmarks/results/auto_whole_heads.md
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import invivo_like_methods as ilm  # this folder: run as python benchmarks/...
import torch
from compare_classical import last_info_of

from qsmlab.metrics.nrmse import nrmse
from qsmlab.recon import registry

FACTORS = {"tv": (0.5, 0.25, 0.125), "medi": (2.0, 0.5, 0.25), "nltv": (0.5, 0.25), "ndi": (2.0, 0.5, 0.25)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[5, 6])
    ap.add_argument("--methods", nargs="+", default=["tv", "medi"], choices=sorted(FACTORS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", type=Path, default=Path("auto_whole_heads.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    lines = ["| head | method | noise: auto's estimate / true (ppb) | auto's weight (ppm) | NRMSE at auto | "
             "NRMSE at auto x factor |", "|---|---|---|---|---|---|"]
    for seed in a.seeds:
        s = ilm.realistic(seed)
        kw = {"voxel_size": s["vs"], "b0_dir": s["b0"], "magnitude": s["magnitude"], "quiet": True}
        for name in a.methods:
            fn = registry.get("inversion", name)
            x = fn(s["local"], s["mask"], **kw)
            info = last_info_of(name)
            w0, est = info["alpha"], info["auto"]["noise_std"]
            scaled = []
            for f in FACTORS[name]:
                y = fn(s["local"], s["mask"], alpha=w0 * f, **kw)
                scaled.append(f"x{f:g}: {nrmse(y, s['chi'], s['mask']):.1f}")
            lines.append(f"| {s['name']} | {name} | {est * 1e3:.2f} / {s['noise_ppm'] * 1e3:.2f} | {w0:.3g} | "
                         f"{nrmse(x, s['chi'], s['mask']):.1f} | {', '.join(scaled)} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
