"""Where NeXtQSM's total-field route loses: its background net's local field against the V-SHARP estimate it starts
from, on the held-out subjects of ``benchmarks/compare_methods.py`` (the default recipe's anatomy, 2 mm, seed 777).

For each subject (local-field NRMSE % against the true local field, in the brain mask and in the mask eroded by 3
voxels, where V-SHARP's own rim error is gone):

- ``vsharp``: the V-SHARP estimate the background net gets as its ``bg_init`` channel
  (:func:`qsmlab.methods.background_inputs.vsharp_estimate`; ``background_init: vsharp``);
- ``bg net``: the checkpoint's local field (``predict_volume(..., output="local_field")``);

and chi NRMSE % against the truth: from the total field (the chain), from the true local field (the variational
net alone), and the variational net on the background net's local field (should equal the chain). Prints a
markdown table; asserts nothing.

    python benchmarks/nextqsm_background.py --ckpt runs/nextqsm/quick/version_0/checkpoints/best-step=125.ckpt
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_methods as cm  # noqa: E402

from qsmlab.data.manifest import load_manifest  # noqa: E402
from qsmlab.data.recipe import ensure_dataset  # noqa: E402
from qsmlab.methods.background_inputs import vsharp_estimate  # noqa: E402
from qsmlab.methods.predict import method_from, predict_volume  # noqa: E402
from qsmlab.metrics.nrmse import nrmse  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, type=Path, help="a NeXtQSM checkpoint (.ckpt)")
    ap.add_argument("--test-seed", type=int, default=777, help="seed of the held-out recipe")
    ap.add_argument("--subjects", type=int, default=2, help="held-out anatomical subjects")
    ap.add_argument("--erode", type=int, default=3, help="voxels eroded for the interior column")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if not a.ckpt.is_file():
        ap.error(f"--ckpt: no file {a.ckpt}")
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    model = method_from(str(a.ckpt), "nextqsm")
    rows = load_manifest(ensure_dataset(cm.test_recipe(a.test_seed, a.subjects))).rows
    out = ["| subject | local field: vsharp / bg net (mask) | same, eroded mask | chi: total route | "
           "chi: true local | chi: varnet on bg net's field |", "|---|---|---|---|---|---|"]
    for row in [r for r in rows if r.group == "anatomical"]:
        s = cm.load_subject(row)
        m, tot, loc, vs, b0 = s["mask"], s["total"], s["local"], s["vs"], s["b0"]
        inner = ndimage.binary_erosion(m, iterations=a.erode)
        vsh = vsharp_estimate(torch.from_numpy(tot)[None, None], torch.from_numpy(m.astype(np.float32))[None, None],
                              vs).numpy()[0, 0]
        kw = dict(magnitude=s["magnitude"])
        bg = predict_volume(model, loc, m, vs, b0, total_field=tot, output="local_field", **kw)
        chi_total = predict_volume(model, loc, m, vs, b0, total_field=tot, **kw)
        chi_local = predict_volume(model, loc, m, vs, b0, **kw)
        chi_bg = predict_volume(model, bg * m, m, vs, b0, **kw)
        out.append(f"| {s['name']} | {nrmse(vsh, loc, m):.1f} / {nrmse(bg, loc, m):.1f} | "
                   f"{nrmse(vsh, loc, inner):.1f} / {nrmse(bg, loc, inner):.1f} | {nrmse(chi_total, s['chi'], m):.1f} | "
                   f"{nrmse(chi_local, s['chi'], m):.1f} | {nrmse(chi_bg, s['chi'], m):.1f} |")
        print(out[-1], flush=True)
    print("\n".join(out))


if __name__ == "__main__":
    main()
