"""Realistic in-vivo-like data: the model errors a real scan carries, each a switchable component.

One file per component: :mod:`.anisotropy` (white-matter susceptibility tensor), :mod:`.veins` (thin
partial-volumed veins), :mod:`.acquisition` (fine-grid signal, k-space crop, noise, echo fit, background
removal), :mod:`.cosmos_sim` (a simulated COSMOS reference); :mod:`.subject` assembles them
(:func:`realistic_subject`). See DESIGN.md section 3 and issue 15.
"""

from qsmlab.data.realistic.subject import (
    COMPONENTS,
    RealismParams,
    RealisticSubject,
    realistic_subject,
    resolve_components,
)

__all__ = ["COMPONENTS", "RealismParams", "RealisticSubject", "realistic_subject", "resolve_components"]
