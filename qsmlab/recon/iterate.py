"""Progress and convergence for iterative solvers: a tqdm bar (quiet on request) and a tolerance test."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm


class IterationMonitor:
    """Wraps an iterative loop: ``for it in mon: ...; if mon.converged(x_new, x_old): break``.

    Convergence is the relative update ``||x_new - x_old|| / max(||x_old||, eps) < tol``. The bar shows
    that quantity; ``quiet=True`` silences it. ``n_iter`` is the number of iterations run.
    """

    def __init__(self, max_iter: int, tol: float, desc: str, quiet: bool = False):
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.max_iter, self.tol, self.n_iter = int(max_iter), float(tol), 0
        self.last_update = float("inf")
        self._bar = tqdm(total=self.max_iter, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)

    def __iter__(self):
        try:
            for it in range(self.max_iter):
                self.n_iter = it + 1
                yield it
                self._bar.update(1)
        finally:
            self._bar.close()

    def converged(self, x_new, x_old) -> bool:
        # einsum, not np.linalg.norm: the latter goes through multi-threaded BLAS, whose thread start-up
        # costs milliseconds per call on a loaded machine (measured 8-14 ms at 64^3 vs 0.07 ms here).
        d = np.ravel(x_new - x_old)
        o = np.ravel(x_old)
        num = float(np.sqrt(np.einsum("i,i->", d, d)))
        den = max(float(np.sqrt(np.einsum("i,i->", o, o))), 1e-12)
        self.last_update = num / den
        self._bar.set_postfix(update=f"{self.last_update:.2e}", refresh=False)
        return self.last_update < self.tol
