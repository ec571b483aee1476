"""Linear total-variation dipole inversion by ADMM (FANSI, Milovic et al., MRM 2018, weighted-linear form).

    min_chi  1/2 ||W (A chi - f)||_2^2 + alpha ||grad chi||_1

``A`` is the dipole operator (:class:`qsmlab.physics.DipoleOperator`), ``f`` the local field (ppm), ``W`` the
data weight (mask times magnitude normalised to max 1 in the mask, or the mask alone) and the TV is
anisotropic (l1 of each forward difference, ppm/mm). Splitting ``z = grad chi`` and ``u = A chi`` (scaled
ADMM, penalties ``mu_grad``, ``mu_field``) gives three cheap updates per iteration:

- chi: ``F^-1[(mu_field D F[u - s_u] + mu_grad F[grad^T(z - s_z)]) / (mu_field D^2 + mu_grad sum|E|^2)]``,
  closed form because D (dipole kernel) and E (difference symbols) are diagonal in k-space;
- z: soft threshold of ``grad chi + s_z`` at ``alpha / mu_grad``;
- u: voxel-wise prox of the data term at ``A chi + s_u`` (linear here; the nonlinear complex-exponential
  prox of :mod:`qsmlab.recon.inversion.nltv` plugs into the same loop).

The weighted form keeps the data term inside the mask only, so the unknown field outside it is not forced
to zero, and zero padding (``pad_factor``) comes for free: the solver runs on the padded FFT grid with
``W = 0`` in the padding. One iteration costs two rfftn + two irfftn (``FFT_PAIRS_PER_ITER = 2``).

Units: the solver works on field / RMS(field) (:func:`field_scale`), with ``alpha / RMS`` and the ADMM
penalties in those units, so multiplying the field by c multiplies chi by c iterate for iterate (a weight
that only suits one field scale was the defect of issue 9). ``alpha="auto"`` (default) chooses the weight
by the discrepancy principle (:mod:`qsmlab.recon.inversion.auto`), by continuation from strong to weak
regularisation with warm starts (:class:`AdmmState`).

This module also holds the input checks and data weight shared by the other iterative inversions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qsmlab.errors import QSMInputError
from qsmlab.physics import DipoleOperator, padded_shape
from qsmlab.recon.inversion.gradients import grad, grad_adjoint_t, grad_symbol_sq, grad_t
from qsmlab.recon.iterate import IterationMonitor
from qsmlab.recon.registry import register

FFT_PAIRS_PER_ITER = 2
#: Working precision of the iterative solvers. float32 halves the memory traffic of the voxel-wise
#: updates and makes np.sin ~20x faster (SIMD) than float64, so the loop stays FFT-bound; 1e-7 relative
#: precision is ample for ppm maps and 1e-3 tolerances. Objectives are summed in float64.
DTYPE = np.float32
last_info: dict = {}


class RealFFT:
    """``rfftn`` / ``irfftn`` on one grid with torch (MKL).

    Not scipy.fft: the solvers' voxel-wise work runs on torch's OpenMP threads, which spin for a while
    after each op and then take a core from scipy's FFT workers (+7 ms per 160^3 FFT pair measured on 2
    cores); torch's FFTs use those same threads. Results are fresh tensors: torch's ``out=`` variants
    compute into a temporary and copy (measured 25 % slower at 160^3).
    """

    def __init__(self, grid: Sequence[int]):
        self.n = int(grid[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfftn(x)

    def inverse(self, spec: torch.Tensor) -> torch.Tensor:
        """``irfftn`` as numpy and scipy compute it (c2c over the first two axes, then c2r along the
        last), in two calls: torch's own irfftn copies the spectrum first and is slower."""
        return torch.fft.irfft(torch.fft.ifftn(spec, dim=(0, 1)), n=self.n, dim=2)


def as_tensor(x: np.ndarray | torch.Tensor, dtype=None) -> torch.Tensor:
    """A torch view of a numpy array (shared memory; a C-contiguous copy when the dtype or layout needs it)."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(x, dtype=dtype))


def zeros(shape: Sequence[int], dtype=DTYPE) -> torch.Tensor:
    return torch.from_numpy(np.zeros(tuple(shape), dtype))


def complex_filter(h: np.ndarray) -> torch.Tensor:
    """A real half-spectrum filter as a complex torch tensor: torch multiplies a complex spectrum by a
    complex operand in place ~8x faster than by a real one (which it converts on every call)."""
    return torch.from_numpy(h.astype(np.complex64 if h.dtype == np.float32 else np.complex128))


@dataclass
class Problem:
    """A field, its weight and geometry on the zero-padded FFT grid (``DTYPE``)."""

    shape: tuple[int, int, int]   # input grid
    grid: tuple[int, int, int]    # padded FFT grid
    field: np.ndarray             # f on grid (ppm), 0 in the padding
    w2: np.ndarray                # W^2 on grid, 0 outside the mask
    mask: np.ndarray              # input-grid boolean mask
    D: np.ndarray                 # half-spectrum dipole kernel on grid
    voxel_size: tuple[float, float, float]
    scale: float = 1.0            # ppm: the solver works on field / scale (see :func:`field_scale`)
    b0_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)
    pad_factor: float = 1.0

    def __post_init__(self):
        self.Dc = complex_filter(self.D)
        self.fft = RealFFT(self.grid)

    def A(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Periodic dipole convolution on the padded grid (1 FFT pair); numpy in, numpy out."""
        spec = self.fft.forward(as_tensor(x, self.field.dtype))
        y = self.fft.inverse(spec.mul_(self.Dc))
        return y if isinstance(x, torch.Tensor) else y.numpy()

    def crop(self, x: np.ndarray) -> np.ndarray:
        """The input grid's part of a normalised solution, masked and back in ppm (times ``scale``)."""
        n = self.shape
        return np.ascontiguousarray(x[: n[0], : n[1], : n[2]]) * (self.mask * np.float32(self.scale))


def check_positive(name: str, value: float, method: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise QSMInputError(f"{method}: parameter {name} must be a positive number, got {value}")
    return value


def check_iterations(max_iter: int, tol: float, method: str) -> tuple[int, float]:
    if int(max_iter) < 1:
        raise QSMInputError(f"{method}: parameter max_iter must be >= 1, got {max_iter}")
    if not np.isfinite(float(tol)) or float(tol) < 0:
        raise QSMInputError(f"{method}: parameter tol must be >= 0, got {tol}")
    return int(max_iter), float(tol)


def data_weight(mask: np.ndarray, magnitude: np.ndarray | None, method: str) -> np.ndarray:
    """``W`` = mask * magnitude / max(magnitude in mask) (magnitude ~ 1/noise of the field), or the mask."""
    if magnitude is None:
        return mask.astype(np.float64)
    mag = np.asarray(magnitude, dtype=np.float64)
    if mag.shape != mask.shape:
        raise QSMInputError(f"{method}: magnitude shape {mag.shape} does not match the field {mask.shape}")
    if not np.all(np.isfinite(mag[mask])) or np.any(mag[mask] < 0):
        raise QSMInputError(f"{method}: magnitude must be finite and >= 0 inside the mask")
    top = mag[mask].max()
    if top <= 0:
        raise QSMInputError(f"{method}: magnitude is zero everywhere inside the mask")
    return np.where(mask, mag / top, 0.0)  # np.where: NaN outside the mask must not leak in


def field_scale(field: np.ndarray, mask: np.ndarray) -> float:
    """RMS of the field in the mask (ppm); 1 for an all-zero field.

    The iterative solvers work on ``field / scale`` and return ``chi * scale``. Every weight of an L1
    term is then ``alpha / scale`` inside the solver, and every other constant (ADMM penalties,
    thresholds, tolerances, the search grid of ``alpha="auto"``) is relative to the field: multiplying
    the field by c multiplies chi and the chosen ``alpha`` by c and changes nothing else, iterate for
    iterate. Any positively homogeneous statistic would do; the RMS is the simplest.
    """
    v = np.asarray(field, dtype=np.float64)[mask]
    s = float(np.sqrt(np.mean(v * v))) if v.size else 0.0
    return s if s > 0 and np.isfinite(s) else 1.0


def prepare(field, mask, magnitude, voxel_size, b0_dir, pad_factor: float, method: str) -> Problem:
    """Validate inputs (one-line :class:`QSMInputError`) and lay them out, divided by
    :func:`field_scale`, on the padded FFT grid."""
    f = np.asarray(field, dtype=np.float64)
    if f.ndim != 3:
        raise QSMInputError(f"{method}: field must be a 3-D volume (X, Y, Z), got shape {f.shape}")
    m = np.asarray(mask)
    if m.shape != f.shape:
        raise QSMInputError(f"{method}: mask shape {m.shape} does not match the field {f.shape}")
    m = m > 0
    if not m.any():
        raise QSMInputError(f"{method}: mask is empty")
    if not np.all(np.isfinite(f[m])):
        raise QSMInputError(f"{method}: field has NaN or inf inside the mask")
    if float(pad_factor) < 1:
        raise QSMInputError(f"{method}: pad_factor must be >= 1 (1 = periodic), got {pad_factor}")
    try:
        op = DipoleOperator(voxel_size, b0_dir, pad_factor=1.0)
    except ValueError as e:
        raise QSMInputError(f"{method}: {e}") from None
    vs = tuple(float(v) for v in op.voxel_size[0])
    w = data_weight(m, magnitude, method)
    grid = padded_shape(f.shape, float(pad_factor))
    fp = np.zeros(grid, DTYPE)
    w2 = np.zeros(grid, DTYPE)
    n = f.shape
    scale = field_scale(f, m)
    fp[: n[0], : n[1], : n[2]] = np.where(m, f / scale, 0.0)
    w2[: n[0], : n[1], : n[2]] = w * w
    # The kernel of the padded grid itself: the solver's circular convolution lives on that grid.
    D = op.kernel(grid, dtype=DTYPE)
    return Problem(tuple(n), grid, fp, w2, m, D, vs, scale, tuple(float(b) for b in op.b0_dir[0]),
                   float(pad_factor))


class TikhonovMisfit:
    """``m_T`` of :data:`qsmlab.recon.inversion.auto.MODEL_ERROR_FACTOR`: calling it solves closed-form Tikhonov
    at its GCV weight on the same field and returns its misfit (solver units, measured by the method's own
    ``misfit``) over the voxels whose Tikhonov residual is not a gross error (:func:`.auto.inlier_weights`).

    When the target came from it (:func:`.auto.noise_target` sets :attr:`used`), :attr:`problem` is ``p``
    with those gross-error voxels weighted 0: the discrepancy search measures every candidate's misfit on
    it, so target and misfit count the same voxels and no weight chases a residual no dipole field explains
    (a phase-unwrapping cycle slip at the mask edge). Otherwise (the noise rules, or ``MODEL_ERROR_FACTOR``
    0: never called) it is ``p`` itself, as before the model-error target existed.
    """

    def __init__(self, p: Problem, misfit: Callable[[Problem, np.ndarray], float]):
        self.p, self.misfit, self._inliers = p, misfit, p
        self.outliers, self.used = 0, False

    @property
    def problem(self) -> Problem:
        return self._inliers if self.used else self.p

    def __call__(self) -> float:
        from dataclasses import replace

        from qsmlab.recon.inversion import auto

        p, n = self.p, self.p.shape
        f = np.asarray(p.field[: n[0], : n[1], : n[2]], np.float64)
        chi, _ = auto.tikhonov_gcv(f, p.mask, p.voxel_size, p.b0_dir, p.pad_factor)
        x = np.zeros(p.grid, DTYPE)
        x[: n[0], : n[1], : n[2]] = chi  # linear in the field: already in solver units
        w2 = auto.inlier_weights(p.A(x) - p.field, p.w2)
        self.outliers = int(np.count_nonzero(p.w2) - np.count_nonzero(w2))
        self._inliers = replace(p, w2=w2) if self.outliers else p
        return self.misfit(self._inliers, x)


def tikhonov_misfit(p: Problem, misfit: Callable[[Problem, np.ndarray], float]) -> TikhonovMisfit:
    """:class:`TikhonovMisfit` of ``p`` with the method's ``misfit``."""
    return TikhonovMisfit(p, misfit)


# A data prox in dual form: ``dual(s_u, v)`` writes ``s_u = v - prox(v)`` (torch tensors, in place), where
# ``prox(v) = argmin_u data(u) + mu/2 ||u - v||^2`` voxel-wise. The loop needs only the new scaled dual and
# ``u - s_u = v - 2 s_u``, so u itself is never stored (two voxel-wise passes fewer per iteration).
DataProx = Callable[[torch.Tensor, torch.Tensor], None]


def linear_prox(p: Problem, mu: float) -> DataProx:
    """Prox of ``1/2 W^2 (u - f)^2``: ``u = (W^2 f + mu v) / (W^2 + mu)``, i.e. ``v - u = k (v - f)``
    with ``k = W^2 / (W^2 + mu)``."""
    k = p.w2 / (p.w2 + mu)
    kt, neg_kf = torch.from_numpy(k), torch.from_numpy(-k * p.field)

    def dual(s_u: torch.Tensor, v: torch.Tensor) -> None:
        torch.addcmul(neg_kf, v, kt, out=s_u)

    return dual


class Monitor(IterationMonitor):
    """:class:`IterationMonitor` whose relative-update test runs in torch into a scratch buffer ``work``:
    numpy's version allocates the difference and makes three single-threaded passes per iteration. The
    quantity, and so the stopping rule, is the same."""

    def converged(self, x_new, x_old, work: torch.Tensor | None = None) -> bool:
        if work is None:
            return super().converged(x_new, x_old)
        d = torch.sub(as_tensor(x_new), as_tensor(x_old), out=work).view(-1)
        o = as_tensor(x_old).view(-1)
        num = float(torch.dot(d, d)) ** 0.5
        den = max(float(torch.dot(o, o)) ** 0.5, 1e-12)
        self.last_update = num / den
        self._bar.set_postfix(update=f"{self.last_update:.2e}", refresh=False)
        return self.last_update < self.tol


@dataclass
class AdmmState:
    """Everything the ADMM loop carries between iterations (torch tensors on the padded grid), so a solve
    can resume from another weight's solution (warm start along the ``alpha="auto"`` search path).

    ``a = u - s_u``, ``s_u`` the scaled dual of ``u = A chi``; ``q = z - s_z``, ``s_z`` the scaled dual of
    ``z = grad chi`` at penalty ``mu_grad``.
    """

    chi: torch.Tensor
    a: torch.Tensor
    s_u: torch.Tensor
    q: torch.Tensor
    s_z: torch.Tensor
    mu_grad: float

    def clone(self) -> AdmmState:
        return AdmmState(*(t.clone() for t in (self.chi, self.a, self.s_u, self.q, self.s_z)), self.mu_grad)

    def set_mu_grad(self, mu_grad: float) -> None:
        """Keep the unscaled dual ``y = mu s_z`` (and ``z``) when the penalty changes."""
        r = self.mu_grad / mu_grad
        if r != 1.0:
            self.q.add_(self.s_z, alpha=1.0 - r)   # z - r s_z
            self.s_z.mul_(r)
            self.mu_grad = mu_grad


def admm_tv(p: Problem, dual: DataProx, u0: np.ndarray, *, alpha: float, mu_grad: float, mu_field: float,
            max_iter: int, tol: float, desc: str, quiet: bool, state: AdmmState | None = None
            ) -> tuple[np.ndarray, IterationMonitor, AdmmState]:
    """The FANSI ADMM loop on the padded grid; returns (chi on the padded grid, monitor, final state).

    ``alpha`` and the penalties are in the problem's normalised units (``p.field`` is field / scale).
    ``state`` (optional) starts from a previous solve's variables (it is updated in place and returned);
    otherwise chi = 0, z = 0, u = ``u0``, zero duals.

    The voxel-wise work runs in place on torch tensors (multi-threaded; see :class:`RealFFT`). Only
    ``z - s_z``, ``s_z``, ``u - s_u`` and ``s_u`` are kept: with ``g = grad chi + s_z`` the soft threshold
    gives ``s_z' = clip(g, -t, t)`` and ``z' = g - s_z'``, so ``z' - s_z' = g - 2 s_z'``; likewise
    ``u' - s_u' = v - 2 s_u'`` with ``v = A chi + s_u`` (the prox returns ``s_u' = v - u'``).
    """
    grid, vs, fft = p.grid, p.voxel_size, p.fft
    d64 = p.D.astype(np.float64)
    denom = mu_field * d64 * d64 + mu_grad * grad_symbol_sq(grid, vs)
    denom[0, 0, 0] = 1.0  # both numerator terms vanish at k = 0: the mean of chi is fixed to 0
    c_field = complex_filter((mu_field * d64 / denom).astype(DTYPE))
    c_grad = complex_filter((mu_grad / denom).astype(DTYPE))
    t = alpha / mu_grad

    vol, vec = grid, (3,) + grid
    if state is None:
        state = AdmmState(zeros(vol), torch.from_numpy(u0.astype(DTYPE, copy=True)), zeros(vol), zeros(vec),
                          zeros(vec), mu_grad)
    else:
        state.set_mu_grad(mu_grad)
    a, s_u, q, s_z, chi = state.a, state.s_u, state.q, state.s_z, state.chi
    b, work = zeros(vol), zeros(vol)
    mon = Monitor(max_iter, tol, desc, quiet)
    for _ in mon:
        spec = fft.forward(a)
        gspec = fft.forward(grad_adjoint_t(q, vs, out=b))
        spec.mul_(c_field).addcmul_(gspec, c_grad)
        torch.mul(spec, p.Dc, out=gspec)
        chi_old, chi = chi, fft.inverse(spec)
        achi = fft.inverse(gspec)
        # z-update (soft threshold at t) in dual form, see the docstring.
        g = grad_t(chi, vs, out=q, add=s_z)
        torch.clamp(g, -t, t, out=s_z)
        g.sub_(s_z, alpha=2.0)
        # u-update at v = A chi + s_u.
        v = achi.add_(s_u)
        dual(s_u, v)
        torch.sub(v, s_u, alpha=2.0, out=a)
        if mon.converged(chi, chi_old, work):
            break
    state.chi = chi
    return chi.numpy(), mon, state


def tv_objective(p: Problem, chi: np.ndarray, alpha: float) -> float:
    """``1/2 ||W (A chi - f)||^2 + alpha ||grad chi||_1`` on the padded grid (normalised units)."""
    r = p.A(chi) - p.field
    return float(0.5 * np.sum(p.w2 * r * r, dtype=np.float64)
                 + alpha * np.abs(grad(chi, p.voxel_size)).sum(dtype=np.float64))


def rms_misfit(p: Problem, chi: np.ndarray) -> float:
    """In-mask RMS of ``W (A chi - f)`` over the RMS of ``W`` (the data's units: field / scale): what the
    discrepancy principle compares with the noise sd."""
    r = p.A(chi) - p.field
    return float(np.sqrt(np.sum(p.w2 * r * r, dtype=np.float64) / max(np.sum(p.w2, dtype=np.float64), 1e-30)))


def record(mon: IterationMonitor, objective: float, store: dict, fft_pairs: int) -> None:
    store.clear()
    store.update(n_iter=mon.n_iter, converged=mon.last_update < mon.tol, last_update=mon.last_update,
                 objective=objective, fft_pairs=fft_pairs)


#: ``alpha="auto"``: candidate TV weights relative to the field's RMS, strong to weak (0.35 decade apart;
#: the walk usually stops near 0.03). ADMM iterations per candidate, warm-started from the previous one
#: (at 15 the misfit is within 2 % of a converged solve's on in-vivo-like fields).
TV_AUTO_GRID = tuple(float(v) for v in np.logspace(-0.5, -4.0, 11))
AUTO_ITERATIONS = 15


def admm_auto(p: Problem, prox: Callable[[float], DataProx], method: str, *, noise_std: float | None,
              mu_grad: float | None, mu_field: float, max_iter: int, tol: float, desc: str, quiet: bool,
              misfit: Callable[[Problem, np.ndarray], float]):
    """``alpha="auto"`` for the ADMM TV solvers: the discrepancy principle (:mod:`.auto`) by continuation,
    then the solve at the chosen weight, warm-started from the last candidate.

    Returns (chi on the padded grid, monitor of the final solve, chosen normalised alpha,
    :class:`.auto.AutoResult` with the whole time and iteration count of search + solve)."""
    from qsmlab.recon.inversion import auto

    t0 = time.perf_counter()
    n = p.shape
    me = tikhonov_misfit(p, misfit)
    sigma_ppm, source, sigma = auto.noise_target(p.field[: n[0], : n[1], : n[2]] * p.scale, p.mask, noise_std,
                                                 p.scale, me)
    pm = me.problem  # p, or p without the gross-error voxels (measured with the model-error target)
    state = None
    dual = prox(mu_field)

    def solve(a: float) -> tuple[float, int]:
        nonlocal state
        chi, mon, state = admm_tv(p, dual, p.field, alpha=a, mu_grad=a if mu_grad is None else mu_grad,
                                  mu_field=mu_field, max_iter=AUTO_ITERATIONS, tol=0.0, desc=desc,
                                  quiet=True, state=state)
        return misfit(pm, chi), mon.n_iter

    res = auto.discrepancy_search(method, "alpha", TV_AUTO_GRID, solve, sigma=sigma, sigma_ppm=sigma_ppm,
                                  noise_source=source, scale=p.scale, units=lambda a: a * p.scale)
    a = res.solver_value
    chi, mon, state = admm_tv(p, dual, p.field, alpha=a, mu_grad=a if mu_grad is None else mu_grad,
                              mu_field=mu_field, max_iter=max_iter, tol=tol, desc=desc, quiet=quiet, state=state)
    res.iterations += mon.n_iter
    res.seconds = time.perf_counter() - t0
    return chi, mon, a, auto.record(res)


@register("inversion", "tv")
def tv_admm(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    magnitude: np.ndarray | None = None,
    pad_factor: float = 1.0,
    alpha: float | str = "auto",
    noise_std: float | None = None,
    mu_grad: float | None = None,
    mu_field: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-3,
    quiet: bool = False,
) -> np.ndarray:
    """Linear TV inversion by ADMM (FANSI weighted-linear, Milovic et al., MRM 2018).

    Args:
        field: local field (ppm), (X, Y, Z).
        mask: brain mask, same shape (nonzero = inside).
        voxel_size: mm along (i, j, k).
        b0_dir: unit B0 direction in voxel axes.
        magnitude: optional magnitude; ``W = mask * magnitude / max`` weights the data term.
        pad_factor: zero padding of the FFT grid per axis (1 = periodic, default).
        alpha: TV weight (ppm: it scales with the field) or ``"auto"`` (default): the discrepancy
            principle (:mod:`qsmlab.recon.inversion.auto`), searched by continuation.
        noise_std: noise sd of the field (ppm) for ``alpha="auto"``; default: estimated from the field's
            high-pass content (:func:`qsmlab.recon.inversion.auto.estimate_noise_std`).
        mu_grad: ADMM penalty of ``z = grad chi`` in the solver's units (field / RMS); default: the
            normalised alpha (``alpha / RMS``): of 0.3-100 x alpha it converged fastest on in-vivo-like
            fields (FANSI's 100 alpha assumes other field units).
        mu_field: ADMM penalty of ``u = A chi`` (default 1; the data weight is <= 1).
        max_iter: maximum ADMM iterations (default 100).
        tol: stop when ``||chi_k - chi_{k-1}|| / ||chi_{k-1}|| < tol`` (default 1e-3).
        quiet: hide the progress bar.
    Returns:
        chi (ppm), (X, Y, Z) float32, zero outside the mask. ``last_info`` holds ``alpha`` (ppm), ``scale``
        (the field's RMS, ppm), ``n_iter``, ``converged``, ``last_update``, ``objective`` (ppm^2, on the
        padded grid) and ``fft_pairs`` of the final solve, and with ``"auto"`` the search
        (``auto``: :meth:`qsmlab.recon.inversion.auto.AutoResult.as_dict`).
    """
    name = "tv"
    alpha = _check_alpha(alpha, name)
    noise_std = _check_noise(noise_std, name)
    if mu_grad is not None:
        check_positive("mu_grad", mu_grad, name)
    check_positive("mu_field", mu_field, name)
    max_iter, tol = check_iterations(max_iter, tol, name)
    p = prepare(field, mask, magnitude, voxel_size, b0_dir, pad_factor, name)
    chi, mon, a, extra = solve_tv_family(p, lambda mu: linear_prox(p, mu), name, alpha, noise_std=noise_std,
                                         mu_grad=mu_grad, mu_field=mu_field, max_iter=max_iter, tol=tol,
                                         desc="TV-ADMM", quiet=quiet, misfit=rms_misfit)
    record(mon, p.scale**2 * tv_objective(p, chi, a), last_info, FFT_PAIRS_PER_ITER * mon.n_iter)
    last_info.update(alpha=a * p.scale, scale=p.scale, **extra)
    return p.crop(chi)


def _check_alpha(alpha, method: str) -> float | str:
    from qsmlab.recon.inversion.auto import check_weight

    return check_weight(alpha, "alpha", method)


def _check_noise(noise_std, method: str) -> float | None:
    from qsmlab.recon.inversion.auto import check_noise_std

    return check_noise_std(noise_std, method)


def solve_tv_family(p: Problem, prox: Callable[[float], DataProx], method: str, alpha: float | str, *,
                    noise_std: float | None, mu_grad: float | None, mu_field: float, max_iter: int, tol: float,
                    desc: str, quiet: bool, misfit: Callable[[Problem, np.ndarray], float]):
    """One ADMM TV solve at ``alpha`` (ppm) or the ``"auto"`` search; returns (chi on the padded grid,
    monitor, normalised alpha, extra ``last_info`` entries)."""
    from qsmlab.recon.inversion import auto

    if alpha == auto.AUTO:
        chi, mon, a, res = admm_auto(p, prox, method, noise_std=noise_std, mu_grad=mu_grad, mu_field=mu_field,
                                     max_iter=max_iter, tol=tol, desc=desc, quiet=quiet, misfit=misfit)
        return chi, mon, a, {"auto": res.as_dict()}
    a = float(alpha) / p.scale
    chi, mon, _ = admm_tv(p, prox(mu_field), p.field, alpha=a, mu_grad=a if mu_grad is None else mu_grad,
                          mu_field=mu_field, max_iter=max_iter, tol=tol, desc=desc, quiet=quiet)
    return chi, mon, a, {}
