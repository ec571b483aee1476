"""A configurable 3D U-Net: the common skeleton of the uQSM, QSMnet and NeXtQSM networks.

Encoder-decoder with skip concatenations (Ronneberger et al., MICCAI 2015; 3D: Çiçek et al., MICCAI
2016). Level ``l`` (0 = full resolution) has ``width * 2**l`` channels and ``convs_per_level``
conv-norm-activation layers with ``kernel_size³`` kernels; ``depth`` 2³ max-poolings lead to the
bottleneck at level ``depth``; the decoder upsamples, concatenates the skip of the same level (skip
first) and applies ``convs_per_level`` layers; a linear ``out_kernel_size³`` convolution gives the
output. Input ``[B, in_channels, X, Y, Z]`` -> ``[B, out_channels, X, Y, Z]``; X, Y, Z multiples of
``2**depth``.

Up path (``upsample``):
- ``"transposed"``: a learned 2³ transposed convolution with stride 2 (``c_{l+1} -> c_l``), as in the
  original U-Net. Its eight output parities have their own weights, so even a constant input yields a
  period-2 (checkerboard) pattern (Odena et al., Distill 2016).
- ``"nearest"``: a 1³ convolution (``c_{l+1} -> c_l``) at the coarse level, then nearest-neighbour
  upsampling. Pointwise convolution and replication commute, so this is "upsample, then 1³ conv" at an
  eighth of the cost, and it is the transposed variant with all eight parities sharing one weight: the
  two options differ only in that, which is the uQSM checkerboard ablation.

Either up path is evaluated fused with the decoder's first convolution (:func:`fused_up_conv`): the
same function, without materialising the up-sampled map or the concatenation. Feature maps are kept
channels-last inside the network. Together these keep a full-volume forward at about two
full-resolution ``width``-channel maps at its widest point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qsmlab.models._blocks import (
    ACTIVATIONS,
    NORMS,
    ConvNormAct,
    check_choice,
    check_input,
    check_positive_int,
)

UPSAMPLE_MODES = ("nearest", "transposed")
# Feature maps are kept channels-last (NDHWC) inside the network: oneDNN convolves that layout directly,
# whereas a standard NCDHW map is reordered to a blocked layout and back around every convolution (two
# extra copies of the widest map, and about twice the time on CPU).
CHANNELS_LAST = torch.channels_last_3d


def fused_up_conv(skip: torch.Tensor, coarse: torch.Tensor, up_weight: torch.Tensor, conv: nn.Conv3d,
                  skip_first: bool = True, fold: bool | None = None) -> torch.Tensor:
    """``conv(cat([skip, up(coarse)]))``, on large grids without forming ``up(coarse)`` or the concatenation.

    ``up`` is a stride-2, 2³ transposed convolution with weight ``up_weight`` ``[C_coarse, C_up, 2, 2, 2]``
    (no bias) and ``conv`` a ``k³`` convolution with 'same' zero padding over the concatenated channels
    (skip first, or last with ``skip_first=False``). Split the convolution by input channels,
    ``conv(cat(s, u)) = conv_s(s) + conv_u(u)``; then ``conv_u`` after the up-sampling is one stride-2
    transposed convolution of ``coarse`` with the ``(k+1)³`` kernel ``W' = T ⊛ W_u`` (the full
    convolution of the two kernels, contracted over ``C_up``; padding ``k // 2`` reproduces the zero
    padding of the up-sampled map exactly). Per output voxel that costs ``C_coarse·C·(k+1)³/8``
    instead of ``C·C_up·k³`` multiply-adds, and only two full-resolution maps of ``C`` channels are
    alive at once instead of four (skip, up-sampled, concatenation, output).

    Composing the kernels costs ``C_coarse·C·C_up·k³·(k+1)³`` whatever the grid, so ``fold=None`` folds
    only when that is under an eighth of ``conv_u`` on the grid (the wide, fine levels, where the memory
    is); ``True`` / ``False`` force either path. ``skip`` is released as soon as its half is done when
    the caller passes it without keeping a reference (``skips.pop()``).
    """
    cs = skip.shape[1]
    w = conv.weight
    k = w.shape[-1]
    if fold is None:
        fold = skip.shape[2] * skip.shape[3] * skip.shape[4] >= 8 * up_weight.shape[0] * (k + 1) ** 3
    if not fold:
        up = F.conv_transpose3d(coarse, up_weight, stride=2)
        return conv(torch.cat([skip, up] if skip_first else [up, skip], dim=1))
    ws, wu = (w[:, :cs], w[:, cs:]) if skip_first else (w[:, w.shape[1] - cs:], w[:, :w.shape[1] - cs])
    y = F.conv3d(skip, ws, conv.bias, padding=k // 2)
    del skip
    w_eff = F.conv3d(F.pad(up_weight, [k - 1] * 6), wu)  # [C_coarse, C, k+1, k+1, k+1]
    return y.add_(F.conv_transpose3d(coarse, w_eff, stride=2, padding=k // 2))


class UNet3d(nn.Module):
    """Configurable 3D U-Net (see the module docstring for the architecture and the up-path options).

    Args:
        in_channels, out_channels: input / output channels.
        width: channels at full resolution; level ``l`` has ``width * 2**l``.
        depth: number of 2³ max-poolings; ``size_multiple = 2**depth``.
        kernel_size: odd convolution size (3 for uQSM/NeXtQSM, 5 for QSMnet).
        convs_per_level: conv-norm-act layers per level and per path.
        norm: ``"batch"``, ``"instance"`` or ``"none"`` (then convolutions carry a bias).
        activation: ``"relu"`` or ``"leaky_relu"`` (with ``negative_slope``).
        upsample: ``"nearest"`` or ``"transposed"``.
        out_kernel_size: size of the final linear convolution (1 or 3).
    """

    fixed_input_size = None

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 16, depth: int = 4,
                 kernel_size: int = 3, convs_per_level: int = 2, norm: str = "batch",
                 activation: str = "relu", negative_slope: float = 0.01, upsample: str = "nearest",
                 out_kernel_size: int = 1):
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        width = check_positive_int(width, "width")
        self.depth = check_positive_int(depth, "depth", minimum=0)
        kernel_size = check_positive_int(kernel_size, "kernel_size")
        out_kernel_size = check_positive_int(out_kernel_size, "out_kernel_size")
        if kernel_size % 2 == 0 or out_kernel_size % 2 == 0:
            raise ValueError(f"kernel_size and out_kernel_size must be odd ('same' padding); "
                             f"got {kernel_size} and {out_kernel_size}")
        convs = check_positive_int(convs_per_level, "convs_per_level")
        check_choice(norm, NORMS, "norm")
        check_choice(activation, ACTIVATIONS, "activation")
        self.upsample = check_choice(upsample, UPSAMPLE_MODES, "upsample")
        self.size_multiple = 2 ** self.depth

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(*[ConvNormAct(cin if i == 0 else cout, cout, kernel_size, norm, activation,
                                               negative_slope) for i in range(convs)])

        ch = [width * 2 ** level for level in range(self.depth + 1)]
        self.encoders = nn.ModuleList(block(in_channels if lv == 0 else ch[lv - 1], ch[lv])
                                      for lv in range(self.depth))
        self.bottleneck = block(in_channels if self.depth == 0 else ch[-2], ch[-1])
        # No bias on the up path: the next convolution's own bias (or normalisation) absorbs a constant,
        # and without one the up path folds exactly into that convolution (see fused_up_conv).
        if upsample == "transposed":
            self.ups = nn.ModuleList(nn.ConvTranspose3d(ch[lv + 1], ch[lv], 2, stride=2, bias=False)
                                     for lv in range(self.depth))
        else:
            self.ups = nn.ModuleList(nn.Conv3d(ch[lv + 1], ch[lv], 1, bias=False) for lv in range(self.depth))
        self.decoders = nn.ModuleList(block(2 * ch[lv], ch[lv]) for lv in range(self.depth))
        self.head = nn.Conv3d(ch[0], out_channels, out_kernel_size, padding=out_kernel_size // 2)
        # Channels-last weights make every convolution output channels-last, even from a one-channel
        # input whose layout is ambiguous (see CHANNELS_LAST); .to()/.double()/load_state_dict keep it.
        self.to(memory_format=CHANNELS_LAST)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.in_channels)
        x = x.contiguous(memory_format=CHANNELS_LAST)
        skips = []
        for enc in self.encoders:
            for layer in enc:
                x = layer(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        for layer in self.bottleneck:
            x = layer(x)
        # Coarse to fine. Layers are applied one by one on a rebound local so that each input map is
        # freed as soon as the next layer has consumed it (full-volume inference memory).
        for lv in reversed(range(self.depth)):
            first, *rest = self.decoders[lv]
            x = first.finish(fused_up_conv(skips.pop(), x, self.up_weight(lv), first.conv))
            for layer in rest:
                x = layer(x)
        return self.head(x).contiguous()

    def up_weight(self, level: int) -> torch.Tensor:
        """The up path into ``level`` as a stride-2 transposed-convolution weight ``[c_{l+1}, c_l, 2, 2, 2]``:
        the learned one, or for ``"nearest"`` the 1³ convolution repeated over the eight parities."""
        w = self.ups[level].weight
        if self.upsample == "transposed":
            return w
        return w[:, :, 0, 0, 0].t()[..., None, None, None].expand(-1, -1, 2, 2, 2)
