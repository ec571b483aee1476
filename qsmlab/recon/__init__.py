"""Classical QSM algorithms that need no training (inversion, background removal, unwrapping, echo
fitting, masking) and the end-to-end pipeline. Importing this package registers every algorithm in
:mod:`qsmlab.recon.registry`.
"""

from qsmlab.recon import background, inversion, unwrap  # noqa: F401 (importing them registers their algorithms)
