"""``qsmlab simulate [RECIPE.yaml] [-o DIR]``: generate a synthetic QSM dataset from a recipe."""

from __future__ import annotations

import argparse

HELP = "generate a synthetic dataset (phantoms, fields, multi-echo GRE) from a recipe YAML"
DESCRIPTION = """\
Generate a synthetic QSM dataset from a recipe (YAML; see data_manifests/README.md): anatomical phantoms
from the MNI ICBM152 templates inside nilearn and/or random-shape phantoms, their local, background and
total fields (ppm), and multi-echo GRE magnitude and wrapped phase (rad) with noise.

Writes per subject float32 NIfTI files (chi, mask, seg, and per orientation field, total_field,
magnitude, 4-D phase) with JSON sidecars (EchoTime, MagneticFieldStrength, B0_dir, VoxelSize,
RecipeHash), then manifest.csv (one row per scan) and a .complete marker.

Without -o the dataset goes to $QSMLAB_CACHE/datasets/<recipe-hash>/ (default cache/datasets/...), and a
complete dataset of the same recipe is reused; --force regenerates. Without RECIPE the embedded default
(data_manifests/default_recipe.yaml) is used. Prints the manifest path.

With --bids DIR, in-vivo-like heads (qsmlab.data.invivo_like: skull, scalp, air, 5 echoes at 3 T) are
written as a BIDS raw dataset instead, the layout 'qsmlab bids' reads:
  DIR/sub-*/[ses-*/]anat/*_echo-<n>_part-{mag,phase}_MEGRE.nii.gz + .json (EchoTime, MagneticFieldStrength,
  Units), an oblique head as an oblique affine, and the ground truth as derivatives under
  DIR/derivatives/qsmlab-truth/ (*_desc-truth_Chimap, *_desc-brain_mask, *_desc-{local,total}_fieldmap).
Scans: --scan sub=01,ses=1,run=1,tilt=15,seed=0 (repeatable), or --subjects N (sub-01..N, tilt 0 and 15
alternating). Prints DIR.

examples:
  qsmlab simulate --bids demo_bids --subjects 4 --voxel-size 2
  qsmlab simulate --bids demo_bids --scan sub=01,ses=1,run=1 --scan sub=02,tilt=20 --shape 48 48 48
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="recipe YAML (default: the embedded default recipe)")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (default: cache/datasets/<recipe-hash>)")
    p.add_argument("--force", action="store_true", help="regenerate even if a complete dataset exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    b = p.add_argument_group("BIDS output (--bids)")
    b.add_argument("--bids", metavar="DIR", help="write in-vivo-like scans as a BIDS raw dataset in DIR")
    b.add_argument("--scan", action="append", default=[], metavar="SPEC",
                   help="one acquisition: sub=L[,ses=L][,acq=L][,run=L][,tilt=DEG][,seed=N] (repeatable)")
    b.add_argument("--subjects", type=int, default=2, metavar="N", help="without --scan: N subjects (default 2)")
    b.add_argument("--voxel-size", type=float, nargs="+", default=[2.0], metavar="MM",
                   help="voxel size in mm, one or three values (default 2)")
    b.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="crop the FOV around the brain")
    b.add_argument("--phase-units", choices=("rad", "arbitrary"), default="rad",
                   help="phase stored in rad (default) or as vendor integers (Units: arbitrary)")


def run(args: argparse.Namespace) -> int:
    if args.bids:
        return _run_bids(args)
    from qsmlab.data.recipe import DEFAULT_RECIPE, generate_dataset

    manifest = generate_dataset(args.recipe or DEFAULT_RECIPE, out_dir=args.output, force=args.force,
                                quiet=args.quiet)
    print(manifest)
    return 0


def _run_bids(args: argparse.Namespace) -> int:
    from qsmlab.data.bids_write import ScanSpec, parse_scan_spec, write_invivo_like_bids
    from qsmlab.errors import QSMInputError

    if args.recipe:
        raise QSMInputError(f"{args.recipe}: --bids writes in-vivo-like scans; a recipe is not used with it")
    if args.scan:
        scans = [parse_scan_spec(t, i) for i, t in enumerate(args.scan)]
    else:
        if args.subjects < 1:
            raise QSMInputError(f"--subjects: expected a positive integer, got {args.subjects}")
        scans = [ScanSpec({"sub": f"{i + 1:02d}"}, seed=i, tilt_deg=15.0 * (i % 2)) for i in range(args.subjects)]
    vs = args.voxel_size * 3 if len(args.voxel_size) == 1 else args.voxel_size
    if len(vs) != 3 or min(vs) <= 0:
        raise QSMInputError(f"--voxel-size: expected one or three positive values (mm), got {args.voxel_size}")
    print(write_invivo_like_bids(args.bids, scans, voxel_size=vs, shape=args.shape, phase_units=args.phase_units,
                                 quiet=args.quiet))
    return 0
