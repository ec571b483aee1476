"""Physics-safe augmentations for QSM subjects (one transform per file, TorchIO-style).

- :class:`PhysicsSafeFlip` (flip.py): flip + negate the matching ``b0_dir`` component.
- :class:`LinearityScaling` (linearity.py): joint chi/field scaling and sign flip (QSMnet+).
- :class:`FieldNoise`, :class:`MagnitudeNoise` (noise.py): noise on the measured quantities.
- :class:`RotateAndResimulate`, :class:`ElasticResimulate` (resimulate.py): deform chi of synthetic rows
  and re-simulate the field; never a (chi, field) pair.

:func:`build_augmentation` turns a config mapping (as written in LightningCLI YAML) into a
``tio.Compose``, applied in a fixed physics-respecting order: re-simulation first (it needs the
un-augmented chi), then flips, scaling, and noise last (noise is not scaled).
"""

from __future__ import annotations

from collections.abc import Mapping

import torchio as tio

from qsmlab.data.transforms.flip import PhysicsSafeFlip, flip_subject
from qsmlab.data.transforms.linearity import LinearityScaling, scale_subject
from qsmlab.data.transforms.noise import FieldNoise, MagnitudeNoise
from qsmlab.data.transforms.resimulate import (
    ElasticResimulate,
    RotateAndResimulate,
    resimulate_field,
    rotate_subject,
)
from qsmlab.errors import QSMInputError

AUGMENTATIONS = {
    "rotate": RotateAndResimulate,
    "elastic": ElasticResimulate,
    "flip": PhysicsSafeFlip,
    "linearity": LinearityScaling,
    "field_noise": FieldNoise,
    "magnitude_noise": MagnitudeNoise,
}


def build_augmentation(config: Mapping[str, Mapping | bool | None] | None,
                       copy: bool = True) -> tio.Compose | None:
    """``{"flip": {"p": 0.5}, "linearity": {"scale_range": [0.5, 2]}, ...}`` -> ``tio.Compose``.

    Keys: ``rotate, elastic, flip, linearity, field_noise, magnitude_noise``; a value is the keyword
    arguments of the transform (``{}``/``True`` for defaults, ``False``/``None`` to disable). Applied in
    that order regardless of the mapping's order. Returns None when nothing is enabled.

    The members work in place on the Compose's single copy of the subject (a deep copy per member
    would copy every volume once per augmentation). ``copy=False`` drops that copy too, for callers
    that own the subject already (``tio.SubjectsDataset`` deep-copies each subject before loading it).
    """
    if not config:
        return None
    unknown = [k for k in config if k not in AUGMENTATIONS]
    if unknown:
        raise QSMInputError(f"augment: unknown augmentation(s) {unknown}; expected {list(AUGMENTATIONS)}")
    out = []
    for name, cls in AUGMENTATIONS.items():
        kw = config.get(name)
        if kw is None or kw is False:
            continue
        kw = {} if kw is True else dict(kw)
        try:
            out.append(cls(copy=False, **kw))
        except (TypeError, ValueError) as e:
            raise QSMInputError(f"augment.{name}: {e}") from None
    return tio.Compose(out, copy=copy) if out else None


__all__ = [
    "AUGMENTATIONS", "ElasticResimulate", "FieldNoise", "LinearityScaling", "MagnitudeNoise",
    "PhysicsSafeFlip", "RotateAndResimulate", "build_augmentation", "flip_subject", "resimulate_field",
    "rotate_subject", "scale_subject",
]
