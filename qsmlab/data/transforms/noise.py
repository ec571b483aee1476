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


class EvalFieldNoise(tio.Transform):
    """Deterministic N(0, std_ppm^2) noise on ``field`` (and ``total_field``) of evaluation volumes.

    Validation on a simulation's exact local field rewards no regularisation at all (the uQSM paper used
    lambda_TV = 0 on high-SNR data); measured fields are noisy. The noise of a subject depends only on
    ``seed`` and the subject's ID (a stable hash), so every validation of a run, every trial of a sweep
    and every rank see the same noisy volume. Not a random augmentation: TorchIO applies it to every
    evaluation subject.
    """

    def __init__(self, std_ppm: float, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.std_ppm = float(std_ppm)
        self.seed = int(seed)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        import zlib

        key = zlib.crc32(str(subject.get("subject", "")).encode()) ^ (self.seed & 0xFFFFFFFF)
        gen = torch.Generator().manual_seed(int(key))
        for k in ("field", "total_field"):
            if k in subject:
                d = subject[k].data
                noise = torch.randn(d.shape, generator=gen, dtype=torch.float32).to(d.dtype)
                subject[k].set_data(d + self.std_ppm * noise)
        return subject
