"""Quality-guided region-growing phase unwrapping, in the spirit of ROMEO (Dymerska et al., MRM 85:2294, 2021).

Every pair of 6-neighbours inside the mask is an edge with a quality in [0, 1] (ROMEO's weights, reduced
to those available for one echo):

- phase coherence ``1 − |wrap(φ_a − φ_b)| / π`` (a large wrapped step is likely a wrap or noise);
- magnitude coherence ``(min(m_a, m_b) / max(m_a, m_b))²`` (edges across a magnitude edge are unsafe);
- magnitude weight ``min(1, min(m_a, m_b) / m_90)`` with m_90 the 90th percentile of the magnitude in
  the mask (low signal = noisy phase).

ROMEO grows the unwrapped region from a seed, always crossing the best edge that leaves it (a priority
queue), and unwraps the new voxel relative to its unwrapped neighbour: ``φ_b ← φ_a + wrap(φ_b − φ_a)``.
That growth order is Prim's algorithm, so the edges it crosses form the maximum-quality spanning tree.
We compute that same tree with ``scipy.sparse.csgraph.minimum_spanning_tree`` on cost ``1 − quality``
(compiled Kruskal: Prim's and Kruskal's trees coincide), orient it from the seeds with a breadth-first
search and sum the integer wrap counts along the tree by pointer jumping (``O(log depth)`` numpy passes).
The result is identical to the heap-driven growth and takes well under a second at 64³.

Each connected component of the mask is grown from its own seed, its best-quality voxel (a virtual root
joined to every voxel by an edge costlier than any real edge makes the spanning forest a single tree);
components are not aligned with each other. The output is ``phase + 2π·n`` (congruent to the input).

Temporal unwrapping (:func:`unwrap_echoes`), for multi-echo data, also lives here: one reference is
unwrapped spatially and the other echoes are predicted from it.
With phase ``φ_n = φ_0 + ω·TE_n`` (φ_0 the receiver/transmit phase offset at TE = 0, ω in rad/s):

- ``reference="difference"`` (default; offset-free, as in MEDI's and ROMEO's multi-echo modes): the
  echo difference ``Δ = wrap(φ_2 − φ_1) = ω·(TE_2 − TE_1)`` is unwrapped spatially, giving ω; the offset
  is ``φ_0 = wrap(φ_1 − ω·TE_1)`` and each echo is predicted as ``p_n = φ_0 + ω·TE_n``.
- ``reference="first"``: echo 1 is unwrapped spatially and the others are predicted as
  ``p_n = φ_1·TE_n/TE_1`` (valid when the phase offset has been removed).

Echo n is then ``φ_n + 2π·round((p_n − φ_n)/2π)``: exact whenever the prediction is within π, which the
difference reference keeps true for errors scaled by TE_n/ΔTE. All echoes share the reference's wrap
pattern, so a residual 2π jump of φ_0 is common to every echo and lands in the echo fit's intercept,
never in the field (the slope).

The spatial reference is only known up to a global 2π·n, i.e. the field up to a global
``n / (γ̄·B0·ΔTE)``; we fix n so that the (magnitude-weighted) mean of the reference over the mask lies in
(−π, π], a convention independent of the unwrapper's seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree

from qsmlab.errors import QSMInputError
from qsmlab.recon.registry import register

_TWO_PI = 2.0 * np.pi


def _wrap(x: np.ndarray) -> np.ndarray:
    return np.angle(np.exp(1j * x))


def edge_quality(phase_a, phase_b, mag_a=None, mag_b=None, mag_ref: float | None = None) -> np.ndarray:
    """ROMEO-style quality in [0, 1] of edges between voxels a and b (1-D arrays, rad and a.u.)."""
    q = 1.0 - np.abs(_wrap(phase_a - phase_b)) / np.pi
    if mag_a is not None:
        lo, hi = np.minimum(mag_a, mag_b), np.maximum(mag_a, mag_b)
        with np.errstate(divide="ignore", invalid="ignore"):
            coh = np.where(hi > 0, lo / hi, 0.0) ** 2
        q = q * coh
        if mag_ref is not None and mag_ref > 0:
            q = q * np.clip(lo / mag_ref, 0.0, 1.0)
    return q


def _tree_sum(parent: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Sum of ``step`` from every node up to its root (``parent[root] == root``, ``step[root] == 0``)."""
    acc, par = step.copy(), parent.copy()
    while True:
        grand = par[par]
        if np.array_equal(grand, par):
            return acc
        acc = acc + acc[par]
        par = grand


@register("unwrap", "region")
def unwrap_region(
    phase: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    magnitude: np.ndarray | None = None,
) -> np.ndarray:
    """Quality-guided (ROMEO-style) spatial unwrapping of one 3-D wrapped phase.

    Args:
        phase: wrapped phase (rad), (X, Y, Z).
        mask: boolean (X, Y, Z) region to unwrap (default: everything); zero outside in the output.
        voxel_size: mm along (i, j, k); unused (the qualities are per edge, not per mm), kept for the
            registry's unwrap signature.
        magnitude: optional (X, Y, Z) magnitude (a.u.) for the magnitude coherence and weight.
    Returns:
        Unwrapped phase (rad), (X, Y, Z), float64: ``phase + 2π·n`` with integer n, n = 0 at each mask
        component's seed voxel.
    """
    phase = np.asarray(phase, dtype=np.float64)
    if phase.ndim != 3:
        raise QSMInputError(f"region unwrap: expected a 3-D phase (X, Y, Z), got shape {phase.shape}")
    mask = np.ones(phase.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != phase.shape:
        raise QSMInputError(f"region unwrap: mask shape {mask.shape} differs from phase shape {phase.shape}")
    if not mask.any():
        raise QSMInputError("region unwrap: the mask is empty")
    mag = None
    if magnitude is not None:
        mag = np.abs(np.asarray(magnitude, dtype=np.float64))
        if mag.shape != phase.shape:
            raise QSMInputError(f"region unwrap: magnitude shape {mag.shape} differs from phase {phase.shape}")

    n_vox = int(mask.sum())
    index = np.full(phase.shape, -1, dtype=np.int64)
    index[mask] = np.arange(n_vox)
    ph = phase[mask]
    mv = mag[mask] if mag is not None else None
    mag_ref = float(np.percentile(mv, 90)) if mv is not None else None

    src, dst, qual = [], [], []
    for ax in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[ax], b[ax] = slice(0, -1), slice(1, None)
        ia, ib = index[tuple(a)], index[tuple(b)]
        ok = (ia >= 0) & (ib >= 0)
        ia, ib = ia[ok], ib[ok]
        src.append(ia)
        dst.append(ib)
        qual.append(edge_quality(ph[ia], ph[ib], None if mv is None else mv[ia], None if mv is None else mv[ib],
                                 mag_ref))
    src, dst, qual = np.concatenate(src), np.concatenate(dst), np.concatenate(qual)

    # Seed of each component: its best voxel (highest quality among its edges), reached from the virtual
    # root through an edge costlier (>= 2) than any real one (<= 1 + 1e-6).
    best = np.zeros(n_vox)
    np.maximum.at(best, src, qual)
    np.maximum.at(best, dst, qual)
    root = n_vox
    cost = np.concatenate([1.0 - qual + 1e-6, 2.0 + (1.0 - best)])
    rows = np.concatenate([src, np.arange(n_vox)])
    cols = np.concatenate([dst, np.full(n_vox, root)])
    graph = coo_matrix((cost, (rows, cols)), shape=(n_vox + 1, n_vox + 1)).tocsr()
    tree = minimum_spanning_tree(graph)
    _, pred = breadth_first_order(tree, root, directed=False, return_predecessors=True)

    parent = pred[:n_vox].astype(np.int64)
    seeds = parent == root
    parent = np.where(seeds, np.arange(n_vox), parent)
    # Unwrapping b from its parent a: n_b - n_a = round((φ_a - φ_b) / 2π) for true steps below π.
    step = np.round((ph[parent] - ph) / _TWO_PI).astype(np.int64)
    step[seeds] = 0
    n = _tree_sum(parent, step)

    out = np.zeros(phase.shape)
    out[mask] = ph + _TWO_PI * n
    return out


def unwrap_echoes(
    phase: np.ndarray,
    te: Sequence[float],
    spatial: Callable[..., np.ndarray],
    mask: np.ndarray | None = None,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    magnitude: np.ndarray | None = None,
    reference: str = "difference",
    **params,
) -> np.ndarray:
    """Unwrap a multi-echo phase in space (one reference) and time (the rest).

    Args:
        phase: wrapped phase (rad), (X, Y, Z, E).
        te: E echo times (s), increasing.
        spatial: a registered unwrapper ``fn(phase, mask, *, voxel_size, magnitude, **params)``.
        mask: boolean (X, Y, Z) or None; zero outside in the output.
        voxel_size: mm along (i, j, k).
        magnitude: optional (X, Y, Z, E) magnitude; echo 1 guides the spatial unwrapping.
        reference: ``"difference"`` or ``"first"`` (see module docstring). One echo: spatial only.
        **params: passed to ``spatial``.
    Returns:
        Unwrapped phase (rad), (X, Y, Z, E), each echo congruent to the input modulo 2π.
    """
    phase = np.asarray(phase, dtype=np.float64)
    te = np.asarray(te, dtype=np.float64).reshape(-1)
    if phase.ndim != 4 or phase.shape[3] != te.size:
        raise QSMInputError(f"temporal unwrap: phase shape {phase.shape} does not hold {te.size} echoes (X,Y,Z,E)")
    if np.any(te <= 0) or np.any(np.diff(te) <= 0):
        raise QSMInputError(f"temporal unwrap: echo times must be positive and increasing (s), got {te.tolist()}")
    if reference not in ("difference", "first"):
        raise QSMInputError(f"temporal unwrap: reference must be 'difference' or 'first', got {reference!r}")
    mag1 = None if magnitude is None else np.asarray(magnitude)[..., 0]
    kw = dict(voxel_size=voxel_size, magnitude=mag1, **params)
    m = np.ones(phase.shape[:3], bool) if mask is None else np.asarray(mask, bool)

    def _centre(ref: np.ndarray) -> np.ndarray:
        w = np.ones(int(m.sum())) if mag1 is None else mag1[m] ** 2
        mean = float(np.sum(w * ref[m]) / max(float(np.sum(w)), 1e-300))
        return ref - _TWO_PI * np.round(mean / _TWO_PI)

    if te.size == 1 or reference == "first":
        ref = _centre(spatial(phase[..., 0], mask, **kw))
        if te.size == 1:
            return (ref * m)[..., None]
        pred = ref[..., None] * (te / te[0])
    else:
        delta = _centre(spatial(_wrap(phase[..., 1] - phase[..., 0]), mask, **kw))
        omega = delta / (te[1] - te[0])  # rad/s
        offset = _wrap(phase[..., 0] - omega * te[0])
        pred = offset[..., None] + omega[..., None] * te
    out = phase + _TWO_PI * np.round((pred - phase) / _TWO_PI)
    if mask is not None:
        out = out * np.asarray(mask, bool)[..., None]
    return out
