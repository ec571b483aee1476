"""Physics-safe random flip: flip every image along a voxel axis AND negate that ``b0_dir`` component.

Why: reflecting chi along axis i reflects k_i; D(k) = 1/3 - (k.b)^2/|k|^2 is unchanged only if b_i is
negated too. With the negated component, ``A_b'(flip(chi)) == flip(A_b(chi))`` exactly (the kernel in
:mod:`qsmlab.physics.kernel` is kept even on Nyquist planes for this), so a flipped (chi, field) pair
stays a valid pair. Keeping b0_dir unchanged (a naive flip) breaks it whenever B0 is oblique. The images'
affines are left as they are (as ``tio.Flip`` does); the ``b0_dir`` metadata is the geometry of record.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform


class PhysicsSafeFlip(RandomTransform):
    """Flip each axis in ``axes`` independently with probability ``p``; update ``subject['b0_dir']``.

    Args:
        axes: voxel axes (0, 1, 2) that may be flipped; default all three.
        p: per-axis flip probability (default 0.5). The transform itself always runs.
    Images: every ``tio.Image`` of the subject (scalar and label), shape [C, X, Y, Z].
    Metadata: ``b0_dir`` (list of 3 floats) gets ``-b0_dir[i]`` for each flipped axis i; the flipped axes
    are recorded in ``subject['flipped_axes']`` (list) for inverse mapping at prediction time.
    """

    def __init__(self, axes: Sequence[int] = (0, 1, 2), p: float = 0.5, **kwargs):
        super().__init__(p=1, **kwargs)
        self.axes = tuple(int(a) for a in axes)
        if any(a not in (0, 1, 2) for a in self.axes):
            raise ValueError(f"PhysicsSafeFlip axes must be in (0, 1, 2), got {axes}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"PhysicsSafeFlip p must be in [0, 1], got {p}")
        self.flip_probability = float(p)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        axes = [a for a in self.axes if torch.rand(1).item() < self.flip_probability]
        return flip_subject(subject, axes)


def flip_subject(subject: tio.Subject, axes: Sequence[int]) -> tio.Subject:
    """Deterministic flip of all images along ``axes`` with the matching ``b0_dir`` negation (in place)."""
    axes = list(axes)
    if not axes:
        return subject
    for image in subject.get_images(intensity_only=False):
        image.set_data(torch.flip(image.data, dims=[a + 1 for a in axes]))
    b = [float(v) for v in subject["b0_dir"]]
    for a in axes:
        b[a] = -b[a]
    subject["b0_dir"] = b
    subject["flipped_axes"] = list(subject.get("flipped_axes", [])) + axes
    subject.update_attributes()
    return subject
