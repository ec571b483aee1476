"""Dipole kernel values, adjointness, flip invariance, numpy/torch agreement, autograd."""

import numpy as np
import pytest
import torch

from qsmlab.physics import DipoleOperator, dipole_kernel, kspace_coords, tilted_b0_dir

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_kernel_special_values(kind):
    shape, vs = (32, 32, 32), (1.0, 1.0, 1.0)
    d = dipole_kernel(shape, vs, (0, 0, 1), kind=kind)
    assert d[0, 0, 0] == 0.0
    if kind == "continuous":
        assert d[0, 0, 5] == pytest.approx(-2.0 / 3.0)  # k along B0
        assert d[5, 0, 0] == pytest.approx(1.0 / 3.0)  # k perpendicular
        assert d[3, 7, 0] == pytest.approx(1.0 / 3.0)
    else:  # discrete kernel matches at low k only
        assert d[0, 0, 1] == pytest.approx(-2.0 / 3.0)
        assert d[1, 0, 0] == pytest.approx(1.0 / 3.0)


@pytest.mark.parametrize("vs", [(1.0, 1.0, 1.0), (0.8, 1.0, 1.2), (1.0, 1.0, 2.0)])
def test_kernel_zero_on_magic_cone_and_extremes_oblique(vs):
    b = tilted_b0_dir(25.0, axis=(1, 1, 0))
    # odd grid: no Nyquist planes (there the kernel is sign-averaged, see kernel docstring)
    d = dipole_kernel((23, 19, 15), vs, b)
    kx, ky, kz = kspace_coords((23, 19, 15), vs)
    k = np.stack(np.broadcast_arrays(kx, ky, kz), -1)
    kn = np.linalg.norm(k, axis=-1)
    cos2 = np.divide((k @ b) ** 2, kn**2, out=np.full(kn.shape, np.nan), where=kn > 0)
    on_cone = np.abs(cos2 - 1 / 3) < 1e-12
    # analytic: D = 1/3 - cos^2 everywhere except k = 0
    np.testing.assert_allclose(d[kn > 0], 1 / 3 - cos2[kn > 0], atol=1e-12)
    assert np.all(np.abs(d[on_cone]) < 1e-12)
    assert d.min() >= -2 / 3 - 1e-12 and d.max() <= 1 / 3 + 1e-12


def test_kernel_uses_k_divided_by_voxel_size():
    """Anisotropic voxels: the k along the coarse axis is 1/(n*h); D depends on the physical k."""
    d = dipole_kernel((16, 16, 16), (1.0, 1.0, 2.0), (0, 0, 1))
    # index (1, 0, 1): kx = 1/16, kz = 1/32 cycles/mm -> D = 1/3 - (1/32)^2/((1/16)^2+(1/32)^2)
    assert d[1, 0, 1] == pytest.approx(1 / 3 - 0.25 / 1.25)


def test_rfft_kernel_is_half_of_full():
    # odd nz: no Nyquist plane, where fftfreq says -1/2 and rfftfreq +1/2 (the same frequency; the
    # continuous kernel differs there for oblique B0, the documented Nyquist limitation)
    full = dipole_kernel((12, 10, 9), (1, 1, 1.5), tilted_b0_dir(40))
    half = dipole_kernel((12, 10, 9), (1, 1, 1.5), tilted_b0_dir(40), rfft=True)
    np.testing.assert_array_equal(half, full[..., :5])


@pytest.mark.parametrize("pad", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_adjointness_float64(pad, kind):
    op = DipoleOperator((0.9, 1.0, 1.3), tilted_b0_dir(30), pad, kind)
    x, y = RNG.standard_normal((2, 20, 18, 15))
    lhs = np.vdot(op.A(x), y)
    rhs = np.vdot(x, op.A_adjoint(y))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lt = torch.sum(op.A(xt) * yt).item()
    rt = torch.sum(xt * op.A_adjoint(yt)).item()
    assert abs(lt - rt) <= 1e-10 * max(1.0, abs(lt))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flip_with_negated_b0_component(axis):
    b = tilted_b0_dir(30, axis=(1, 1, 0))
    chi = RNG.standard_normal((16, 18, 20))
    f = DipoleOperator((1, 1, 1.5), b).A(chi)
    b_flipped = b.copy()
    b_flipped[axis] *= -1
    f2 = DipoleOperator((1, 1, 1.5), b_flipped).A(np.flip(chi, axis))
    # exact for the padded operator too: the lattice of periodic images is symmetric under the flip,
    # and the kernel is sign-averaged on Nyquist planes (white noise has full energy there)
    np.testing.assert_allclose(np.flip(f, axis), f2, atol=1e-10)
    # a naive flip (b0 unchanged) is wrong for oblique B0
    f3 = DipoleOperator((1, 1, 1.5), b).A(np.flip(chi, axis))
    assert np.abs(np.flip(f, axis) - f3).max() > 1e-2 * np.abs(f).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_torch_agree_batched_autograd(dtype):
    op = DipoleOperator((1.0, 0.8, 1.2), tilted_b0_dir(20))
    x = RNG.standard_normal((2, 1, 16, 12, 14))
    ref = op.A(x)
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    out = op.A(xt)
    assert out.dtype == dtype and out.shape == xt.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(out.detach().numpy(), ref, atol=tol * np.abs(ref).max())
    # gradient of <A x, g> is A* g = A g
    g = torch.tensor(RNG.standard_normal(x.shape), dtype=dtype)
    (out * g).sum().backward()
    np.testing.assert_allclose(xt.grad.numpy(), op.A(g.numpy().astype(np.float64)), atol=tol * 10)


def test_numpy_float32_preserved_and_per_sample_geometry():
    b = np.stack([tilted_b0_dir(0), tilted_b0_dir(30), tilted_b0_dir(60)])
    x = RNG.standard_normal((3, 1, 12, 12, 12)).astype(np.float32)
    out = DipoleOperator((1, 1, 1), b).A(x)
    assert out.dtype == np.float32
    for i in range(3):
        single = DipoleOperator((1, 1, 1), b[i]).A(x[i])
        np.testing.assert_allclose(out[i], single, atol=1e-5)
    outt = DipoleOperator((1, 1, 1), torch.tensor(b)).A(torch.tensor(x))
    np.testing.assert_allclose(outt.numpy(), out, atol=1e-5)


def test_kernel_even_on_nyquist_planes():
    """D(k) = D(-k) on the DFT grid, Nyquist planes included, for oblique B0 (even-sized grid)."""
    d = dipole_kernel((8, 6, 10), (1, 1.2, 0.9), tilted_b0_dir(35, axis=(1, 2, 0)))
    neg = np.roll(np.flip(d, (0, 1, 2)), (1, 1, 1), axis=(0, 1, 2))  # index -i mod n
    np.testing.assert_allclose(d, neg, atol=1e-14)


def test_uniform_chi_gives_no_field_periodic():
    f = DipoleOperator(pad_factor=1.0).A(np.full((8, 8, 8), 3.0))
    assert np.abs(f).max() < 1e-12


def test_bad_arguments():
    with pytest.raises(ValueError, match="pad_factor"):
        DipoleOperator(pad_factor=0.5).A(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="b0_dir"):
        DipoleOperator(b0_dir=(0, 0, 0))
    with pytest.raises(ValueError, match="kind"):
        DipoleOperator(kind="magic")


def test_A_dagger_is_tkd_and_inverts_A_outside_the_cone():
    import torch

    from qsmlab.physics import tilted_b0_dir
    from qsmlab.recon.inversion import tkd

    rng = np.random.default_rng(0)
    b, vs = tilted_b0_dir(25), (1.0, 1.1, 2.0)
    op = DipoleOperator(vs, b, pad_factor=2)
    f = rng.normal(size=(2, 1, 18, 20, 14))
    chi = op.A_dagger(torch.from_numpy(f)).numpy()
    for i in range(2):
        ref = tkd(f[i, 0], np.ones(f.shape[2:]), voxel_size=vs, b0_dir=b, pad_factor=2.0)
        np.testing.assert_allclose(chi[i, 0], ref, atol=1e-10)
    # where |D| >= threshold everywhere on the grid (threshold tiny), A_dagger(A(x)) = x up to the mean
    op1 = DipoleOperator(vs, b, pad_factor=1)
    x = rng.normal(size=(16, 16, 16))
    D = op1.kernel(x.shape)
    thr = 0.5 * np.abs(D[np.abs(D) > 0]).min()
    back = op1.A_dagger(torch.from_numpy(op1.A(x)), threshold=thr).numpy()
    np.testing.assert_allclose(back, x - x.mean(), atol=1e-8)
    with pytest.raises(ValueError, match="threshold"):
        op.A_dagger(torch.from_numpy(f), threshold=0.9)
