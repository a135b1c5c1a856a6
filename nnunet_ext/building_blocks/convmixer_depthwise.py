"""The depth-wise half of a ConvMixer block (Trockman & Kolter, "Patches Are All You Need?", Eq. 2),
``p + GroupNorm(GELU(DWConv(p)))`` with one channel per group, as one compiled CPU pass per (sample, channel) plane
(``csrc/convmixer_depthwise_cpu.cpp``).

Composed from the separate kernels (``DepthwiseConv2d``, then ``gelu_group_norm``, then the residual add), the block
writes the conv output, reads it back, writes the norm output, reads it and ``p`` for the sum, and its backward
passes over the maps three more times; these maps do not fit in cache at SCRNet's high-resolution stages, so the time
goes to memory traffic. The fused pass reads ``p`` and writes the result; its backward recomputes the conv of a plane
from ``p`` (the only map kept) and gives ``dL/dp`` and the parameter gradients in one pass. Results do not depend on
the thread count (one thread per plane; the parameter gradients summed over the samples in order).

Used where both kernels apply (2D, float32/64, stride 1, odd square kernel, "same" padding, a bias, planes of at
least ``gelu_norm.MIN_PLANE`` elements: the GELU is PyTorch's, called per plane) and neither is switched off
(``NNUNET_EXT_DEPTHWISE_CPU_KERNEL=0``, ``NNUNET_EXT_GELU_NORM_CPU_KERNEL=0``), or by
``NNUNET_EXT_CONVMIXER_CPU_KERNEL=0``; elsewhere the composition. Both give the same result up to float rounding
(tested).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from nnunet_ext.building_blocks import gelu_norm
from nnunet_ext.building_blocks.cpu_extension import load_cpu_extension
from nnunet_ext.building_blocks.depthwise import DepthwiseConv2d, depthwise_conv_flops
from nnunet_ext.building_blocks.gelu_norm import gelu_group_norm

_NAME = "nnunet_ext_convmixer_depthwise_cpu"  # the ops' namespace (torch.ops.<_NAME>)


def convmixer_kernel_available() -> bool:
    """Build (first call on a machine) or load the kernel; False (with a warning) when it cannot be built."""
    return load_cpu_extension("convmixer_depthwise_cpu.cpp", _NAME, "ConvMixer depth-wise CPU kernel",
                              "NNUNET_EXT_CONVMIXER_CPU_KERNEL")


class _ConvMixerDepthwiseCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, weight, bias, gamma, beta, dilation, eps):
        ctx.save_for_backward(p, weight, bias, gamma, beta)
        ctx.dilation, ctx.eps = dilation, eps
        return getattr(torch.ops, _NAME).forward(p, weight, bias, gamma, beta, dilation, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grads = getattr(torch.ops, _NAME).backward(grad, *ctx.saved_tensors, ctx.dilation, ctx.eps)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None)


def convmixer_flop_formulas() -> dict:
    """``torch.utils.flop_counter`` formulas of the compiled ops, counting their depthwise convolutions
    (``depthwise_conv_flops``): forward one pass; backward three (the recomputed conv,
    the input gradient and the weight gradient). Empty when the kernel is not available."""
    if not convmixer_kernel_available():
        return {}
    ops = getattr(torch.ops, _NAME)

    def forward(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return depthwise_conv_flops(x_shape, w_shape)

    def backward(grad_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 3 * depthwise_conv_flops(x_shape, w_shape)
    return {ops.forward: forward, ops.backward: backward}


def _fused_applies(p: torch.Tensor, depthwise: nn.Module, norm: nn.GroupNorm) -> bool:
    return (isinstance(depthwise, DepthwiseConv2d) and depthwise.bias is not None and depthwise._kernel_applies(p)
            and norm.num_groups == norm.num_channels == p.shape[1] and norm.affine and norm.weight.dtype == p.dtype
            and p[0, 0].numel() >= max(gelu_norm.MIN_PLANE, 2) and gelu_norm.gelu_norm_kernel_available()
            and convmixer_kernel_available())


def depthwise_gelu_norm_residual(p: torch.Tensor, depthwise: nn.Module, norm: nn.GroupNorm) -> torch.Tensor:
    """``p + norm(GELU(depthwise(p)))`` for a depthwise conv ``depthwise`` and a ``norm`` with one channel per group;
    fused on the CPU where it applies (module docstring)."""
    if _fused_applies(p, depthwise, norm):
        return _ConvMixerDepthwiseCPU.apply(p.contiguous(), depthwise.weight, depthwise.bias, norm.weight, norm.bias,
                                            depthwise.dilation[0], norm.eps)
    return gelu_group_norm(depthwise(p), norm).add_(p)
