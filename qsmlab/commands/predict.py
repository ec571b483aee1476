"""``qsmlab predict``: a trained method's checkpoint applied to one scan (local field -> chi, ppm)."""

from __future__ import annotations

import argparse

ACCEPTS_EXTRA = True  # with --config, the remaining options go to the platform's LightningCLI predict

HELP = "apply a trained method's checkpoint to a local field (ppm) -> chi (ppm); any grid, B0 direction"

DESCRIPTION = """\
Apply a trained deep-learning method (a checkpoint written by 'qsmlab fit') to one scan: local field
(ppm, background removed) + brain mask -> susceptibility map (ppm).

Any grid size (padded to the network's multiple, or tiled with Gaussian-blended sliding windows when
large) and any B0 direction: when B0 is more than 1 degree from the training data's direction (stored
in the checkpoint), the field and mask are rotated into a frame where B0 matches, the network runs, and
chi is rotated back (a warning says so). A voxel size more than 25 % from the training one is resampled
to it and back, with a warning, unless the checkpoint says voxel_resampling: never (the quick profiles
with a TKD prior: they keep the scan's resolution) or --voxel-resampling overrides it. --tta flips averages
the network over the axis flips that leave the dipole kernel unchanged (as nnU-Net mirrors). The B0 direction
(voxel axes) is, by priority: --b0-dir, the field's JSON sidecar key "B0_dir", the field's affine. The
voxel size comes from the header unless --voxel-size.

The output is float32 NIfTI with the field's affine and header, plus a JSON sidecar (same name, .json)
recording the checkpoint, the method, B0_dir, the voxel size, the normalisation and the qsmlab version.

With --config instead of --ckpt/--field, the command is the platform's LightningCLI 'predict' (a whole
datamodule's predict split): 'qsmlab predict --config experiments/uqsm_tv.yaml --ckpt_path last.ckpt'.

example:
  qsmlab predict --ckpt runs/uqsm_tv/last.ckpt --field local_field.nii.gz --mask mask.nii.gz -o chi.nii.gz
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", metavar="CKPT", help="checkpoint of a qsmlab method (.ckpt)")
    p.add_argument("--field", metavar="FIELD", help="local field map in ppm (NIfTI)")
    p.add_argument("--mask", metavar="MASK", help="brain mask (binary NIfTI, same grid as the field)")
    p.add_argument("--magnitude", metavar="MAG", help="magnitude image (NIfTI), for methods whose network takes it")
    p.add_argument("--total-field", metavar="T", help="total field in ppm (NIfTI), for methods that take it (NeXtQSM)")
    p.add_argument("--b0-dir", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="B0 direction in voxel axes (overrides sidecar/affine)")
    p.add_argument("--voxel-size", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="voxel size in mm (default: from the NIfTI header)")
    p.add_argument("--voxel-resampling", choices=("auto", "never"),
                   help="voxel size > 25 %% off the training one: 'auto' resamples to it and back, 'never' runs "
                        "on the scan's grid (default: the checkpoint's model.voxel_resampling)")
    p.add_argument("--tta", choices=("none", "flips"),
                   help="test-time mirroring: 'flips' averages the network over the axis flips that keep the dipole "
                        "kernel (8 for B0 along a voxel axis; one pass each), 'none' one pass (default: the "
                        "checkpoint's model.tta)")
    p.add_argument("--method", metavar="NAME",
                   help="expected method (uqsm, uqsm_dip, qsmnet, qsmnet_plus, ...); a checkpoint of another fails")
    p.add_argument("--device", default="cpu", help="torch device for inference (default cpu; e.g. cuda)")
    p.add_argument("--config", metavar="YAML",
                   help="experiment YAML: run the platform's LightningCLI 'predict' instead (other options "
                        "such as --ckpt_path, --profile, --key.path VALUE are passed on)")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.add_argument("-o", "--output", metavar="CHI", help="output chi map (.nii or .nii.gz)")


def _delegate(args) -> int:
    from qsmlab.errors import QSMInputError

    if args.ckpt or args.field:
        raise QSMInputError("--config runs the platform's LightningCLI predict; give either --config or "
                            "--ckpt/--field, not both")
    from qsmlab.lab.cli import main as lab_main

    return int(lab_main("predict", ["--config", args.config] + list(getattr(args, "extra", None) or [])) or 0)


def run(args) -> int:
    import json

    import numpy as np

    from qsmlab import __version__
    from qsmlab.commands.scan_inputs import load_scan, output_path
    from qsmlab.data.nifti import atomic_write_text, save_nifti
    from qsmlab.errors import QSMInputError
    from qsmlab.physics.geometry import sidecar_path

    if args.config:
        return _delegate(args)
    if getattr(args, "extra", None):
        raise QSMInputError(f"unrecognized arguments: {' '.join(args.extra)}")
    for opt, v in (("--ckpt", args.ckpt), ("--field", args.field), ("--mask", args.mask), ("-o", args.output)):
        if not v:
            raise QSMInputError(f"{opt} is required (or --config for the platform's predict)")
    out = output_path(args)

    import torch

    from qsmlab.methods import load_method
    from qsmlab.methods.predict import predict_volume

    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise QSMInputError(f"--device {args.device}: not available ({str(e).splitlines()[0]})") from None
    model = load_method(args.ckpt, method=args.method, map_location=str(device))

    scan = load_scan(args, ("magnitude", "total_field"))
    field, mask, extra, b0, vs = scan.field, scan.mask, scan.images, scan.b0_dir, scan.voxel_size
    chi = predict_volume(model, field.data, mask, voxel_size=vs, b0_dir=b0,
                         voxel_resampling=args.voxel_resampling, tta=args.tta, **extra)
    if not np.all(np.isfinite(chi)):
        raise QSMInputError(f"--ckpt {args.ckpt}: the network produced non-finite values on {args.field}")
    path = save_nifti(out, chi, like=field)
    meta = {
        "method": model.name,
        "checkpoint": str(args.ckpt),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "B0_dir": [float(c) for c in b0],
        "voxel_size": [float(c) for c in vs],
        "field_scale_ppm": float(model.field_scale),
        "train_b0_dir": [float(c) for c in model.train_b0_dir],
        "train_voxel_size": [float(c) for c in model.train_voxel_size],
        "voxel_resampling": args.voxel_resampling or model.options.voxel_resampling,
        "tta": args.tta or model.options.tta,
        "field": str(args.field), "mask": str(args.mask), "magnitude": args.magnitude,
        "total_field": args.total_field,
        "units": "ppm",
        "qsmlab_version": __version__,
    }
    atomic_write_text(sidecar_path(path), json.dumps(meta, indent=2) + "\n")
    if not args.quiet:
        print(f"wrote {path} ({model.name})")
    return 0
