"""``qsmlab recon METHOD``: dipole inversion of a local field map (ppm) into a susceptibility map (ppm)."""

from __future__ import annotations

import argparse

HELP = "dipole inversion: local field (ppm) -> chi (ppm) with a classical method (TKD, CFL2, COSMOS, ...)"

DESCRIPTION = """\
Invert a local field map (ppm, background removed) into a susceptibility map (ppm).

The B0 direction (voxel axes) is, by priority: --b0-dir, the field's JSON sidecar key "B0_dir", the
field's affine. The voxel size comes from the header unless --voxel-size is given. Method parameters are
set with --param NAME=VALUE (repeatable), e.g. 'qsmlab recon tkd --param threshold=0.19 --param mode=zero'.
The output is float32 NIfTI with the field's affine and header, plus a JSON sidecar (same name, .json)
recording the method, parameters, B0_dir (B0_dirs for cosmos), voxel size and qsmlab version.

Regularisation weights default to 'auto': chosen from the data, without ground truth, by the discrepancy
principle (tv, nltv, medi, ndi: the misfit equals the field's noise, estimated from its high-pass content
unless --param noise_std=PPM is given; lsqr: its stopping rule) or generalised cross-validation (cfl2, cg:
Tikhonov weight lam; cfl2 --param penalty=gradient: the L-curve corner). The value
chosen is printed and written to the sidecar ("auto"); a search that cannot apply its criterion warns
and says which value it used. Give a number (e.g. --param alpha=3e-4) to fix the weight.

COSMOS takes several co-registered fields: '--field F1 F2 F3' with one '--b0-dir X Y Z' per field (in
the same order), or B0 directions from each field's sidecar/affine; --mask is one mask or one per field.
"""


def _methods_epilog() -> str:
    """Methods and their parameters, read from the registry (imported only when help is printed)."""
    from qsmlab.recon import registry

    lines = ["methods (--param NAME=VALUE, defaults shown):"]
    for name in registry.names("inversion"):
        fn = registry.get("inversion", name)
        params = registry.parameters(fn)
        title = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "(no parameters)"
        lines.append(f"  {name:8s} {title}")
        lines.append(f"  {'':8s} {shown}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", metavar="METHOD",
                   help="inversion method (listed below), e.g. tkd, tsvd, cfl2, lsqr, cg, cosmos, or ckpt:PATH for a "
                        "trained method's checkpoint")
    p.add_argument("--field", nargs="+", required=True, metavar="FIELD",
                   help="local field map(s) in ppm (NIfTI); several only for cosmos")
    p.add_argument("--mask", nargs="+", required=True, metavar="MASK",
                   help="brain mask(s) (binary NIfTI, same grid as the field); one per field for cosmos, or one")
    p.add_argument("--magnitude", metavar="MAG", help="magnitude image (NIfTI) for methods that weight by it")
    p.add_argument("--b0-dir", nargs=3, type=float, action="append", metavar=("X", "Y", "Z"),
                   help="B0 direction in voxel axes (overrides sidecar/affine); repeat once per field for cosmos")
    p.add_argument("--voxel-size", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="voxel size in mm (default: from the NIfTI header)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter, repeatable (e.g. --param threshold=0.19)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, metavar="CHI", help="output chi map (.nii or .nii.gz)")
    # The method list needs the registry (numpy/scipy/torch imports): build it only when help is printed.
    format_help = p.format_help

    def format_help_with_methods() -> str:
        p.epilog = _methods_epilog()
        return format_help()

    p.format_help = format_help_with_methods


def _geometry(args, field_vols, voxel_size_opt):
    """b0_dir per field (explicit > sidecar > affine) and the voxel size (option > header)."""
    import numpy as np

    from qsmlab.errors import QSMInputError
    from qsmlab.physics.geometry import normalize_b0_dir

    explicit = args.b0_dir or []
    if explicit and len(explicit) != len(field_vols):
        raise QSMInputError(f"--b0-dir given {len(explicit)} times for {len(field_vols)} field(s); "
                            "give it once per --field, or not at all")
    b0_dirs = []
    for i, v in enumerate(field_vols):
        b = normalize_b0_dir(explicit[i], what="--b0-dir") if explicit else v.b0_dir()
        b0_dirs.append(b)
    if voxel_size_opt is not None:
        vs = np.asarray(voxel_size_opt, dtype=np.float64)
        if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
            raise QSMInputError(f"--voxel-size {voxel_size_opt}: expected three positive numbers (mm)")
    else:
        vs = field_vols[0].voxel_size
    return b0_dirs, vs


def _load_inputs(args, cosmos: bool):
    from qsmlab.data.nifti import check_finite, check_mask, check_ndim, check_same_grid, load_nifti
    from qsmlab.errors import QSMInputError

    if not cosmos and len(args.field) != 1:
        raise QSMInputError(f"--field: {len(args.field)} files given; only cosmos takes several fields")
    if cosmos and len(args.field) < 2:
        raise QSMInputError("--field: cosmos needs fields from at least 2 head orientations")
    if cosmos and args.magnitude:
        raise QSMInputError("--magnitude: not used by cosmos; leave it out")
    if len(args.mask) not in (1, len(args.field)):
        raise QSMInputError(f"--mask: {len(args.mask)} files for {len(args.field)} field(s); give one, "
                            "or one per field")
    fields = []
    for path in args.field:
        v = load_nifti(path, what="--field")
        check_ndim(v, (3,), "field")
        check_finite(v)
        if fields:
            check_same_grid(fields[0], v)
        fields.append(v)
    masks = []
    for path in args.mask:
        v = load_nifti(path, what="--mask")
        check_same_grid(fields[0], v)
        masks.append(check_mask(v))
    mag = None
    if args.magnitude:
        mv = load_nifti(args.magnitude, what="--magnitude")
        check_ndim(mv, (3,), "magnitude")
        check_finite(mv)
        check_same_grid(fields[0], mv)
        mag = mv.data
    return fields, masks, mag


def run(args) -> int:
    import json

    import numpy as np

    from qsmlab import __version__
    from qsmlab.data.nifti import atomic_write_text, save_nifti
    from qsmlab.methods.checkpoint_recon import install as _install_ckpt

    _install_ckpt()  # --inversion ckpt:PATH / --bfr ckpt:PATH: trained checkpoints as pipeline steps
    from qsmlab.errors import QSMInputError
    from qsmlab.physics.geometry import sidecar_path
    from qsmlab.recon import registry

    out = str(args.output)
    if not (out.endswith(".nii") or out.endswith(".nii.gz")):
        raise QSMInputError(f"-o {out}: output must end in .nii or .nii.gz")
    fn = registry.get("inversion", args.method)  # unknown method -> one-line error with the choices
    params = registry.check_params("inversion", args.method, registry.parse_params(args.param))
    cosmos = args.method == "cosmos"
    fields, masks, mag = _load_inputs(args, cosmos)
    b0_dirs, vs = _geometry(args, fields, args.voxel_size)
    import sys
    import warnings

    from qsmlab.recon.inversion import auto

    auto.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", auto.AutoWarning)
        if cosmos:
            chi = fn([v.data for v in fields], masks, b0_dirs=b0_dirs, voxel_size=tuple(vs), quiet=args.quiet,
                     **params)
        else:
            chi = fn(fields[0].data, masks[0], voxel_size=tuple(vs), b0_dir=tuple(b0_dirs[0]), magnitude=mag,
                     quiet=args.quiet, **params)
    auto_warnings = [str(w.message) for w in caught if issubclass(w.category, auto.AutoWarning)]
    for msg in auto_warnings:  # one line each, also when --quiet: the user must know a fallback was used
        print(f"qsmlab recon: warning: {msg}", file=sys.stderr)
    chosen = auto.last()
    if not np.all(np.isfinite(chi)):
        raise QSMInputError(f"{args.method}: produced non-finite values; check the parameters {params}")
    path = save_nifti(out, chi, like=fields[0])
    resolved = {**registry.parameters(fn), **params}
    meta = {
        "method": args.method,
        "params": {k: (v if isinstance(v, bool | int | float | str) or v is None else str(v))
                   for k, v in resolved.items()},
        # "B0_dir" is the sidecar key qsmlab reads back (physics.geometry); cosmos has one per field.
        **({"B0_dirs": [[float(c) for c in b] for b in b0_dirs]} if cosmos
           else {"B0_dir": [float(c) for c in b0_dirs[0]]}),
        "voxel_size": [float(c) for c in vs],
        "field": [str(v.path) for v in fields] if cosmos else str(fields[0].path),
        "mask": list(args.mask) if cosmos else args.mask[0],
        "magnitude": args.magnitude,
        "units": "ppm",
        "qsmlab_version": __version__,
    }
    if chosen:
        meta["chosen"] = {r.parameter: r.value for r in chosen}
        meta["auto"] = [r.as_dict() for r in chosen]
    if auto_warnings:
        meta["warnings"] = auto_warnings
    atomic_write_text(sidecar_path(path), json.dumps(meta, indent=2) + "\n")
    if not args.quiet:
        for r in chosen:
            print(f"{args.method}: {r.summary()}")
        print(f"wrote {path} ({args.method})")
    return 0
