"""The shared physics-consistency loss library (torch only; no Lightning, no data imports).

Every loss is an ``nn.Module`` with one signature ``loss(pred, batch, physics) -> Tensor`` (scalar):

- ``pred``: chi ``[B, 1, X, Y, Z]`` (ppm) or a dict of named outputs; each loss reads ``pred[output]``.
- ``batch``: a ``QSMBatch`` or any object/mapping with ``field``, ``mask``, ``magnitude``, ``chi``,
  ``seg``, ``phase_scale`` [B] (rad/ppm, NaN if unknown), ``b0_dir`` [B, 3], ``voxel_size`` [B, 3] and
  optionally ``noise_weight``.
- ``physics``: the batch's :class:`qsmlab.physics.DipoleOperator`, from :func:`qsmlab.physics.physics_for_batch`.

Modules: ``data_consistency`` (linear / weighted / nonlinear, L1 / L2), ``tv`` (mask-aware anisotropic
TV), ``gradient`` (QSMnet's gradient-difference loss), ``supervised`` (chi and field L1/L2),
``segmentation`` (MONAI Dice + CE), ``composite`` (named, weighted terms, each logged).
"""

from qsmlab.losses.composite import CompositeLoss, Term
from qsmlab.losses.data_consistency import KINDS as DATA_CONSISTENCY_KINDS
from qsmlab.losses.data_consistency import DataConsistencyLoss, magnitude_weight
from qsmlab.losses.gradient import GradientDifferenceLoss
from qsmlab.losses.segmentation import DiceCELoss
from qsmlab.losses.supervised import ChiLoss, FieldLoss
from qsmlab.losses.tv import TVLoss

__all__ = [
    "ChiLoss", "CompositeLoss", "DATA_CONSISTENCY_KINDS", "DataConsistencyLoss", "DiceCELoss", "FieldLoss",
    "GradientDifferenceLoss", "TVLoss", "Term", "magnitude_weight",
]
