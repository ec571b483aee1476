"""Trained checkpoints as classical-registry steps: ``qsmlab recon ckpt:PATH`` (and the pipeline's
``--inversion ckpt:PATH``) give exactly what ``predict_volume`` gives; a missing checkpoint is one line."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from _methods import run_cli
from test_cli_predict import _scan, ckpts  # noqa: F401  (module fixture: a tiny uQSM checkpoint)

from qsmlab.errors import QSMInputError
from qsmlab.methods.checkpoint_recon import install
from qsmlab.methods.predict import predict_volume
from qsmlab.recon import registry


def test_recon_ckpt_equals_predict_volume(ckpts, tmp_path):  # noqa: F811
    paths, _ = _scan(tmp_path)
    out = tmp_path / "chi.nii.gz"
    rc, _, err = run_cli(["recon", f"ckpt:{ckpts['uqsm']}", "--field", str(paths["field"]),
                          "--mask", str(paths["mask"]), "-o", str(out)])
    assert rc == 0, err
    chi = np.asarray(nib.load(str(out)).dataobj)
    f = np.asarray(nib.load(str(paths["field"])).dataobj)
    m = np.asarray(nib.load(str(paths["mask"])).dataobj) > 0.5
    ref = predict_volume(ckpts["uqsm"], f, m, voxel_size=(2, 2, 2), b0_dir=(0, 0, 1))
    assert np.any(ref != 0) and np.allclose(chi, ref, atol=1e-6)


def test_registry_ckpt_prefix_errors(tmp_path):
    install()
    with pytest.raises(QSMInputError, match="checkpoint file not found"):
        registry.get("inversion", f"ckpt:{tmp_path / 'missing.ckpt'}")
    with pytest.raises(QSMInputError, match="not unwrap"):
        (tmp_path / "x.ckpt").write_bytes(b"")
        registry.get("unwrap", f"ckpt:{tmp_path / 'x.ckpt'}")
