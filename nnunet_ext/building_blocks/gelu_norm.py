"""``GroupNorm(GELU(z))`` with one channel per group (instance normalisation with a per-channel affine map), as one
compiled CPU pass per (sample, channel) plane (``csrc/gelu_instance_norm_cpu.cpp``): the GELU, the plane's mean and
variance and the normalisation while the plane is in cache, and in backward the GELU and the statistics recomputed
from ``z``, which is all that is kept (autograd through ``F.gelu`` then ``nn.GroupNorm`` keeps ``z`` and
``GELU(z)`` and passes over the map five times in forward and backward). Results do not depend on the thread count
(one thread per plane, the affine gradients summed over the samples in order). Elsewhere (other devices, dtypes,
``NNUNET_EXT_GELU_NORM_CPU_KERNEL=0``, no C++ compiler): ``norm(F.gelu(z))``. Both give the same result up to
float rounding (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from nnunet_ext.building_blocks.cpu_extension import load_cpu_extension

_NAME = "nnunet_ext_gelu_instance_norm_cpu"  # the ops' namespace (torch.ops.<_NAME>)
# planes of fewer elements go to F.gelu + nn.GroupNorm: the kernel's per-plane cost (PyTorch's GELU called per plane)
# dominates there. fwd+bwd, batch 4, 2 threads: 96 ch at 256^2 95.6 ms fused against 136.5 unfused, 192 at 128^2
# 55.9 against 65.3, but 384 at 64^2 37.1 against 23.8 and 1536 at 16^2 98.4 against 3.7
MIN_PLANE = 128 * 128


def gelu_norm_kernel_available() -> bool:
    """Build (first call on a machine) or load the kernel; False (with a warning) when it cannot be built."""
    return load_cpu_extension("gelu_instance_norm_cpu.cpp", _NAME, "GELU + instance-norm CPU kernel",
                              "NNUNET_EXT_GELU_NORM_CPU_KERNEL")


class _GeluInstanceNormCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, gamma, beta, eps):
        ctx.save_for_backward(z, gamma, beta)
        ctx.eps = eps
        return getattr(torch.ops, _NAME).forward(z, gamma, beta, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        z, gamma, beta = ctx.saved_tensors
        grad_z, grad_gamma, grad_beta = getattr(torch.ops, _NAME).backward(grad, z, gamma, beta, ctx.eps)
        need = ctx.needs_input_grad
        return (grad_z if need[0] else None, grad_gamma if need[1] else None, grad_beta if need[2] else None, None)


def gelu_group_norm(z: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(F.gelu(z))`` for a ``norm`` with one channel per group and an affine map; fused on the CPU for planes
    of at least ``MIN_PLANE`` elements."""
    if (z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64) and z.dim() >= 3
            and norm.num_groups == norm.num_channels == z.shape[1] and norm.affine
            and norm.weight.dtype == z.dtype and z[0, 0].numel() >= max(MIN_PLANE, 2)
            and gelu_norm_kernel_available()):
        return _GeluInstanceNormCPU.apply(z.contiguous(), norm.weight, norm.bias, norm.eps)
    return norm(F.gelu(z))
