"""``qsmlab evaluate``: score a susceptibility map against a reference inside a mask."""

from __future__ import annotations

import argparse

HELP = "score a chi map against a reference (PSNR, NRMSE, HFEN, SSIM, XSIM, ...)"
DESCRIPTION = """Score a susceptibility map against a reference inside a mask, with the metric
definitions of the 2016 QSM reconstruction challenge (Langkammer et al. 2018: NRMSE, HFEN, SSIM) and
QSM challenge 2.0 (Bilgic et al. 2021: demeaned/detrended NRMSE, XSIM), plus PSNR and Pearson
correlation. All maps must be 3-D NIfTI on the same grid (shape and affine); values in ppm.

PSNR (dB) = 20 log10(peak / RMSE), peak = max - min of the reference in the mask, RMSE over mask voxels.

example:
  qsmlab evaluate --pred chi.nii.gz --ref cosmos.nii.gz --mask mask.nii.gz
  qsmlab evaluate --pred chi.nii.gz --ref cosmos.nii.gz --mask mask.nii.gz --json > scores.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, metavar="CHI", help="reconstruction to score (NIfTI, ppm)")
    p.add_argument("--ref", required=True, metavar="REF", help="reference map, e.g. COSMOS or ground truth (ppm)")
    p.add_argument("--mask", required=True, metavar="MASK", help="binary mask (0/1) the metrics are computed in")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def evaluate_files(pred: str, ref: str, mask: str) -> dict[str, float]:
    """Load, validate (3-D, finite, same grid, binary non-empty mask) and score."""
    from qsmlab.data.nifti import check_finite, check_mask, check_ndim, check_same_grid, load_nifti
    from qsmlab.metrics import compute_all

    vp = load_nifti(pred, what="--pred")
    vr = load_nifti(ref, what="--ref")
    vm = load_nifti(mask, what="--mask")
    for v in (vp, vr):
        check_ndim(v, (3,), "map")
        check_finite(v)
    check_same_grid(vr, vp)
    check_same_grid(vr, vm)
    m = check_mask(vm)
    return compute_all(vp.data, vr.data, m)


def run(args: argparse.Namespace) -> int:
    import json
    import math

    from qsmlab.metrics import METRIC_INFO

    scores = evaluate_files(args.pred, args.ref, args.mask)
    if args.json:
        print(json.dumps({k: (None if not math.isfinite(v) else v) if isinstance(v, float) else v
                          for k, v in scores.items()} | {"pred": args.pred, "ref": args.ref, "mask": args.mask}))
        return 0
    width = max(len(k) for k in scores)
    print(f"{'metric':<{width}}  {'value':>10}  unit  better  definition")
    for k, v in scores.items():
        info = METRIC_INFO[k]
        print(f"{k:<{width}}  {v:>10.4f}  {info.unit:<4}  {'higher' if info.higher_is_better else 'lower':<6}  "
              f"{info.definition}")
    return 0
