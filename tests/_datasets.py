"""Tiny synthetic QSM datasets on disk for data-layer tests (numpy + nibabel, deterministic).

``make_dataset(root, ...)`` writes, per scan, ``chi`` (random smooth blobs, ppm), ``mask`` (ellipsoid),
``magnitude``, ``field = DipoleOperator(voxel_size, b0_dir).A(chi) * mask`` (ppm) and a manifest CSV.
An oblique scan uses an affine rotated about the x axis, so its b0_dir from the header is oblique.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from qsmlab.data.nifti import save_nifti
from qsmlab.physics import DipoleOperator, b0_dir_from_affine, rotation_matrix


def smooth_chi(shape, seed: int, sigma: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chi = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), sigma)
    return 0.1 * chi / np.abs(chi).max()


def ellipsoid_mask(shape) -> np.ndarray:
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return (g[0] / 0.8) ** 2 + (g[1] / 0.85) ** 2 + (g[2] / 0.75) ** 2 <= 1.0


def oblique_affine(voxel_size=(1.0, 1.0, 1.0), tilt_deg: float = 0.0) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rotation_matrix((1.0, 0.0, 0.0), tilt_deg) @ np.diag(voxel_size)
    return a


def make_dataset(root: str | Path, n_subjects: int = 3, shape=(24, 24, 24), voxel_size=(1.0, 1.0, 1.0),
                 tilt_deg: float = 0.0, synthetic: bool = True, sources: list[str] | None = None,
                 scans_per_subject: int = 1, write_geometry: bool = False, te: str = "0.004 0.008",
                 b0_tesla: str = "3", pad_factor: float = 2.0) -> Path:
    """Write a dataset under ``root``; returns the manifest path (``root/manifest.csv``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    affine = oblique_affine(voxel_size, tilt_deg)
    b0 = b0_dir_from_affine(affine)
    op = DipoleOperator(voxel_size, b0, pad_factor=pad_factor)
    mask = ellipsoid_mask(shape)
    for s in range(n_subjects):
        for run in range(scans_per_subject):
            sid = f"sub-{s:02d}"
            seed = 100 * s + run
            chi = smooth_chi(shape, seed) * mask
            field = op.A(chi) * mask
            mag = np.where(mask, 0.8 - chi, 0.0)
            d = root / sid / f"run-{run}"
            names = {}
            for name, arr in (("chi", chi), ("field", field), ("mask", mask), ("magnitude", mag)):
                save_nifti(d / f"{name}.nii.gz", arr, affine=affine)
                names[name] = str((d / f"{name}.nii.gz").relative_to(root))
            src = sources[s] if sources else ("synthetic" if synthetic else "invivo")
            rows.append({
                "subject": sid, "session": "", "run": str(run), "source": src, "field": names["field"],
                "total_field": "", "chi": names["chi"], "mask": names["mask"], "magnitude": names["magnitude"],
                "phase": "", "seg": "", "te": te, "b0_tesla": b0_tesla,
                "b0_dir": " ".join(f"{v:.9f}" for v in b0) if write_geometry else "",
                "voxel_size": " ".join(str(v) for v in voxel_size) if write_geometry else "",
                "group": "",
            })
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path
