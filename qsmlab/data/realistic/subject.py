"""Realistic in-vivo-like subjects: the clean subject's head, with the model errors a real scan carries.

:func:`realistic_subject` starts from the anatomy of :func:`qsmlab.data.invivo_like.invivo_like_subject`
(same seed, same head) and adds, each switchable by name in ``components`` (all on by default):

- ``"anisotropy"``: white matter as a cylindrical susceptibility tensor, field through the tensor kernel
  (:mod:`.anisotropy`; Li et al. 2012: delta_chi 0.01-0.02 ppm);
- ``"veins"``: a network of thin veins of deoxygenated blood (:mod:`.veins`; Fan et al. 2014: 0.3-0.5 ppm,
  0.2-2.2 mm), partial-volumed, replacing the clean phantom's coarse veins;
- ``"acquisition"``: the signal simulated on a grid ``factor`` (2) times finer and k-space cropped to the
  scan (:mod:`.acquisition`): intravoxel dephasing and partial volume as a scanner makes them;
- ``"noise"``: the local field handed to a method is what the pipeline makes of the noisy multi-echo
  signal (echo fit, V-SHARP, eroded mask), not the exact local field (:mod:`.acquisition`).

``cosmos=True`` adds a simulated COSMOS reference (:mod:`.cosmos_sim`). With every component off the
physics is the clean subject's: ``local_field = A(chi * mask)`` on the scan grid, the same background,
phase offset and noise (tests/test_realistic_subject.py).

What the fields mean (scan grid, ppm): ``chi`` is the scalar truth: the tensor's mean, the veins' partial
volume included, band-limited like the data (the k-space crop of the fine-grid chi) with acquisition on;
``local_field_exact`` the physical local field at the scan's resolution (tensor and veins included, no
noise, no background removal); ``local_field_scalar = A(chi * mask)``, what a scalar model predicts from the
truth; ``local_field`` what a method receives. Their differences are the model error.

Measured (seed 0, 0 deg; benchmarks/realistic_misfit.py for the misfit table): at 1 mm on a 128^3 crop
(288^3 fine grid) the physical local field's 1st/99th percentiles in the brain are -0.029/+0.032 ppm (in
vivo at 3 T: +-0.03-0.05 ppm), the field noise 1.5 ppb, the model error ``local_field_exact -
local_field_scalar`` 1.5-1.9 ppb RMS (anisotropy, veins, crop), and what the pipeline adds (V-SHARP residue
and noise, ``local_field - local_field_exact``) 4.9 ppb RMS; at 2 mm (whole head) 0.9 and 4.7 ppb.
What carries the misfit (1 mm, 64^3, benchmarks/results/realistic_misfit_ablation.md: rms of
``A chi_true - f`` in the valid mask, noise 1.4 ppb): anisotropy 1.3 ppb, veins or the crop alone < 0.8 ppb
(the padding baseline), the pipeline 5.6 ppb, all on 6.3 ppb. V-SHARP alone, on the noiseless local field,
loses 4.8 ppb of a 12.6 ppb local field (38 %: the low-frequency, near-harmonic part of the field of the
brain's own tissue): on these subjects the background-removal residue, not anisotropy or veins, is what a
scalar inversion cannot fit.
Generation on two shared CPU cores (load ~6-12): 131 s at 1 mm / 128^3 (V-SHARP 64 s of it, peak RSS
4.3 GB), 177 s at 2 mm whole head (1.9 GB); ``meta["timings_s"]`` has the stages.

Randomness: anatomy ``SeedSequence(seed, spawn_key=(0,))`` (the clean subject's), phase offset and noise
``(1,)`` (``(1, o)`` for COSMOS orientation o > 0), fibres ``(2, 0)``, veins ``(2, 1)``: switching one
component never changes another's draws.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from qsmlab.data.invivo_like import (
    INVIVO_SNR,
    INVIVO_TE,
    PHASE_OFFSET_RAD,
    _crop_slices,
    _phantom,
    field_noise_ppm,
)
from qsmlab.data.phantoms.anatomical import LABEL_IDS, output_grid
from qsmlab.data.realistic import acquisition as acq
from qsmlab.data.realistic.anisotropy import (
    DELTA_CHI_PPM,
    FIBRE_SMOOTH_MM,
    fibre_orientation,
    microstructure_shift,
)
from qsmlab.data.realistic.cosmos_sim import (
    COSMOS_ROTATIONS_DEG,
    cosmos_b0_dirs,
    cosmos_fit,
)
from qsmlab.data.realistic.veins import VEIN_CHI_PPM, VEIN_SIGNAL, draw_veins, rasterise_veins, remove_label
from qsmlab.data.simulate import background_field, simulate_gre, smooth_phase_offset, wrap_phase
from qsmlab.physics import DipoleOperator
from qsmlab.physics.tensor_kernel import cylindrical_tensor, tensor_dipole_field
from qsmlab.physics.units import ppm_to_rad

COMPONENTS = ("anisotropy", "veins", "acquisition", "noise")


@dataclass(frozen=True)
class RealismParams:
    """Component settings (defaults: the published values of each component's module).

    Attributes:
        delta_chi_ppm: (lo, hi) white-matter chi_par - chi_perp, per subject (ppm).
        fibre_smooth_mm: smoothness of the fibre-orientation perturbation (mm).
        microstructure_ppm: amplitude of the optional ``a (sin^2 theta - 2/3)`` white-matter term (0 = off).
        vein_chi_ppm: (lo, hi) blood susceptibility relative to tissue (ppm).
        vein_families: overrides of :data:`qsmlab.data.realistic.veins.VEIN_FAMILIES` (counts, diameters).
        factor: fine-grid refinement per axis with acquisition on (>= 2).
        margin: scan voxels simulated around the output crop (absorbs the crop's ringing; tapered).
        taper: voxels of the margin over which the fine signal is tapered to zero.
        pad_factor: zero padding of the local-field FFTs; None = 2 on the scan grid, 1.5 on the fine grid.
        bfr: background removal of the ``noise`` component (None = the pipeline's default, V-SHARP).
        cosmos_rotations_deg: extra head rotations of the COSMOS scans (the first should be 0, 0, 0).
    """

    delta_chi_ppm: tuple[float, float] = DELTA_CHI_PPM
    fibre_smooth_mm: float = FIBRE_SMOOTH_MM
    microstructure_ppm: float = 0.0
    vein_chi_ppm: tuple[float, float] = VEIN_CHI_PPM
    vein_families: Mapping | None = None
    factor: int = 2
    margin: int = 8
    taper: int = 6
    pad_factor: float | None = None
    bfr: str | None = None
    cosmos_rotations_deg: tuple = COSMOS_ROTATIONS_DEG


@dataclass
class RealisticSubject:
    """One realistic simulated scan on the scan grid; arrays (X, Y, Z) or (X, Y, Z, E), float32 unless noted.

    Attributes:
        chi: scalar truth (ppm; tensor mean, veins partial-volumed), 0 outside ``mask``.
        mask: brain mask (bool). valid_mask: where ``local_field`` is valid (background removal's eroded
            mask; = ``mask`` with ``noise`` off). labels: int16 tissue labels (veins where their fraction >= 0.5).
        local_field: what a method receives (ppm, 0 outside ``valid_mask``).
        local_field_exact: physical local field (ppm, unmasked; no noise, no background removal).
        local_field_scalar: ``A(chi * mask)`` (ppm, unmasked).
        background_field: true background (ppm). total_field: the echo-fit total field (ppm, 0 outside
            ``mask``) with ``noise`` on, else local_field_exact + background_field.
        magnitude, phase: per echo (X, Y, Z, E), noisy; phase wrapped (rad).
        vein_fraction: vein volume fraction per scan voxel (0-1).
        te (s), b0_tesla (T), b0_dir (voxel axes, float64), voxel_size (mm), affine (voxel -> world mm),
        tilt_deg (deg).
        noise_sigma: complex noise sd per channel. snr_per_echo: mean noiseless brain magnitude / sigma.
        noise_std_ppm: median over ``valid_mask`` of the field's noise sd (weighted LS over TE, ppm).
        cosmos: simulated COSMOS map (ppm) or None; cosmos_mask: its mask; cosmos_b0_dirs: per orientation.
        components: which components were on. delta_chi_ppm: the subject's white-matter anisotropy.
        seed: the subject's seed. meta: counts, timings_s per stage.
    """

    chi: np.ndarray
    mask: np.ndarray
    valid_mask: np.ndarray
    labels: np.ndarray
    local_field: np.ndarray
    local_field_exact: np.ndarray
    local_field_scalar: np.ndarray
    background_field: np.ndarray
    total_field: np.ndarray
    magnitude: np.ndarray
    phase: np.ndarray
    vein_fraction: np.ndarray
    te: tuple[float, ...]
    b0_tesla: float
    b0_dir: np.ndarray
    voxel_size: tuple[float, float, float]
    affine: np.ndarray
    tilt_deg: float
    noise_sigma: float
    snr_per_echo: tuple[float, ...]
    noise_std_ppm: float
    components: dict[str, bool]
    delta_chi_ppm: float
    seed: int
    cosmos: np.ndarray | None = None
    cosmos_mask: np.ndarray | None = None
    cosmos_b0_dirs: list | None = None
    meta: dict = field(default_factory=dict)


def resolve_components(components: Iterable[str] | Mapping[str, bool] | None) -> dict[str, bool]:
    """``None`` = all on; a list names those on; a mapping sets each (missing ones on)."""
    if components is None:
        return {c: True for c in COMPONENTS}
    if isinstance(components, Mapping):
        bad = [k for k in components if k not in COMPONENTS]
        out = {c: bool(components.get(c, True)) for c in COMPONENTS}
    else:
        names = list(components)
        bad = [k for k in names if k not in COMPONENTS]
        out = {c: c in names for c in COMPONENTS}
    if bad:
        raise ValueError(f"unknown realism component(s) {bad}; expected some of {list(COMPONENTS)}")
    return out


@dataclass
class _Scene:
    """Everything that does not depend on the B0 direction (built once, scanned per orientation)."""

    vs: tuple
    factor: tuple
    region: tuple
    inner: tuple  # output crop within the region (coarse indices)
    sources: np.ndarray  # background sources on the full grid (ppm)
    chi_f: np.ndarray  # scalar chi * mask on the simulation grid
    mask_c: np.ndarray  # region brain mask (coarse)
    m0_f: np.ndarray
    r2_f: np.ndarray
    delta_f: np.ndarray | None  # delta_chi map (anisotropy on)
    fibre_f: np.ndarray | None
    wm_f: np.ndarray | None
    window: list | None
    pad: float


def _region(full, crop, margin) -> tuple[tuple[slice, ...], tuple[slice, ...], list, list]:
    reg, inner, lo_m, hi_m = [], [], [], []
    for n, s in zip(full, crop):
        a, b = max(s.start - margin, 0), min(s.stop + margin, n)
        reg.append(slice(a, b))
        inner.append(slice(s.start - a, s.stop - a))
        lo_m.append(s.start - a)
        hi_m.append(b - s.stop)
    return tuple(reg), tuple(inner), lo_m, hi_m


def _scan(sc: _Scene, b0: np.ndarray, te, b0_tesla, snr, rng, noise_on: bool, bfr) -> dict:
    """One orientation: fields, signal, noise and (noise on) the pipeline's local field."""
    t = {}
    t0 = time.perf_counter()
    fine_vs = tuple(v / k for v, k in zip(sc.vs, sc.factor))
    if sc.delta_f is not None:
        local_f = tensor_dipole_field(cylindrical_tensor(sc.chi_f, sc.delta_f, sc.fibre_f), fine_vs, b0, sc.pad)
    else:
        local_f = DipoleOperator(voxel_size=fine_vs, b0_dir=b0, pad_factor=sc.pad).A(sc.chi_f).astype(np.float32)
    if sc.wm_f is not None:
        local_f += sc.wm_f
    t["local_field"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bg_c = background_field(sc.sources, sc.vs, b0)[sc.region]
    t["background"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    region_shape = bg_c.shape
    phi0 = smooth_phase_offset(region_shape, sc.vs, rng, PHASE_OFFSET_RAD)
    inner = sc.inner
    mask = sc.mask_c[inner]
    if sc.factor == (1, 1, 1):
        total = local_f + bg_c
        sig, sigma = simulate_gre(total, sc.m0_f, sc.r2_f, te, b0_tesla, rng, snr, phi0, mask)
        local_exact, bg, total_exact = local_f, bg_c, total
        mag0 = np.asarray(sc.m0_f, np.float64)[..., None] * np.exp(
            -np.asarray(te) * np.asarray(sc.r2_f, np.float64)[..., None] * (b0_tesla / 3.0))
    else:
        bg_f = acq.upsample_smooth(bg_c, sc.factor)
        total_f = local_f + bg_f
        del bg_f
        phi0_f = acq.upsample_smooth(phi0, sc.factor)
        clean = acq.acquire(total_f, sc.m0_f, sc.r2_f, phi0_f, te, b0_tesla, sc.factor, sc.window)[inner]
        del total_f, phi0_f
        local_exact = acq.kspace_crop(acq.apply_window(local_f, sc.window), sc.factor)[inner]
        bg, phi0 = bg_c[inner], phi0[inner]
        total_exact = local_exact + bg
        sig, sigma = acq.add_noise(clean, snr, mask, rng)
        mag0 = np.abs(clean).astype(np.float64)
        del clean
    del local_f
    t["signal"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = {"local_exact": np.ascontiguousarray(local_exact, dtype=np.float32), "background": bg,
           "sigma": sigma, "mag0": mag0, "timings": t}
    if noise_on:
        ref = np.stack([phi0 + np.float32(ppm_to_rad(1.0, e, b0_tesla)) * total_exact for e in te], -1)
        total, local, valid = acq.pipeline_local_field(sig, ref, te, b0_tesla, mask, sc.vs, b0, bfr)
        t["pipeline"] = time.perf_counter() - t0
    else:
        total, valid = total_exact.astype(np.float32), mask
        local = np.where(valid, local_exact, 0.0).astype(np.float32)
    out.update(total=total, local=local, valid=valid, signal=sig)
    return out


def realistic_subject(
    seed: int,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    tilt_deg: float = 0.0,
    shape: Sequence[int] | None = None,
    components: Iterable[str] | Mapping[str, bool] | None = None,
    snr: float | None = INVIVO_SNR,
    te: Sequence[float] = INVIVO_TE,
    b0_tesla: float = 3.0,
    cosmos: bool = False,
    params: RealismParams | None = None,
    head_rotation_deg: Sequence[float] | None = None,
) -> RealisticSubject:
    """One realistic in-vivo-like subject (module docstring); arguments as
    :func:`qsmlab.data.invivo_like.invivo_like_subject`, plus:

    Args:
        components: names of the components on (``COMPONENTS``; default all), or a mapping name -> bool.
        cosmos: also simulate the COSMOS scans (``params.cosmos_rotations_deg``) and fit COSMOS.
        params: :class:`RealismParams` (published defaults).
        head_rotation_deg: instead of ``tilt_deg``, any head rotation [rx, ry, rz] (extrinsic x-y-z Euler
            angles, deg; a recipe's ``orientations``): ``b0 = R^T z``.
    Returns:
        :class:`RealisticSubject` (``meta["timings_s"]`` per stage).
    """
    t_start = time.perf_counter()
    p = params or RealismParams()
    comp = resolve_components(components)
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    vs = tuple(float(v) for v in voxel_size)
    if len(vs) != 3 or min(vs) <= 0:
        raise ValueError(f"voxel_size must be 3 positive numbers (mm), got {list(voxel_size)}")
    te = tuple(float(t) for t in te)
    if not te or te[0] <= 0 or any(b <= a for a, b in zip(te, te[1:])):
        raise ValueError(f"te must be positive, strictly increasing echo times (s), got {list(te)}")
    factor = acq.as_factor(p.factor if comp["acquisition"] else 1)
    if comp["acquisition"] and min(factor) < 2:
        raise ValueError(f"acquisition needs a fine grid at least 2x the scan's, got factor {p.factor}")
    timings: dict[str, float] = {}

    # -- anatomy: the clean subject's head on the full grid (cached) -------------------------------------
    t0 = time.perf_counter()
    full, _ = output_grid(vs)
    grid = None
    if shape is not None:
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or min(shape) < 8:
            raise ValueError(f"shape must be 3 ints >= 8, got {list(shape)}")
        if any(s > n for s, n in zip(shape, full)):
            grid = tuple(max(s, n) for s, n in zip(shape, full))
            full = grid
    ph = _phantom(int(seed), vs, grid)
    crop = _crop_slices(full, shape if shape is not None else full)
    ref_rot = tilt_deg if head_rotation_deg is None else [float(v) for v in head_rotation_deg]
    if head_rotation_deg is not None and (len(ref_rot) != 3 or tilt_deg):
        raise ValueError(f"head_rotation_deg must be [rx, ry, rz] (deg) with tilt_deg 0, got {head_rotation_deg!r}")
    b0 = cosmos_b0_dirs(ref_rot, [(0.0, 0.0, 0.0)])[0]
    chi_full, labels_full = np.array(ph.chi), np.array(ph.labels)
    m0_full, r2_full = np.array(ph.m0), np.array(ph.r2star)
    veins = []
    if comp["veins"]:
        rng_v = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(2, 1)))
        remove_label(labels_full, [chi_full, m0_full, r2_full], LABEL_IDS["vein"])
        veins = draw_veins(ph.mask, labels_full, vs, ph.affine, rng_v, p.vein_families, p.vein_chi_ppm)
    timings["anatomy"] = time.perf_counter() - t0

    # -- the simulation grid: region = output crop + margin, refined by `factor` ------------------------
    t0 = time.perf_counter()
    margin = int(p.margin) if factor != (1, 1, 1) else 0
    region, inner, lo_m, hi_m = _region(full, crop, margin)
    # background sources: the head model plus all brain outside the output crop (the margin included: the
    # local field is the field of the brain inside the crop, as for the clean subject)
    sources = np.array(ph.chi_bg, dtype=np.float32)
    outside = np.ones(full, bool)
    outside[crop] = False
    sources[outside] += chi_full[outside] * ph.mask[outside]
    del outside
    mask_c = np.array(ph.mask[region])
    reg_affine = np.array(ph.affine)
    reg_affine[:3, 3] += reg_affine[:3, :3] @ np.array([s.start for s in region], dtype=np.float64)
    f_affine = acq.fine_affine(reg_affine, factor)

    def up(a):
        return acq.upsample_nearest(a, factor)

    mask_f = up(mask_c)
    in_crop = np.zeros(mask_c.shape, bool)
    in_crop[inner] = True
    in_crop_f = up(in_crop)
    chi_f = np.where(mask_f, up(chi_full[region]), 0).astype(np.float32)
    m0_f, r2_f = up(m0_full[region]).astype(np.float32), up(r2_full[region]).astype(np.float32)
    frac_f = None
    if comp["veins"]:
        frac_f, dchi_v = rasterise_veins(veins, mask_f.shape, f_affine)
        frac_f *= mask_f
        chi_f += dchi_v * mask_f
        del dchi_v
        m0_f += frac_f * (np.float32(VEIN_SIGNAL[0]) - m0_f)
        r2_f += frac_f * (np.float32(1000.0 / VEIN_SIGNAL[1]) - r2_f)
    delta_f = fibre_f = wm_shift = None
    dchi = 0.0
    if comp["anisotropy"]:
        rng_a = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(2, 0)))
        dchi = float(rng_a.uniform(*p.delta_chi_ppm))
        centre = np.asarray(ph.affine)[:3, :3] @ ((np.asarray(full) - 1) / 2.0) + np.asarray(ph.affine)[:3, 3]
        n_c = fibre_orientation(mask_c.shape, vs, reg_affine, centre, rng_a, p.fibre_smooth_mm)
        fibre_f = np.stack([acq.upsample_smooth(n_c[i], factor, order=1) for i in range(3)])
        del n_c
        fibre_f /= np.maximum(np.sqrt((fibre_f**2).sum(0)), 1e-6)
        wm = up(labels_full[region] == LABEL_IDS["wm"]) & mask_f
        delta_f = (np.float32(dchi) * wm).astype(np.float32)
        if frac_f is not None:
            delta_f *= 1.0 - frac_f
        if p.microstructure_ppm:
            wm_shift = microstructure_shift(fibre_f, b0, wm, p.microstructure_ppm)
        del wm
    window = None
    if factor != (1, 1, 1):
        window = acq.taper_profiles(mask_c.shape, factor, lo_m, hi_m, p.taper)
    pad = p.pad_factor if p.pad_factor is not None else (2.0 if factor == (1, 1, 1) else 1.5)
    chi_truth_f = chi_f  # the scalar truth keeps the margin (no cut at the crop edge before the k-space crop)
    chi_f = chi_f * in_crop_f if margin else chi_f
    if delta_f is not None and margin:
        delta_f *= in_crop_f
    sc = _Scene(vs=vs, factor=factor, region=region, inner=inner, sources=sources, chi_f=chi_f, mask_c=mask_c,
                m0_f=m0_f, r2_f=r2_f, delta_f=delta_f, fibre_f=fibre_f, wm_f=wm_shift, window=window, pad=pad)
    timings["scene"] = time.perf_counter() - t0

    # -- the scan -------------------------------------------------------------------------------------------
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1,)))
    s0 = _scan(sc, b0, te, b0_tesla, snr, rng, comp["noise"], p.bfr)
    timings.update({f"scan_{k}": v for k, v in s0["timings"].items()})

    # -- scan-grid truth -------------------------------------------------------------------------------------
    mask = np.array(ph.mask[crop])
    if factor == (1, 1, 1):
        chi = chi_f * mask
        vein_frac = frac_f if frac_f is not None else np.zeros(mask.shape, np.float32)
    else:
        chi = acq.kspace_crop(acq.apply_window(chi_truth_f.copy(), window), factor)[inner] * mask
        vein_frac = (_block_mean(frac_f, factor)[inner] if frac_f is not None else np.zeros(mask.shape, np.float32))
    chi = chi.astype(np.float32)
    labels = np.array(labels_full[crop])
    labels[(vein_frac >= 0.5) & mask] = LABEL_IDS["vein"]
    local_scalar = DipoleOperator(voxel_size=vs, b0_dir=b0, pad_factor=2.0).A(chi).astype(np.float32)

    sigma = s0["sigma"]
    mag0 = s0["mag0"]
    valid = s0["valid"]
    if sigma > 0:
        snr_e = tuple(float(np.mean(mag0[mask][:, e]) / sigma) for e in range(len(te)))
        noise_ppm = float(np.median(field_noise_ppm(mag0[valid], te, b0_tesla, sigma)))
    else:
        snr_e, noise_ppm = tuple(float("inf") for _ in te), 0.0
    sig = s0.pop("signal")
    phase = wrap_phase(np.angle(sig)).astype(np.float32)
    magnitude = np.abs(sig).astype(np.float32)
    del sig

    # -- COSMOS -----------------------------------------------------------------------------------------------
    cos_map = cos_mask = cos_dirs = None
    if cosmos:
        t0 = time.perf_counter()
        cos_dirs = cosmos_b0_dirs(ref_rot, p.cosmos_rotations_deg)
        fields, masks = [], []
        for o, b in enumerate(cos_dirs):
            if o == 0 and np.allclose(b, b0):
                so = s0
            else:
                rng_o = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1, o)))
                so = _scan(sc, b, te, b0_tesla, snr, rng_o, comp["noise"], p.bfr)
            fields.append(so["local"])
            masks.append(so["valid"])
        cos_map, cos_mask = cosmos_fit(fields, masks, cos_dirs, vs)
        timings["cosmos"] = time.perf_counter() - t0

    affine = np.array(ph.affine)
    affine[:3, 3] += affine[:3, :3] @ np.array([s.start for s in crop], dtype=np.float64)
    timings["total"] = time.perf_counter() - t_start
    meta = {"timings_s": timings, "n_veins": len(veins),
            "veins_per_family": {f: sum(v.family == f for v in veins) for f in ("medullary", "cortical", "deep")},
            "factor": list(factor), "fine_shape": list(chi_f.shape), "pad_factor": pad}
    return RealisticSubject(
        chi=chi, mask=mask, valid_mask=np.asarray(valid, bool), labels=labels, local_field=s0["local"],
        local_field_exact=s0["local_exact"], local_field_scalar=local_scalar,
        background_field=np.ascontiguousarray(s0["background"], dtype=np.float32), total_field=s0["total"],
        magnitude=magnitude, phase=phase, vein_fraction=vein_frac.astype(np.float32), te=te,
        b0_tesla=float(b0_tesla), b0_dir=b0, voxel_size=vs, affine=affine, tilt_deg=float(tilt_deg),
        noise_sigma=float(sigma), snr_per_echo=snr_e, noise_std_ppm=noise_ppm, components=comp,
        delta_chi_ppm=dchi, seed=int(seed), cosmos=cos_map, cosmos_mask=cos_mask,
        cosmos_b0_dirs=None if cos_dirs is None else [np.asarray(b) for b in cos_dirs], meta=meta)


def _block_mean(x: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """Mean over each ``f0 x f1 x f2`` block (fine -> scan grid)."""
    f = factor
    n = tuple(s // k for s, k in zip(x.shape, f))
    return x.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5))
