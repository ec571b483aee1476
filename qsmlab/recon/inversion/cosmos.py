"""COSMOS: calculation of susceptibility through multiple orientation sampling.

Liu et al., "Calculation of susceptibility through multiple orientation sampling (COSMOS): a method for
conditioning the inverse problem from measured magnetic field map to susceptibility source image in
MRI", MRM 2009. With fields ``f_o`` measured at several head orientations (already co-registered to one
grid; each with its own B0 direction in that grid's voxel axes) the per-frequency least-squares solution
over orientations is

    chi = F^-1[ sum_o D_o F[f_o] / sum_o D_o^2 ]

Each orientation's magic-angle cone differs, so ``sum_o D_o^2`` vanishes only at DC and on the few
lines where all cones meet; there it is clipped to ``threshold`` (Tikhonov-like regularisation of the
nearly singular frequencies). Cost: one rfftn per orientation plus one irfftn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft

from qsmlab.errors import QSMInputError
from qsmlab.physics import DipoleOperator
from qsmlab.recon.inversion.tkd import cached_filter, check_inputs
from qsmlab.recon.registry import register


@register("inversion", "cosmos")
def cosmos(
    fields: Sequence[np.ndarray],
    masks: np.ndarray | Sequence[np.ndarray],
    *,
    b0_dirs: Sequence[Sequence[float]],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    pad_factor: float = 1.0,
    threshold: float = 0.01,
    quiet: bool = False,
) -> np.ndarray:
    """Multi-orientation least-squares inversion (Liu et al. 2009).

    Args:
        fields: local fields (ppm), one (X, Y, Z) array per orientation, all on one grid.
        masks: one mask (X, Y, Z) for all orientations, or one per orientation; each field is masked by
            its own mask and the output by their intersection.
        b0_dirs: B0 direction (voxel axes of the common grid) per orientation, same length as ``fields``.
        voxel_size: mm. pad_factor: zero padding per axis before the FFTs (default 1 = periodic).
        threshold: lower bound applied to ``sum_o D_o^2`` (unitless, default 0.01).
        quiet: unused (closed form).
    Returns:
        chi (ppm), (X, Y, Z), zero outside the (intersected) mask.
    """
    fields = list(fields)
    b0_dirs = [np.asarray(b, dtype=np.float64) for b in b0_dirs]
    if len(fields) < 1:
        raise QSMInputError("cosmos: no field given")
    if len(b0_dirs) != len(fields):
        raise QSMInputError(f"cosmos: {len(fields)} fields but {len(b0_dirs)} b0_dirs; expected one per field")
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        masks = [masks] * len(fields)
    masks = list(masks)
    if len(masks) == 1:
        masks = masks * len(fields)
    if len(masks) != len(fields):
        raise QSMInputError(f"cosmos: {len(fields)} fields but {len(masks)} masks; expected 1 or one per field")
    if not threshold > 0:
        raise QSMInputError(f"threshold={threshold}: expected > 0")
    pairs = [check_inputs(f, m) for f, m in zip(fields, masks)]
    n = pairs[0][0].shape
    if any(f.shape != n for f, _ in pairs):
        raise QSMInputError(f"cosmos: fields have different shapes {[f.shape for f, _ in pairs]}")
    op = DipoleOperator(voxel_size, np.stack(b0_dirs), pad_factor)
    s = op.fft_shape(n)
    dtype = pairs[0][0].dtype
    kernels = [op.kernel(n, o, dtype) for o in range(len(pairs))]
    key = ("cosmos", float(threshold), s, tuple(np.round(op.voxel_size[0], 9)),
           tuple(np.round(op.b0_dir, 12).ravel()), dtype.str)

    def build() -> np.ndarray:  # 1 / max(sum_o D_o^2, threshold), cached per geometry like TKD's filter
        den = sum(op.kernel(n, o) ** 2 for o in range(len(pairs)))
        return (1.0 / np.maximum(den, threshold)).astype(dtype)

    inv_den = cached_filter(key, build)
    num = None
    for (f, m), D in zip(pairs, kernels):
        spec = scipy.fft.rfftn(f * m, s=s, workers=-1, overwrite_x=True)
        spec *= D
        if num is None:
            num = spec
        else:
            num += spec
    num *= inv_den
    chi = scipy.fft.irfftn(num, s=s, workers=-1)[: n[0], : n[1], : n[2]]
    out_mask = np.logical_and.reduce([m for _, m in pairs])
    return (chi * out_mask).astype(dtype, copy=False)
