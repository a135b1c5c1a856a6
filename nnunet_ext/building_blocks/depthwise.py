"""Depthwise convolution whose 3D form runs as 2D depthwise convolutions over the depth slices on the CPU.

PyTorch's CPU kernels for grouped 3D convolutions with ``groups == channels`` are slow (measured on 2 cores, forward
+ backward of 2 x 96 x 16 x 32 x 32: 59 s for a 7x7x7 kernel with dilation 3, against 0.14 s for the 2D equivalent
on 2 x 96 x 64 x 64), while its 2D depthwise kernels are fast. A depthwise 3D convolution is a sum over the kernel's
depth taps of 2D depthwise convolutions of shifted depth slices:

    y[b, c, z] = sum_i conv2d(x_pad[b, c, z * s_d + i * d_d], w[c, 0, i])          (stride s, dilation d)

``DepthwiseConv3d`` is an ``nn.Conv3d`` (same parameters, state-dict keys and ``groups``) that computes that sum on
the CPU and calls ``nn.Conv3d`` (cuDNN) on other devices. Both give the same result up to float rounding (tested).

``DepthwiseConv2d`` is an ``nn.Conv2d`` that runs the compiled kernel ``csrc/depthwise_conv_cpu.cpp`` on the CPU for
stride 1, a square odd kernel and "same" padding (``dilation * (k // 2)``), float32/float64, maps of at least
``MIN_PLANE`` pixels: PyTorch's (oneDNN's) depthwise kernels on standard-layout maps run at 2-3 GFLOP/s. Measured
with 2 threads, 3x3, batch 4, forward + backward (input, weight and bias gradients): 96 channels at 256^2 229.6 ->
97.0 ms, 192 at 128^2 114.1 -> 54.5 ms, 384 at 64^2 37.0 -> 20.6 ms (forward alone 81.6 -> 40.2, 40.6 -> 22.5,
15.8 -> 6.0 ms). One thread computes a whole (sample, channel) plane and the weight gradient is summed over the
samples in order, so the results do not depend on the thread count. Other shapes, devices and dtypes, or
``NNUNET_EXT_DEPTHWISE_CPU_KERNEL=0``, or no C++ compiler: ``nn.Conv2d``. Both give the same result up to float
rounding (tested).
"""
import math
from typing import Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.conv import _ConvNd

from nnunet_ext.building_blocks.cpu_extension import load_cpu_extension

_NAME = "nnunet_ext_depthwise_conv_cpu"  # the ops' namespace (torch.ops.<_NAME>)


def depthwise_kernel_available() -> bool:
    """Build (first call on a machine) or load the compiled depthwise kernel; False (with a warning) when it cannot
    be built, or when ``NNUNET_EXT_DEPTHWISE_CPU_KERNEL=0``."""
    return load_cpu_extension("depthwise_conv_cpu.cpp", _NAME, "depthwise-convolution CPU kernel",
                              "NNUNET_EXT_DEPTHWISE_CPU_KERNEL")


class _DepthwiseConv2dCPU(torch.autograd.Function):
    """The compiled depthwise convolution; saves the input and the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, dilation):
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        return getattr(torch.ops, _NAME).forward(x, weight, bias, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = getattr(torch.ops, _NAME).backward(grad, x, weight, ctx.dilation, need_x, need_w,
                                                                   need_b and ctx.has_bias)
        return (grad_x if need_x else None, grad_w if need_w else None,
                grad_b if need_b and ctx.has_bias else None, None)


# maps with fewer pixels go to oneDNN, faster there (fwd+bwd, 3x3, batch 4, 2 threads: 384 channels at 64^2 21.1 ms
# kernel against 37.2 oneDNN, but 768 at 32^2 19.6 against 18.2 and 1536 at 16^2 14.9 against 4.1)
MIN_PLANE = 64 * 64


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``groups == channels`` (same parameters and state-dict keys) that runs the compiled kernel
    where it applies (see the module docstring)."""

    def __init__(self, channels: int, kernel_size, padding=0, dilation=1, stride=1, bias: bool = True):
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=channels, bias=bias)

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
                and self.weight.dtype == x.dtype and self.stride == (1, 1) and kh == kw and kh % 2 == 1
                and dh == dw and self.padding == (dh * (kh // 2),) * 2 and self.padding_mode == "zeros"
                and x.shape[-1] * x.shape[-2] >= MIN_PLANE
                and depthwise_kernel_available())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kernel_applies(x):
            return super().forward(x)
        return _DepthwiseConv2dCPU.apply(x.contiguous(), self.weight, self.bias, self.dilation[0])


class DepthwiseConv3d(nn.Conv3d):
    def __init__(self, channels: int, kernel_size, padding=0, dilation=1, stride=1, bias: bool = True):
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=channels, bias=bias)
        if isinstance(self.padding, str):
            raise ValueError("DepthwiseConv3d needs explicit padding")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        (pd, ph, pw), (dd, dh, dw), (sd, sh, sw) = self.padding, self.dilation, self.stride
        kd = self.kernel_size[0]
        b, c, d = x.shape[:3]
        d_out = (d + 2 * pd - dd * (kd - 1) - 1) // sd + 1
        slices = F.pad(x, (0, 0, 0, 0, pd, pd)).transpose(1, 2)  # (B, D + 2 pd, C, H, W)
        out = None
        for i in range(kd):
            taps = slices[:, i * dd: i * dd + (d_out - 1) * sd + 1: sd]  # (B, D_out, C, H, W)
            part = F.conv2d(taps.reshape(b * d_out, c, *x.shape[3:]), self.weight[:, :, i], None, (sh, sw),
                            (ph, pw), (dh, dw), c)
            out = part if out is None else out + part
        out = out.reshape(b, d_out, c, *out.shape[2:]).transpose(1, 2)
        if self.bias is not None:
            out = out + self.bias.view(1, c, 1, 1, 1)
        return out.contiguous()


def depthwise_conv_flops(x_shape, w_shape) -> int:
    """Floating-point operations of one depthwise convolution pass, 2 per multiply-add like a convolution's:
    ``2 B C H W k^2`` for an input ``(B, C, H, W)`` and a weight ``(C, 1, k, k)``."""
    return 2 * math.prod(x_shape) * math.prod(w_shape[2:])


def depthwise_flop_formulas() -> dict:
    """``torch.utils.flop_counter`` formulas of the compiled ops (2 per multiply-add, like a convolution's):
    forward ``2 B C H W k^2``; backward that per gradient of the input and of the weight. Empty when the kernel is
    not available."""
    if not depthwise_kernel_available():
        return {}
    ops = getattr(torch.ops, _NAME)

    def forward(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return depthwise_conv_flops(x_shape, w_shape)

    def backward(grad_shape, x_shape, w_shape, dilation, need_x, need_w, need_bias, out_shape=None, **kwargs) -> int:
        return depthwise_conv_flops(x_shape, w_shape) * (int(need_x) + int(need_w))
    return {ops.forward: forward, ops.backward: backward}


def depthwise_conv(conv_op: Type[_ConvNd], channels: int, kernel_size, padding=0, dilation: int = 1,
                   bias: bool = True) -> nn.Module:
    """A depthwise ``conv_op`` (``groups == channels``): ``DepthwiseConv2d`` in 2D, ``DepthwiseConv3d`` in 3D."""
    if conv_op is nn.Conv3d:
        return DepthwiseConv3d(channels, kernel_size, padding=padding, dilation=dilation, bias=bias)
    if conv_op is nn.Conv2d:
        return DepthwiseConv2d(channels, kernel_size, padding=padding, dilation=dilation, bias=bias)
    return conv_op(channels, channels, kernel_size, padding=padding, dilation=dilation, groups=channels, bias=bias)
