"""Dipole inversions: field (ppm) -> chi (ppm). Importing this package registers each method in
:mod:`qsmlab.recon.registry` under family ``"inversion"``.

Closed form (one FFT pair): ``tkd``, ``tsvd``, ``cfl2``; multi-orientation: ``cosmos``; linear
iterative: ``lsqr``, ``cg``; regularised iterative: ``tv``, ``nltv``, ``ndi``, ``medi``.
"""

from qsmlab.recon.inversion import gradients, medi, ndi, nltv, tv  # noqa: F401 (importing registers them)
from qsmlab.recon.inversion.cfl2 import cfl2
from qsmlab.recon.inversion.cosmos import cosmos
from qsmlab.recon.inversion.lsqr import cg_tikhonov, lsqr_inversion
from qsmlab.recon.inversion.tkd import tkd
from qsmlab.recon.inversion.tsvd import tsvd

__all__ = ["cfl2", "cg_tikhonov", "cosmos", "lsqr_inversion", "tkd", "tsvd"]
