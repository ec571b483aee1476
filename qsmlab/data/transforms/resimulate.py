"""Geometric augmentation of synthetic rows: deform chi, then re-simulate the field.

Rotating or warping a (chi, field) *pair* is wrong: B0 stays fixed in the scanner, so the field of a
rotated chi is not the rotated field (DESIGN.md section 3). Here chi (and mask, magnitude, seg) are
rotated or elastically deformed and the local field is recomputed with the project's single forward
model, ``field = DipoleOperator(voxel_size, b0_dir).A(chi) * mask`` (ppm).

Only rows with ``source == 'synthetic'`` and a ``chi`` image are changed; others pass through untouched
(their field is a measurement and cannot be re-simulated). ``total_field`` (local + background) cannot be
recomputed without the background sources, so it is removed from re-simulated subjects.
"""

from __future__ import annotations

import numpy as np
import torch
import torchio as tio
from scipy import ndimage
from torchio.transforms.augmentation import RandomTransform

from qsmlab.physics import DipoleOperator, rotation_matrix

# interpolation order per image: linear for continuous maps, nearest for labels
_ORDER = {"chi": 1, "magnitude": 1, "mask": 0, "seg": 0}


def _eligible(subject: tio.Subject) -> bool:
    return subject.get("source") == "synthetic" and "chi" in subject


def resimulate_field(subject: tio.Subject, pad_factor: float = 2.0) -> tio.Subject:
    """Replace ``field`` by ``A(chi) * mask`` with the subject's ``voxel_size``/``b0_dir`` (in place)."""
    chi = subject["chi"].data.numpy().astype(np.float64)  # [C, X, Y, Z]
    mask = (subject["mask"].data.numpy() > 0.5).astype(np.float64)
    op = DipoleOperator(subject["voxel_size"], subject["b0_dir"], pad_factor=pad_factor)
    field = op.A(chi[:1]) * mask[:1]
    subject["field"].set_data(torch.from_numpy(field.astype(np.float32)))
    if "total_field" in subject:
        subject.remove_image("total_field")
    subject.update_attributes()
    return subject


def rotate_subject(subject: tio.Subject, axis, angle_deg: float) -> tio.Subject:
    """Rotate chi/mask/magnitude/seg about the volume centre by ``angle_deg`` around ``axis`` (mm space).

    The rotation acts on physical coordinates (voxel index times ``voxel_size``), so anisotropic voxels
    are handled; samples from outside the volume are 0.
    """
    s = np.asarray(subject["voxel_size"], dtype=np.float64)
    r = rotation_matrix(axis, angle_deg)
    # ndimage maps output index o to input index  M o + offset; M = S^-1 R^T S, about the centre c.
    m = np.diag(1.0 / s) @ r.T @ np.diag(s)
    for name, image in subject.get_images_dict(intensity_only=False).items():
        if name not in _ORDER:
            continue
        data = image.data.numpy()
        c = (np.asarray(data.shape[1:], dtype=np.float64) - 1.0) / 2.0
        offset = c - m @ c
        out = np.stack([ndimage.affine_transform(ch.astype(np.float64), m, offset=offset,
                                                 order=_ORDER[name], mode="constant", cval=0.0)
                        for ch in data])
        image.set_data(torch.from_numpy(out.astype(np.float32)))
    return subject


class RotateAndResimulate(RandomTransform):
    """Random rotation of chi (synthetic rows only), then ``field = A(chi) * mask``.

    Args:
        max_deg: rotation angle drawn uniformly in [-max_deg, max_deg] (degrees) about a random axis;
            default 15.
        pad_factor: zero-padding of the forward operator (default 2, as the simulator).
        p: TorchIO application probability.
    """

    def __init__(self, max_deg: float = 15.0, pad_factor: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.max_deg = float(max_deg)
        self.pad_factor = float(pad_factor)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        if not _eligible(subject):
            return subject
        axis = torch.randn(3).double().numpy()
        angle = self.sample_uniform(-self.max_deg, self.max_deg)
        rotate_subject(subject, axis, angle)
        return resimulate_field(subject, self.pad_factor)


class ElasticResimulate(RandomTransform):
    """Random elastic (B-spline) deformation of chi (synthetic rows only), then ``field = A(chi) * mask``.

    The deformation is TorchIO's ``RandomElasticDeformation`` restricted to chi/mask/magnitude/seg (linear
    interpolation for scalars, nearest for labels).

    Args:
        max_displacement_mm: largest control-point displacement (mm), default 4.
        num_control_points: B-spline grid per axis (default 7).
        pad_factor: forward operator padding (default 2).
        p: TorchIO application probability.
    """

    def __init__(self, max_displacement_mm: float = 4.0, num_control_points: int = 7,
                 pad_factor: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.max_displacement_mm = float(max_displacement_mm)
        self.num_control_points = int(num_control_points)
        self.pad_factor = float(pad_factor)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        if not _eligible(subject):
            return subject
        include = [k for k in _ORDER if k in subject]
        warp = tio.RandomElasticDeformation(num_control_points=self.num_control_points,
                                            max_displacement=self.max_displacement_mm, include=include,
                                            copy=False)
        subject = warp(subject)
        return resimulate_field(subject, self.pad_factor)
