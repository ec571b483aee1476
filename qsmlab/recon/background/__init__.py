"""Background field removal: SHARP, V-SHARP, RESHARP, PDF, LBV.

Importing this package registers each method in the ``background`` registry
(:mod:`qsmlab.recon.registry`); every one has the signature
``fn(total_field, mask, *, voxel_size, b0_dir, **params) -> (local_field, valid_mask)`` (ppm).
Use ``registry.get("background", name)`` or the functions in the modules (``sharp.sharp``,
``sharp.vsharp``, ``resharp.resharp``, ``pdf.pdf``, ``lbv.lbv``). The package exports the modules, not
the functions: a function named like its module would shadow the module attribute.
"""

from qsmlab.recon.background import lbv, pdf, resharp, sharp

__all__ = ["lbv", "pdf", "resharp", "sharp"]
