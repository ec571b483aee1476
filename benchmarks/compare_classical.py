"""Every classical inversion on in-vivo-like synthetic subjects: default, ``auto`` and oracle weights.

Subjects (:func:`qsmlab.data.invivo_like.invivo_like_subject`: MNI anatomy with healthy 3 T
susceptibilities, whole-head background, B0 tilted about i) are turned into the local field a real scan
gives, with the errors that made the old defaults fail on a real scan (issue 9):

1. total field = local + background + white noise at the given first-echo SNR (per-voxel sd of the
   magnitude^2-weighted echo fit, :func:`qsmlab.data.invivo_like.field_noise_ppm`) + a white-matter
   frequency shift that no isotropic chi explains (a fibre-orientation term ``a (sin^2 theta - 2/3)`` with
   a smooth random fibre angle, ``a`` = 0.01 ppm: the anisotropy/microstructure effect, Wharton & Bowtell,
   PNAS 2012, that a single-orientation model misses and a COSMOS reference averages out);
2. background removal by V-SHARP (qsmlab's default) on the brain mask: its residuals stay in the field;
3. plus a smooth second-order residual (RMS 0.002 ppm) for what background removal misses on a real
   head (shim and model errors).

Scores: demeaned NRMSE (%) against the true chi inside V-SHARP's valid mask, as in the issue. Per method
and subject: ``default`` (the registered function called with no parameter), ``auto`` (the weight chosen
from the data; ``= default`` when auto is the default), the ``oracle`` weight (best NRMSE over a
quarter-decade grid, converged solves) and, for reference, the weight ``fixed`` before issue 9. Each
with its time (s) on this machine; ``auto/solve`` is auto's time over one solve at the chosen weight.

Prints markdown tables (per subject, and the mean over subjects), writes
``OUT/inversions.csv`` and ``OUT/summary.md``. Asserts nothing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare_classical.py \
        [--seeds 0 1 2] [--snr 40 100] [--tilt 0 20] [--shape 96 96 96] [-o benchmarks/results/compare_classical]

Subjects are cached under ``cache/compare_classical/`` (the whole-head background costs minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

CACHE = Path("cache/compare_classical")
WM_SHIFT_PPM = 0.01        # amplitude of the white-matter orientation term (ppm)
RESIDUAL_RMS_PPM = 0.002   # smooth background-removal residual (ppm)


def load_npz(path: Path) -> dict:
    """Every array of a cached ``.npz`` (read into memory)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def save_npz(path: Path, arrays: dict) -> None:
    """Write a cache file atomically (a killed run leaves no half-written cache behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def _subject_arrays(seed: int, tilt: float, voxel_size, shape) -> dict:
    """The expensive part (whole-head simulation), cached on disk."""
    key = hashlib.sha1(json.dumps([seed, tilt, list(voxel_size), list(shape), 1]).encode()).hexdigest()[:12]
    path = CACHE / f"invivo_{seed}_{tilt:g}_{key}.npz"
    if path.is_file():
        return load_npz(path)
    from qsmlab.data.invivo_like import INVIVO_SNR, field_noise_ppm, invivo_like_subject

    s = invivo_like_subject(seed, voxel_size=voxel_size, tilt_deg=tilt, shape=shape)
    # noise sd of the field fit at SNR 1 (sd scales as 1/SNR): sigma is mean |S_1| / SNR
    sd1 = field_noise_ppm(s.magnitude, s.te, s.b0_tesla, s.noise_sigma * INVIVO_SNR)
    out = {"chi": s.chi, "mask": s.mask, "labels": s.labels, "local": s.local_field, "total": s.total_field,
           "magnitude": np.sqrt(np.mean(s.magnitude.astype(np.float64) ** 2, axis=-1)).astype(np.float32),
           "sd1": np.where(s.mask, sd1, 0).astype(np.float32), "b0_dir": s.b0_dir,
           "voxel_size": np.asarray(s.voxel_size)}
    save_npz(path, out)
    return out


def _vs_tag(voxel_size) -> str:
    """Case-name suffix for a voxel size other than 1 mm isotropic, e.g. ``_vs0.5x0.5x2``."""
    vs = [float(v) for v in voxel_size]
    return "" if vs == [1.0, 1.0, 1.0] else "_vs" + "x".join(f"{v:g}" for v in vs)


def case_set(name: str) -> str:
    """The case set of a case name: its voxel size (``1x1x1`` or e.g. ``0.5x0.5x2``)."""
    return name.split("_vs")[1] if "_vs" in name else "1x1x1"


def invivo_case(seed: int, tilt: float = 0.0, snr: float = 60.0, voxel_size=(1.0, 1.0, 1.0),
                shape=(96, 96, 96), crop: int | None = None) -> dict:
    """One benchmark case: chi, valid mask, local field after V-SHARP with noise and model errors (see the
    module docstring), magnitude, b0_dir, voxel_size. ``crop`` (voxels per axis) cuts the centre of the
    *total* field before background removal (the cut-away brain becomes background, as for a slab)."""
    from qsmlab.physics import DipoleOperator
    from qsmlab.recon import registry

    key = hashlib.sha1(json.dumps([seed, tilt, snr, list(voxel_size), list(shape), crop, WM_SHIFT_PPM,
                                   RESIDUAL_RMS_PPM, 1]).encode()).hexdigest()[:12]
    path = CACHE / f"case_{seed}_{tilt:g}_{snr:g}_{key}.npz"
    if path.is_file():
        c = load_npz(path)
        c["voxel_size"] = tuple(float(v) for v in c["voxel_size"])
        c.update({k: float(c[k]) for k in ("field_rms", "error_rms", "noise_sd")}, name=str(c["name"]))
        return c
    a = _subject_arrays(seed, tilt, tuple(voxel_size), tuple(shape))
    chi, mask, labels, total, sd1, mag = (a[k] for k in ("chi", "mask", "labels", "total", "sd1", "magnitude"))
    vs, b0 = tuple(float(v) for v in a["voxel_size"]), np.asarray(a["b0_dir"], float)
    if crop is not None:
        sl = tuple(slice((n - crop) // 2, (n - crop) // 2 + crop) for n in chi.shape)
        chi, mask, labels, total, sd1, mag = (x[sl] for x in (chi, mask, labels, total, sd1, mag))
    rng = np.random.default_rng([seed, int(round(tilt * 10)), int(snr)])
    noise = rng.standard_normal(chi.shape) * (sd1 / snr)
    # white-matter orientation term: fibre angle theta from a smooth random field, shift a (sin^2 - 2/3)
    theta = ndimage.gaussian_filter(rng.standard_normal(chi.shape), 4.0 / np.asarray(vs))
    theta = np.pi / 2 * (1 + np.tanh(theta / theta.std())) / 2
    wm = labels == 3
    shift = np.where(wm, WM_SHIFT_PPM * (np.sin(theta) ** 2 - 2.0 / 3.0), 0.0)
    measured = np.where(mask, total + noise + shift, 0.0)
    local, valid = registry.get("background", "vsharp")(measured, mask, voxel_size=vs, quiet=True)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in chi.shape], indexing="ij")
    terms = [g[0], g[1], g[2], g[0] * g[1], g[1] * g[2], g[0] * g[2], g[0] ** 2, g[1] ** 2, g[2] ** 2]
    poly = sum(rng.normal() * t for t in terms)
    poly = (poly - poly[valid].mean()) * (RESIDUAL_RMS_PPM / poly[valid].std())
    field = np.where(valid, local + poly, 0.0).astype(np.float32)
    true_local = DipoleOperator(vs, b0, pad_factor=2.0).A(chi * mask)
    err = field[valid] - (true_local[valid] - true_local[valid].mean())
    c = {"chi": chi * mask, "mask": valid, "field": field, "magnitude": mag, "b0_dir": b0, "voxel_size": vs,
         "field_rms": float(np.sqrt(np.mean(field[valid] ** 2))), "error_rms": float(np.sqrt(np.mean(err**2))),
         "noise_sd": float(np.median(sd1[valid]) / snr), "name": f"s{seed}_snr{snr:g}_tilt{tilt:g}" + _vs_tag(vs)}
    save_npz(path, c)
    return c


def realistic_case(seed: int, tilt: float = 0.0, voxel_size=(1.0, 1.0, 1.0), shape=(80, 80, 80)) -> dict:
    """One case of the realistic recipe (:func:`qsmlab.data.realistic.realistic_subject`, every model-error
    component on, simulated COSMOS): the local field V-SHARP made of the echo fit of the noisy fine-grid
    signal, its valid mask, the scalar truth (``chi``) and the simulated COSMOS map (``cosmos``; scored in
    ``valid & cosmos_mask``). Cached like the clean cases (COSMOS costs minutes)."""
    from qsmlab.data.realistic.subject import realistic_subject

    key = hashlib.sha1(json.dumps([seed, tilt, list(voxel_size), list(shape), "realistic", 1]).encode()).hexdigest()[:12]
    path = CACHE / f"realistic_{seed}_{tilt:g}_{key}.npz"
    if path.is_file():
        c = load_npz(path)
    else:
        r = realistic_subject(seed, voxel_size=tuple(voxel_size), tilt_deg=tilt, shape=tuple(shape), cosmos=True)
        m = r.valid_mask
        err = (r.local_field - r.local_field_scalar)[m]
        c = {"chi": r.chi * m, "mask": m, "field": r.local_field.astype(np.float32),
             "magnitude": np.sqrt(np.mean(r.magnitude.astype(np.float64) ** 2, axis=-1)).astype(np.float32),
             "b0_dir": np.asarray(r.b0_dir), "voxel_size": np.asarray(r.voxel_size),
             "cosmos": (r.cosmos * r.cosmos_mask).astype(np.float32), "cosmos_mask": r.cosmos_mask & m,
             "field_rms": float(np.sqrt(np.mean(r.local_field[m] ** 2))),
             "error_rms": float(np.sqrt(np.mean((err - err.mean()) ** 2))), "noise_sd": float(r.noise_std_ppm),
             "name": f"r{seed}_snr60_tilt{tilt:g}" + _vs_tag(voxel_size)}
        save_npz(path, c)
    c["voxel_size"] = tuple(float(v) for v in c["voxel_size"])
    c.update({k: float(c[k]) for k in ("field_rms", "error_rms", "noise_sd")}, name=str(c["name"]))
    return c


# method -> (auto parameter or None, the pre-issue-9 fixed parameters, oracle grid factors around the
# default's value, extra parameters for every call)
METHODS = {
    "tkd": ("threshold", {}, (0.5, 0.7, 1.4, 2.0), {}),
    "tsvd": ("threshold", {}, (0.5, 0.7, 1.4, 2.0), {}),
    "cfl2": ("lam", {"lam": 0.01, "penalty": "gradient"}, (0.25, 0.5, 2.0, 4.0), {}),
    "lsqr": ("max_iter", {"max_iter": 30, "lam_grad": 0.001}, (0.5, 0.7, 1.4, 2.0), {}),
    "cg": ("lam", {"lam": 0.0, "lam_grad": 0.003}, (0.25, 0.5, 2.0, 4.0), {}),
    "tv": ("alpha", {"alpha": 5e-5}, (0.25, 0.5, 2.0, 4.0), {}),
    "nltv": ("alpha", {"alpha": 5e-5}, (0.25, 0.5, 2.0, 4.0), {}),
    "ndi": ("tikhonov", {"tikhonov": 0.0}, (0.25, 0.5, 2.0, 4.0), {}),
    "medi": ("alpha", {"alpha": 5e-5}, (0.33, 3.0), {}),
}
THRESHOLD_DEFAULT = {"tkd": 0.19, "tsvd": 0.2}
ALT_FACTOR: float | None = None  # --compare-factor


def _nrmse(x, ref, m) -> float:
    from qsmlab.metrics.nrmse import nrmse_demeaned

    return float(nrmse_demeaned(x, ref, m))


def last_info_of(name: str) -> dict:
    """The info dict the last call of inversion ``name`` left in its module (``last_info``; cg and lsqr keep
    their own): the weight it used and, with ``"auto"``, the search (``info["auto"]``)."""
    import importlib

    mod = importlib.import_module(f"qsmlab.recon.inversion.{ {'cg': 'lsqr', 'lsqr': 'lsqr'}.get(name, name)}")
    return {"cg": getattr(mod, "CG_INFO", {}), "lsqr": getattr(mod, "LSQR_INFO", {})}.get(
        name, getattr(mod, "last_info", {}))


def _chosen(name: str, param: str) -> float | None:
    """The value the last call of ``name`` used for ``param`` (auto's choice), from its module's info."""
    info = last_info_of(name)
    if name == "lsqr":
        return float(info.get("n_iter", float("nan")))
    v = info.get(param)
    return None if v is None else float(v)


def _misfit(x: np.ndarray, c: dict) -> float:
    """In-mask RMS of ``A chi - f`` (ppm, unweighted, periodic as the solvers' default)."""
    from qsmlab.physics import DipoleOperator

    r = DipoleOperator(c["voxel_size"], tuple(c["b0_dir"]), 1.0).A(x) - c["field"]
    return float(np.sqrt(np.mean(r[c["mask"]] ** 2)))


def run_method(c: dict, name: str, reference: str = "truth") -> dict:
    """Default / auto / oracle / fixed results of one method on one case (see the module docstring)."""
    import warnings

    from qsmlab.recon import registry
    from qsmlab.recon.inversion import auto

    kw = {"voxel_size": c["voxel_size"], "b0_dir": tuple(c["b0_dir"]), "magnitude": c["magnitude"], "quiet": True}
    f, m, chi = c["field"], c["mask"], c["chi"]
    param, fixed, factors, extra = METHODS[name]
    fn = registry.get("inversion", name)
    defaults = registry.parameters(fn)
    is_auto = registry.is_auto(defaults.get(param))

    ref, rmask = (c["cosmos"], c["cosmos_mask"]) if reference == "cosmos" else (chi, m)

    def call(**params):
        auto.clear()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", auto.AutoWarning)
            x = fn(f, m, **kw, **extra, **params)
        sec = time.perf_counter() - t0
        e = _nrmse(x, ref, rmask)
        if "cosmos" in c:  # the other reference, for the record
            other[len(other)] = (_nrmse(x, chi, m) if reference == "cosmos" else _nrmse(x, c["cosmos"],
                                                                                     c["cosmos_mask"]))
        misfits[len(misfits)] = _misfit(x, c)
        return e, sec, [str(w.message) for w in caught]

    other: dict = {}
    misfits: dict = {}

    e, sec, warn = call()
    value = _chosen(name, param) if is_auto else (THRESHOLD_DEFAULT.get(name) or defaults.get(param))
    alt = {}
    if is_auto and ALT_FACTOR is not None:  # auto with the other model-error factor, for the comparison
        keep, auto.MODEL_ERROR_FACTOR = auto.MODEL_ERROR_FACTOR, ALT_FACTOR
        try:
            ea, _, _ = call()
            alt = {"alt_factor": ALT_FACTOR, "alt_auto_value": _chosen(name, param), "alt_auto_nrmse": ea,
                   "alt_auto_other_nrmse": other.get(len(other) - 1, float("nan"))}
        finally:
            auto.MODEL_ERROR_FACTOR = keep
    row = {"case": c["name"], "method": name, "param": param, "reference": reference, "default_value": value,
           "default_nrmse": e, "default_s": sec, "auto_nrmse": e if is_auto else float("nan"),
           "auto_s": sec if is_auto else float("nan"), "auto_misfit": misfits[0],
           "auto_other_nrmse": other.get(0, float("nan")), "warnings": " | ".join(warn), **alt}
    grid: dict = {}

    def at(v):
        v = int(round(v)) if param == "max_iter" else float(v)
        if v not in grid:
            ev, sv, _ = call(**{param: v})
            grid[v] = (ev, sv, misfits[len(misfits) - 1], other.get(len(other) - 1, float("nan")))
        return grid[v]

    base = float(value)
    one_s = at(base)[1]  # one solve at the default's (auto's) value: auto's time reference
    for fac in factors:
        at(base * fac)
    for _ in range(3):  # extend the oracle grid while its best point is at an edge
        best, lo, hi = min(grid, key=lambda k: grid[k][0]), min(grid), max(grid)
        if best == lo and (param != "threshold" or lo * 0.5 > 0.02):
            at(lo * 0.5)
        elif best == hi and (param != "threshold" or hi * 2 < {"tkd": 0.6, "tsvd": 0.95}[name]):
            at(hi * 2.0)
        else:
            break
    best = min(grid, key=lambda k: grid[k][0])
    row.update(oracle_value=best, oracle_nrmse=grid[best][0], oracle_s=grid[best][1], solve_s=one_s,
               auto_over_solve=(sec / one_s) if is_auto else float("nan"), oracle_misfit=grid[best][2],
               oracle_other_nrmse=grid[best][3], noise_sd=c["noise_sd"],
               oracle_misfit_over_noise=grid[best][2] / c["noise_sd"] if c["noise_sd"] > 0 else float("nan"),
               oracle_weight_over_auto=(best / value) if is_auto and value else float("nan"))
    if "cosmos" in c:  # the same grid scored against the simulated COSMOS
        bc = min(grid, key=lambda k: grid[k][3])
        row.update(cosmos_default_nrmse=other[0], cosmos_oracle_value=bc, cosmos_oracle_nrmse=grid[bc][3])
    if fixed:
        ef, sf, _ = call(**fixed)
        row.update(fixed_nrmse=ef, fixed_s=sf)
    print(f"  {name:5s} default {e:6.1f} % ({param}={value:.3g}, {sec:5.1f} s)  oracle {grid[best][0]:6.1f} % "
          f"({param}={best:.3g})" + (f"  fixed {row['fixed_nrmse']:6.1f} %" if fixed else "")
          + (f"  auto/solve {row['auto_over_solve']:.1f}" if is_auto else "") + (f"  [{warn[0]}]" if warn else ""),
          flush=True)
    return row


def _markdown(df) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        out.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out)


def summarise(rows: list[dict]) -> str:
    """One table per case set (voxel size): the mean over its cases, per method."""
    import pandas as pd

    df = pd.DataFrame(rows)
    sets = sorted({case_set(c) for c in df.case}, key=lambda v: v != "1x1x1")
    if len(sets) > 1:
        return "\n\n".join(f"#### {v} mm ({df[df.case.map(case_set) == v].case.nunique()} cases)\n\n"
                           + summarise(df[df.case.map(case_set) == v].to_dict("records")) for v in sets)
    tkd = df[df.method == "tkd"].set_index("case")["default_nrmse"]
    df["beats_tkd"] = [r.default_nrmse < tkd[r.case] for r in df.itertuples()]
    df["auto_vs_oracle_%"] = 100.0 * (df.auto_nrmse / df.oracle_nrmse - 1.0)
    g = df.groupby("method", sort=False)
    summ = pd.DataFrame({
        "default %": g.default_nrmse.mean(), "default s": g.default_s.mean(),
        "auto %": g.auto_nrmse.mean(), "auto s": g.auto_s.mean(),
        "oracle %": g.oracle_nrmse.mean(), "oracle s": g.oracle_s.mean(),
        "pre-issue fixed %": g.fixed_nrmse.mean() if "fixed_nrmse" in df else float("nan"),
        "auto vs oracle, worst case %": g["auto_vs_oracle_%"].max(),
        "auto/solve (max)": g.auto_over_solve.max(),
        "beats TKD (cases)": g.beats_tkd.sum().astype(int).astype(str) + "/" + g.size().astype(str),
    })
    if "cosmos_oracle_nrmse" in df and df.cosmos_oracle_nrmse.notna().any():
        ctkd = df[df.method == "tkd"].set_index("case")["cosmos_default_nrmse"]
        df["cosmos_auto_vs_oracle_%"] = 100.0 * (df.cosmos_default_nrmse / df.cosmos_oracle_nrmse - 1.0)
        df["cosmos_beats_tkd"] = [r.cosmos_default_nrmse < ctkd[r.case] for r in df.itertuples()]
        g = df.groupby("method", sort=False)
        summ["default % (COSMOS)"] = g.cosmos_default_nrmse.mean()
        summ["oracle % (COSMOS)"] = g.cosmos_oracle_nrmse.mean()
        summ["auto vs oracle, worst case % (COSMOS)"] = g["cosmos_auto_vs_oracle_%"].max()
        summ["beats TKD (COSMOS)"] = g.cosmos_beats_tkd.sum().astype(int).astype(str) + "/" + g.size().astype(str)
    if "alt_auto_nrmse" in df and df.alt_auto_nrmse.notna().any():
        df["alt_vs_oracle_%"] = 100.0 * (df.alt_auto_nrmse / df.oracle_nrmse - 1.0)
        g = df.groupby("method", sort=False)
        f0 = df.alt_factor.dropna().iloc[0]
        summ[f"auto % (factor {f0:g})"] = g.alt_auto_nrmse.mean()
        summ[f"auto vs oracle, worst % (factor {f0:g})"] = g["alt_vs_oracle_%"].max()
        if "cosmos_oracle_nrmse" in df and df.cosmos_oracle_nrmse.notna().any():
            df["alt_cosmos_vs_oracle_%"] = 100.0 * (df.alt_auto_other_nrmse / df.cosmos_oracle_nrmse - 1.0)
            g = df.groupby("method", sort=False)
            summ[f"auto vs oracle, worst % (COSMOS, factor {f0:g})"] = g["alt_cosmos_vs_oracle_%"].max()
    if "oracle_misfit_over_noise" in df:
        summ["oracle misfit / noise"] = g.oracle_misfit_over_noise.mean()
        summ["oracle weight / auto's"] = g.oracle_weight_over_auto.mean()
    summ = summ.reset_index()
    return _markdown(summ)


def main() -> None:
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/compare_classical"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--snr", type=float, nargs="+", default=[40.0, 100.0])
    ap.add_argument("--tilt", type=float, nargs="+", default=[0.0, 20.0])
    ap.add_argument("--shape", type=int, nargs=3, default=None,
                    help="grid (default 96^3 at 1 mm, 160 x 160 x 40 at 0.5 x 0.5 x 2 mm: 80-96 mm across)")
    ap.add_argument("--voxel-size", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("I", "J", "K"),
                    help="mm; 0.5 0.5 2 is the anisotropic in-vivo-like case set (issue 9)")
    ap.add_argument("--crop", type=int, default=None, help="cut the centre (voxels per axis) for a faster run")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--recipe", choices=("clean", "realistic"), default="clean",
                    help="clean: invivo_case (the issue-9 subjects); realistic: realistic_case (qsmlab.data.realistic, "
                         "every model-error component, simulated COSMOS; --snr is then the recipe's)")
    ap.add_argument("--compare-factor", type=float, default=None,
                    help="also run auto with this model-error factor (columns alt_*), e.g. 0 for the noise-only target")
    ap.add_argument("--model-error-factor", type=float, default=None,
                    help="override qsmlab.recon.inversion.auto.MODEL_ERROR_FACTOR (0: the noise-only target)")
    ap.add_argument("--cache-only", action="store_true", help="build the cached subjects and stop")
    ap.add_argument("--from-csv", type=Path, nargs="+", metavar="CSV",
                    help="summarise inversions.csv files of earlier runs (e.g. one per seed, run in parallel)")
    a = ap.parse_args()
    rows = []
    a.out.mkdir(parents=True, exist_ok=True)
    if a.model_error_factor is not None:
        from qsmlab.recon.inversion import auto

        auto.MODEL_ERROR_FACTOR = float(a.model_error_factor)
    if a.recipe == "realistic":
        a.snr = [60.0]
    global ALT_FACTOR
    ALT_FACTOR = a.compare_factor
    if a.from_csv:
        rows = pd.concat([pd.read_csv(p) for p in a.from_csv]).to_dict("records")
        pd.DataFrame(rows).to_csv(a.out / "inversions.csv", index=False)
        a.seeds = sorted({int(r["case"].split("_")[0][1:]) for r in rows})
        a.snr = sorted({float(r["case"].split("_")[1][3:]) for r in rows})
        a.tilt = sorted({float(r["case"].split("_")[2][4:]) for r in rows})
    if a.shape is None:
        big = a.recipe == "clean"
        a.shape = ([160, 160, 40] if big else [128, 128, 40]) if list(a.voxel_size) == [0.5, 0.5, 2.0] else \
            ([96, 96, 96] if big else [80, 80, 80])
    for seed in a.seeds if not a.from_csv else []:
        for tilt in a.tilt:
            for snr in a.snr:
                t0 = time.perf_counter()
                c = (invivo_case(seed, tilt, snr, voxel_size=tuple(a.voxel_size), shape=a.shape, crop=a.crop)
                     if a.recipe == "clean" else realistic_case(seed, tilt, tuple(a.voxel_size), a.shape))
                print(f"{c['name']}: field rms {c['field_rms']:.4f} ppm, error rms {c['error_rms']:.4f}, "
                      f"noise sd {c['noise_sd']:.4f}, {c['mask'].sum()} voxels ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
                if a.cache_only:
                    continue
                rows += [run_method(c, name) for name in a.methods]
                pd.DataFrame(rows).to_csv(a.out / "inversions.csv", index=False)
    if a.cache_only:
        return
    sets = sorted({case_set(r["case"]) for r in rows}, key=lambda v: v != "1x1x1")
    grids = ({"1x1x1": "96^3", "0.5x0.5x2": "160 x 160 x 40"} if a.recipe == "clean" else
             {"1x1x1": "80^3", "0.5x0.5x2": "128 x 128 x 40"})
    where = (f"{a.shape if a.crop is None else [a.crop] * 3} at {' x '.join(f'{v:g}' for v in a.voxel_size)} mm"
             if not a.from_csv else ", ".join(f"{v} mm ({grids.get(v, '?')})" for v in sets))
    from qsmlab.recon.inversion import auto

    text = (f"## Classical inversions on {a.recipe} in-vivo-like subjects (auto's model-error factor "
            f"{auto.MODEL_ERROR_FACTOR:g}, exponent {auto.MODEL_ERROR_EXPONENT:g}): mean over {len(set(r['case'] for r in rows))} cases "
            f"(seeds {a.seeds}, SNR {a.snr}, tilt {a.tilt} deg; {where})"
            "\n\nDemeaned NRMSE (%) in the valid mask; times in s on this machine.\n\n" + summarise(rows))
    cols = ["case", "method", "param", "default_value", "default_nrmse", "auto_nrmse", "oracle_value",
            "oracle_nrmse", "auto_over_solve", "cosmos_default_nrmse", "cosmos_oracle_value", "cosmos_oracle_nrmse",
            "auto_misfit", "oracle_misfit", "noise_sd"]
    per_case = pd.DataFrame(rows)[[k for k in cols if k in pd.DataFrame(rows)]]
    text += "\n\n### Per case\n\n" + _markdown(per_case) + "\n"
    (a.out / "summary.md").write_text(text)
    print("\n" + text)
    print(f"wrote {a.out / 'inversions.csv'} and {a.out / 'summary.md'}")


if __name__ == "__main__":
    main()
