"""``kind: realistic`` recipe groups (qsmlab.data.recipe + qsmlab.data.realistic.recipe_group).

- the shipped realistic recipe resolves; existing recipes keep their hashes (no generator bump);
- bad keys fail in one line naming the key;
- a tiny realistic dataset (2 mm, 32^3, COSMOS as the label) writes the manifest the loader reads: the
  field is the pipeline's local field on its valid mask, chi the COSMOS map, the scalar truth beside it.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from qsmlab.data.recipe import generate_dataset, load_recipe, recipe_hash
from qsmlab.errors import QSMInputError

ROOT = Path(__file__).resolve().parents[1] / "data_manifests"


def test_existing_recipe_hashes_unchanged_and_realistic_recipe_resolves():
    assert recipe_hash(load_recipe(ROOT / "default_recipe.yaml")[0]) == "9ff1150827c7"
    assert recipe_hash(load_recipe(ROOT / "invivo_like_recipe.yaml")[0]) == "b89cec0e8f30"
    r, _ = load_recipe(ROOT / "invivo_realistic_recipe.yaml")
    g = r["subjects"][0]
    assert g["kind"] == "realistic" and all(g["components"].values()) and g["engine"] == "realistic-1"


@pytest.mark.parametrize("bad,key", [({"components": {"vein": True}}, "components.vein"),
                                     ({"label": "cosmos"}, "label"),
                                     ({"factor": 1}, "factor"),
                                     ({"background": False}, "background")])
def test_bad_realistic_keys_name_the_key(bad, key):
    rec = {"name": "x", "subjects": [{"kind": "realistic", **bad}]}
    with pytest.raises(QSMInputError, match=f"subjects\\[0\\].{key}"):
        load_recipe(rec)


def test_tiny_realistic_dataset_with_cosmos_label(tmp_path):
    from qsmlab.data.manifest import load_manifest
    from qsmlab.data.nifti import load_nifti

    rec = {"name": "tiny", "seed": 3, "te": [0.004, 0.012, 0.02], "subjects": [
        {"kind": "realistic", "count": 1, "voxel_size": [2, 2, 2], "shape": [32, 32, 32],
         "orientations": [[0, 0, 0]], "cosmos": True, "label": "cosmos",
         "cosmos_rotations_deg": [[0, 0, 0], [20, 0, 0], [0, 20, 0]],
         "components": {"acquisition": False}}]}
    manifest = generate_dataset(rec, out_dir=tmp_path, quiet=True)
    rows = list(csv.DictReader(manifest.open()))
    assert len(rows) == 1 and rows[0]["group"] == "realistic"
    assert rows[0]["chi"].endswith("_cosmos.nii.gz") and rows[0]["mask"].endswith("run-01_mask.nii.gz")
    side = json.loads((tmp_path / rows[0]["chi"].replace(".nii.gz", ".json")).read_text())
    assert side["Units"].startswith("ppm")
    chi_side = json.loads((tmp_path / "real001" / "real001_chi.json").read_text())
    assert chi_side["Cosmos"] == rows[0]["chi"]
    field = load_nifti(tmp_path / rows[0]["field"]).data
    mask = load_nifti(tmp_path / rows[0]["mask"]).data > 0
    assert field.shape == (32, 32, 32) and np.all(field[~mask] == 0) and np.abs(field[mask]).max() > 0.005
    table = load_manifest(manifest)  # the loader validates every file and grid
    assert len(table.rows) == 1
