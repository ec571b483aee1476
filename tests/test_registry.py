"""Registry: method lookup, parameter validation and string conversion for --param."""

import pytest

from qsmlab.errors import QSMInputError
from qsmlab.recon import registry


def test_every_family_registered():
    assert {"tkd", "tsvd", "cfl2", "lsqr", "cg", "tv", "nltv", "ndi", "medi", "cosmos"} <= set(registry.names("inversion"))
    assert {"sharp", "vsharp", "resharp", "pdf", "lbv"} <= set(registry.names("background"))
    assert {"laplacian", "region"} <= set(registry.names("unwrap"))


def test_param_conversion_and_errors():
    p = registry.check_params("inversion", "tkd", {"threshold": "0.15", "mode": "zero"})
    assert p == {"threshold": 0.15, "mode": "zero"}
    p = registry.check_params("inversion", "tv", {"mu_grad": "0.1", "max_iter": "7"})
    assert p["mu_grad"] == 0.1 and p["max_iter"] == 7
    with pytest.raises(QSMInputError, match="unknown parameter 'treshold' for inversion method 'tkd'; accepted: .*threshold"):
        registry.check_params("inversion", "tkd", {"treshold": "0.1"})
    with pytest.raises(QSMInputError, match="expected float"):
        registry.check_params("inversion", "tkd", {"threshold": "abc"})
    with pytest.raises(QSMInputError, match="unknown inversion method 'tkdd'; choose one of: .*tkd"):
        registry.get("inversion", "tkdd")
    with pytest.raises(QSMInputError, match="expected NAME=VALUE"):
        registry.parse_params(["threshold"])
