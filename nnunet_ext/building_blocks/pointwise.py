"""1x1(x1) convolutions as batched matrix products, 2D and 3D.

``pointwise_conv(x, weight, bias, groups)`` computes ``F.conv2d`` / ``F.conv3d`` with a 1x1 kernel (stride 1) of a
standard-layout map as ``torch.bmm`` / ``torch.baddbmm`` of each sample's (and group's) ``(in / groups, voxels)``
matrix: the same function. ``PointwiseConv2d`` / ``PointwiseConv3d`` are ``nn.Conv2d`` / ``nn.Conv3d`` subclasses
(same parameters, initialisation and state dict) whose forward is ``pointwise_conv``; ``pointwise_conv_op(conv_op)``
picks the one matching a network's ``conv_op``.

Why: on the CPU, oneDNN reorders NCHW maps to its blocked layout and back around a 1x1 convolution, which dominates
at the widths these networks use. Measured forward + backward (CPU time, 2 threads, under load), convolution against
matrix product: SCRNet 32 -> 96 at 4 x 256^2 0.67 s / 0.41 s, 96 -> 96 in 3 groups 0.80 s / 0.46 s, 256 -> 768 at
32^2 0.13 s / 0.09 s; SPA-DCN-Net 32 -> 32 at 4 x 256^2 0.20 s / 0.08 s, 80 -> 80 at 128^2 0.086 s / 0.048 s (equal
at 144 channels, 64^2); DPC-Net's 32 -> 2 head at 2 x 32x64x64 0.09 s / 0.02 s, ``g_spa`` 64 -> 64 at 2 x 16x32x32
0.032 s / 0.021 s. The matrix product also gives the same bits with 1 and 2 threads; the oneDNN conv did not.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import nn

__all__ = ["pointwise_conv", "PointwiseConv2d", "PointwiseConv3d", "pointwise_conv_op"]


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   groups: int = 1) -> torch.Tensor:
    """``F.conv{2,3}d(x, weight, bias, groups=groups)`` for a 1x1(x1) ``weight`` (``(out, in / groups, 1, ...)``) as
    one batched matrix product per sample and group."""
    b, c = x.shape[:2]
    out = weight.shape[0]
    w = weight.reshape(1, groups, out // groups, c // groups).expand(b, -1, -1, -1).reshape(
        b * groups, out // groups, c // groups)
    columns = x.reshape(b * groups, c // groups, -1)
    if bias is None:
        y = torch.bmm(w, columns)
    else:
        y = torch.baddbmm(bias.reshape(1, groups, out // groups, 1).expand(b, -1, -1, -1).reshape(
            b * groups, out // groups, 1), w, columns)
    return y.view(b, out, *x.shape[2:])


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in, out, 1)`` computed by ``pointwise_conv``; same parameters and state dict."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv(x, self.weight, self.bias)


class PointwiseConv3d(nn.Conv3d):
    """``nn.Conv3d(in, out, 1)`` computed by ``pointwise_conv``; same parameters and state dict."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv(x, self.weight, self.bias)


def pointwise_conv_op(conv_op: Type[nn.Module]) -> Type[nn.Module]:
    """The 1x1 convolution class matching ``conv_op`` (``nn.Conv2d`` -> ``PointwiseConv2d``, 3D likewise)."""
    return PointwiseConv2d if convert_conv_op_to_dim(conv_op) == 2 else PointwiseConv3d
