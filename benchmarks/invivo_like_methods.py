"""The learned quick profiles on a scan shaped like the in-vivo target: 160^3 at 1.06 x 1.06 x 1.07 mm.

qsmlab is scored on a real 160^3 scan at 1.06 x 1.06 x 1.07 mm (B0 along k, local field in ppm) against
COSMOS. The quick profiles train on the embedded default (2 mm). This script measures what that costs
on data built to look like the target: :func:`qsmlab.data.invivo_like.invivo_like_subject` (MNI anatomy,
healthy adult chi, head air/bone background, 5 echoes to 24 ms at 3 T, first-echo SNR 60) on the target's
grid and voxel size. Inputs are measured, not labels: the total field is the magnitude-weighted echo fit
of the noisy phase (unwrapped with the known field: no unwrapping error), the local field is it minus
the true background (perfect background removal, measured noise). Scores inside the brain mask against
the true chi (:func:`qsmlab.metrics.compute_all`).

Rows: TKD (0.19), CFL2 and TV at their defaults (what a user gets), and every learned checkpoint found
under ``--runs`` (``benchmarks/compare_methods.py``'s training folders: the validation-selected
checkpoint, else the last), two ways:

- ``resampled``: as ``qsmlab predict`` runs it: the voxel size is > 25 % from the training 2 mm, so the
  field is resampled to 2 mm, inverted, and chi resampled back to 1.06 mm;
- ``native``: the network run on the 1.06 mm grid itself (its TKD prior and dipole operator at 1.06 mm).

``--recipe realistic`` uses :mod:`qsmlab.data.realistic` heads instead (model errors, V-SHARP local field, scored
in its valid mask); ``--cosmos`` adds a column against each head's simulated COSMOS (demeaned NRMSE in the mask
COSMOS and V-SHARP share), the reference a real scan is scored against.

Other geometries: ``--voxel 0.5 0.5 2 --shape 320 320 40`` (anisotropic; a realistic head there with its
COSMOS takes ~13 min and 18 GB once), ``--tilt 20`` (B0 off k: both routes then also rotate into the training B0
direction and back), ``--tag`` names the output files. ``--runs-extra`` checkpoints run native unless
``--extra-routes native,resampled``, and in one pass unless ``--extra-tta none,flips`` (test-time mirroring).
Writes ``OUT/invivo_like_methods{tag}.{md,json,png}``; asserts nothing.

    python benchmarks/invivo_like_methods.py [--seeds 5] [--runs runs/compare_methods] [--methods qsmnet,uqsm_tv]
                                             [--voxel X Y Z] [--shape X Y Z] [--tilt DEG] [--tag _tilt20]
                                             [--recipe realistic [--cosmos]]
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from compare_classical import load_npz, save_npz  # noqa: E402  (this folder: run as python benchmarks/...)
from compare_methods import measured_field  # noqa: E402

from qsmlab.methods.inference.flips import TTA  # noqa: E402
from qsmlab.metrics import compute_all, nrmse_demeaned  # noqa: E402
from qsmlab.recon import registry  # noqa: E402

KEYS = ("nrmse", "psnr", "hfen", "ssim", "nrmse_demeaned")
LEARNED = ("uqsm", "uqsm_tv", "qsmnet", "qsmnet_plus", "nextqsm", "pedqnet")
VOXEL = (1.06, 1.06, 1.07)
SHAPE = (160, 160, 160)
CACHE = Path("cache/invivo_like_methods")
#: classical rows of the realistic column: every registered inversion at its default (auto weights)
CLASSICAL_REALISTIC = (("tkd", {"threshold": 0.19}), ("cfl2", {}), ("tv", {}), ("ndi", {}), ("lsqr", {}), ("medi", {}))


def subject(seed: int, voxel=VOXEL, shape=SHAPE, tilt: float = 0.0) -> dict:
    from qsmlab.data.invivo_like import invivo_like_subject

    s = invivo_like_subject(seed, voxel_size=tuple(voxel), tilt_deg=float(tilt), shape=tuple(shape))
    total = measured_field(s.phase, s.total_field, s.te, s.b0_tesla)
    m = s.mask
    return {"name": f"ivl{seed}", "chi": s.chi.astype(np.float32), "mask": m, "vs": tuple(voxel),
            "b0": tuple(float(b) for b in s.b0_dir), "magnitude": s.magnitude[..., 0].astype(np.float32),
            "total": total * m, "local": (total - s.background_field) * m,
            "noise_ppm": float(np.std((total - s.total_field)[m]))}


def realistic_cache(seed: int, voxel, shape, tilt: float, suffix: str = "") -> Path:
    """The cache file of the realistic head ``seed`` on this grid (``suffix`` "_cosmos": its COSMOS map)."""
    import hashlib

    key = hashlib.sha1(json.dumps([seed, list(voxel), list(shape), float(tilt), "realistic", 1]).encode()).hexdigest()[:12]
    return CACHE / f"real{seed}_{key}{suffix}.npz"


def realistic(seed: int, voxel=VOXEL, shape=SHAPE, tilt: float = 0.0) -> dict:
    """The realistic column's subject: :func:`qsmlab.data.realistic.realistic_subject` (white-matter anisotropy,
    sub-voxel veins, fine-grid acquisition, noisy echoes -> echo fit -> V-SHARP): the local field a method
    gets is what the pipeline made of the scan, scored in V-SHARP's valid mask against the scalar truth."""
    path = realistic_cache(seed, voxel, shape, tilt)
    if path.is_file():  # the 160^3 head costs minutes and ~8 GB (a 320^3 fine grid): cached
        d = load_npz(path)
        return {**d, "name": str(d["name"]), "vs": tuple(float(v) for v in d["vs"]),
                "b0": tuple(float(v) for v in d["b0"]), "noise_ppm": float(d["noise_ppm"])}
    from qsmlab.data.realistic.subject import realistic_subject

    r = realistic_subject(seed, voxel_size=tuple(voxel), tilt_deg=float(tilt), shape=tuple(shape))
    m = r.valid_mask
    d = {"name": f"real{seed}", "chi": (r.chi * m).astype(np.float32), "mask": m, "vs": tuple(voxel),
         "b0": tuple(float(b) for b in r.b0_dir), "magnitude": r.magnitude[..., 0].astype(np.float32),
         "local": (r.local_field * m).astype(np.float32), "total": (r.total_field * r.mask).astype(np.float32),
         "noise_ppm": float(r.noise_std_ppm)}
    save_npz(path, d)
    return d


def add_cosmos(s: dict, seed: int, voxel=VOXEL, shape=SHAPE, tilt: float = 0.0) -> dict:
    """``s`` with its simulated COSMOS reference (``cosmos``, ppm; ``cosmos_mask``: V-SHARP's valid mask of
    every orientation and of the scan): :func:`qsmlab.data.realistic.realistic_subject` with ``cosmos=True``
    (the scan itself and 3 more head orientations, each its own noise and pipeline, least squares over them),
    as a real scan is scored. Cached beside the head (~10 min and ~8 GB for a 160^3 head)."""
    path = realistic_cache(seed, voxel, shape, tilt, "_cosmos")
    if path.is_file():
        d = load_npz(path)
    else:
        from qsmlab.data.realistic.subject import realistic_subject

        r = realistic_subject(seed, voxel_size=tuple(voxel), tilt_deg=float(tilt), shape=tuple(shape), cosmos=True)
        if not np.allclose(r.local_field * r.valid_mask, s["local"], atol=1e-6):
            raise RuntimeError(f"real{seed}: the COSMOS run's scan differs from the cached head {path.stem}")
        d = {"cosmos": r.cosmos.astype(np.float32), "cosmos_mask": np.asarray(r.cosmos_mask, bool)}
        save_npz(path, d)
    return {**s, "cosmos": d["cosmos"], "cosmos_mask": np.asarray(d["cosmos_mask"], bool) & s["mask"]}


def score(chi: np.ndarray, s: dict) -> dict:
    m = s["mask"]
    r = compute_all(np.asarray(chi, np.float32) * m, s["chi"] * m, m)
    out = {k: float(r[k]) for k in KEYS}
    if "cosmos" in s:  # demeaned NRMSE against the simulated COSMOS, as a real scan is scored
        cm = s["cosmos_mask"]
        out["nrmse_demeaned_cosmos"] = float(nrmse_demeaned(np.asarray(chi, np.float32) * cm, s["cosmos"] * cm, cm))
    return out


def checkpoint(runs: Path, name: str) -> Path | None:
    folder = runs / name / "checkpoints"
    best = sorted(folder.glob("best*.ckpt"))
    if best:
        return best[-1]
    last = folder / "last.ckpt"
    return last if last.is_file() else None


def learned(ckpt: Path, s: dict, native: bool, tta: str | None = None) -> np.ndarray:
    from qsmlab.methods.predict import method_from, predict_volume

    return predict_volume(method_from(ckpt), s["local"], s["mask"], s["vs"], s["b0"], magnitude=s["magnitude"],
                          voxel_resampling="never" if native else "auto", tta=tta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="5", help="comma-separated subject seeds")
    ap.add_argument("--runs", type=Path, default=Path("runs/compare_methods"))
    ap.add_argument("--methods", default=",".join(LEARNED))
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--voxel", type=float, nargs=3, default=VOXEL, metavar=("X", "Y", "Z"), help="mm")
    ap.add_argument("--shape", type=int, nargs=3, default=SHAPE, metavar=("X", "Y", "Z"))
    ap.add_argument("--tilt", type=float, default=0.0, help="head pitch about i (deg): b0_dir = (0, sin, cos)")
    ap.add_argument("--recipe", choices=("clean", "realistic"), default="clean",
                    help="clean: invivo_like subjects, true background removed; realistic: qsmlab.data.realistic "
                         "(model errors, V-SHARP local field)")
    ap.add_argument("--runs-extra", nargs="*", default=[], metavar="NAME=CKPT",
                    help="more learned rows from checkpoint files, e.g. uqsm_tv_sweep=runs/uqsm_tv/trials/.../last.ckpt")
    ap.add_argument("--extra-routes", default="native",
                    help="routes of the --runs-extra rows, comma-separated: native (the network on the scan's grid, "
                         "as the realistic profiles' voxel_resampling never) and/or resampled (to the training "
                         "voxel size and back when > 25 %% off)")
    ap.add_argument("--extra-tta", default="none",
                    help="test-time augmentation of the --runs-extra rows, comma-separated: none (one pass) and/or "
                         "flips (the mean over the kernel-preserving axis flips; route shown as 'native+flips')")
    ap.add_argument("--tag", default="", help="suffix of the output files (invivo_like_methods<tag>.md)")
    ap.add_argument("--cosmos", action="store_true",
                    help="realistic: also score against the head's simulated COSMOS (demeaned NRMSE, column "
                         "nrmse_demeaned_cosmos), as a real scan is; the COSMOS scans are simulated and cached on first use")
    ap.add_argument("--classical", default=None,
                    help="comma-separated classical rows (default: tkd,cfl2,tv; realistic: + ndi,lsqr,medi)")
    a = ap.parse_args()
    routes = [r for r in a.extra_routes.split(",") if r]
    if not routes or set(routes) - {"native", "resampled"}:
        ap.error(f"--extra-routes: expected native and/or resampled, got {a.extra_routes!r}")
    ttas = [x for x in a.extra_tta.split(",") if x]
    if not ttas or set(ttas) - set(TTA):
        ap.error(f"--extra-tta: expected none and/or flips, got {a.extra_tta!r}")
    extras = [(item, *item.partition("=")[::2]) for item in a.runs_extra]  # (item, name, checkpoint path)
    for item, name, path in extras:
        if not name or not Path(path).is_file():
            ap.error(f"--runs-extra {item!r}: expected NAME=CKPT with an existing checkpoint file")
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    make = subject if a.recipe == "clean" else realistic
    subs = [make(int(x), a.voxel, a.shape, a.tilt) for x in a.seeds.split(",") if x]
    if a.cosmos:
        if a.recipe != "realistic":
            ap.error("--cosmos needs --recipe realistic")
        subs = [add_cosmos(s, int(x), a.voxel, a.shape, a.tilt) for s, x in zip(subs, [x for x in a.seeds.split(",") if x])]
    keys = KEYS + (("nrmse_demeaned_cosmos",) if a.cosmos else ())
    print(f"subjects {[s['name'] for s in subs]}: field noise {np.mean([s['noise_ppm'] for s in subs]):.4f} ppm, "
          f"local p1/p99 {np.percentile(subs[0]['local'][subs[0]['mask']], [1, 99]).round(3).tolist()} ppm "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows, maps = [], {}

    def add(label, how, outs, sec):
        scores = [score(o, s) for o, s in zip(outs, subs)]
        sc = {k: float(np.mean([x[k] for x in scores])) for k in keys}
        rows.append({"method": label, "route": how, **sc, "seconds": sec / len(subs)})
        maps[f"{label} ({how})" if how else label] = outs[0]
        print(f"{label:12s} {how:10s} NRMSE {sc['nrmse']:.1f} %  HFEN {sc['hfen']:.1f} %  SSIM {sc['ssim']:.3f} "
              + (f"NRMSE vs COSMOS (demeaned) {sc['nrmse_demeaned_cosmos']:.1f} %  " if a.cosmos else "")
              + f"({sec / len(subs):.1f} s per scan)", flush=True)

    inv = lambda n: registry.get("inversion", n)  # noqa: E731
    classical = (("tkd", {"threshold": 0.19}), ("cfl2", {}), ("tv", {})) if a.recipe == "clean" else CLASSICAL_REALISTIC
    if a.classical is not None:
        known = dict(CLASSICAL_REALISTIC)
        bad = [n for n in a.classical.split(",") if n and n not in known]
        if bad:
            ap.error(f"--classical: unknown {', '.join(bad)} (known: {', '.join(known)})")
        classical = tuple((n, known[n]) for n in a.classical.split(",") if n)
    for name, kw in classical:
        t1 = time.perf_counter()
        # realistic: the magnitude weights the data term where the method takes one, as in the pipeline
        mag = a.recipe == "realistic" and "magnitude" in inspect.signature(inv(name)).parameters
        outs = [inv(name)(s["local"], s["mask"], voxel_size=s["vs"], b0_dir=s["b0"], quiet=True,
                          **({**kw, "magnitude": s["magnitude"]} if mag else kw)) for s in subs]
        add(name.upper() if name != "cfl2" else "CFL2", "default", outs, time.perf_counter() - t1)
    for name in [m for m in a.methods.split(",") if m]:
        ckpt = checkpoint(a.runs, name)
        if ckpt is None:
            print(f"{name}: no checkpoint under {a.runs / name}; run benchmarks/compare_methods.py first")
            continue
        for native in (False, True):
            t1 = time.perf_counter()
            outs = [learned(ckpt, s, native) for s in subs]
            add(name, "native" if native else "resampled", outs, time.perf_counter() - t1)
    for _, name, path in extras:
        for route in routes:
            for tta in ttas:
                t1 = time.perf_counter()
                outs = [learned(Path(path), s, route == "native", tta) for s in subs]
                add(name, route + ("+flips" if tta == "flips" else ""), outs, time.perf_counter() - t1)

    cols = ("method", "route") + keys + ("seconds",)
    lines = [f"# Quick profiles on in-vivo-like scans ({'x'.join(map(str, a.shape))} at "
             f"{' x '.join(map(str, a.voxel))} mm, B0 tilted {a.tilt:g} deg from k)", "",
             f"Subjects {', '.join(s['name'] for s in subs)} ("
             + ("qsmlab.data.invivo_like, SNR 60, 5 echoes to 24 ms); measured local field (echo fit, true "
                "background removed" if a.recipe == "clean" else
                "qsmlab.data.realistic: anisotropy, veins, fine-grid acquisition, SNR 60, 5 echoes to 24 ms); local "
                "field from the echo fit and V-SHARP, scored in its valid mask")
             + f"; noise "
             f"{np.mean([s['noise_ppm'] for s in subs]):.4f} ppm); metrics inside the mask; NRMSE, HFEN in %, "
             f"PSNR in dB; seconds per scan ({a.threads} thread{'s' if a.threads > 1 else ''}).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if c == "ssim" else f"{r[c]:.1f}" if isinstance(r[c], float)
                                       else str(r[c]) for c in cols) + " |")
    text = "\n".join(lines)
    print("\n" + text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"invivo_like_methods{a.tag}.md").write_text(text + "\n")
    (a.out / f"invivo_like_methods{a.tag}.json").write_text(json.dumps({"rows": rows, "seeds": a.seeds}, indent=2))
    s = subs[0]
    k = int(np.argmax(s["mask"].sum(axis=(0, 1))))
    panels = [("truth", s["chi"])] + list(maps.items())
    cols_n = min(5, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols_n), cols_n, figsize=(3 * cols_n, 3.2 * -(-len(panels) // cols_n)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (label, vol) in zip(axes.ravel(), panels):
        ax.imshow(np.rot90(vol[:, :, k] * s["mask"][:, :, k]), cmap="gray", vmin=-0.1, vmax=0.2)
        ax.set_title(label, fontsize=8)
    fig.suptitle(f"{s['name']}: axial slice {k}, chi in ppm (window -0.1 .. 0.2)", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out / f"invivo_like_methods{a.tag}.png", dpi=90)
    print(f"wrote {a.out / f'invivo_like_methods{a.tag}.md'}, .json, .png ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
