"""Noise augmentation on the measured quantities: the field (ppm) and the magnitude.

Noise is added to what a scanner measures, never to chi (the label). Field noise is Gaussian in ppm
(phase noise divided by the phase scale); magnitude noise is Rician (Gaussian on the real and imaginary
channels of a real-valued magnitude, then the modulus), as in MR magnitude images (Gudbjartsson &
Patz, MRM 1995).
"""

from __future__ import annotations

import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform


def _std(rng: float | tuple[float, float], sample) -> float:
    if isinstance(rng, (int, float)):
        return float(rng)
    lo, hi = rng
    return sample(float(lo), float(hi))


class FieldNoise(RandomTransform):
    """Add N(0, std^2) to ``field`` (and ``total_field`` if ``include_total``).

    Args:
        std_ppm: standard deviation in ppm, or a (low, high) range sampled uniformly per subject;
            default 0.005 ppm (about 0.05 rad of phase at 3 T, TE = 20 ms).
        include_total: also perturb ``total_field`` with independent noise (default True).
        p: TorchIO application probability.
    """

    def __init__(self, std_ppm: float | tuple[float, float] = 0.005, include_total: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.std_ppm = std_ppm
        self.include_total = include_total

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        std = _std(self.std_ppm, self.sample_uniform)
        keys = ("field", "total_field") if self.include_total else ("field",)
        for k in keys:
            if k in subject:
                d = subject[k].data
                subject[k].set_data(d + std * torch.randn_like(d))
        return subject


class MagnitudeNoise(RandomTransform):
    """Rician noise on ``magnitude``: ``|m + n1 + i n2|``, ``n ~ N(0, sigma^2)``.

    Args:
        std: sigma relative to the magnitude's 99th percentile (default 0.02), or a (low, high) range.
        p: TorchIO application probability.
    """

    def __init__(self, std: float | tuple[float, float] = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.std = std

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        if "magnitude" not in subject:
            return subject
        m = subject["magnitude"].data
        ref = torch.quantile(m.flatten()[:: max(1, m.numel() // 100_000)].float(), 0.99).clamp_min(1e-12)
        sigma = _std(self.std, self.sample_uniform) * float(ref)
        noisy = torch.sqrt((m + sigma * torch.randn_like(m)) ** 2 + (sigma * torch.randn_like(m)) ** 2)
        subject["magnitude"].set_data(noisy.to(m.dtype))
        return subject
