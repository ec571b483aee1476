"""Linearity augmentation (QSMnet+; Jung et al., NeuroImage 2020, "Exploring linearity of deep neural
network trained QSM: QSMnet+"): multiply chi and its fields by one random factor and a random sign.

The dipole model is linear, ``A(s * chi) = s * A(chi)``, so scaled pairs stay exact pairs; it widens the
susceptibility range the network sees (QSMnet+ trained on scales beyond the healthy-brain range).
Magnitude, mask and segmentation are not touched.
"""

from __future__ import annotations

import math

import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform

SCALED_KEYS = ("chi", "field", "total_field")


class LinearityScaling(RandomTransform):
    """Scale ``chi``, ``field`` and ``total_field`` (those present) by ``s * sign``.

    Args:
        scale_range: (low, high) of the factor ``s``, sampled log-uniformly (so x0.5 and x2 are equally
            likely); default (0.5, 2.0).
        p_sign: probability of a sign flip (default 0.5).
        p: probability of applying the transform at all (TorchIO semantics, default 1).
    Metadata: ``subject['chi_scale']`` is multiplied by the signed factor (1.0 initially).
    """

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0), p_sign: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"LinearityScaling scale_range must satisfy 0 < low <= high, got {scale_range}")
        if not 0.0 <= p_sign <= 1.0:
            raise ValueError(f"LinearityScaling p_sign must be in [0, 1], got {p_sign}")
        self.scale_range = (lo, hi)
        self.p_sign = float(p_sign)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        lo, hi = self.scale_range
        s = math.exp(self.sample_uniform(math.log(lo), math.log(hi))) if hi > lo else lo
        if torch.rand(1).item() < self.p_sign:
            s = -s
        return scale_subject(subject, s)


def scale_subject(subject: tio.Subject, factor: float) -> tio.Subject:
    """Multiply chi and fields by ``factor`` (in place); record it in ``chi_scale``."""
    for k in SCALED_KEYS:
        if k in subject:
            subject[k].set_data(subject[k].data * factor)
    subject["chi_scale"] = float(subject.get("chi_scale", 1.0)) * factor
    subject.update_attributes()
    return subject
