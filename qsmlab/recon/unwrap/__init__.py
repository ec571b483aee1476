"""Phase unwrapping. Importing this package registers the spatial unwrappers in the recon registry:

- ``"laplacian"``: Laplacian unwrapping (Schofield & Zhu 2003), :mod:`.laplacian`;
- ``"region"``: quality-guided region growing (ROMEO-style, Dymerska et al. 2021), :mod:`.region_growing`.

Multi-echo data: :func:`unwrap_echoes` (spatial reference + temporal prediction), in :mod:`.region_growing`.
"""

from qsmlab.recon.unwrap.laplacian import unwrap_laplacian
from qsmlab.recon.unwrap.region_growing import unwrap_echoes, unwrap_region

__all__ = ["unwrap_laplacian", "unwrap_region", "unwrap_echoes"]
