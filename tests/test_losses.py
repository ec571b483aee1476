"""qsmlab.losses: each term is zero at the truth and positive away from it, analytic values, gradcheck,
wrap invariance of the nonlinear term, TV of constants, flip equivariance of data consistency with a
negated b0 component, per-sample geometry, and the composite's weights, skipping and logging names."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchio as tio
from scipy import ndimage

from qsmlab.data.collate import collate_subjects
from qsmlab.data.transforms import flip_subject
from qsmlab.losses import (
    ChiLoss,
    CompositeLoss,
    DataConsistencyLoss,
    DiceCELoss,
    FieldLoss,
    GradientDifferenceLoss,
    Term,
    TVLoss,
    magnitude_weight,
)
from qsmlab.physics import DipoleOperator, normalize_b0_dir, phase_scale, physics_for_batch

OBLIQUE = normalize_b0_dir((0.35, -0.45, 0.82))  # every component non-zero: flips matter
VS = (1.0, 1.1, 1.3)
PHI = phase_scale(0.02, 3.0)  # rad/ppm at TE = 20 ms, 3 T (about 16 rad/ppm)
DC_KINDS = [(k, n) for k in ("linear", "weighted", "nonlinear") for n in ("l1", "l2")]


def _volume(shape, seed):
    """Smooth chi (ppm, |chi| <= 0.1), an ellipsoid mask and a positive magnitude, as numpy float64."""
    rng = np.random.default_rng(seed)
    chi = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    chi = 0.1 * chi / np.abs(chi).max()
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = (g[0] / 0.8) ** 2 + (g[1] / 0.85) ** 2 + (g[2] / 0.75) ** 2 <= 1.0
    mag = np.where(mask, 0.9 - 2.0 * np.abs(chi) + 0.05 * rng.random(shape), 0.02)
    return chi, mask, mag


def _batch(shape=(20, 18, 16), seed=0, b0=OBLIQUE, vs=VS, pad=2.0, dtype=torch.float64, n=1, ps=PHI):
    """A dict batch [n, 1, X, Y, Z] whose field is exactly A(chi) under its geometry."""
    vols = [_volume(shape, seed + i) for i in range(n)]
    t = lambda a: torch.tensor(np.stack(a)[:, None], dtype=dtype)  # noqa: E731
    chi, mask, mag = (t([v[j] for v in vols]) for j in range(3))
    b0s = torch.tensor(np.broadcast_to(np.asarray(b0, dtype=float), (n, 3)).copy(), dtype=dtype)
    vss = torch.tensor(np.broadcast_to(np.asarray(vs, dtype=float), (n, 3)).copy(), dtype=dtype)
    batch = dict(chi=chi, mask=mask, magnitude=mag, b0_dir=b0s, voxel_size=vss,
                 phase_scale=torch.full((n,), float(ps), dtype=dtype))
    batch["field"] = DipoleOperator(vss, b0s, pad_factor=pad).A(chi)
    return batch


def _perturbed(chi, scale=0.02, seed=1):
    g = torch.Generator().manual_seed(seed)
    return chi + scale * torch.randn(chi.shape, generator=g, dtype=chi.dtype)


# -- zero at the truth, positive away --------------------------------------------------------------
@pytest.mark.parametrize("kind,norm", DC_KINDS)
def test_data_consistency_zero_at_truth_positive_away(kind, norm):
    b = _batch()
    phys = physics_for_batch(b)
    loss = DataConsistencyLoss(kind=kind, norm=norm)
    assert loss(b["chi"], b, phys).item() < 1e-12
    assert loss(_perturbed(b["chi"]), b, phys).item() > 1e-6
    assert loss({"chi": _perturbed(b["chi"])}, SimpleNamespace(**b), None).item() > 1e-6  # builds physics


@pytest.mark.parametrize("cls", [ChiLoss, GradientDifferenceLoss])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_supervised_chi_terms_zero_at_truth_positive_away(cls, norm):
    b = _batch()
    loss = cls(norm=norm)
    assert loss(b["chi"].clone(), b, None).item() == 0.0
    assert loss(_perturbed(b["chi"]), b, None).item() > 1e-6


def test_field_loss_reads_named_output_and_is_masked():
    b = _batch()
    loss = FieldLoss(norm="l2")
    assert loss({"local_field": b["field"].clone(), "chi": b["chi"]}, b, None).item() == 0.0
    outside = b["field"] + 5.0 * (1 - b["mask"])  # errors outside the mask do not count
    assert loss({"local_field": outside}, b, None).item() == 0.0
    inside = b["field"] + 0.01 * b["mask"]
    assert loss({"local_field": inside}, b, None).item() == pytest.approx(1e-4, rel=1e-9)
    with pytest.raises(ValueError, match="local_field"):
        loss({"chi": b["chi"]}, b, None)


def test_mean_over_masked_voxels_is_size_independent():
    """chi = 0, f = c inside the mask: residual -c on every masked voxel -> L1 = c, L2 = c^2, at any FOV."""
    c = 0.03
    for shape in [(16, 16, 16), (24, 24, 24)]:
        mask = torch.zeros((1, 1) + shape, dtype=torch.float64)
        mask[..., 4:12, 5:11, 3:13] = 1.0  # the same 480 voxels, more background in the larger FOV
        b = dict(mask=mask, field=c * mask, b0_dir=torch.tensor(np.array([OBLIQUE])), voxel_size=torch.tensor([VS], dtype=torch.float64))
        chi = torch.zeros_like(mask)
        assert DataConsistencyLoss("linear", "l1")(chi, b, None).item() == pytest.approx(c, rel=1e-12)
        assert DataConsistencyLoss("linear", "l2")(chi, b, None).item() == pytest.approx(c * c, rel=1e-12)


def test_dice_ce_low_at_truth_high_away_for_seg_and_mask_targets():
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 3, (2, 1, 12, 12, 12), generator=g)
    b = dict(seg=seg, mask=(seg > 0).float())
    onehot = torch.nn.functional.one_hot(seg[:, 0], 3).permute(0, 4, 1, 2, 3).double()
    loss = DiceCELoss()
    good = loss({"seg_logits": 20.0 * (2 * onehot - 1)}, b, None).item()
    bad = loss({"seg_logits": 20.0 * (2 * onehot.roll(1, dims=1) - 1)}, b, None).item()
    assert good < 1e-3 and bad > 1.0
    brain = DiceCELoss(output="mask_logits", target="mask")
    fg = (seg > 0).double()
    assert brain({"mask_logits": 20.0 * (2 * fg - 1)}, b, None).item() < 1e-3  # one channel: sigmoid + BCE
    assert brain({"mask_logits": -20.0 * (2 * fg - 1)}, b, None).item() > 1.0
    two = torch.cat([-(2 * fg - 1), 2 * fg - 1], dim=1) * 20.0  # two channels: softmax, labels from the mask
    assert brain({"mask_logits": two}, b, None).item() < 1e-3
    with pytest.raises(ValueError, match="labels 0..2 but the output has 2 channels"):
        loss({"seg_logits": two}, b, None)


# -- TV ----------------------------------------------------------------------------------------------
def test_tv_of_constant_is_zero_and_ramp_is_analytic():
    b = _batch(shape=(16, 16, 16))
    tv = TVLoss()
    assert tv(torch.full_like(b["chi"], 0.07), b, None).item() == 0.0
    assert tv(b["chi"], b, None).item() > 0.0
    # full mask, chi = a * i along axis 1: every pair differs by a / h_1; n^2 (n - 1) pairs over n^3 voxels
    n, a = 16, 0.01
    ramp = (a * torch.arange(n, dtype=torch.float64)).reshape(1, 1, 1, n, 1).expand(1, 1, n, n, n)
    full = dict(mask=torch.ones(1, 1, n, n, n), voxel_size=torch.tensor([VS], dtype=torch.float64))
    assert tv(ramp, full, None).item() == pytest.approx(a / VS[1] * (n - 1) / n, rel=1e-12)
    assert TVLoss(voxel_size_aware=False)(ramp, full, None).item() == pytest.approx(a * (n - 1) / n, rel=1e-12)


def test_tv_ignores_the_mask_edge():
    """A chi that is 1 inside the mask and 0 outside has no TV inside: only in-mask pairs count."""
    b = _batch(shape=(16, 16, 16))
    assert TVLoss()(b["mask"].clone(), b, None).item() == 0.0
    assert TVLoss()(b["mask"].clone(), {"voxel_size": b["voxel_size"]}, None).item() > 0.0  # no mask: counts


def test_tv_on_the_grid_counts_the_edge_and_outside_per_mask_voxel():
    """support="grid": a box of 1 in a grid of 0 pays its surface (the jump at the box's faces, per mm),
    divided by the mask's voxel count; a constant over the whole grid still has no TV."""
    n, k = 16, 4
    box = torch.zeros(1, 1, n, n, n, dtype=torch.float64)
    box[..., 6:6 + k, 6:6 + k, 6:6 + k] = 1.0
    mask = torch.zeros_like(box)
    mask[..., 4:12, 4:12, 4:12] = 1.0
    b = {"mask": mask, "voxel_size": torch.tensor([VS], dtype=torch.float64)}
    grid = TVLoss(support="grid")
    faces = sum(2 * k * k / h for h in VS)  # two faces of k x k pairs per axis, each a jump of 1 / h
    assert grid(box, b, None).item() == pytest.approx(faces / mask.sum().item(), rel=1e-12)
    assert TVLoss()(box, b, None).item() == pytest.approx(grid(box, b, None).item(), rel=1e-12)  # box inside mask
    assert TVLoss()(mask.clone(), b, None).item() == 0.0 < grid(mask.clone(), b, None).item()
    assert grid(torch.full_like(box, 0.3), b, None).item() == 0.0
    with pytest.raises(ValueError, match="support must be 'mask' or 'grid'"):
        TVLoss(support="everywhere")


# -- physics of the data-consistency family --------------------------------------------------------
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_nonlinear_invariant_to_2pi_wraps_of_the_phase(norm):
    b = _batch()
    g = torch.Generator().manual_seed(5)
    k = torch.randint(-3, 4, b["field"].shape, generator=g).double()
    wrapped = dict(b, field=b["field"] + 2 * math.pi * k / PHI)  # phi_s * f shifted by 2 pi k per voxel
    chi = _perturbed(b["chi"])
    phys = physics_for_batch(b)
    nl = DataConsistencyLoss("nonlinear", norm)
    assert nl(chi, wrapped, phys).item() == pytest.approx(nl(chi, b, phys).item(), rel=1e-9)
    assert nl(b["chi"], wrapped, phys).item() < 1e-12  # the truth still fits the wrapped field
    lin = DataConsistencyLoss("weighted", norm)
    assert lin(chi, wrapped, phys).item() > 100 * lin(chi, b, phys).item()  # a linear term sees the wraps


def test_weighted_and_nonlinear_limits():
    """W = 1 -> weighted == linear; small residuals -> nonlinear == phi_s^p * weighted (|2 sin(x/2)| ~ |x|)."""
    b = _batch()
    chi = _perturbed(b["chi"], scale=1e-5)
    phys = physics_for_batch(b)
    flat = dict(b, magnitude=torch.ones_like(b["magnitude"]))
    for norm, p in [("l1", 1), ("l2", 2)]:
        lin = DataConsistencyLoss("linear", norm)(chi, flat, phys).item()
        assert DataConsistencyLoss("weighted", norm)(chi, flat, phys).item() == pytest.approx(lin, rel=1e-12)
        w = DataConsistencyLoss("weighted", norm)(chi, b, phys).item()
        assert w < 0.99 * lin  # W <= 1, and < 1 almost everywhere: the magnitude does weight
        nl = DataConsistencyLoss("nonlinear", norm)(chi, b, phys).item()
        assert nl == pytest.approx(PHI**p * w, rel=1e-4)


def test_magnitude_weight_and_noise_weight():
    b = _batch(n=2)
    mask = b["mask"]
    w = magnitude_weight(b, b["chi"], mask)
    assert torch.all((w >= 0) & (w <= 1))
    peak = (w * mask).amax(dim=(1, 2, 3, 4))
    np.testing.assert_allclose(peak.numpy(), [1.0, 1.0], rtol=1e-12)
    scaled = dict(b, magnitude=b["magnitude"] * torch.tensor([1.0, 7.0], dtype=torch.float64).reshape(2, 1, 1, 1, 1))
    torch.testing.assert_close(magnitude_weight(scaled, b["chi"], mask), w)  # per-sample scale removed
    nw = torch.rand_like(b["chi"])
    assert torch.equal(magnitude_weight(dict(b, noise_weight=nw), b["chi"], mask), nw)
    with pytest.raises(ValueError, match="magnitude"):
        DataConsistencyLoss("weighted")(b["chi"], dict(b, magnitude=None), None)


def test_nonlinear_needs_a_phase_scale():
    b = _batch(n=2)
    b["phase_scale"][1] = float("nan")
    chi = _perturbed(b["chi"])
    with pytest.raises(ValueError, match=r"phase_scale .*sample\(s\) \[1\]"):
        DataConsistencyLoss("nonlinear")(chi, b, None)
    assert DataConsistencyLoss("nonlinear", phase_scale=PHI)(chi, b, None).item() > 0
    assert DataConsistencyLoss("weighted")(chi, b, None).item() > 0  # linear kinds need none
    with pytest.raises(ValueError, match="phase_scale"):
        DataConsistencyLoss("nonlinear", phase_scale=-1.0)


def test_dc_target_from_prediction_checked_first():
    """NeXtQSM: data consistency against the network's own local-field output."""
    b = _batch()
    other = b["field"] * 0.5
    loss = DataConsistencyLoss("linear", "l2", target="local_field")
    assert loss({"chi": b["chi"], "local_field": b["field"]}, b, None).item() < 1e-20
    assert loss({"chi": b["chi"], "local_field": other}, b, None).item() > 1e-8
    with pytest.raises(ValueError, match="local_field"):
        loss({"chi": b["chi"]}, b, None)


def test_per_sample_geometry():
    """Two samples, two head orientations: zero only when each uses its own b0_dir."""
    b = _batch(n=2)
    b["b0_dir"][1] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    b["field"] = DipoleOperator(b["voxel_size"], b["b0_dir"]).A(b["chi"])
    phys = physics_for_batch(b)
    assert phys.n_geometries == 2
    loss = DataConsistencyLoss("linear", "l2")
    assert loss(b["chi"], b, phys).item() < 1e-20
    assert loss(b["chi"], b, DipoleOperator(VS, OBLIQUE)).item() > 1e-8
    assert physics_for_batch(_batch(n=3)).n_geometries == 1  # identical rows collapse to one kernel


def _subject(shape, seed):
    chi, mask, mag = _volume(shape, seed)
    field = DipoleOperator(VS, OBLIQUE).A(chi)
    pred = chi + 0.01 * np.random.default_rng(seed + 9).normal(size=shape)  # a network's imperfect output
    t = lambda a: torch.tensor(np.asarray(a, dtype=np.float32)[None])  # noqa: E731
    return tio.Subject(chi=tio.ScalarImage(tensor=t(chi)), field=tio.ScalarImage(tensor=t(field)),
                       magnitude=tio.ScalarImage(tensor=t(mag)), pred=tio.ScalarImage(tensor=t(pred)),
                       mask=tio.LabelMap(tensor=t(mask)), b0_dir=list(OBLIQUE), voxel_size=list(VS),
                       subject="s0", source="synthetic", phase_scale=PHI)


@pytest.mark.parametrize("axes", [(0,), (1, 2)])
@pytest.mark.parametrize("kind,norm", [("linear", "l2"), ("weighted", "l1"), ("nonlinear", "l2")])
def test_data_consistency_unchanged_under_physics_safe_flip(axes, kind, norm):
    """flip_subject flips every image and negates b0_dir[i]; A commutes with it, so the loss is unchanged
    (float32 batch from the real collate); keeping b0_dir (a naive flip) changes it."""
    shape = (20, 18, 16)  # even sizes: Nyquist planes included
    s0, s1 = _subject(shape, 2), flip_subject(_subject(shape, 2), list(axes))
    b0, b1 = collate_subjects([s0]), collate_subjects([s1])
    assert b1.b0_dir[0, axes[0]].item() == pytest.approx(-OBLIQUE[axes[0]])
    loss = DataConsistencyLoss(kind, norm)
    p0, p1 = s0["pred"].data[None], s1["pred"].data[None]
    v0 = loss(p0, b0, physics_for_batch(b0)).item()
    v1 = loss(p1, b1, physics_for_batch(b1)).item()
    assert v0 > 0 and v1 == pytest.approx(v0, rel=1e-5)
    naive = loss(p1, b1, physics_for_batch(b0)).item()
    assert abs(naive - v0) > 1e-3 * v0


# -- autograd ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,make", [
    *[(f"dc_{k}_{n}", (lambda k=k, n=n: DataConsistencyLoss(k, n))) for k, n in DC_KINDS],
    ("tv", TVLoss), ("grad_l1", GradientDifferenceLoss), ("grad_l2", lambda: GradientDifferenceLoss(norm="l2")),
    ("chi_l1", ChiLoss), ("chi_l2", lambda: ChiLoss(norm="l2")),
])
def test_gradcheck_float64(name, make):
    b = _batch(shape=(6, 6, 6), pad=1.0)
    phys = physics_for_batch(b, pad_factor=1.0)
    loss = make()
    x = _perturbed(b["chi"], scale=0.05, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: loss(t, b, phys), (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_field_dice_and_composite():
    b = _batch(shape=(6, 6, 6), pad=1.0)
    phys = physics_for_batch(b, pad_factor=1.0)
    g = torch.Generator().manual_seed(2)
    b["seg"] = torch.randint(0, 3, b["chi"].shape, generator=g)
    lf = (b["field"] + 0.01 * torch.randn(b["field"].shape, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: FieldLoss()({"local_field": t}, b, phys), (lf,), eps=1e-6, atol=1e-6)
    logits = torch.randn((1, 3, 6, 6, 6), generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: DiceCELoss()({"seg_logits": t}, b, phys), (logits,),
                                    eps=1e-6, atol=1e-6)
    comp = CompositeLoss({"dc": (DataConsistencyLoss("nonlinear", "l1"), 1.0), "tv": (TVLoss(), 0.1),
                          "seg": (DiceCELoss(), 0.5)})
    x = _perturbed(b["chi"], scale=0.05, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, s: comp({"chi": c, "seg_logits": s}, b, phys)[0], (x, logits),
                                    eps=1e-6, atol=1e-6)


# -- composite ---------------------------------------------------------------------------------------
def test_composite_sums_named_parts_and_skips_zero_weights():
    b = _batch()
    phys = physics_for_batch(b)
    chi = _perturbed(b["chi"])
    dc, tv, sup = DataConsistencyLoss("nonlinear"), TVLoss(), ChiLoss()
    comp = CompositeLoss({"dc": (dc, 1.0), "tv": (tv, 1e-3), "model": (sup, 0.0)})
    total, parts = comp(chi, b, phys)
    assert set(parts) == {"loss_dc", "loss_tv"}
    assert total.item() == pytest.approx(dc(chi, b, phys).item() + 1e-3 * tv(chi, b, phys).item(), rel=1e-12)
    # a weight-0 term is not computed: a batch without chi is fine until its weight is set
    no_chi = dict(b, chi=None)
    comp(chi, no_chi, phys)
    comp.lambda_model = 0.5
    assert comp.weights["model"] == 0.5 and comp.lambda_model == 0.5
    with pytest.raises(ValueError, match="'chi'"):
        comp(chi, no_chi, phys)
    total, parts = comp(chi, b, None)  # physics built from the batch
    assert set(parts) == {"loss_dc", "loss_tv", "loss_model"}
    assert total.item() == pytest.approx(sum(comp.weights[k[5:]] * v.item() for k, v in parts.items()), rel=1e-12)
    comp.set_weights(lambda_tv=0.0, dc=2.0)
    assert comp.weight_hparams() == {"lambda_dc": 2.0, "lambda_tv": 0.0, "lambda_model": 0.5}
    assert copy.deepcopy(comp).lambda_dc == 2.0
    with pytest.raises(ValueError, match="lambda_tv"):
        comp.lambda_tv = -1.0
    with pytest.raises(KeyError, match="seg"):
        comp.set_weights(lambda_seg=1.0)
    comp.set_weights(dc=0, model=0)
    with pytest.raises(ValueError, match="every term has weight 0"):
        comp(chi, b, phys)
    assert set(CompositeLoss([Term("a", TVLoss(), 1.0)]).weights) == {"a"}


def test_uqsm_ablation_is_four_configs():
    """NDI; LDI + TV; WLDI + TV; NDI + TV from plain config dicts (as YAML gives them), no code."""
    configs = {
        "NDI": {"dc": {"kind": "nonlinear"}, "lambda_tv": 0.0},
        "LDI+TV": {"dc": {"kind": "linear"}, "lambda_tv": 1e-3},
        "WLDI+TV": {"dc": {"kind": "weighted"}, "lambda_tv": 1e-3},
        "NDI+TV": {"dc": {"kind": "nonlinear"}, "lambda_tv": 1e-3},
    }
    b = _batch()
    phys = physics_for_batch(b)
    chi = _perturbed(b["chi"])
    values = {}
    for name, cfg in configs.items():
        comp = CompositeLoss({"dc": (DataConsistencyLoss(**cfg["dc"]), 1.0), "tv": (TVLoss(), cfg["lambda_tv"])})
        total, parts = comp(chi, b, phys)
        assert ("loss_tv" in parts) == (cfg["lambda_tv"] > 0)
        values[name] = total.item()
    assert len({round(v, 12) for v in values.values()}) == 4
    assert values["NDI+TV"] > values["NDI"]
