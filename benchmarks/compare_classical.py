"""Every classical method on one embedded synthetic subject: a metrics table and a figure.

Subject ``anat001`` of the embedded default dataset (MNI152 anatomy at 2 mm, 3 T, 5 echoes; generated
and cached on first use). Two comparisons, both on the subject's true brain mask:

1. dipole inversion of the *true* local field (the label of the simulation, no background removal
   error): every registered single-orientation inversion with its default parameters, plus COSMOS
   from three simulated orientations (B0 tilted 0 deg, 25 deg about i, 25 deg about j);
2. background removal of the true total field: each method's local-field NRMSE (demeaned, on its valid
   mask), followed by the same TV inversion.

Metrics are qsmlab.metrics on each method's valid mask (the same functions score learned methods).
Prints markdown tables, writes ``OUT/inversions.csv``, ``OUT/background.csv`` and ``OUT/chi.png``
(axial, coronal and sagittal slices of every inversion and the truth, +/-0.15 ppm). Asserts nothing.

    python benchmarks/compare_classical.py [-o runs/compare_classical]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from qsmlab.data.manifest import load_manifest  # noqa: E402
from qsmlab.data.nifti import load_nifti  # noqa: E402
from qsmlab.data.recipe import ensure_dataset  # noqa: E402
from qsmlab.metrics import compute_all  # noqa: E402
from qsmlab.physics import DipoleOperator, tilted_b0_dir  # noqa: E402
from qsmlab.recon import registry  # noqa: E402

KEYS = ("nrmse_demeaned", "hfen", "ssim", "xsim", "corr", "psnr")


def _table(rows: list[dict]) -> str:
    df = pd.DataFrame(rows)
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        out.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, default=Path("runs/compare_classical"))
    ap.add_argument("--subject", default="anat001")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    table = load_manifest(ensure_dataset())
    row = next(r for r in table.rows if r.subject == a.subject)
    chi = load_nifti(row.chi).data
    mask = load_nifti(row.mask).data > 0.5
    local = load_nifti(row.field).data
    total = load_nifti(row.total_field).data
    mag = load_nifti(row.magnitude).data
    vs, b0 = tuple(row.voxel_size), tuple(row.b0_dir)

    inv_rows, maps = [], {"truth": chi * mask}
    for name in registry.names("inversion"):
        if name == "cosmos":
            dirs = [b0, tuple(tilted_b0_dir(25.0, (1, 0, 0))), tuple(tilted_b0_dir(25.0, (0, 1, 0)))]
            fields = [DipoleOperator(vs, d).A(chi * mask) * mask for d in dirs]
            t0 = time.perf_counter()
            out = registry.get("inversion", "cosmos")(fields, mask, b0_dirs=dirs, voxel_size=vs, quiet=True)
        else:
            t0 = time.perf_counter()
            out = registry.get("inversion", name)(local * mask, mask, voxel_size=vs, b0_dir=b0, magnitude=mag,
                                                 quiet=True)
        sec = time.perf_counter() - t0
        maps[name] = out
        scores = compute_all(out, chi, mask)
        inv_rows.append({"method": name, "seconds": round(sec, 2), **{k: scores[k] for k in KEYS}})
    inv = pd.DataFrame(inv_rows).sort_values("nrmse_demeaned")
    inv.to_csv(a.out / "inversions.csv", index=False)
    print(f"## Inversion of the true local field ({a.subject}, {mask.sum()} brain voxels, {vs} mm)\n")
    print(_table(inv.to_dict("records")))

    bfr_rows = []
    tv = registry.get("inversion", "tv")
    for name in registry.names("background"):
        t0 = time.perf_counter()
        loc, valid = registry.get("background", name)(total * mask, mask, voxel_size=vs, b0_dir=b0, quiet=True)
        sec = time.perf_counter() - t0
        e = loc[valid] - loc[valid].mean()
        t = local[valid] - local[valid].mean()
        out = tv(loc * valid, valid, voxel_size=vs, b0_dir=b0, quiet=True)
        scores = compute_all(out, chi, valid)
        bfr_rows.append({"method": name, "seconds": round(sec, 2), "valid/mask": valid.sum() / mask.sum(),
                         "local_nrmse": 100 * np.linalg.norm(e - t) / np.linalg.norm(t),
                         "tv_chi_nrmse_demeaned": scores["nrmse_demeaned"], "tv_chi_corr": scores["corr"]})
    bfr = pd.DataFrame(bfr_rows).sort_values("local_nrmse")
    bfr.to_csv(a.out / "background.csv", index=False)
    print(f"\n## Background removal of the true total field, then TV ({a.subject})\n")
    print(_table(bfr.to_dict("records")))

    names = ["truth"] + list(inv["method"])
    c = [int(np.mean(ix)) for ix in np.nonzero(mask)]
    fig, axes = plt.subplots(3, len(names), figsize=(1.9 * len(names), 6.2))
    for j, n in enumerate(names):
        vol = maps[n]
        for i, sl in enumerate((vol[:, :, c[2]], vol[:, c[1], :], vol[c[0], :, :])):
            ax = axes[i, j]
            ax.imshow(np.rot90(sl), cmap="gray", vmin=-0.15, vmax=0.15)
            ax.set_axis_off()
        label = n if n == "truth" else f"{n}\n{inv.set_index('method').loc[n, 'nrmse_demeaned']:.0f} %"
        axes[0, j].set_title(label, fontsize=9)
    fig.suptitle(f"chi (ppm, -0.15..0.15) of {a.subject}: inversions of the true local field; "
                 "title = demeaned NRMSE", fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out / "chi.png", dpi=90)
    print(f"\nwrote {a.out / 'inversions.csv'}, {a.out / 'background.csv'}, {a.out / 'chi.png'}")


if __name__ == "__main__":
    main()
