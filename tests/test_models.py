"""qsmlab.models: shape contract, parameter counts, the uQSM checkerboard ablation, the NeXtQSM
variational network's physics (its steps are gradient steps on ½‖M(Aχ − f)‖² through the dipole
operator), and the memory-saving inference paths against the autograd ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _phantom import head_phantom

from qsmlab.errors import QSMInputError
from qsmlab.models import (
    BackgroundUNet,
    BrainMaskUNETR,
    NeXtQSMChain,
    PedQNetRecon,
    QSMnetUNet,
    SubcorticalUNETR,
    UNet3d,
    UQSMNet,
    VariationalNet,
    count_parameters,
    default_models,
    summary,
)
from qsmlab.models.unet import fused_up_conv
from qsmlab.physics import DipoleOperator, tilted_b0_dir

torch.set_num_threads(1)


def _x(shape, channels, batch=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, channels, *shape), generator=g, dtype=dtype)


# Small configurations; (12, 16, 20) is a multiple of 4 with odd (3, 5) and even (4) quotients.
FC_CASES = [
    ("uqsm-nearest", lambda: UQSMNet(depth=2, width=4), 2, 1, (12, 16, 20)),
    ("uqsm-transposed", lambda: UQSMNet(depth=2, width=4, upsample="transposed"), 2, 1, (12, 16, 20)),
    ("uqsm-depth4", lambda: UQSMNet(width=2), 2, 1, (16, 32, 48)),
    ("qsmnet", lambda: QSMnetUNet(width=4, depth=2), 1, 1, (12, 16, 20)),
    ("qsmnet-depth4", lambda: QSMnetUNet(width=2), 1, 1, (16, 48, 32)),
    ("background", lambda: BackgroundUNet(width=4, depth=2), 2, 1, (12, 16, 20)),
    ("pedq", lambda: PedQNetRecon(filters=(4, 8, 16)), 2, 1, (12, 16, 20)),
    ("pedq-default", lambda: PedQNetRecon(), 2, 1, (8, 24, 16)),
]


@pytest.mark.parametrize("name,make,cin,cout,grid", FC_CASES, ids=[c[0] for c in FC_CASES])
def test_fully_convolutional_shapes_and_bad_grid(name, make, cin, cout, grid):
    torch.manual_seed(0)
    model = make().eval()
    m = model.size_multiple
    assert model.fixed_input_size is None
    assert all(s % m == 0 for s in grid) and any((s // m) % 2 for s in grid)  # an odd quotient is tested
    with torch.inference_mode():
        y = model(_x(grid, cin, batch=2))
    assert y.shape == (2, cout, *grid)
    assert torch.isfinite(y).all()
    bad = (grid[0], grid[1], grid[2] + m // 2)
    with pytest.raises(ValueError, match=rf"\({bad[0]}, {bad[1]}, {bad[2]}\).*size_multiple={m}"):
        model(_x(bad, cin))
    with pytest.raises(ValueError, match=rf"\[B, {cin}, X, Y, Z\]"):
        model(_x(grid, cin + 1))


def test_size_multiples_follow_depth():
    assert UQSMNet().size_multiple == 16 and UQSMNet(depth=3).size_multiple == 8
    assert QSMnetUNet().size_multiple == 16
    assert PedQNetRecon().size_multiple == 8 and PedQNetRecon(filters=(8, 16, 32, 64, 128)).size_multiple == 16
    assert VariationalNet(depth=3).size_multiple == 8
    assert NeXtQSMChain(bg={"depth": 2}, varnet={"depth": 3}).size_multiple == 8


def test_unetr_fixed_size_and_classes():
    torch.manual_seed(0)
    seg = SubcorticalUNETR(num_classes=5, img_size=(16, 32, 48)).eval()
    brain = BrainMaskUNETR(img_size=(32, 16, 16)).eval()
    assert seg.fixed_input_size == (16, 32, 48) and seg.size_multiple == 16
    with torch.inference_mode():
        assert seg(_x((16, 32, 48), 1, batch=2)).shape == (2, 5, 16, 32, 48)
        assert brain(_x((32, 16, 16), 1)).shape == (1, 2, 32, 16, 16)
    with pytest.raises(ValueError, match=r"\(32, 32, 48\).*fixed input size \(16, 32, 48\)"):
        seg(_x((32, 32, 48), 1))
    with pytest.raises(QSMInputError, match="img_size must be 3 positive multiples of 16"):
        BrainMaskUNETR(img_size=(40, 48, 48))
    with pytest.raises(QSMInputError, match="num_classes"):
        SubcorticalUNETR(num_classes=1)


def test_bad_options_name_the_option():
    with pytest.raises(QSMInputError, match="upsample must be one of nearest, transposed; got 'bilinear'"):
        UQSMNet(upsample="bilinear")
    with pytest.raises(QSMInputError, match="norm"):
        UQSMNet(norm="group")
    with pytest.raises(QSMInputError, match="init_step must be > 0"):
        VariationalNet(init_step=0.0)
    with pytest.raises(QSMInputError, match="bg must keep out_channels=1"):
        NeXtQSMChain(bg={"out_channels": 2})
    with pytest.raises(QSMInputError, match="filters must list at least 3 levels"):
        PedQNetRecon(filters=(8, 16))


def _unet_parameter_count(cin, cout, width, depth, k, convs, norm_params_per_channel, up, out_k):
    """Closed form for UNet3d: conv weights (bias only without norm), norm affine, up path, head."""
    ch = [width * 2**lv for lv in range(depth + 1)]
    bias = norm_params_per_channel == 0

    def block(a, b):
        n = 0
        for i in range(convs):
            c_in = a if i == 0 else b
            n += c_in * b * k**3 + (b if bias else 0) + norm_params_per_channel * b
        return n

    total = sum(block(cin if lv == 0 else ch[lv - 1], ch[lv]) for lv in range(depth))
    total += block(cin if depth == 0 else ch[-2], ch[-1])
    up_k = 8 if up == "transposed" else 1
    total += sum(ch[lv + 1] * ch[lv] * up_k for lv in range(depth))  # no bias on the up path
    total += sum(block(2 * ch[lv], ch[lv]) for lv in range(depth))
    return total + ch[0] * cout * out_k**3 + cout


def test_parameter_counts(capsys):
    # BatchNorm/InstanceNorm(affine) carry 2 parameters per channel; without norm the convs have a bias.
    assert count_parameters(UQSMNet()) == _unet_parameter_count(2, 1, 16, 4, 3, 2, 2, "nearest", 3)
    assert count_parameters(UQSMNet(upsample="transposed", width=8, depth=3)) == \
        _unet_parameter_count(2, 1, 8, 3, 3, 2, 2, "transposed", 3)
    assert count_parameters(QSMnetUNet(width=8)) == _unet_parameter_count(1, 1, 8, 4, 5, 2, 2, "transposed", 1)
    varnet = VariationalNet(steps=5, width=8, depth=2)  # one shared regulariser + one weight per step
    assert count_parameters(varnet) == _unet_parameter_count(3, 1, 8, 2, 3, 1, 0, "nearest", 1) + 5
    varnet = VariationalNet(steps=3, width=4, depth=3, convs_per_level=2)
    assert count_parameters(varnet) == _unet_parameter_count(3, 1, 4, 3, 3, 2, 0, "nearest", 1) + 3
    net = NeXtQSMChain()
    assert count_parameters(net) == count_parameters(net.background) + count_parameters(net.varnet)
    table = summary(num_classes=6)
    with capsys.disabled():
        print("\n" + table)
    for name, model in default_models(num_classes=6).items():
        assert name in table and f"{count_parameters(model):,}" in table


def _nyquist_fraction(volume: np.ndarray) -> float:
    """Largest, over the three axes, fraction of spectral energy at that axis's Nyquist frequency."""
    power = np.abs(np.fft.fftn(volume)) ** 2
    total = power.sum()
    return max(float(np.take(power, volume.shape[a] // 2, axis=a).sum() / total) for a in range(3))


def test_nearest_upsampling_has_no_checkerboard_on_constant_input(capsys):
    """Odena et al. 2016: a stride-2 transposed convolution gives each output parity its own weights, so a
    constant input comes out with a period-2 pattern; nearest upsampling + a shared conv cannot."""
    n, margin = 56, 24  # the zero-padded borders reach 23 voxels into a depth-2 net's output
    inner = (0, 0, slice(margin, n - margin), slice(margin, n - margin), slice(margin, n - margin))
    fractions = {}
    for mode in ("nearest", "transposed"):
        torch.manual_seed(0)
        model = UQSMNet(depth=2, width=8, upsample=mode).double().eval()
        with torch.inference_mode():
            y = model(torch.ones((1, 2, n, n, n), dtype=torch.float64))[inner]
            y0 = model(torch.zeros((1, 2, n, n, n), dtype=torch.float64))[inner]
        # the input reaches the output (a net whose ReLUs all die on this input would pass vacuously)
        assert (y - y0).abs().min() > 1e-6
        fractions[mode] = _nyquist_fraction(y.numpy())
    with capsys.disabled():
        print(f"\nNyquist energy fraction on a constant input: nearest {fractions['nearest']:.2e}, "
              f"transposed {fractions['transposed']:.2e}")
    # The period-2 amplitude of an untrained net is ~1e-3 of the mean, hence an energy fraction ~1e-6.
    assert fractions["transposed"] > 1e-8
    assert fractions["nearest"] < 1e-20
    assert fractions["nearest"] < 1e-12 * fractions["transposed"]


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("skip_first", [True, False])
def test_fused_up_conv_equals_upsample_concat_conv(k, skip_first):
    """conv(cat(skip, up(coarse))) by one stride-2 transposed conv with the composed (k+1)³ kernel:
    exact everywhere, borders included, for a learned 2³ up-conv and for nearest + 1³ conv."""
    torch.manual_seed(0)
    skip = torch.randn(2, 3, 10, 6, 14, dtype=torch.float64)
    coarse = torch.randn(2, 5, 5, 3, 7, dtype=torch.float64)
    conv = torch.nn.Conv3d(7, 4, k, padding=k // 2).double()
    tconv = torch.nn.ConvTranspose3d(5, 4, 2, stride=2, bias=False).double()
    conv1 = torch.nn.Conv3d(5, 4, 1, bias=False).double()
    nearest_weight = conv1.weight[:, :, 0, 0, 0].t()[..., None, None, None].expand(-1, -1, 2, 2, 2)
    for up, weight in [(tconv, tconv.weight),
                       (lambda c: F.interpolate(conv1(c), scale_factor=2, mode="nearest"), nearest_weight)]:
        parts = [skip, up(coarse)] if skip_first else [up(coarse), skip]
        ref = conv(torch.cat(parts, 1))
        for fold in (True, False):
            fused = fused_up_conv(skip, coarse, weight, conv, skip_first=skip_first, fold=fold)
            torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)


def test_unet_up_weight_is_the_up_path():
    torch.manual_seed(0)
    coarse = torch.randn(1, 8, 3, 4, 5)
    for mode in ("nearest", "transposed"):
        net = UNet3d(1, 1, width=4, depth=1, upsample=mode)
        expected = (F.interpolate(net.ups[0](coarse), scale_factor=2, mode="nearest") if mode == "nearest"
                    else net.ups[0](coarse))
        torch.testing.assert_close(F.conv_transpose3d(coarse, net.up_weight(0), stride=2), expected)


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("upsample", ["nearest", "transposed"])
def test_inplace_inference_path_equals_autograd_path(norm, upsample):
    torch.manual_seed(0)
    model = UNet3d(2, 1, width=4, depth=2, norm=norm, upsample=upsample)
    x = _x((12, 8, 16), 2, batch=2, seed=1)
    model.train()
    model(x)  # give BatchNorm non-trivial running statistics
    model.eval()
    with torch.enable_grad():
        ref = model(x)
    with torch.inference_mode():
        fast = model(x)
    torch.testing.assert_close(fast, ref.detach(), rtol=1e-4, atol=1e-5)


def test_pedqnet_lean_inference_equals_monai_forward():
    """The memory-lean no-grad path walks DynUNet's own modules: it must be MONAI's function exactly."""
    torch.manual_seed(0)
    model = PedQNetRecon(filters=(4, 8, 16, 32))
    x = _x((16, 24, 8), 2, batch=2, seed=3)
    for mode in (model.train, model.eval):  # instance norm: the same statistics in both modes
        mode()
        ref = model.net(x)  # MONAI's forward, autograd on
        with torch.inference_mode():
            lean = model(x)
        assert lean.is_contiguous()
        torch.testing.assert_close(lean, ref.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("upsample", ["nearest", "transposed"])
def test_training_backward_reaches_every_parameter(upsample):
    torch.manual_seed(0)
    model = UQSMNet(depth=2, width=4, upsample=upsample).train()
    model(_x((8, 8, 12), 2, batch=2)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- NeXtQSM: the variational network is a physics-consistent gradient scheme ---------------------------

def _geometry_case(n=24, b0_deg=25.0, voxel=(1.0, 1.0, 1.5)):
    b0 = tilted_b0_dir(b0_deg)
    ph = head_phantom(n, voxel_size=voxel, b0_dir=b0)
    op = DipoleOperator(voxel_size=voxel, b0_dir=b0)
    mask = torch.from_numpy(ph["mask"].astype(np.float64))[None, None]
    chi = torch.from_numpy(ph["chi"])[None, None] * mask
    field = op.A(chi) * mask
    return op, chi, field, mask


def _data_term(op, chi, field, mask):
    return 0.5 * (mask * (op.A(chi) - field)).square().sum()


def test_varnet_untrained_step_is_projected_gradient_step_on_data_term():
    op, _, field, mask = _geometry_case()
    torch.manual_seed(0)
    net = VariationalNet(steps=1, width=4, depth=2, init_step=0.7).double()
    # alpha = softplus(a) = init_step, up to the float32 rounding of a made before .double()
    alpha = net.step_weights.detach()
    torch.testing.assert_close(alpha, torch.tensor([0.7], dtype=torch.float64), rtol=1e-6, atol=0)
    chi0 = (field * mask).requires_grad_(True)
    (grad,) = torch.autograd.grad(_data_term(op, chi0, field, mask), chi0)
    expected = mask * (chi0.detach() - alpha * grad)
    with torch.no_grad():
        out = net(field, mask, op)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_varnet_untrained_descends_the_data_term():
    op, chi_true, field, mask = _geometry_case()
    values = []
    for steps in (1, 2, 4, 8):
        net = VariationalNet(steps=steps, width=4, depth=2, init_step=1.5).double()
        with torch.no_grad():
            values.append(float(_data_term(op, net(field, mask, op), field, mask)))
    start = float(_data_term(op, field * mask, field, mask))
    assert start > values[0] > values[1] > values[2] > values[3]
    # and the iterates approach the source: closer to chi_true than the local field is
    with torch.no_grad():
        chi8 = VariationalNet(steps=8, width=4, depth=2, init_step=1.5).double()(field, mask, op)
    assert (chi8 - chi_true).norm() < (field * mask - chi_true).norm()


def _perturbed_varnet(**kw):
    torch.manual_seed(0)
    net = VariationalNet(width=4, depth=2, **kw).double()
    with torch.no_grad():
        net.regulariser.head.weight.normal_(0.0, 0.1)  # make R non-zero so that it matters
    return net


def test_varnet_checkpointing_gives_same_values_and_gradients():
    op, _, field, mask = _geometry_case(n=16)
    results = []
    for ckpt in (False, True):
        net = _perturbed_varnet(steps=3, checkpointing=ckpt).train()
        out = net(field, mask, op)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1)
    assert results[0][1][-1].abs().sum() > 0  # the step weights are learned


def test_varnet_per_sample_geometry_matches_single_runs():
    """A batch mixing head orientations and voxel sizes = each sample with its own operator."""
    cases = [_geometry_case(n=16, b0_deg=0.0, voxel=(1.0, 1.0, 1.0)),
             _geometry_case(n=16, b0_deg=40.0, voxel=(1.0, 1.0, 2.0))]
    batched_op = DipoleOperator(voxel_size=[c[0].voxel_size[0] for c in cases],
                                b0_dir=[c[0].b0_dir[0] for c in cases])
    field = torch.cat([c[2] for c in cases])
    mask = torch.cat([c[3] for c in cases])
    net = _perturbed_varnet(steps=2).eval()
    with torch.no_grad():
        batched = net(field, mask, batched_op)
        for i, (op, _, f, m) in enumerate(cases):
            torch.testing.assert_close(batched[i:i + 1], net(f, m, op))
        assert not torch.allclose(batched[0], batched[1])


def test_nextqsm_outputs_masked_local_field_and_chi():
    op, _, field, mask = _geometry_case(n=16)
    torch.manual_seed(0)
    net = NeXtQSMChain(bg={"width": 4, "depth": 2}, varnet={"steps": 2, "width": 4, "depth": 1}).double().eval()
    assert net.size_multiple == 4
    total = field + 0.3  # a constant background offset
    with torch.inference_mode():
        out = net(total, mask, op)
    assert set(out) == {"local_field", "chi"}
    for key in out:
        assert out[key].shape == total.shape
        assert torch.all(out[key][mask == 0] == 0)
        assert out[key][mask > 0].abs().sum() > 0
    with pytest.raises(ValueError, match="mask shape"):
        net(total, mask[:, :, :8], op)
    with pytest.raises(ValueError, match=r"\(16, 16, 18\).*size_multiple=4"):
        net(F.pad(total, (0, 2)), F.pad(mask, (0, 2)), op)
