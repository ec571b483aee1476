"""Benchmark: TorchIO queue throughput vs. the training-step rate of a small 3-D U-Net.

Generates a few synthetic subjects (smooth chi, field = A(chi) * mask, mask, magnitude) of 96^3-128^3,
then measures

1. queue throughput, in 64^3 patches per second, through ``QSMDataModule.train_dataloader()`` (load,
   augment: flip + linearity + field noise, crop, collate) with 0 and 1 queue workers;
2. the training rate, in patches per second, of ``monai.networks.nets.UNet`` (channels (8, 16, 32),
   strides (2, 2)) doing forward + L1 loss + backward + Adam step on batches of the same patches;

and prints their ratio (target >= 2: the loader must never starve the model). Each rate is the best of
``--repeats`` timings. It prints a table and asserts nothing.

    python benchmarks/bench_data_queue.py [--shape 112] [--subjects 4] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from qsmlab.data.datamodule import QSMDataModule
from qsmlab.data.nifti import save_nifti
from qsmlab.physics import DipoleOperator, tilted_b0_dir


def make_subjects(root: Path, n: int, size: int, seed: int = 0, ext: str = ".nii.gz") -> Path:
    """Write ``n`` synthetic subjects of ``size``^3 and their manifest; returns the manifest path."""
    rng = np.random.default_rng(seed)
    shape = (size,) * 3
    g = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mask = (g[0] / 0.8) ** 2 + (g[1] / 0.9) ** 2 + (g[2] / 0.75) ** 2 <= 1
    op = DipoleOperator((1.0, 1.0, 1.0), tilted_b0_dir(15.0))
    rows = []
    for i in range(n):
        chi = ndimage.gaussian_filter(rng.normal(size=shape), 3.0)
        chi = 0.1 * chi / np.abs(chi).max() * mask
        field = op.A(chi) * mask
        d = root / f"sub-{i:02d}"
        for name, arr in (("chi", chi), ("field", field), ("mask", mask), ("magnitude", 0.8 - chi)):
            save_nifti(d / f"{name}{ext}", arr)
        rows.append({"subject": f"sub-{i:02d}", "source": "synthetic", "te": "0.02", "b0_tesla": "3",
                     **{k: f"sub-{i:02d}/{k}{ext}" for k in ("field", "chi", "mask", "magnitude")}})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def queue_rate(manifest: Path, workers: int, patch: int, spv: int, batch: int, epochs: int,
               cache: bool = False) -> float:
    """Patches per second popped from the training loader (volume loading unless cached, augmentation,
    cropping, collation). With ``cache`` the one-off load happens before the clock starts (steady state)."""
    dm = QSMDataModule(str(manifest), patch_size=patch, samples_per_volume=spv, queue_length=2 * spv,
                       batch_size=batch, num_workers=workers, seed=0, cache_volumes=cache,
                       augment={"flip": {}, "linearity": {}, "field_noise": {"std_ppm": 0.005}})
    loader = dm.train_dataloader()
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for b in loader:
            n += b.field.shape[0]
    return n / (time.perf_counter() - t0)


def train_rate(device: torch.device, patch: int, batch: int, steps: int) -> float:
    """Patches per second of forward + backward + Adam step of a small MONAI U-Net."""
    from monai.networks.nets import UNet

    net = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16, 32), strides=(2, 2)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, patch, patch, patch, device=device)
    y = torch.randn_like(x)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.l1_loss(net(x), y)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up (cuDNN autotune, allocator)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, default=112, help="subject volume edge, voxels (96-128)")
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--samples-per-volume", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--ext", default=".nii.gz", choices=[".nii.gz", ".nii"], help="NIfTI compression")
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings (shared machines are noisy)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    a = ap.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if a.device == "auto" else a.device))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = make_subjects(Path(tmp), a.subjects, a.shape, ext=a.ext)
        gen_s = time.perf_counter() - t0
        train = max(train_rate(device, a.patch, a.batch, a.steps) for _ in range(a.repeats))
        rows = []
        for cache in (False, True):
            for w in a.workers:
                q = max(queue_rate(manifest, w, a.patch, a.samples_per_volume, a.batch, a.epochs, cache)
                        for _ in range(a.repeats))
                rows.append({"cache_volumes": cache, "queue_workers": w, "queue_patches_per_s": round(q, 2),
                             f"train_patches_per_s ({device.type})": round(train, 2),
                             "ratio": round(q / train, 2), "target": ">= 2", "meets": q / train >= 2})
    table = pd.DataFrame(rows)
    print(f"subjects: {a.subjects} x {a.shape}^3 {a.ext} (generated in {gen_s:.1f} s); patches {a.patch}^3, "
          f"{a.samples_per_volume}/volume, batch {a.batch}; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))
    if a.out:
        table.to_csv(a.out, index=False)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
