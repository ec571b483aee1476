"""Thresholded k-space division (TKD): chi = F^-1[ D_inv(k) F[field] ].

Shmueli et al., "Magnetic susceptibility mapping of brain tissue in vivo using MRI phase data",
MRM 2009 (TKD); Wharton et al., "Susceptibility mapping in the human brain using threshold-based
k-space division", MRM 2010. Near the magic-angle cone |D| is small and 1/D amplifies noise, so 1/D is
replaced where ``|D| < threshold``. Two conventions exist in the literature and both are offered:

- ``mode="sign"`` (Shmueli 2009, the usual "TKD"): ``D`` is clipped to ``sign(D) * threshold``, i.e.
  ``1/D -> sign(D) / threshold``. Cone frequencies are kept but attenuated (by ``|D| / threshold``).
- ``mode="zero"`` (the truncated pseudo-inverse, Wharton 2010): ``1/D -> 0``. Cone frequencies are
  removed entirely: less streaking, more loss of contrast (see also :mod:`.tsvd`).

Both underestimate chi; ``correct=True`` divides the result by the white-spectrum average of the
effective filter ``D * D_inv`` over k-space, a correction in the spirit of Schweser et al., "Toward
online reconstruction of quantitative susceptibility maps: superfast dipole inversion", MRM 2013
(off by default: it rescales the whole map and is only exact for a spectrally flat chi).

This module also holds :func:`kspace_inverse`, the one-FFT-pair engine shared by every closed-form
inversion (TKD, TSVD, CFL2): ``rfftn`` of the masked field on the padded grid, multiply by a cached
real filter, ``irfftn``, crop, mask.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import scipy.fft

from qsmlab.errors import QSMInputError
from qsmlab.physics import DipoleOperator
from qsmlab.recon.registry import register

TKD_MODES = ("sign", "zero")

_FILTERS: OrderedDict = OrderedDict()
_MAX_FILTERS = 8  # a 160^3 float64 half-spectrum filter is ~17 MB


def check_inputs(field: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a 3-D field and a same-shape mask; returns (float field, bool mask)."""
    field = np.asarray(field)
    if not np.issubdtype(field.dtype, np.floating):
        field = field.astype(np.float64)
    mask = np.asarray(mask).astype(bool, copy=False)
    if field.ndim != 3:
        raise QSMInputError(f"field: expected a 3-D array (X, Y, Z), got shape {field.shape}")
    if mask.shape != field.shape:
        raise QSMInputError(f"mask: shape {mask.shape} does not match field shape {field.shape}")
    if not mask.any():
        raise QSMInputError("mask: empty (no voxel set)")
    return field, mask


def cached_filter(key: tuple, build: Callable[[], np.ndarray]) -> np.ndarray:
    """Build once per (geometry, parameters): the filter costs a few passes over the spectrum, which
    would otherwise be a visible fraction of the single FFT pair the closed-form methods need."""
    f = _FILTERS.get(key)
    if f is None:
        f = build()
        f.setflags(write=False)
        _FILTERS[key] = f
        if len(_FILTERS) > _MAX_FILTERS:
            _FILTERS.popitem(last=False)
    else:
        _FILTERS.move_to_end(key)
    return f


def kspace_inverse(
    field: np.ndarray,
    mask: np.ndarray,
    build: Callable[[np.ndarray, tuple, np.ndarray], np.ndarray],
    name: str,
    params: tuple,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    pad_factor: float = 1.0,
) -> np.ndarray:
    """``mask * crop(irfftn(H * rfftn(pad(mask * field))))`` with ``H = build(D, fft_shape, voxel_size)``.

    Args:
        field: local field (ppm), (X, Y, Z).
        mask: brain mask, (X, Y, Z).
        build: makes the real half-spectrum filter from the float64 half-spectrum dipole kernel ``D``
            (shape (Px, Py, Pz//2+1)), the padded grid and the voxel size (mm).
        name, params: identify the filter in the cache together with the geometry.
        voxel_size: mm; b0_dir: unit B0 in voxel axes; pad_factor: zero padding (1 = periodic).
    Returns:
        chi (ppm), (X, Y, Z), dtype of ``field``, zero outside the mask.
    """
    field, mask = check_inputs(field, mask)
    op = DipoleOperator(voxel_size, b0_dir, pad_factor)
    n = field.shape
    s = op.fft_shape(n)
    vs = op.voxel_size[0]
    key = (name, params, s, tuple(np.round(vs, 9)), tuple(np.round(op.b0_dir[0], 12)), field.dtype.str)
    filt = cached_filter(key, lambda: np.asarray(build(op.kernel(n), s, vs), dtype=field.dtype))
    spec = scipy.fft.rfftn(field * mask, s=s, workers=-1, overwrite_x=True)
    spec *= filt
    out = scipy.fft.irfftn(spec, s=s, workers=-1, overwrite_x=True)
    if out.shape != n:  # padded: crop (a copy, so the padded buffer is freed)
        return out[: n[0], : n[1], : n[2]] * mask
    out *= mask
    return out


def tkd_filter(D: np.ndarray, threshold: float, mode: str) -> np.ndarray:
    """Regularised inverse kernel ``D_inv`` (same shape as ``D``); ``D_inv(0) = 0``."""
    small = np.abs(D) < threshold
    with np.errstate(divide="ignore"):
        inv = 1.0 / np.where(small, 1.0, D)
    if mode == "sign":
        inv = np.where(small, np.sign(D) / threshold, inv)
    else:
        inv = np.where(small, 0.0, inv)
    inv.flat[0] = 0.0  # DC: the mean of chi is not determined by the field
    return inv


def white_spectrum_gain(D: np.ndarray, inv: np.ndarray, s: tuple) -> float:
    """Mean of ``D * D_inv`` over the full (not half) spectrum: the fraction of chi a spectrally flat
    map keeps. Half-spectrum planes other than 0 and Nyquist stand for two full-spectrum samples."""
    w = np.full(D.shape[-1], 2.0)
    w[0] = 1.0
    if s[-1] % 2 == 0:
        w[-1] = 1.0
    return float(((D * inv) * w).sum() / (w.sum() * D.shape[0] * D.shape[1]))


def _check_threshold(threshold: float, name: str = "threshold") -> None:
    if not (0.0 < threshold < 2.0 / 3.0):
        raise QSMInputError(f"{name}={threshold}: expected 0 < {name} < 2/3 (|D| is at most 2/3)")


@register("inversion", "tkd")
def tkd(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    magnitude: np.ndarray | None = None,
    pad_factor: float = 1.0,
    threshold: float = 0.19,
    mode: str = "sign",
    correct: bool = False,
    quiet: bool = False,
) -> np.ndarray:
    """Thresholded k-space division (Shmueli et al. 2009; Wharton et al. 2010).

    Args:
        field: local field (ppm), (X, Y, Z).
        mask: brain mask (X, Y, Z); the output is zero outside it.
        voxel_size: mm (default 1 mm isotropic). b0_dir: unit B0 in voxel axes (default (0, 0, 1)).
        magnitude: unused (accepted for the common inversion signature).
        pad_factor: zero padding per axis before the FFT (default 1.0 = periodic).
        threshold: |D| below which 1/D is regularised (unitless, default 0.19, a widely used value).
        mode: ``"sign"`` (1/D -> sign(D)/threshold, default) or ``"zero"`` (1/D -> 0).
        correct: divide by the white-spectrum gain of the filter (Schweser et al. 2013); default off.
        quiet: unused (closed form, no progress bar).
    Returns:
        chi (ppm), (X, Y, Z), zero outside the mask. Cost: one rfftn + irfftn pair.
    """
    _check_threshold(threshold)
    if mode not in TKD_MODES:
        raise QSMInputError(f"mode={mode!r}: expected one of {', '.join(TKD_MODES)}")

    def build(D, s, vs):
        inv = tkd_filter(D, threshold, mode)
        if correct:
            inv /= white_spectrum_gain(D, inv, s)
        return inv

    return kspace_inverse(field, mask, build, "tkd", (threshold, mode, bool(correct)),
                          voxel_size, b0_dir, pad_factor)
