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
import numpy as np
import torch
from compare_classical import last_info_of

from qsmlab.metrics.nrmse import nrmse
from qsmlab.physics.operator import DipoleOperator
from qsmlab.recon import registry

FACTORS = {"tv": (0.5, 0.35, 0.25, 0.18, 0.125), "medi": (2.0, 0.5, 0.25), "nltv": (0.5, 0.25), "ndi": (2.0, 0.5, 0.25)}


def misfit(chi, s: dict) -> float:
    """Magnitude-weighted in-mask RMS of ``A chi - f`` (ppm): ``W = mask * magnitude / max``."""
    m = s["mask"]
    w2 = (m * s["magnitude"] / s["magnitude"][m].max()) ** 2
    r = DipoleOperator(voxel_size=s["vs"], b0_dir=s["b0"]).A(chi * m) - s["local"]
    return float(np.sqrt(np.sum(w2 * r ** 2) / np.sum(w2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[5, 6])
    ap.add_argument("--methods", nargs="+", default=["tv", "medi"], choices=sorted(FACTORS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--misfit", action="store_true",
                    help="also print each weight's data misfit (magnitude-weighted in-mask RMS of A chi - f, the "
                         "discrepancy principle's measure, on the padded operator) over the true noise")
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
            for f in (1.0,) + FACTORS[name] if a.misfit else FACTORS[name]:
                y = x if f == 1.0 else fn(s["local"], s["mask"], alpha=w0 * f, **kw)
                mis = f" ({misfit(y, s) / s['noise_ppm']:.2f} x noise)" if a.misfit else ""
                scaled.append(f"x{f:g}: {nrmse(y, s['chi'], s['mask']):.1f}{mis}")
            lines.append(f"| {s['name']} | {name} | {est * 1e3:.2f} / {s['noise_ppm'] * 1e3:.2f} | {w0:.3g} | "
                         f"{nrmse(x, s['chi'], s['mask']):.1f} | {', '.join(scaled)} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
