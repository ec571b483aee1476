"""Classical QSM algorithms that need no training (inversion, background removal, unwrapping, echo
fitting, masking) and the end-to-end pipeline. Importing this package registers every algorithm in
:mod:`qsmlab.recon.registry`.
"""

import importlib

# Modules that register algorithms; each is optional while the package is being built.
_REGISTERING = [
    "qsmlab.recon.inversion",
    "qsmlab.recon.background",
    "qsmlab.recon.unwrap",
]
for _m in _REGISTERING:
    try:
        importlib.import_module(_m)
    except ModuleNotFoundError as _e:  # a sub-package not written yet
        if _e.name != _m:
            raise
