"""How strongly ``auto``'s discrepancy target should follow the model error: the exponent ``w`` of
``target = noise^(1-w) * m_T^w`` (:data:`qsmlab.recon.inversion.auto.MODEL_ERROR_EXPONENT`), per method, on
the realistic cases of ``benchmarks/compare_classical.py --recipe realistic`` (its cache and its oracle
weights: run that first, for both geometries, and pass its two ``inversions.csv``).

Prints, per geometry, method and exponent, the mean and worst case over the cases of auto's NRMSE over the
oracle weight's (%, against the scalar truth and against the simulated COSMOS), and writes ``OUT``. ``f0``
is the noise alone (factor 0), ``1`` the GCV-Tikhonov misfit itself. Asserts nothing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/model_error_exponent.py --methods tv,ndi,medi,lsqr \\
        --exponents f0,0.3,0.5,0.7,1 --oracle 1mm/inversions.csv aniso/inversions.csv -o exponents.csv
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import compare_classical as cc  # this folder: run as python benchmarks/...
import pandas as pd

from qsmlab.recon import registry
from qsmlab.recon.inversion import auto

SETS = (((1.0, 1.0, 1.0), (80, 80, 80)), ((0.5, 0.5, 2.0), (128, 128, 40)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="tv,ndi,medi,lsqr")
    ap.add_argument("--exponents", default="f0,0.3,0.5,0.7,1", help="f0 = the noise alone")
    ap.add_argument("--oracle", type=Path, nargs="+", required=True, help="compare_classical inversions.csv files")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tilt", type=float, nargs="+", default=[0.0, 20.0])
    ap.add_argument("-o", "--out", type=Path, default=Path("model_error_exponent.csv"))
    a = ap.parse_args()
    oracle = pd.concat([pd.read_csv(p) for p in a.oracle])
    rows = []
    for vs, shape in SETS:
        for seed in a.seeds:
            for tilt in a.tilt:
                c = cc.realistic_case(seed, tilt, vs, shape)
                kw = {"voxel_size": c["voxel_size"], "b0_dir": tuple(c["b0_dir"]), "magnitude": c["magnitude"],
                      "quiet": True}
                for name in a.methods.split(","):
                    o = oracle[(oracle.case == c["name"]) & (oracle.method == name)]
                    if o.empty:
                        continue
                    o = o.iloc[0]
                    for e in a.exponents.split(","):
                        keep = auto.MODEL_ERROR_FACTOR, auto.MODEL_ERROR_EXPONENT
                        auto.MODEL_ERROR_FACTOR, auto.MODEL_ERROR_EXPONENT = (0.0, 0.5) if e == "f0" else (1.0, float(e))
                        try:
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                x = registry.get("inversion", name)(c["field"], c["mask"], **kw)
                        finally:
                            auto.MODEL_ERROR_FACTOR, auto.MODEL_ERROR_EXPONENT = keep
                        et, ec = cc._nrmse(x, c["chi"], c["mask"]), cc._nrmse(x, c["cosmos"], c["cosmos_mask"])
                        rows.append({"case": c["name"], "set": cc.case_set(c["name"]), "method": name, "exponent": e,
                                     "off_truth": 100 * (et / o.oracle_nrmse - 1),
                                     "off_cosmos": 100 * (ec / o.cosmos_oracle_nrmse - 1)})
                        print(rows[-1], flush=True)
    d = pd.DataFrame(rows)
    d.to_csv(a.out, index=False)
    print(d.groupby(["set", "method", "exponent"])[["off_truth", "off_cosmos"]].agg(["mean", "max"]).round(2).to_string())


if __name__ == "__main__":
    main()
