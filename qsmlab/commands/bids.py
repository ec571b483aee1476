"""``qsmlab bids BIDS_DIR -o OUT_DIR``: a BIDS multi-echo GRE dataset -> QSM derivatives + in-vivo manifest."""

from __future__ import annotations

import argparse

HELP = "BIDS multi-echo GRE (MEGRE) -> Chimap, fields and masks as BIDS derivatives, plus manifest.csv"
DESCRIPTION = """\
Find every multi-echo GRE acquisition of a BIDS raw dataset
(sub-*/[ses-*/]anat/*_echo-<n>_part-{mag,phase}_MEGRE.nii[.gz]; entities sub, ses, acq, ce, rec, dir, run
kept), run the classical pipeline on each (mask -> unwrap -> echo fit -> background removal -> dipole
inversion; see 'qsmlab pipeline --help') and write BIDS derivatives under OUT_DIR:

  sub-*/[ses-*/]anat/<prefix>_Chimap.nii.gz           chi, ppm (+ .json with the provenance)
                     <prefix>_desc-{total,local}_fieldmap.nii.gz   fields, ppm
                     <prefix>_desc-{brain,valid}_mask.nii.gz       masks
                     <prefix>_part-mag_desc-rss_MEGRE.nii.gz       echo-combined magnitude
  dataset_description.json   GeneratedBy: qsmlab, its version and the exact configuration
  manifest.csv               one source=invivo row per acquisition (local field, valid mask, magnitude,
                             TE, B0, b0_dir, voxel size; chi from --reference), for qsmlab fit / loocv

Sidecars (inheritance principle) must give EchoTime (s) and MagneticFieldStrength (T); phase Units rad
or arbitrary (vendor integers, rescaled); B0 direction from the affine, or a B0_dir key. A finished
acquisition (same configuration) is skipped on a rerun; one that fails is reported in one line and the
others go on (exit status 2 if any failed).

examples:
  qsmlab bids /data/study -o /data/study/derivatives/qsmlab
  qsmlab bids /data/study -o out --mask /data/study/derivatives/bet --participant-label 01 02 --workers 2
  qsmlab bids /data/study -o out --reference /data/study/derivatives/cosmos --reference-desc cosmos
  qsmlab bids /data/study -o /data/study/derivatives/qsmlab-uqsm --inversion ckpt:runs/uqsm_tv/quick/version_0/checkpoints/last.ckpt
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bids_dir", metavar="BIDS_DIR", help="BIDS raw dataset")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="derivatives folder (created)")
    p.add_argument("--mask", default="auto", metavar="auto|MASK_DIR",
                   help="brain masks: auto (default: magnitude + R2*), or a BIDS derivatives folder with "
                        "sub-*_[...]_desc-brain_mask.nii[.gz] matched by entities")
    p.add_argument("--participant-label", nargs="+", metavar="L", help="only these subjects (01 or sub-01)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="acquisitions in parallel (default 1)")
    p.add_argument("--reference", metavar="REF_DIR",
                   help="BIDS derivatives with a reference chi (*_Chimap.nii.gz, e.g. COSMOS) per acquisition: "
                        "written to the manifest's chi column")
    p.add_argument("--reference-desc", metavar="DESC", help="only reference Chimaps with desc-DESC")
    p.add_argument("--unwrap", default="region", metavar="NAME", help="spatial unwrapper (default region)")
    p.add_argument("--bfr", default="vsharp", metavar="NAME", help="background removal (default vsharp)")
    p.add_argument("--inversion", default="tv", metavar="NAME",
                   help="dipole inversion (default tv, alpha auto), or ckpt:PATH for a trained method's checkpoint")
    for opt, what in (("--unwrap-param", "unwrapper"), ("--bfr-param", "background method"),
                      ("--inv-param", "inversion"), ("--mask-param", "automatic mask")):
        p.add_argument(opt, nargs="+", action="extend", default=[], metavar="K=V", help=f"parameters of the {what}")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def config_from_args(args: argparse.Namespace):
    from qsmlab.commands.pipeline import _mask_params
    from qsmlab.data.bids_prepare import PrepareConfig
    from qsmlab.recon.registry import parse_params

    return PrepareConfig(mask=args.mask, unwrap=args.unwrap, bfr=args.bfr, inversion=args.inversion,
                         unwrap_params=parse_params(args.unwrap_param), bfr_params=parse_params(args.bfr_param),
                         inv_params=parse_params(args.inv_param),
                         mask_params=_mask_params(parse_params(args.mask_param)))


def run(args: argparse.Namespace) -> int:
    import sys

    from qsmlab.data.bids_prepare import prepare_dataset
    from qsmlab.methods.checkpoint_recon import install as _install_ckpt

    _install_ckpt()  # --inversion ckpt:PATH: a trained method's chi as the Chimap (predict to derivatives)
    cfg = config_from_args(args)
    manifest, done, failed = prepare_dataset(
        args.bids_dir, args.output, cfg, participant_labels=args.participant_label, workers=args.workers,
        reference=args.reference, reference_desc=args.reference_desc, quiet=args.quiet,
        report=lambda line: print(f"qsmlab bids: error: {line}", file=sys.stderr, flush=True))
    if not args.quiet:
        print(f"{len(done)} acquisition(s) prepared, {len(failed)} failed; manifest: {manifest}")
    return 2 if failed else 0
