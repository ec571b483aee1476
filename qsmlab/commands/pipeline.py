"""``qsmlab pipeline``: multi-echo GRE phase + magnitude -> total field, local field and chi (NIfTI, ppm)."""

from __future__ import annotations

import argparse

HELP = "end-to-end QSM: unwrap, echo fit, mask, background removal, dipole inversion"
DESCRIPTION = """\
End-to-end classical QSM from multi-echo GRE data.

Phase (rad, wrapped) and magnitude are one 4-D NIfTI each (echoes last) or one 3-D file per echo.
Echo times (s) and field strength (T) come from BIDS JSON sidecars next to each echo file
(EchoTime, MagneticFieldStrength; a 4-D file's sidecar may list EchoTime per echo); --te / --b0 win.
B0 direction: --b0-dir > sidecar B0_dir > the NIfTI affine.

Steps: mask (given, or from the magnitude) -> spatial + temporal unwrapping -> magnitude-weighted echo
fit (total field, ppm) -> background removal (--bfr) -> dipole inversion (--inversion).

Writes to OUTDIR: total_field, mask (brain), valid_mask (where local field and chi are defined),
local_field, chi (.nii.gz, float32 ppm, input geometry), qsmlab.json (provenance) and chi.png.

Example:
  qsmlab pipeline --phase ph_e1.nii.gz ph_e2.nii.gz --magnitude mag_e1.nii.gz mag_e2.nii.gz \\
      --te 0.004 0.008 --b0 3 --bfr vsharp --inversion cfl2 --inv-param lam=0.05 -o out/

The inversion's regularisation weight defaults to auto (see 'qsmlab recon --help'); the value chosen is
printed and recorded in qsmlab.json (steps[-1].chosen, .auto).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phase", nargs="+", required=True, metavar="PHASE",
                   help="wrapped phase in rad: one 4-D NIfTI (X,Y,Z,echo) or one 3-D NIfTI per echo")
    p.add_argument("--magnitude", nargs="+", required=True, metavar="MAG",
                   help="magnitude, same layout as --phase")
    p.add_argument("--te", nargs="+", type=float, metavar="TE", help="echo times in seconds (default: sidecars)")
    p.add_argument("--b0", type=float, metavar="TESLA", help="field strength in T (default: sidecar)")
    p.add_argument("--mask", metavar="M", help="binary brain mask NIfTI (default: computed from the magnitude)")
    p.add_argument("--unwrap", default="region", metavar="NAME", help="spatial unwrapper: region (default) or laplacian")
    p.add_argument("--bfr", default="vsharp", metavar="NAME", help="background removal method (default vsharp), or ckpt:PATH for the background net of a trained "
                        "NeXtQSM checkpoint")
    p.add_argument("--inversion", default="tv", metavar="NAME",
                   help="dipole inversion method (default tv: FANSI-style total variation, its weight alpha=auto "
                        "by the discrepancy principle with the echo fit's noise level), or ckpt:PATH for any trained "
                        "method's checkpoint (qsmlab fit)")
    p.add_argument("--unwrap-param", nargs="+", action="extend", default=[], metavar="K=V",
                   help="parameters of the unwrapper")
    p.add_argument("--bfr-param", nargs="+", action="extend", default=[], metavar="K=V",
                   help="parameters of the background method, e.g. radius_mm=4")
    p.add_argument("--inv-param", nargs="+", action="extend", default=[], metavar="K=V",
                   help="parameters of the inversion, e.g. lam=0.05")
    p.add_argument("--mask-param", nargs="+", action="extend", default=[], metavar="K=V",
                   help="parameters of the automatic brain mask (no --mask): threshold=otsu|FRACTION, "
                        "opening, closing, separate_mm, erode_mm, erode_vox")
    p.add_argument("--b0-dir", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="B0 direction in voxel axes (default: sidecar B0_dir, else the affine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("-o", "--outdir", required=True, metavar="OUTDIR", help="output folder (created)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from qsmlab.data.nifti import check_mask, check_same_grid, load_nifti
    from qsmlab.methods.checkpoint_recon import install as _install_ckpt

    _install_ckpt()  # --inversion ckpt:PATH / --bfr ckpt:PATH: trained checkpoints as pipeline steps
    from qsmlab.errors import QSMInputError
    from qsmlab.recon.pipeline import check_phase_radians, run_pipeline
    from qsmlab.recon.registry import parse_params


    def params(items, opt):
        try:
            return parse_params(items)
        except QSMInputError as e:
            raise QSMInputError(str(e).replace("--param", opt, 1)) from None

    from qsmlab.recon import registry

    # Methods and parameters are checked before any file is read; errors name the option at fault.
    chosen = {}
    for fam, name, opt, popt, items in (
        ("unwrap", args.unwrap, "--unwrap", "--unwrap-param", args.unwrap_param),
        ("background", args.bfr, "--bfr", "--bfr-param", args.bfr_param),
        ("inversion", args.inversion, "--inversion", "--inv-param", args.inv_param),
    ):
        try:
            registry.get(fam, name)
        except QSMInputError as e:
            raise QSMInputError(f"{opt}: {e}") from None
        p = params(items, popt)
        try:
            registry.check_params(fam, name, p)
        except QSMInputError as e:
            raise QSMInputError(f"{popt}: {e}") from None
        chosen[fam] = p
    un_p, bfr_p, inv_p = chosen["unwrap"], chosen["background"], chosen["inversion"]
    mask_p = _mask_params(params(args.mask_param, "--mask-param"))
    if mask_p and args.mask:
        raise QSMInputError("--mask-param: only used for the automatic mask; drop it or drop --mask")

    ph_vols, phase = _load_echoes(args.phase, "--phase")
    mag_vols, mag = _load_echoes(args.magnitude, "--magnitude")
    ref = ph_vols[0]
    for v in mag_vols:
        check_same_grid(ref, v)
    if mag.shape[3] == 1 and phase.shape[3] > 1:
        # one echo-combined magnitude (common in shared data sets): the same weight for every echo
        mag = np.repeat(mag, phase.shape[3], axis=3)
    if mag.shape[3] != phase.shape[3]:
        raise QSMInputError(f"--magnitude: {mag.shape[3]} echoes but --phase has {phase.shape[3]} "
                            "(give one magnitude per echo, or a single echo-combined magnitude)")
    for i, v in enumerate(ph_vols):
        sl = phase[..., i] if len(ph_vols) > 1 else phase
        check_phase_radians(sl, name=f"--phase {v.path}")

    te, te_src, b0, b0_src = _read_acquisition(args, ph_vols, mag_vols, phase.shape[3])

    mask = None
    if args.mask:
        mvol = load_nifti(args.mask, what="--mask")
        check_same_grid(ref, mvol)
        mask = check_mask(mvol)

    b0_dir = ref.b0_dir(args.b0_dir)
    b0_dir_src = "--b0-dir" if args.b0_dir is not None else "sidecar B0_dir or affine"
    import sys
    import warnings

    from qsmlab.recon.inversion.auto import AutoWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AutoWarning)
        res = run_pipeline(phase, mag, te, b0, mask=mask, voxel_size=ref.voxel_size, b0_dir=b0_dir,
                           unwrap=args.unwrap, unwrap_params=un_p, bfr=args.bfr, bfr_params=bfr_p,
                           inversion=args.inversion, inv_params=inv_p, mask_params=mask_p, quiet=args.quiet)
    for w in caught:
        if issubclass(w.category, AutoWarning):
            print(f"qsmlab pipeline: warning: {w.message}", file=sys.stderr)
    prov = dict(res["provenance"])
    prov["inputs"] = {"phase": [str(v.path) for v in ph_vols], "magnitude": [str(v.path) for v in mag_vols],
                      "mask": args.mask, "te_source": te_src, "b0_source": b0_src, "b0_dir_source": b0_dir_src}
    prov["arguments"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    out = Path(args.outdir)
    written = _save_outputs(out, res, prov, ref)
    if not args.quiet:
        inv_step = prov["steps"][-1]
        for r in inv_step.get("auto", []):
            how = r["criterion"]
            if r.get("noise_std"):
                src = inv_step.get("noise_std_ppm", {}).get("source") or r.get("noise_source")
                how += f", noise {r['noise_std']:.2g} ppm from the {src}"
            print(f"qsmlab pipeline: {args.inversion}: {r['parameter']}=auto -> {r['value']:.3g} ({how})")
        print(f"qsmlab pipeline: chi range [{np.min(res['chi']):.3f}, {np.max(res['chi']):.3f}] ppm; "
              f"wrote {', '.join(p.name for p in written)} to {out}")
    return 0


# -- helpers (heavy imports stay inside: ``qsmlab --help`` must not load numpy/nibabel) ---------------


def _mask_params(raw: dict) -> dict:
    """``--mask-param`` values checked and converted against :func:`brain_mask`'s keyword defaults."""
    from qsmlab.errors import QSMInputError
    from qsmlab.recon.masking import brain_mask
    from qsmlab.recon.registry import convert_params

    try:
        out = convert_params(brain_mask, raw, "the automatic brain mask")
        if out.get("threshold", "otsu") != "otsu":  # str | float parameter: a fraction arrives as text
            out["threshold"] = float(out["threshold"])
    except QSMInputError as e:
        raise QSMInputError(f"--mask-param: {e}") from None
    except ValueError:
        raise QSMInputError(f"--mask-param threshold={raw['threshold']!r}: expected otsu or a fraction") from None
    return out


def _load_echoes(paths: list[str], opt: str):
    """Volumes and the (X, Y, Z, E) array from one 4-D file or one 3-D file per echo."""
    import numpy as np

    from qsmlab.data.nifti import check_finite, check_ndim, check_same_grid, load_nifti

    vols = [load_nifti(p, what=opt) for p in paths]
    for v in vols:
        check_ndim(v, (3, 4) if len(vols) == 1 else (3,), opt)
        check_finite(v)
        check_same_grid(vols[0], v)
    data = vols[0].data if vols[0].data.ndim == 4 else np.stack([v.data for v in vols], axis=-1)
    return vols, data  # (X, Y, Z, E), E >= 1


def _sidecar(vol) -> dict:
    import json

    from qsmlab.errors import QSMInputError
    from qsmlab.physics.geometry import sidecar_path

    if vol.path is None:
        return {}
    p = sidecar_path(vol.path)
    if not p.is_file():
        return {}
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise QSMInputError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return meta if isinstance(meta, dict) else {}


def _read_acquisition(args, ph_vols, mag_vols, n_echoes: int):
    """(te s, te source, B0 T, B0 source): the CLI wins, then EchoTime / MagneticFieldStrength sidecars."""
    from qsmlab.errors import QSMInputError

    te_src, b0_src = "--te", "--b0"
    te = list(args.te) if args.te else None
    if te is None:
        for vols in (ph_vols, mag_vols):
            metas = [_sidecar(v) for v in vols]
            vals = [m.get("EchoTime") for m in metas]
            if all(v is not None for v in vals):
                flat = [x for v in vals for x in (v if isinstance(v, list) else [v])]
                te, te_src = [float(x) for x in flat], f"sidecar EchoTime ({vols[0].path.name} ...)"
                break
        if te is None:
            raise QSMInputError("--te: echo times not given and no EchoTime in the JSON sidecars of --phase or "
                                "--magnitude; pass --te TE1 TE2 ... in seconds")
    if len(te) != n_echoes:
        raise QSMInputError(f"{te_src}: {len(te)} echo times for {n_echoes} echoes")
    if any(t > 1.0 for t in te):
        raise QSMInputError(f"{te_src}: echo times {te} look like milliseconds; expected seconds (e.g. 0.004)")
    b0 = args.b0
    if b0 is None:
        for v in [*ph_vols, *mag_vols]:
            val = _sidecar(v).get("MagneticFieldStrength")
            if val is not None:
                b0, b0_src = float(val), f"sidecar MagneticFieldStrength ({v.path.name})"
                break
        if b0 is None:
            raise QSMInputError("--b0: field strength not given and no MagneticFieldStrength in the JSON "
                                "sidecars; pass --b0 TESLA")
    if not b0 > 0 or b0 > 30:
        raise QSMInputError(f"{b0_src}: field strength {b0} T out of range (0, 30]")
    return te, te_src, float(b0), b0_src


def _save_outputs(out, res: dict, prov: dict, ref):
    """NIfTIs (float32, ``ref``'s affine/header, atomic), qsmlab.json and chi.png; returns the paths."""
    import json

    from qsmlab.data.nifti import atomic_write_text, save_nifti

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in ("total_field", "mask", "valid_mask", "local_field", "chi"):
        written.append(save_nifti(out / f"{key}.nii.gz", res[key], like=ref))
    prov = {**prov, "outputs": {p.name: ("ppm" if "field" in p.name or p.name.startswith("chi") else "0/1")
                                for p in written}}
    written.append(atomic_write_text(out / "qsmlab.json", json.dumps(prov, indent=2) + "\n"))
    written.append(_plot_chi(out / "chi.png", res["chi"], res["valid_mask"], ref.voxel_size))
    return written


def _plot_chi(path, chi, mask, voxel_size, vlim: float = 0.15):
    """Orthogonal slices through the mask centroid, grey ±vlim ppm, with a colourbar; atomic write."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    idx = np.argwhere(mask)
    c = np.round(idx.mean(0)).astype(int) if idx.size else np.array(chi.shape) // 2
    vs = np.asarray(voxel_size, float)
    views = [(chi[c[0], :, :], vs[2] / vs[1], f"i = {c[0]}"), (chi[:, c[1], :], vs[2] / vs[0], f"j = {c[1]}"),
             (chi[:, :, c[2]], vs[1] / vs[0], f"k = {c[2]}")]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (sl, aspect, title) in zip(axes, views):
        im = ax.imshow(sl.T, origin="lower", cmap="gray", vmin=-vlim, vmax=vlim, aspect=aspect,
                       interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.02, label="χ (ppm)")
    fd, tmp = tempfile.mkstemp(prefix=".chi.", suffix=".png", dir=str(path.parent))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions of a new file
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
