"""Dipole inversions: field (ppm) -> chi (ppm). Importing this package registers each method in
:mod:`qsmlab.recon.registry` under family ``"inversion"``.

Closed form (one FFT pair): ``tkd``, ``tsvd``, ``cfl2``; multi-orientation: ``cosmos``; linear
iterative: ``lsqr``, ``cg``; regularised iterative (when present): ``tv``, ``nltv``, ``ndi``, ``medi``.
"""

import importlib

from qsmlab.recon.inversion.cfl2 import cfl2
from qsmlab.recon.inversion.cosmos import cosmos
from qsmlab.recon.inversion.lsqr import cg_tikhonov, lsqr_inversion
from qsmlab.recon.inversion.tkd import tkd
from qsmlab.recon.inversion.tsvd import tsvd

# Modules written in parallel by another engineer; each is optional until it exists.
_OPTIONAL = ["gradients", "tv", "nltv", "ndi", "medi"]
for _m in _OPTIONAL:
    _name = f"{__name__}.{_m}"
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as _e:
        if _e.name != _name:
            raise

__all__ = ["cfl2", "cg_tikhonov", "cosmos", "lsqr_inversion", "tkd", "tsvd"]
