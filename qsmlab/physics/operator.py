"""The dipole forward operator ``A``: chi (ppm) -> field (ppm), numpy and torch, with zero padding.

    A x = crop( irfftn( D_padded * rfftn( pad(x) ) ) )

``pad`` zero-pads each axis to ``next_fast_len(ceil(pad_factor * n))`` (at the end; the FFT does it
for free through its ``s=`` argument) and ``crop`` keeps the first n samples. ``pad_factor=1`` is the
periodic (circular) operator; the default 2 makes the FOV's field the linear convolution of chi with the
dipole, up to images of the sources at least one FOV away (the field decays as 1/r^3).

``A`` is self-adjoint: D is real and even (D(k) = D(-k)), so the padded circular convolution is
symmetric, and the adjoint of the zero-pad is the crop. ``A_adjoint`` is therefore ``A`` itself; this
is asserted by the adjointness test (``<Ax, y> == <x, A* y>`` to 1e-10 in float64), as in deepinv.

Shapes: numpy ``(..., X, Y, Z)``; torch ``(..., X, Y, Z)``, typically ``[B, 1, X, Y, Z]``. dtype is
preserved (float32 stays float32: a float32 kernel multiplies the complex64 spectrum). Torch inputs keep
autograd and their device. ``b0_dir`` may be one 3-vector or, for a batch, a ``[B, 3]`` array with one
direction per sample (as when the batch mixes head orientations); ``voxel_size`` likewise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.fft

from qsmlab.physics.kernel import KERNEL_KINDS, dipole_kernel

try:  # torch is a hard dependency of the package, but the numpy path must not need it
    import torch
except ImportError:  # pragma: no cover
    torch = None


def padded_shape(shape: Sequence[int], pad_factor: float) -> tuple[int, int, int]:
    """Per-axis FFT size: ``next_fast_len(ceil(pad_factor * n))`` (``n`` itself when pad_factor == 1)."""
    if pad_factor < 1:
        raise ValueError(f"pad_factor must be >= 1 (1 = periodic), got {pad_factor}")
    if pad_factor == 1:
        return tuple(int(n) for n in shape)
    return tuple(scipy.fft.next_fast_len(int(math.ceil(pad_factor * int(n))), real=True) for n in shape)


_TORCH_KERNELS: dict = {}
_TORCH_INVERSES: dict = {}  # thresholded inverses of cached kernels (A_dagger), same bound and keys + threshold


def _torch_kernel(shape, voxel_size, b0_dir, kind, dtype, device):
    vs = tuple(float(v) for v in voxel_size)
    b = tuple(float(v) for v in b0_dir)
    key = (tuple(shape), vs, b, kind, dtype, str(device))
    k = _TORCH_KERNELS.get(key)
    if k is None:
        np_dtype = np.float32 if dtype in (torch.float32, torch.float16, torch.bfloat16) else np.float64
        k = torch.from_numpy(np.array(dipole_kernel(shape, vs, b, kind, rfft=True, dtype=np_dtype))).to(device)
        if len(_TORCH_KERNELS) > 64:  # small LRU-ish bound: drop the oldest entry
            _TORCH_KERNELS.pop(next(iter(_TORCH_KERNELS)))
        _TORCH_KERNELS[key] = k
    return k


def _as_rows(v, name: str) -> np.ndarray:
    """(3,) or (B, 3) geometry as a float64 (R, 3) array of rows."""
    if torch is not None and isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name} must be a 3-vector or a [B, 3] array, got shape {a.shape}")
    return a


class DipoleOperator:
    """Dipole convolution with a geometry: ``A(x)`` = field (ppm) of chi ``x`` (ppm).

    Args:
        voxel_size: mm along (i, j, k); one 3-vector or ``[B, 3]``.
        b0_dir: B0 direction in voxel axes; one 3-vector or ``[B, 3]`` (normalised per row).
        pad_factor: zero-padding factor per axis (1 = periodic; default 2).
        kind: ``"continuous"`` (default) or ``"discrete"`` kernel (see :mod:`qsmlab.physics.kernel`).

    The operator takes its grid from the input, so one instance serves any patch or volume size; the
    kernel for each grid is built once and cached.
    """

    def __init__(
        self,
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
        pad_factor: float = 2.0,
        kind: str = "continuous",
    ):
        if kind not in KERNEL_KINDS:
            raise ValueError(f"kernel kind must be one of {KERNEL_KINDS}, got {kind!r}")
        self.voxel_size = _as_rows(voxel_size, "voxel_size")
        b = _as_rows(b0_dir, "b0_dir")
        norms = np.linalg.norm(b, axis=1, keepdims=True)
        if np.any(~np.isfinite(b)) or np.any(norms < 1e-12):
            raise ValueError(f"b0_dir must be non-zero finite 3-vectors, got {b.tolist()}")
        self.b0_dir = b / norms
        if len(self.b0_dir) > 1 and len(self.voxel_size) > 1 and len(self.b0_dir) != len(self.voxel_size):
            raise ValueError("b0_dir and voxel_size give different batch sizes")
        self.pad_factor = float(pad_factor)
        self.kind = kind

    # -- geometry -----------------------------------------------------------------------------------
    @property
    def n_geometries(self) -> int:
        return max(len(self.b0_dir), len(self.voxel_size))

    def _geometry(self, i: int):
        return (
            self.voxel_size[min(i, len(self.voxel_size) - 1)],
            self.b0_dir[min(i, len(self.b0_dir) - 1)],
        )

    def fft_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        return padded_shape(tuple(shape)[-3:], self.pad_factor)

    def kernel(self, shape: Sequence[int], index: int = 0, dtype=np.float64) -> np.ndarray:
        """Half-spectrum kernel on the padded grid of a volume of ``shape`` (geometry ``index``)."""
        vs, b = self._geometry(index)
        return dipole_kernel(self.fft_shape(shape), vs, b, self.kind, rfft=True, dtype=dtype)

    # -- operator -----------------------------------------------------------------------------------
    def A(self, x):
        """Field (ppm) of chi ``x`` (ppm); numpy or torch, shape ``(..., X, Y, Z)``."""
        if torch is not None and isinstance(x, torch.Tensor):
            return self._apply_torch(x)
        return self._apply_numpy(np.asarray(x))

    def A_adjoint(self, y):
        """Adjoint of :meth:`A`; the operator is self-adjoint (D real and even, pad* = crop)."""
        return self.A(y)

    __call__ = A

    def A_dagger(self, y: torch.Tensor, threshold: float = 0.19) -> torch.Tensor:
        """Thresholded pseudo-inverse of :meth:`A` (TKD, Shmueli et al. 2009): chi (ppm) from a field (ppm).

        ``1/D`` where ``|D| >= threshold``, ``sign(D)/threshold`` below it, 0 at DC (the field does not
        determine chi's mean), on this operator's padded grid; torch, ``(..., X, Y, Z)``, differentiable.
        The learned methods use it as a physics prior (an input channel and a residual the network
        corrects). :func:`qsmlab.recon.inversion.tkd` is the classical method (numpy, masked, options).
        """
        if not (0.0 < float(threshold) < 2.0 / 3.0):
            raise ValueError(f"threshold={threshold}: expected 0 < threshold < 2/3 (|D| is at most 2/3)")
        if not isinstance(y, torch.Tensor) or y.ndim < 3:
            raise ValueError("A_dagger expects a torch tensor (..., X, Y, Z)")
        n = tuple(y.shape[-3:])
        s = self.fft_shape(n)
        g = self._check_batch(y.shape)
        compute = y if y.dtype in (torch.float32, torch.float64) else y.float()
        spec = torch.fft.rfftn(compute, s=s, dim=(-3, -2, -1))

        def inverse(i):
            vs, b = self._geometry(i)
            key = (tuple(s), tuple(float(v) for v in vs), tuple(float(v) for v in b), self.kind, float(threshold),
                   compute.dtype, str(compute.device))
            inv = _TORCH_INVERSES.get(key)
            if inv is None:  # built once per grid, geometry and threshold, like the kernel itself
                D = _torch_kernel(s, vs, b, self.kind, compute.dtype, compute.device)
                small = D.abs() < threshold
                inv = torch.where(small, torch.sign(D) / threshold, 1.0 / torch.where(small, torch.ones_like(D), D))
                inv.reshape(-1)[0] = 0.0
                if len(_TORCH_INVERSES) > 16:
                    _TORCH_INVERSES.pop(next(iter(_TORCH_INVERSES)))
                _TORCH_INVERSES[key] = inv
            return inv

        if g == 1:
            spec = spec * inverse(0)
        else:
            k = torch.stack([inverse(i) for i in range(g)])
            spec = spec * k.reshape((g,) + (1,) * (y.ndim - 4) + tuple(k.shape[1:]))
        out = torch.fft.irfftn(spec, s=s, dim=(-3, -2, -1))[..., : n[0], : n[1], : n[2]]
        return out.to(y.dtype)

    def _check_batch(self, x_shape) -> int:
        g = self.n_geometries
        if g == 1:
            return 1
        if len(x_shape) < 4 or x_shape[0] != g:
            raise ValueError(f"operator holds {g} geometries but the input has shape {tuple(x_shape)}; "
                             "expected [B, ..., X, Y, Z] with B equal to the number of geometries")
        return g

    def _apply_numpy(self, x: np.ndarray) -> np.ndarray:
        if x.ndim < 3:
            raise ValueError(f"expected an array (..., X, Y, Z), got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        n = x.shape[-3:]
        s = self.fft_shape(n)
        axes = (-3, -2, -1)
        g = self._check_batch(x.shape)
        spec = scipy.fft.rfftn(x, s=s, axes=axes, workers=-1)
        if g == 1:
            spec *= self.kernel(n, 0, x.dtype)
        else:
            for i in range(g):
                spec[i] *= self.kernel(n, i, x.dtype)
        out = scipy.fft.irfftn(spec, s=s, axes=axes, workers=-1)
        return np.ascontiguousarray(out[..., : n[0], : n[1], : n[2]])

    def _apply_torch(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            raise ValueError(f"expected a tensor (..., X, Y, Z), got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            x = x.to(torch.get_default_dtype())
        n = tuple(x.shape[-3:])
        s = self.fft_shape(n)
        dims = (-3, -2, -1)
        g = self._check_batch(x.shape)
        compute = x if x.dtype in (torch.float32, torch.float64) else x.float()  # no half-precision FFTs
        spec = torch.fft.rfftn(compute, s=s, dim=dims)
        # In place: rfftn's backward does not need its output, so autograd allows it, and a padded
        # spectrum is large enough that a second allocation shows in the timings.
        if g == 1:
            vs, b = self._geometry(0)
            spec.mul_(_torch_kernel(s, vs, b, self.kind, compute.dtype, compute.device))
        else:
            k = torch.stack([_torch_kernel(s, *self._geometry(i), self.kind, compute.dtype, compute.device)
                             for i in range(g)])
            spec.mul_(k.reshape((g,) + (1,) * (x.ndim - 4) + tuple(k.shape[1:])))
        out = torch.fft.irfftn(spec, s=s, dim=dims)[..., : n[0], : n[1], : n[2]]
        return out.to(x.dtype)


def dipole_field(chi, voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), pad_factor: float = 2.0,
                 kind: str = "continuous"):
    """Convenience: ``DipoleOperator(voxel_size, b0_dir, pad_factor, kind).A(chi)``."""
    return DipoleOperator(voxel_size, b0_dir, pad_factor, kind).A(chi)
