"""PedQ-NET's three networks, on MONAI's implementations.

- :class:`PedQNetRecon`: the reconstruction net, MONAI ``DynUNet`` configured nnU-Net style (Isensee et
  al., Nature Methods 2021): per level two 3³ conv - InstanceNorm - LeakyReLU layers, downsampling by
  stride-2 convolutions, transposed-convolution up path with skip concatenations, 1³ output.
  ``[B, in_channels, X, Y, Z]`` (field, mask) -> ``[B, out_channels, X, Y, Z]`` (chi);
  ``size_multiple = 2**(len(filters) - 1)``.
  Without autograd (full-volume inference) the forward walks the DynUNet's own modules with in-place
  normalisation, channels-last maps and the up-sampling fused into the next convolution: about two
  full-resolution maps at the widest point instead of MONAI's six (see :meth:`PedQNetRecon.forward`).
- :class:`SubcorticalUNETR`: UNETR (Hatamizadeh et al., WACV 2022) segmenting subcortical nuclei on the
  reconstructed chi: ``[B, 1, *img_size]`` -> logits ``[B, num_classes, *img_size]``.
- :class:`BrainMaskUNETR`: UNETR brain masking: magnitude ``[B, 1, *img_size]`` -> 2-class logits
  (background, brain).

UNETR's ViT has a learned position embedding for a 16³-patch grid, so its input size is fixed
(``fixed_input_size = img_size``, each a multiple of 16); the method crops or tiles. Defaults are
smaller than the UNETR paper's ViT-Base (768 hidden, 12 heads) so that it trains and runs on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock
from monai.networks.nets import UNETR, DynUNet
from torch import nn

from qsmlab.errors import QSMInputError
from qsmlab.models._blocks import check_input, check_positive_int, norm_inplace
from qsmlab.models.unet import CHANNELS_LAST, fused_up_conv

_UNETR_PATCH = 16  # MONAI's UNETR uses a fixed 16³ patch embedding


class PedQNetRecon(nn.Module):
    """nnU-Net-style reconstruction net (MONAI ``DynUNet``).

    Args:
        in_channels, out_channels: 2 (field, mask) and 1 (chi).
        filters: channels per level, full resolution first; ``len(filters) >= 3`` levels, each after the
            first halves the grid.
        kernel_size: odd convolution size (3).
        negative_slope: LeakyReLU slope (0.01, nnU-Net).
        res_block: residual conv blocks instead of plain ones.
    """

    fixed_input_size = None

    def __init__(self, in_channels: int = 2, out_channels: int = 1,
                 filters: Sequence[int] = (16, 32, 64, 128), kernel_size: int = 3,
                 negative_slope: float = 0.01, res_block: bool = False):
        super().__init__()
        filters = [check_positive_int(f, "filters") for f in filters]
        if len(filters) < 3:
            raise QSMInputError(f"filters must list at least 3 levels (DynUNet); got {filters}")
        kernel_size = check_positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise QSMInputError(f"kernel_size must be odd; got {kernel_size}")
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        levels = len(filters)
        self.size_multiple = 2 ** (levels - 1)
        self.net = DynUNet(
            spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
            kernel_size=[kernel_size] * levels, strides=[1] + [2] * (levels - 1),
            upsample_kernel_size=[2] * (levels - 1), filters=filters,
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": float(negative_slope)}),
            res_block=bool(res_block),
        )

    @property
    def head(self) -> nn.Conv3d:
        """The output layer (DynUNet's 1x1x1 ``output_block`` convolution): what
        :class:`qsmlab.methods.QSMMethod` zero-initialises under ``model.prior`` (an untrained net adds 0)."""
        return self.net.output_block.conv.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, X, Y, Z] -> [B, out_channels, X, Y, Z]``. With autograd enabled this is
        MONAI's ``DynUNet.forward``; without it, :meth:`_lean_forward`, the same function in less
        memory (plain blocks only; residual blocks always take MONAI's path)."""
        check_input(self, x, self.in_channels)
        if (torch.is_grad_enabled() or self.net.conv_block is not UnetBasicBlock
                or self.net.upsamples[0].transp_conv.conv.bias is not None):
            return self.net(x)
        return self._lean_forward(x)

    @staticmethod
    def _block_steps(block: UnetBasicBlock):
        """The layers of a MONAI ``UnetBasicBlock`` as in-place-friendly steps (conv, norm+act, ...)."""
        for conv, norm in ((block.conv1, block.norm1), (block.conv2, block.norm2)):
            yield conv
            yield lambda y, norm=norm: block.lrelu(norm_inplace(norm, y))  # lrelu is in place

    def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
        # DynUNetSkipLayer order: input block and down-samplings keep their outputs as skips; the
        # up blocks (deepest first) concatenate (transposed conv output, skip), in that order, which
        # fused_up_conv evaluates without forming the up-sampled map or the concatenation.
        net = self.net
        x = x.contiguous(memory_format=CHANNELS_LAST)
        skips = []
        for block in [net.input_block, *net.downsamples]:
            for step in self._block_steps(block):
                x = step(x)
            skips.append(x)
        for step in self._block_steps(net.bottleneck):
            x = step(x)
        for up in net.upsamples:
            block = up.conv_block
            x = block.lrelu(norm_inplace(block.norm1, fused_up_conv(
                skips.pop(), x, up.transp_conv.conv.weight, block.conv1.conv, skip_first=False)))
            x = block.lrelu(norm_inplace(block.norm2, block.conv2(x)))
        return net.output_block(x).contiguous()


def _img_size(img_size, option: str = "img_size") -> tuple[int, int, int]:
    size = (img_size,) * 3 if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 3 or any(isinstance(s, bool) or int(s) != s or s < _UNETR_PATCH or s % _UNETR_PATCH
                             for s in size):
        raise QSMInputError(f"{option} must be 3 positive multiples of {_UNETR_PATCH} (UNETR's patch size); "
                            f"got {img_size!r}")
    return tuple(int(s) for s in size)


class _UNETRNet(nn.Module):
    """UNETR with the fixed-size contract; subclasses set the channels."""

    size_multiple = _UNETR_PATCH

    def __init__(self, in_channels: int, out_channels: int, img_size, feature_size: int, hidden_size: int,
                 mlp_dim: int, num_heads: int):
        super().__init__()
        self.fixed_input_size = _img_size(img_size)
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "num_classes", minimum=2)
        hidden_size = check_positive_int(hidden_size, "hidden_size")
        num_heads = check_positive_int(num_heads, "num_heads")
        if hidden_size % num_heads:
            raise QSMInputError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.net = UNETR(
            in_channels=in_channels, out_channels=out_channels, img_size=self.fixed_input_size,
            feature_size=check_positive_int(feature_size, "feature_size"), hidden_size=hidden_size,
            mlp_dim=check_positive_int(mlp_dim, "mlp_dim"), num_heads=num_heads, proj_type="conv",
            norm_name="instance", res_block=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.in_channels)
        return self.net(x)


class SubcorticalUNETR(_UNETRNet):
    """Subcortical segmentation on reconstructed chi: ``[B, 1, *img_size]`` -> logits
    ``[B, num_classes, *img_size]`` (class 0 = background)."""

    def __init__(self, num_classes: int, img_size: Sequence[int] = (64, 64, 64), feature_size: int = 8,
                 hidden_size: int = 96, mlp_dim: int = 192, num_heads: int = 4):
        super().__init__(1, num_classes, img_size, feature_size, hidden_size, mlp_dim, num_heads)


class BrainMaskUNETR(_UNETRNet):
    """Brain masking: magnitude ``[B, in_channels, *img_size]`` -> logits ``[B, 2, *img_size]``
    (0 = background, 1 = brain)."""

    def __init__(self, img_size: Sequence[int] = (64, 64, 64), feature_size: int = 8, hidden_size: int = 96,
                 mlp_dim: int = 192, num_heads: int = 4, in_channels: int = 1):
        super().__init__(in_channels, 2, img_size, feature_size, hidden_size, mlp_dim, num_heads)
