"""Learned methods vs classical inversions on held-out synthetic subjects: a metrics table and a figure.

Each learned method trains its experiment's ``quick`` profile (``experiments/<name>.yaml``: since issue 15
the realistic 1.5 mm heads of ``data_manifests/train_realistic_recipe.yaml`` for most methods, the embedded
default for the others; 2 CPU cores) through the platform's ``fit`` (:func:`qsmlab.lab.run.execute`), and its
validation-selected checkpoint (best ``val/nrmse`` on the profile's validation subject, else the last) is scored on subjects that
were never seen: the default recipe's anatomical group (MNI152 anatomy, 2 mm, 3 T, 5 echoes, SNR 100)
generated with another seed (``--test-seed``), plus one random-shape phantom for the uQSM-DIP check.

Inputs are what a scanner measures, not the simulation's labels: the total field is the magnitude-
weighted echo fit (:func:`qsmlab.recon.echo_fit.fit_field`) of the simulated noisy multi-echo phase,
unwrapped with the known field (an oracle unwrapping: no unwrapping error, the engine's phase noise
kept); the local field is that total field minus the true background field (perfect background removal,
measured noise). Scores (:func:`qsmlab.metrics.compute_all`) are against the true chi inside the true
mask, averaged over the test subjects:

1. from the local field: TKD (threshold 0.19), CFL2 and TV each at their best weight on these subjects
   (an oracle choice over a grid), every learned method; uQSM-DIP fits each volume itself;
2. from the total field, on V-SHARP's valid mask (where every row has an answer): V-SHARP + TKD,
   V-SHARP + TV (best weight), NeXtQSM end to end;
3. one volume (the random-shape phantom, 64^3): TKD vs uQSM-DIP.

The issue's checks are printed and saved: every learned method below TKD's NRMSE; uQSM (NDI + TV)
below uQSM (NDI alone); uQSM-DIP below TKD on one volume; NeXtQSM from the total field below V-SHARP +
TKD. Writes ``OUT/compare_methods.{md,csv,json,png}``; asserts nothing. Parts can be rerun:

    python benchmarks/compare_methods.py [--methods nextqsm,pedqnet] [--quick-steps 300] [--reuse]
                                         [--ckpt qsmnet=runs/qsmnet/quick/version_0/checkpoints/last.ckpt]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from qsmlab.data.manifest import load_manifest  # noqa: E402
from qsmlab.data.nifti import load_nifti  # noqa: E402
from qsmlab.data.recipe import DEFAULT_RECIPE, ensure_dataset  # noqa: E402
from qsmlab.metrics import compute_all  # noqa: E402
from qsmlab.physics import units  # noqa: E402
from qsmlab.recon import registry  # noqa: E402
from qsmlab.recon.echo_fit import fit_field  # noqa: E402

LEARNED = ("uqsm", "uqsm_tv", "uqsm_ldi_tv", "uqsm_wldi_tv", "qsmnet", "qsmnet_plus", "nextqsm", "pedqnet",
           "uqsm_dip")
DEFAULT_METHODS = "uqsm,uqsm_tv,qsmnet,qsmnet_plus,nextqsm,pedqnet,uqsm_dip"
KEYS = ("nrmse", "psnr", "hfen", "ssim", "nrmse_demeaned")
CFL2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
TV_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)


# -- held-out data ------------------------------------------------------------------------------------------

def test_recipe(seed: int, n_anat: int) -> dict:
    """The default recipe's anatomical group with another seed (``n_anat`` subjects) + one shape phantom."""
    rec = yaml.safe_load(Path(DEFAULT_RECIPE).read_text())
    anat = next(g for g in rec["subjects"] if g["kind"] == "anatomical")
    shapes = next(g for g in rec["subjects"] if g["kind"] == "shapes")
    rec.update(name=f"heldout-{seed}", seed=int(seed),
               subjects=[{**anat, "name": "test", "count": int(n_anat)}, {**shapes, "name": "tshape", "count": 1}])
    return rec


def measured_field(phase: np.ndarray, total: np.ndarray, te, b0_tesla: float) -> np.ndarray:
    """Echo fit of a simulated noisy phase (rad, (X, Y, Z, E)), unwrapped with the known total field
    (an oracle unwrapping: no unwrapping error, the phase noise kept); ppm, (X, Y, Z)."""
    te = np.asarray(te, dtype=np.float64)
    model = np.asarray(total, np.float64)[..., None] * np.asarray([units.phase_scale(t, b0_tesla) for t in te])
    d = np.angle(np.exp(1j * (phase - model)))               # phase offset + noise, wrapped
    d = d[..., :1] + np.angle(np.exp(1j * (d - d[..., :1])))  # the offset is common to all echoes
    return fit_field(model + d, te, b0_tesla).field.astype(np.float32)


def measured_total_field(row) -> np.ndarray:
    """:func:`measured_field` of a manifest row's phase and total field."""
    return measured_field(load_nifti(row.phase).data.astype(np.float64), load_nifti(row.total_field).data,
                          row.te, row.b0_tesla)


def load_subject(row) -> dict:
    chi = load_nifti(row.chi).data.astype(np.float32)
    mask = load_nifti(row.mask).data > 0.5
    local = load_nifti(row.field).data.astype(np.float32)
    total_true = load_nifti(row.total_field).data.astype(np.float32)
    total = measured_total_field(row)
    return {
        "name": row.subject, "chi": chi, "mask": mask, "vs": tuple(row.voxel_size), "b0": tuple(row.b0_dir),
        "magnitude": load_nifti(row.magnitude).data.astype(np.float32),
        "total": total * mask, "local": (total - (total_true - local)) * mask,
        "noise_ppm": float(np.std((total - total_true)[mask])),
        "phase_scale": float(units.phase_scale(row.te[0], row.b0_tesla)),
    }


def score(chi: np.ndarray, s: dict, mask: np.ndarray | None = None) -> dict:
    m = s["mask"] if mask is None else mask
    r = compute_all(np.asarray(chi, np.float32) * m, s["chi"] * m, m)
    return {k: float(r[k]) for k in KEYS}


def mean_scores(per_subject: list[dict]) -> dict:
    return {k: float(np.mean([p[k] for p in per_subject])) for k in KEYS}


# -- classical ----------------------------------------------------------------------------------------------

def classical(subjects: list[dict]) -> tuple[list[dict], dict, list[dict], str]:
    """Rows from the local field (TKD, best CFL2, best TV) and from the total field (V-SHARP + ...)."""
    inv = lambda n: registry.get("inversion", n)  # noqa: E731
    rows, maps = [], {}

    def run(name, fn, grid, key):
        best = None
        for p in grid:
            try:
                outs = [fn(s["local"], s["mask"], voxel_size=s["vs"], b0_dir=s["b0"], quiet=True, **{key: p})
                        for s in subjects]
            except Exception as e:  # a broken baseline is reported, not fatal
                rows.append({"method": name, "input": "local field", "kind": "classical", "error": repr(e)[:200]})
                print(f"{name}: failed: {e!r}")
                return name
            sc = mean_scores([score(o, s) for o, s in zip(outs, subjects)])
            if best is None or sc["nrmse"] < best[1]["nrmse"]:
                best = (p, sc, outs[0])
        p, sc, out = best
        label = name if len(grid) == 1 else f"{name} ({key}={p:g}, best)"
        rows.append({"method": label, "input": "local field", "kind": "classical", **sc})
        maps[label] = out
        return label

    tkd = run("TKD", inv("tkd"), (0.19,), "threshold")
    run("CFL2", inv("cfl2"), CFL2_GRID, "lam")
    run("TV", inv("tv"), TV_GRID, "alpha")

    total_rows = []
    vs_out = [registry.get("background", "vsharp")(s["total"], s["mask"], voxel_size=s["vs"], b0_dir=s["b0"],
                                                  quiet=True) for s in subjects]
    for s, (loc, valid) in zip(subjects, vs_out):
        s["vsharp_local"], s["valid"] = loc * valid, valid
    for name, fn, grid, key in (("V-SHARP + TKD", inv("tkd"), (0.19,), "threshold"),
                                ("V-SHARP + TV", inv("tv"), TV_GRID, "alpha")):
        best = None
        for p in grid:
            try:
                outs = [fn(s["vsharp_local"], s["valid"], voxel_size=s["vs"], b0_dir=s["b0"], quiet=True,
                           **{key: p}) for s in subjects]
            except Exception as e:
                print(f"{name}: failed: {e!r}")
                break
            sc = mean_scores([score(o, s, s["valid"]) for o, s in zip(outs, subjects)])
            if best is None or sc["nrmse"] < best[1]["nrmse"]:
                best = (p, sc, outs[0])
        if best is None:
            total_rows.append({"method": name, "input": "total field", "kind": "classical", "error": "failed"})
            continue
        label = name if len(grid) == 1 else f"{name} ({key}={best[0]:g}, best)"
        total_rows.append({"method": label, "input": "total field", "kind": "classical", **best[1]})
        maps[label] = best[2]
    return rows, maps, total_rows, tkd


# -- learned ------------------------------------------------------------------------------------------------

def train(name: str, runs: Path, steps: int | None, reuse: bool) -> tuple[Path, float]:
    """Fit ``experiments/<name>.yaml`` (quick) unless a checkpoint exists and ``reuse``; returns (ckpt, s)."""
    from qsmlab.lab.config import load_experiment
    from qsmlab.lab.run import RunOptions, execute

    run_dir = runs / name
    ckpt_dir = run_dir / "checkpoints"

    def pick() -> Path | None:
        best = sorted(ckpt_dir.glob("best-*.ckpt"), key=os.path.getmtime)
        last = ckpt_dir / "last.ckpt"
        return best[-1] if best else (last if last.is_file() else None)

    if reuse and pick() is not None:
        info = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}
        return pick(), float(info.get("fit_seconds", float("nan")))
    over = {}
    if steps:
        over = {"trainer.max_steps": int(steps), "trainer.val_check_interval": int(min(100, steps))}
    cfg = load_experiment(name, "quick", overrides=over, manifest=True)
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    res = execute(RunOptions("fit", cfg, run_dir, experiment=name, profile="quick", loggers=("csv",),
                             save_predictions=False))
    ck = pick()
    if ck is None:
        raise RuntimeError(f"{name}: no checkpoint under {ckpt_dir}")
    return ck, float(res.fit_seconds)


def predict(ckpt: Path, s: dict, total: bool = False) -> np.ndarray:
    from qsmlab.methods.predict import predict_volume

    extra = {"total_field": s["total"]} if total else {}
    return predict_volume(str(ckpt), s["local"], s["mask"], s["vs"], s["b0"], magnitude=s["magnitude"], **extra)


def dip(s: dict, iterations: int | None) -> tuple[np.ndarray, float]:
    """uQSM-DIP with the quick profile's model arguments, fitted to one volume."""
    from qsmlab.lab.config import load_experiment
    from qsmlab.methods import UQSMDIP

    args = dict(load_experiment("uqsm_dip", "quick")["model"]["init_args"])
    model = UQSMDIP(**args)
    t0 = time.perf_counter()
    chi = model.fit_volume(s["local"], s["mask"], magnitude=s["magnitude"], voxel_size=s["vs"], b0_dir=s["b0"],
                           phase_scale=s["phase_scale"], iterations=iterations)
    return chi, time.perf_counter() - t0


# -- report -------------------------------------------------------------------------------------------------

def md_table(rows: list[dict], cols=("method", "input") + KEYS + ("train_s",)) -> str:
    cols = [c for c in cols if any(c in r for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) and c == "ssim" else
                         f"{v:.1f}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def figure(maps: dict, s: dict, path: Path) -> None:
    names = ["truth"] + list(maps)
    vols = {"truth": s["chi"] * s["mask"], **maps}
    c = [int(np.mean(ix)) for ix in np.nonzero(s["mask"])]
    fig, axes = plt.subplots(1, len(names), figsize=(1.9 * len(names), 2.6))
    for ax, n in zip(np.atleast_1d(axes), names):
        ax.imshow(np.rot90(vols[n][:, :, c[2]]), cmap="gray", vmin=-0.1, vmax=0.2)
        ax.set_axis_off()
        ax.set_title(n.replace(" (", "\n("), fontsize=7)
    fig.suptitle(f"chi (ppm, -0.1..0.2), axial slice {c[2]} of held-out {s['name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help=f"comma-separated learned methods (of {', '.join(LEARNED)}); '' = classical only")
    ap.add_argument("--quick-steps", type=int, default=None, help="override the quick profile's max_steps")
    ap.add_argument("--dip-iterations", type=int, default=None, help="override uQSM-DIP's iterations")
    ap.add_argument("--test-seed", type=int, default=777, help="seed of the held-out recipe (training: 20240501)")
    ap.add_argument("--subjects", type=int, default=2, help="held-out anatomical subjects")
    ap.add_argument("--runs", type=Path, default=Path("runs/compare_methods"), help="training run folders")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse checkpoints and the classical results under --runs when present")
    ap.add_argument("--ckpt", action="append", default=[], metavar="NAME=PATH",
                    help="score this checkpoint for method NAME instead of training it (repeatable)")
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    a.out.mkdir(parents=True, exist_ok=True)
    given = dict(c.split("=", 1) for c in a.ckpt)
    methods = [m for m in a.methods.split(",") if m]
    methods += [m for m in given if m not in methods]
    unknown = [m for m in methods if m not in LEARNED]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {', '.join(LEARNED)}")

    t0 = time.perf_counter()
    rows_all = load_manifest(ensure_dataset(test_recipe(a.test_seed, a.subjects))).rows
    subjects = [load_subject(r) for r in rows_all if r.group == "anatomical"]
    shape_vol = next(load_subject(r) for r in rows_all if r.group == "shapes")
    print(f"held-out: {[s['name'] for s in subjects]} + {shape_vol['name']} (seed {a.test_seed}); measured field "
          f"noise {np.mean([s['noise_ppm'] for s in subjects]):.4f} ppm (local field sd "
          f"{np.mean([s['local'][s['mask']].std() for s in subjects]):.4f} ppm); {time.perf_counter() - t0:.0f} s")

    cache = a.runs / f"classical-seed{a.test_seed}-n{a.subjects}"
    if a.reuse and (cache / "rows.json").is_file():  # the baselines do not change between method runs
        saved = json.loads((cache / "rows.json").read_text())
        local_rows, total_rows = saved["local"], saved["total"]
        with np.load(cache / "maps.npz") as z:
            maps = {k[4:]: z[k] for k in z.files if k.startswith("map:")}
            for i, s in enumerate(subjects):
                s["valid"] = z[f"valid:{i}"]
    else:
        local_rows, maps, total_rows, _ = classical(subjects)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "rows.json").write_text(json.dumps({"local": local_rows, "total": total_rows}, default=float))
        np.savez_compressed(cache / "maps.npz", **{f"map:{k}": v for k, v in maps.items()},
                            **{f"valid:{i}": s["valid"] for i, s in enumerate(subjects)})
    print(f"classical done ({time.perf_counter() - t0:.0f} s)")
    tkd_nrmse = local_rows[0].get("nrmse", float("nan"))
    checks, volume_rows = {}, []
    tkd_shape = registry.get("inversion", "tkd")(shape_vol["local"], shape_vol["mask"], voxel_size=shape_vol["vs"],
                                                 b0_dir=shape_vol["b0"], quiet=True)
    volume_rows.append({"method": "TKD", "input": f"local field ({shape_vol['name']})", **score(tkd_shape, shape_vol)})

    for name in methods:
        t1 = time.perf_counter()
        if name == "uqsm_dip":
            chi, sec = dip(shape_vol, a.dip_iterations)
            volume_rows.append({"method": "uQSM-DIP", "input": f"local field ({shape_vol['name']})",
                                **score(chi, shape_vol), "train_s": sec})
            checks["uqsm_dip < TKD NRMSE (one volume)"] = volume_rows[-1]["nrmse"] < volume_rows[0]["nrmse"]
            print(f"uqsm_dip: {volume_rows[-1]['nrmse']:.1f} % vs TKD {volume_rows[0]['nrmse']:.1f} % ({sec:.0f} s)")
            continue
        try:
            if name in given:
                ckpt, sec = Path(given[name]), float("nan")
                if not ckpt.is_file():
                    raise FileNotFoundError(f"--ckpt {name}={ckpt}: no such file")
            else:
                ckpt, sec = train(name, a.runs, a.quick_steps, a.reuse)
        except Exception as e:  # one failing method must not lose the others' results
            print(f"{name}: training failed: {type(e).__name__}: {e}")
            local_rows.append({"method": name, "input": "local field", "kind": "learned", "error": str(e)[:200]})
            continue
        outs = [predict(ckpt, s) for s in subjects]
        local_rows.append({"method": name, "input": "local field", "kind": "learned",
                           **mean_scores([score(o, s) for o, s in zip(outs, subjects)]), "train_s": sec})
        maps[name] = outs[0]
        if name == "nextqsm":
            outs_t = [predict(ckpt, s, total=True) for s in subjects]
            total_rows.append({"method": "nextqsm", "input": "total field", "kind": "learned", "train_s": sec,
                               **mean_scores([score(o, s, s["valid"]) for o, s in zip(outs_t, subjects)])})
            maps["nextqsm (total field)"] = outs_t[0]
        print(f"{name}: NRMSE {local_rows[-1]['nrmse']:.1f} % (TKD {tkd_nrmse:.1f} %), trained {sec:.0f} s, "
              f"{time.perf_counter() - t1:.0f} s")

    learned = {r["method"]: r for r in local_rows if r.get("kind") == "learned" and "nrmse" in r}
    for n, r in learned.items():
        checks[f"{n} < TKD NRMSE"] = r["nrmse"] < tkd_nrmse
    if "uqsm" in learned and "uqsm_tv" in learned:
        checks["uqsm_tv (NDI+TV) < uqsm (NDI) NRMSE"] = learned["uqsm_tv"]["nrmse"] < learned["uqsm"]["nrmse"]
    nxt = [r for r in total_rows if r["method"] == "nextqsm"]
    if nxt and "nrmse" in total_rows[0]:
        checks["nextqsm (total) < V-SHARP + TKD NRMSE"] = nxt[0]["nrmse"] < total_rows[0]["nrmse"]

    text = [f"# Learned vs classical QSM on held-out synthetic subjects (seed {a.test_seed})", "",
            f"Subjects {', '.join(s['name'] for s in subjects)} (MNI anatomy, 2 mm, 3 T), measured fields (echo fit "
            "of the noisy phase); metrics inside the mask, mean over subjects; NRMSE, HFEN in %, PSNR in dB. "
            f"Learned methods: quick profiles{f', {a.quick_steps} steps' if a.quick_steps else ''}; "
            "train_s = fit seconds.", "", "## From the local field", "", md_table(local_rows), "",
            "## From the total field (scored on V-SHARP's valid mask)", "", md_table(total_rows), "",
            "## One volume (uQSM-DIP)", "", md_table(volume_rows), "", "## Checks (issue 7)", ""]
    text += [f"- {'PASS' if ok else 'FAIL'}: {k}" for k, ok in checks.items()]
    report = "\n".join(text)
    print("\n" + report)
    (a.out / "compare_methods.md").write_text(report + "\n")
    pd.DataFrame(local_rows + total_rows + volume_rows).to_csv(a.out / "compare_methods.csv", index=False)
    (a.out / "compare_methods.json").write_text(json.dumps(
        {"rows": local_rows + total_rows + volume_rows, "checks": checks, "test_seed": a.test_seed,
         "quick_steps": a.quick_steps, "seconds": time.perf_counter() - t0}, indent=2, default=float))
    figure(maps, subjects[0], a.out / "compare_methods.png")
    print(f"\nwrote {a.out / 'compare_methods.md'}, .csv, .json, .png ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
