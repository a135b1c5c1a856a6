"""DLKUNet building blocks (Tang et al., DLKUNet, ``papers/dlkunet``; authors' code University-Pro/DLKUNet).

One code path for 2D and 3D: the dimension comes from ``conv_op`` (``nn.Conv2d`` / ``nn.Conv3d``); pooling,
transposed convolution and batch norm are the matching ops of ``dynamic_network_architectures``.

- ``DepthwiseSeparableConv``: depthwise k x k conv (bias) -> pointwise 1x1 conv (bias), the
  ``PointwiseConv(DepthwiseConv(.))`` of Eq. 1-2.
- ``LKA``: the attention part, Eq. 3-4: depthwise 5x5 (pad 2) -> depthwise 7x7 with dilation 3 (pad 9)
  -> 1x1 conv, then the Hadamard product with the block's input. The paper's text mentions a residual
  connection; neither its equations nor the authors' code have one, so there is none.
- ``DLKBlock``: EBlock (Sec. 3.2) and the convolution + attention part of the DFB (Sec. 3.3):
  DW -> BN -> ReLU -> DW -> BN -> ReLU -> LKA. Eq. 2 has no ReLU after the second BN; the authors' code
  (whose parameter counts Table 1 reports) has one, and so has this block.
- ``DecoderFusionBlock``: DFB (Sec. 3.3): transposed conv (kernel = stride, as the code's k2 s2; the
  text's "3x3, stride 1" cannot double a resolution) -> zero-pad to the skip's size -> cat(skip, up)
  -> ``DLKBlock(2C -> C)``.

In 3D every kernel is isotropic (5^3, 7^3 dilated, 3^3): the paper is 2D only. The depthwise convolutions are
``nnunet_ext.building_blocks.depthwise.depthwise_conv``: ``nn.Conv2d`` in 2D, and in 3D an ``nn.Conv3d`` that runs as
2D depthwise convolutions over depth slices on the CPU (PyTorch's grouped 3D kernels are slow there).
"""
from typing import Sequence, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import get_matching_batchnorm, get_matching_convtransp
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_ext.building_blocks.depthwise import depthwise_conv

IntOrSeq = Union[int, Sequence[int]]


class DepthwiseSeparableConv(nn.Module):
    """Depthwise conv (``kernel_size``, same padding, bias) followed by a pointwise 1x1 conv (bias)."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.depthwise = depthwise_conv(conv_op, in_channels, kernel_size, padding=kernel_size // 2)
        self.pointwise = conv_op(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class LKA(nn.Module):
    """Large kernel attention, Eq. 3-4: ``x * conv1x1(dwconv7_dil3(dwconv5(x)))``; output size = input size."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int):
        super().__init__()
        self.depthwise = depthwise_conv(conv_op, channels, 5, padding=2)
        self.depthwise_dilated = depthwise_conv(conv_op, channels, 7, padding=9, dilation=3)
        self.pointwise = conv_op(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pointwise(self.depthwise_dilated(self.depthwise(x)))


class DLKBlock(nn.Module):
    """EBlock / DFB convolution + attention part: DW -> BN -> ReLU -> DW -> BN -> ReLU -> LKA (no residual)."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int):
        super().__init__()
        norm_op = get_matching_batchnorm(conv_op)
        self.convs = nn.Sequential(
            DepthwiseSeparableConv(conv_op, in_channels, out_channels), norm_op(out_channels), nn.ReLU(inplace=True),
            DepthwiseSeparableConv(conv_op, out_channels, out_channels), norm_op(out_channels), nn.ReLU(inplace=True))
        self.lka = LKA(conv_op, out_channels)
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lka(self.convs(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of every conv output (nnU-Net's planner estimate): 1 depthwise at the input width,
        pointwise + depthwise + pointwise + 3 LKA convs at the output width."""
        return int(np.prod(input_size)) * (self.in_channels + 6 * self.out_channels)


def pad_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial axes of ``x`` to ``size``, half of the difference on each side (the extra
    voxel at the end), as the authors' ``F.pad(x1, [diffX // 2, diffX - diffX // 2, ...])``."""
    pads = []
    for have, want in zip(reversed(x.shape[2:]), reversed(size)):
        diff = want - have
        pads += [diff // 2, diff - diff // 2]
    return F.pad(x, pads) if any(pads) else x


class DecoderFusionBlock(nn.Module):
    """DFB: ``DLKBlock(cat(skip, pad_to(transpconv(below), skip)))``; ``below`` has ``in_channels``,
    the skip and the output have ``out_channels``; ``stride`` is the upsampling factor per axis."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, stride: IntOrSeq):
        super().__init__()
        self.upsample = get_matching_convtransp(conv_op)(in_channels, out_channels, stride, stride)
        self.block = DLKBlock(conv_op, 2 * out_channels, out_channels)

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = pad_to(self.upsample(below), skip.shape[2:])
        return self.block(torch.cat((skip, up), dim=1))

    def compute_conv_feature_map_size(self, skip_size: Sequence[int]) -> int:
        return int(np.prod(skip_size)) * self.block.out_channels + self.block.compute_conv_feature_map_size(skip_size)
