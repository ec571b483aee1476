"""``qsmlab dip``: uQSM in deep-image-prior mode on one scan (no training set)."""

from __future__ import annotations

import argparse

HELP = "uQSM-DIP: fit uQSM's network to one local field from random weights -> chi (ppm); no training data"

DESCRIPTION = """\
Reconstruct chi (ppm) from one local field (ppm) with uQSM in deep-image-prior mode: the uQSM network,
randomly initialised, is fitted to this volume alone with the uQSM loss (data consistency + lambda_TV * TV)
for --iterations steps (200, the paper), or until the data-consistency term changes by less than --tol
over 10 steps, or until the residual RMS reaches --noise-level ppm (discrepancy principle).

Data consistency (--dc): 'nonlinear' (NDI: complex exponential of phase_scale * field, weighted by the
magnitude) needs phase_scale = 2 pi * 42.58 MHz/T * B0 * TE (rad/ppm): --phase-scale, else from --te and
--b0, else from the field's JSON sidecar (EchoTime, first echo; MagneticFieldStrength). 'auto' (default)
picks nonlinear when phase_scale is known, else weighted. Without --magnitude the weight is 1 in the mask.

B0 direction and voxel size as for 'qsmlab recon'. The output is float32 NIfTI with the field's geometry,
and a JSON sidecar with the settings and how the fit stopped.

example:
  qsmlab dip --field local_field.nii.gz --mask mask.nii.gz --magnitude mag.nii.gz -o chi_dip.nii.gz
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--field", required=True, metavar="FIELD", help="local field map in ppm (NIfTI)")
    p.add_argument("--mask", required=True, metavar="MASK", help="brain mask (binary NIfTI, same grid)")
    p.add_argument("--magnitude", metavar="MAG", help="magnitude (NIfTI) for the data-consistency weight W")
    p.add_argument("--iterations", type=int, default=200, metavar="N", help="optimiser steps (default 200)")
    p.add_argument("--tol", type=float, default=0.0,
                   help="stop when the data-consistency term changes by less than this (relative) over 10 steps")
    p.add_argument("--noise-level", type=float, metavar="PPM", help="stop at this residual RMS (ppm)")
    p.add_argument("--dc", default="auto", choices=("auto", "nonlinear", "weighted", "linear"),
                   help="data-consistency kind (default auto)")
    p.add_argument("--lambda-tv", type=float, default=None, metavar="W",
                   help="TV weight (default: uQSM's default for nonlinear, scaled by 1/phase_scale^2 for linear kinds)")
    p.add_argument("--support", default="mask", choices=("mask", "free"),
                   help="where the loss lets chi be nonzero: mask (the paper) or free (the network's output outside "
                        "the mask may explain the part of the field no chi inside can; the result is masked either way)")
    p.add_argument("--phase-scale", type=float, metavar="RAD_PER_PPM", help="phase per ppm of field (rad/ppm)")
    p.add_argument("--te", type=float, metavar="S", help="echo time (s) for phase_scale")
    p.add_argument("--b0", type=float, metavar="T", help="field strength (T) for phase_scale")
    p.add_argument("--depth", type=int, default=4, help="network poolings (default 4)")
    p.add_argument("--width", type=int, default=16, help="network width (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--prior", default="none", choices=("none", "tkd"),
                   help="none (the paper: the fit starts from the random network's output) or tkd (TKD of the field "
                        "is an input and is added to the output, whose layer starts at zero: the fit starts at TKD)")
    p.add_argument("--b0-dir", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="B0 direction in voxel axes (overrides sidecar/affine)")
    p.add_argument("--voxel-size", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="voxel size in mm (default: from the NIfTI header)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, metavar="CHI", help="output chi map (.nii or .nii.gz)")


def _phase_scale(args, field_path) -> float | None:
    import json

    from qsmlab.errors import QSMInputError
    from qsmlab.physics import phase_scale
    from qsmlab.physics.geometry import sidecar_path

    if args.phase_scale is not None:
        if not args.phase_scale > 0:
            raise QSMInputError(f"--phase-scale {args.phase_scale}: expected a positive number of rad/ppm")
        return float(args.phase_scale)
    if (args.te is None) != (args.b0 is None):
        raise QSMInputError("--te and --b0 go together (phase_scale = 2 pi * 42.58 MHz/T * B0 * TE)")
    if args.te is not None:
        if not (args.te > 0 and args.b0 > 0):
            raise QSMInputError(f"--te {args.te} s and --b0 {args.b0} T must be positive")
        return float(phase_scale(args.te, args.b0))
    side = sidecar_path(field_path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise QSMInputError(f"{side}: not valid JSON ({e.msg})") from None
        te, b0 = meta.get("EchoTime"), meta.get("MagneticFieldStrength")
        if isinstance(te, list):
            te = te[0] if te else None
        if isinstance(te, int | float) and isinstance(b0, int | float) and te > 0 and b0 > 0:
            return float(phase_scale(float(te), float(b0)))
    return None


def run(args) -> int:
    import json

    from qsmlab import __version__
    from qsmlab.commands.scan_inputs import load_scan, output_path
    from qsmlab.data.nifti import atomic_write_text, save_nifti
    from qsmlab.errors import QSMInputError
    from qsmlab.physics.geometry import sidecar_path

    out = output_path(args)
    if args.iterations < 1:
        raise QSMInputError(f"--iterations {args.iterations}: expected a positive integer")
    scan = load_scan(args, ("magnitude",))
    field, mask, mag, b0, vs = scan.field, scan.mask, scan.images.get("magnitude"), scan.b0_dir, scan.voxel_size
    ps = _phase_scale(args, field.path)
    dc = args.dc
    if dc == "auto":
        dc = "nonlinear" if ps is not None else "weighted"
    if dc == "nonlinear" and ps is None:
        raise QSMInputError("--dc nonlinear needs phase_scale: give --phase-scale, or --te and --b0, or a field "
                            "sidecar with EchoTime and MagneticFieldStrength")

    from qsmlab.methods import UQSMDIP, UQSMLoss

    default_tv = UQSMLoss().lambda_tv
    if args.lambda_tv is not None:
        lam = args.lambda_tv
    elif dc == "nonlinear":
        lam = default_tv
    else:  # the nonlinear term is ~ phase_scale^2 times the linear one: keep the same balance
        lam = default_tv / (ps ** 2 if ps is not None else UQSMDIP_DEFAULT_PHASE_SCALE ** 2)
    if not lam >= 0:
        raise QSMInputError(f"--lambda-tv {lam}: expected a number >= 0")
    model = UQSMDIP(depth=args.depth, width=args.width, loss=UQSMLoss(dc=dc, lambda_tv=lam, phase_scale=ps, support=args.support),
                    iterations=args.iterations, tol=args.tol, noise_level=args.noise_level, seed=args.seed,
                    lr=args.lr, prior=args.prior, log_images=False)
    chi = model.fit_volume(field.data, mask, magnitude=mag, voxel_size=vs, b0_dir=b0, phase_scale=ps,
                           progress=not args.quiet)
    path = save_nifti(out, chi, like=field)
    meta = {
        "method": "uqsm_dip", "dc": dc, "lambda_tv": lam, "phase_scale_rad_per_ppm": ps,
        "iterations": args.iterations, "tol": args.tol, "noise_level_ppm": args.noise_level,
        "support": args.support, "depth": args.depth, "width": args.width, "lr": args.lr, "seed": args.seed, "prior": args.prior,
        "fit": {k: v for k, v in model.last_fit.items() if k != "snapshots"},
        "B0_dir": [float(c) for c in b0], "voxel_size": [float(c) for c in vs],
        "field": str(args.field), "mask": str(args.mask), "magnitude": args.magnitude,
        "units": "ppm", "qsmlab_version": __version__,
    }
    atomic_write_text(sidecar_path(path), json.dumps(meta, indent=2) + "\n")
    if not args.quiet:
        print(f"wrote {path} (uqsm_dip, {model.last_fit['iterations']} iterations, "
              f"stopped by {model.last_fit['stopped_by']})")
    return 0


UQSMDIP_DEFAULT_PHASE_SCALE = 3.21
"""rad/ppm at TE 4 ms and 3 T (2 pi * 42.58 * 3 * 0.004): the reference for scaling lambda_TV when unknown."""
