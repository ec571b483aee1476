"""QSMnet / QSMnet+ U-Net (Yoon et al., NeuroImage 2018; Jung et al., NeuroImage 2020).

A 3D U-Net of 5³ convolutions with BatchNorm and LeakyReLU (slope 0.1), two per level and path, four
2³ max-poolings, a 2³ stride-2 transposed-convolution up path with skip concatenations, and a linear 1³
output convolution. Input: the (normalised) local field ``[B, 1, X, Y, Z]``; output: chi
``[B, 1, X, Y, Z]``. The papers use 32 channels at full resolution; ``width`` is configurable because
the 5³ kernels make full-volume inference cost about ``1e6 * (width / 32)**2`` multiply-adds per voxel.
"""

from __future__ import annotations

from qsmlab.models.unet import UNet3d


class QSMnetUNet(UNet3d):
    """QSMnet U-Net: ``[B, in_channels, X, Y, Z] -> [B, out_channels, X, Y, Z]``, X, Y, Z multiples of
    ``size_multiple = 2**depth`` (16 for the paper's four poolings).

    Args:
        in_channels, out_channels: 1 and 1 (field -> chi).
        width: full-resolution channels, doubled per level. The paper's 32 costs ~1e6 multiply-adds
            per voxel (a 160³ volume: ~45 s on 2 CPU cores); the default 16 costs a quarter of that.
            Keep it a multiple of 16: AVX-512 oneDNN kernels pad other widths to 16 channels and add
            blocked-layout copies (width 12 is ~25 % faster but needs ~2x the memory per channel).
            Set 32 to reproduce the paper.
        depth: number of poolings (4 in the paper).
        kernel_size: 5 in the paper.
        negative_slope: LeakyReLU slope (0.1 in QSMnet+).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 16, depth: int = 4,
                 kernel_size: int = 5, negative_slope: float = 0.1):
        super().__init__(in_channels=in_channels, out_channels=out_channels, width=width, depth=depth,
                         kernel_size=kernel_size, convs_per_level=2, norm="batch", activation="leaky_relu",
                         negative_slope=negative_slope, upsample="transposed", out_kernel_size=1)
