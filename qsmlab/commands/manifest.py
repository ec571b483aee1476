"""``qsmlab manifest check FILE`` / ``merge A.csv B.csv -o OUT.csv``: validate or combine dataset manifests."""

from __future__ import annotations

import argparse

HELP = "validate a dataset manifest (CSV), or merge manifests into a hybrid one"
DESCRIPTION = """\
Validate a dataset manifest and print every problem (one line each, naming the row and column).
Exit status 2 if any problem is found; otherwise print "N rows, M subjects, OK".

A manifest is a CSV, one row per scan; paths are relative to the manifest's folder; blank = absent.
Columns:
  subject      subject ID (required); all scans of a subject share one cross-validation fold
  session, run scan identifiers; (subject, session, run) must be unique
  source       synthetic | invivo (blank = invivo); synthetic rows never enter a test fold
  field        local field NIfTI, ppm (required)
  mask         brain mask NIfTI, 0/1 (required)
  total_field  total (local + background) field, ppm
  chi          susceptibility label, ppm
  magnitude    GRE magnitude
  phase        (multi-echo) phase, rad
  seg          segmentation label map
  te           echo time(s) in seconds, e.g. "0.004 0.008"
  b0_tesla     field strength in tesla, e.g. 3
  b0_dir       B0 direction in voxel axes "x y z" (space or comma separated); blank = from the field
               NIfTI (JSON sidecar B0_dir, else the affine)
  voxel_size   voxel size in mm "x y z"; blank = from the field NIfTI header
  group        free label (site, scanner, cohort)
All images of a row must share one grid (3-D shape and affine).

merge: 'qsmlab manifest merge A.csv B.csv [...] -o hybrid.csv' validates each input, rewrites its paths
relative to the output's folder and writes the rows of all inputs in order, e.g. the embedded synthetic
dataset (source=synthetic, always trains) with the in-vivo rows written by 'qsmlab bids' (held out by
'qsmlab loocv'). A scan (subject, session, run) present in two inputs is an error naming both.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    c = sub.add_parser("check", help="validate FILE and print every problem",
                       description="Validate a manifest; exit 2 if any problem is found.")
    c.add_argument("file", metavar="FILE", help="manifest CSV")
    m = sub.add_parser("merge", help="merge manifests (e.g. synthetic + in-vivo) into one hybrid manifest",
                       description="Merge manifests; paths are rewritten relative to the output's folder.")
    m.add_argument("inputs", nargs="+", metavar="CSV", help="manifests to merge, in order")
    m.add_argument("-o", "--output", required=True, metavar="OUT", help="merged manifest CSV")


def run(args: argparse.Namespace) -> int:
    from qsmlab.data.manifest import check_manifest, load_manifest, merge_manifests

    if args.action == "merge":
        out = merge_manifests(args.inputs, args.output)
        table = load_manifest(out)
        n_syn = sum(r.synthetic for r in table)
        print(f"{out}: {len(table)} rows ({n_syn} synthetic, {len(table) - n_syn} in-vivo), "
              f"{len(table.subjects)} subjects")
        return 0

    problems = check_manifest(args.file)
    if problems:
        for line in problems:
            print(line)
        print(f"{len(problems)} problem(s) in {args.file}")
        return 2
    table = load_manifest(args.file)
    print(f"{len(table)} rows, {len(table.subjects)} subjects, OK")
    return 0
