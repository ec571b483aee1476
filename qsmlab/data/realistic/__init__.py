"""Realistic in-vivo-like data: the model errors a real scan carries, each a switchable component.

One file per component: :mod:`.anisotropy` (white-matter susceptibility tensor), :mod:`.veins` (thin
partial-volumed veins), :mod:`.acquisition` (fine-grid signal, k-space crop, noise, echo fit, background
removal), :mod:`.cosmos_sim` (a simulated COSMOS reference); :mod:`.subject` assembles them
(:func:`realistic_subject`). See DESIGN.md section 3 and issue 15.

From a benchmark::

    from qsmlab.data.realistic import realistic_subject
    s = realistic_subject(0, voxel_size=(1, 1, 1), tilt_deg=20, shape=(96, 96, 96), cosmos=True)
    chi = tv_admm(s.local_field, s.valid_mask, voxel_size=s.voxel_size, b0_dir=s.b0_dir, noise_std=s.noise_std_ppm)
    # score against s.chi (scalar truth) and s.cosmos (on s.cosmos_mask); components=["noise"] etc. ablate
"""

from qsmlab.data.realistic.subject import (
    COMPONENTS,
    RealismParams,
    RealisticSubject,
    realistic_subject,
    resolve_components,
)

__all__ = ["COMPONENTS", "RealismParams", "RealisticSubject", "realistic_subject", "resolve_components"]
