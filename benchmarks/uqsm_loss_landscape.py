"""Where the uQSM loss has its minimum, on a clean subject and on a realistic one (issue 15).

uQSM trains a network to minimise ``NDI + lambda_TV * TV`` (``qsmlab.methods.uqsm.build_uqsm_loss``); a
network can at best reach the loss's minimiser. This benchmark asks, per subject and TV weight, what that
minimiser is worth against the scalar truth, without a network:

- the loss and its parts at the truth, at TKD, and at the classical TV solution (``tv_admm`` at the
  equivalent weight ``alpha = lambda_TV / (2 phi_s^2)``: both objectives are ``1/2 ||W (D chi - f)||^2 +
  alpha ||grad chi||_1`` for small residuals), early-stopped (the default 100 iterations) and run further;
- the map itself optimised on the loss by Adam (cosine step, from TKD, as the TKD-prior network starts):
  a lower loss than TKD's that is not nearer the truth means the loss's minimum is not where the truth is.
  ``--support free`` optimises with ``UQSMLoss(support="free")`` (chi may be nonzero outside the mask, TV
  over the grid); its rows show the loss of the masked map.

On the clean recipe the truth's data term is the noise; on the realistic one it carries the model error
(anisotropy, veins, V-SHARP residue), and a method that fits the field better than the truth does fits
that error. Prints a markdown table and writes it to ``OUT``. Asserts nothing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uqsm_loss_landscape.py \\
        --case data_manifests/train_realistic_recipe.yaml:real005 --case data_manifests/default_recipe.yaml:anat004 \\
        --lambda-tv 6e-4 2.6e-3 --steps 300 --support mask free -o benchmarks/results/uqsm_loss_landscape.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from qsmlab.data.manifest import load_manifest
from qsmlab.data.recipe import ensure_dataset
from qsmlab.data.subjects import row_phase_scale
from qsmlab.methods.uqsm import UQSMLoss, build_uqsm_loss
from qsmlab.metrics.nrmse import nrmse
from qsmlab.recon.inversion.tkd import tkd
from qsmlab.recon.inversion.tv import tv_admm


def load_case(spec: str) -> dict:
    recipe, _, subject = spec.rpartition(":")
    if not recipe or not subject:
        raise SystemExit(f"--case {spec!r}: expected RECIPE.yaml:SUBJECT")
    table = load_manifest(ensure_dataset(recipe, quiet=False))
    rows = [r for r in table.rows if r.subject == subject]
    if not rows:
        raise SystemExit(f"--case {spec!r}: no subject {subject!r} in {recipe}")
    r = rows[0]

    def img(p):
        a = np.asarray(nib.load(p).dataobj, dtype=np.float32)
        return a[..., 0] if a.ndim == 4 else a

    return {"name": f"{Path(recipe).stem}:{subject}", "field": img(r.field), "mask": img(r.mask) > 0,
            "chi": img(r.chi), "magnitude": img(r.magnitude), "vs": tuple(float(v) for v in r.voxel_size),
            "b0": tuple(float(v) for v in r.b0_dir), "phase_scale": row_phase_scale(r)}


def table_row(c: dict, lam: float, label: str, x: np.ndarray, loss, batch: dict) -> str:
    """The loss and its parts at the masked map ``x``, and its NRMSE against the truth, as a table row."""
    m = c["mask"]
    with torch.no_grad():
        tot, parts = loss(torch.from_numpy(np.ascontiguousarray(x * m, dtype=np.float32))[None, None], batch)
    return (f"| {c['name']} | {lam:g} | {label} | {tot.item():.3e} | {parts['loss_dc'].item():.3e} | "
            f"{parts['loss_tv'].item():.4f} | {nrmse(x, c['chi'], m):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", required=True, metavar="RECIPE:SUBJECT")
    ap.add_argument("--lambda-tv", type=float, nargs="+", default=[2.6e-3])
    ap.add_argument("--steps", type=int, default=300, help="Adam steps on the map")
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam's first step (ppm), cosine to 0")
    ap.add_argument("--support", nargs="+", default=["mask"], choices=("mask", "free"),
                    help="the loss's support (UQSMLoss.support): free lets the optimised chi be nonzero outside the mask")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", type=Path, default=Path("uqsm_loss_landscape.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lines = ["| case | lambda_TV | map | loss | DC | TV (ppm/mm) | NRMSE % |", "|---|---|---|---|---|---|---|"]
    for spec in a.case:
        c = load_case(spec)
        m = c["mask"]

        def T(x):
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]

        batch = {"field": T(c["field"]), "mask": T(m), "magnitude": T(c["magnitude"]),
                 "b0_dir": torch.tensor([c["b0"]]), "voxel_size": torch.tensor([c["vs"]]),
                 "phase_scale": torch.tensor([c["phase_scale"]])}
        x_tkd = tkd(c["field"], m, voxel_size=c["vs"], b0_dir=c["b0"], quiet=True)
        for lam in a.lambda_tv:
            loss = build_uqsm_loss(UQSMLoss(lambda_tv=lam))

            def row(label, x, c=c, lam=lam, loss=loss, batch=batch):
                lines.append(table_row(c, lam, label, x, loss, batch))
                print(lines[-1], flush=True)

            row("truth", c["chi"])
            row("TKD", x_tkd)
            alpha = lam / (2 * c["phase_scale"] ** 2)
            for iters, tol in ((100, 1e-3), (400, 1e-5)):
                x = tv_admm(c["field"], m, voxel_size=c["vs"], b0_dir=c["b0"], magnitude=c["magnitude"], alpha=alpha,
                            max_iter=iters, tol=tol, quiet=True)
                row(f"TV-ADMM alpha {alpha:.2g} ppm, <= {iters} it", x)
            for support in a.support:
                opt_loss = build_uqsm_loss(UQSMLoss(lambda_tv=lam, support=support))
                x = T(x_tkd * m).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=a.lr)
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps)
                t0 = time.perf_counter()
                for step in range(1, a.steps + 1):
                    opt.zero_grad()
                    opt_loss(x if support == "free" else x * batch["mask"], batch)[0].backward()
                    opt.step()
                    sched.step()
                    if step in (a.steps // 4, a.steps):  # scored (and its loss shown) inside the mask
                        row(f"Adam on the loss ({support} support) from TKD, {step} steps", x.detach()[0, 0].numpy())
                print(f"  ({time.perf_counter() - t0:.0f} s of Adam)", flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
