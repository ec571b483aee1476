"""Unit conversions between phase (rad), frequency (Hz) and field (ppm): the only place they live.

    phase [rad] = 2*pi * gamma_bar [MHz/T] * B0 [T] * TE [s] * field [ppm]
                = 2*pi * TE [s] * f [Hz],     f [Hz] = gamma_bar [MHz/T] * B0 [T] * field [ppm]

(1 MHz * 1 ppm = 1 Hz, so no stray powers of ten appear once gamma_bar is kept in MHz/T.)
gamma_bar is the proton gyromagnetic ratio over 2*pi, 42.577478 MHz/T (CODATA 2018), rounded here to
42.5775 MHz/T as the design fixes. Functions accept floats, numpy arrays and torch tensors.
"""

from __future__ import annotations

import math

GAMMA_BAR_MHZ_PER_T = 42.5775
"""Proton gyromagnetic ratio / 2*pi in MHz/T."""


def _check_positive(name: str, value) -> None:
    try:
        v = float(value)
    except TypeError:  # arrays: check all
        import numpy as np

        v = float(np.min(np.asarray(value)))
    if not v > 0:
        raise ValueError(f"{name} must be > 0 (got {value!r}); TE is in seconds and B0 in tesla")


def hz_per_ppm(b0_tesla: float) -> float:
    """Frequency shift in Hz of a 1 ppm field perturbation at B0 (T)."""
    _check_positive("b0_tesla", b0_tesla)
    return GAMMA_BAR_MHZ_PER_T * float(b0_tesla)


def phase_scale(te_s, b0_tesla: float):
    """Radians of phase per ppm of field at echo time TE (s) and B0 (T): 2*pi*gamma_bar*B0*TE."""
    _check_positive("te_s", te_s)
    return 2.0 * math.pi * hz_per_ppm(b0_tesla) * te_s


def ppm_to_hz(field_ppm, b0_tesla: float):
    """Field (ppm) -> frequency offset (Hz)."""
    return field_ppm * hz_per_ppm(b0_tesla)


def hz_to_ppm(freq_hz, b0_tesla: float):
    """Frequency offset (Hz) -> field (ppm)."""
    return freq_hz / hz_per_ppm(b0_tesla)


def rad_to_hz(phase_rad, te_s):
    """Phase (rad) accrued at TE (s) -> frequency (Hz)."""
    _check_positive("te_s", te_s)
    return phase_rad / (2.0 * math.pi * te_s)


def hz_to_rad(freq_hz, te_s):
    """Frequency (Hz) -> phase (rad) accrued at TE (s)."""
    _check_positive("te_s", te_s)
    return freq_hz * (2.0 * math.pi * te_s)


def ppm_to_rad(field_ppm, te_s, b0_tesla: float):
    """Field (ppm) -> phase (rad) at TE (s), B0 (T)."""
    return field_ppm * phase_scale(te_s, b0_tesla)


def rad_to_ppm(phase_rad, te_s, b0_tesla: float):
    """Phase (rad) at TE (s), B0 (T) -> field (ppm)."""
    return phase_rad / phase_scale(te_s, b0_tesla)
