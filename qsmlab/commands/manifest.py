"""``qsmlab manifest check FILE``: validate a dataset manifest and report every problem."""

from __future__ import annotations

import argparse

HELP = "validate a dataset manifest (CSV): files, geometry, duplicates"
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
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    c = sub.add_parser("check", help="validate FILE and print every problem",
                       description="Validate a manifest; exit 2 if any problem is found.")
    c.add_argument("file", metavar="FILE", help="manifest CSV")


def run(args: argparse.Namespace) -> int:
    from qsmlab.data.manifest import check_manifest, load_manifest

    problems = check_manifest(args.file)
    if problems:
        for line in problems:
            print(line)
        print(f"{len(problems)} problem(s) in {args.file}")
        return 2
    table = load_manifest(args.file)
    print(f"{len(table)} rows, {len(table.subjects)} subjects, OK")
    return 0
