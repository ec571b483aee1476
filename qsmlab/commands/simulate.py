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
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="recipe YAML (default: the embedded default recipe)")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (default: cache/datasets/<recipe-hash>)")
    p.add_argument("--force", action="store_true", help="regenerate even if a complete dataset exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from qsmlab.data.recipe import DEFAULT_RECIPE, generate_dataset

    manifest = generate_dataset(args.recipe or DEFAULT_RECIPE, out_dir=args.output, force=args.force,
                                quiet=args.quiet)
    print(manifest)
    return 0
