"""uQSM encoder-decoder (Zhang et al., unsupervised QSM, 2020).

A 3D U-Net of 3³ convolutions, BatchNorm and ReLU (two per level and path), 2³ max-pooling, skip
concatenations, and nearest-neighbour upsampling rather than transposed convolutions, which the paper
adopts to avoid checkerboard artefacts; the output is a linear 3³ convolution. Input: the normalised
local field and the brain mask concatenated, ``[B, 2, X, Y, Z]``; output: chi ``[B, 1, X, Y, Z]`` in the
method's normalised units. ``upsample="transposed"`` is the checkerboard ablation (2³ stride-2
transposed convolutions, everything else equal; see :mod:`qsmlab.models.unet`).
"""

from __future__ import annotations

from qsmlab.models.unet import UNet3d


class UQSMNet(UNet3d):
    """uQSM network: ``[B, in_channels, X, Y, Z] -> [B, out_channels, X, Y, Z]``, X, Y, Z multiples of
    ``size_multiple = 2**depth``.

    Args:
        in_channels: 2 (field, mask) by default.
        out_channels: 1 (chi).
        depth: number of poolings (4: 16 -> 256 channels for ``width=16``).
        width: full-resolution channels, doubled per level.
        upsample: ``"nearest"`` (the paper) or ``"transposed"`` (checkerboard ablation).
        norm: ``"batch"`` (the paper), ``"instance"`` or ``"none"``.
    """

    def __init__(self, in_channels: int = 2, out_channels: int = 1, depth: int = 4, width: int = 16,
                 upsample: str = "nearest", norm: str = "batch"):
        super().__init__(in_channels=in_channels, out_channels=out_channels, width=width, depth=depth,
                         kernel_size=3, convs_per_level=2, norm=norm, activation="relu",
                         upsample=upsample, out_kernel_size=3)
