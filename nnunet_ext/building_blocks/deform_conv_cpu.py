"""The compiled CPU kernel of the modulated deformable convolution (DCNv2, Zhu et al. 2019, Eq. 3), 2D and 3D.

``csrc/deform_conv_cpu.cpp`` (im2col + GEMM with the input kept channels-last, the sampling vectorised across blocks
of output voxels, one fused sampling pass in backward; its header comment has the design) is compiled on first use
by ``torch.utils.cpp_extension.load`` (about 25 s once per machine, cached in torch's extension directory,
``TORCH_EXTENSIONS_DIR``). ``cpu_kernel_available()`` says
whether it could be built; when it cannot (no C++ compiler), ``deform_conv.resolve_backend`` falls back to the
pure-PyTorch path with one warning. ``NNUNET_EXT_DCN_CPU_KERNEL=0`` disables it.

``deform_conv_cpu`` is the autograd Function around the two ops: it saves input, offset, mask and weight only (the
backward recomputes the samples chunk by chunk), like the pure-PyTorch lean path it replaces on the CPU.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from nnunet_ext.building_blocks.cpu_extension import load_cpu_extension
from nnunet_ext.building_blocks.deform_conv import IntOrSeq, _geometry

__all__ = ["cpu_kernel_available", "deform_conv_cpu", "CHUNK_BYTES"]

_NAME = "nnunet_ext_deform_conv_cpu"  # the ops' namespace (torch.ops.<_NAME>)
# bytes of one chunk of columns (and of column gradients in backward); each thread keeps two such buffers between
# calls.
# Small enough for the columns to stay in a core's L2 cache between the sampling and the GEMM (2D layer 16->16,
# 128^2: 512 KiB chunks took half the time of 8 MiB chunks; 256 KiB to 1 MiB within 5 % of each other)
CHUNK_BYTES = 512 * 2 ** 10


def cpu_kernel_available() -> bool:
    """Build (first call on a machine) or load the kernel; False (with a warning) when it cannot be built."""
    return load_cpu_extension("deform_conv_cpu.cpp", _NAME, "deformable-convolution CPU kernel",
                              "NNUNET_EXT_DCN_CPU_KERNEL")


class _DeformConvCPUFunction(torch.autograd.Function):
    """DCNv2 through the compiled ops; saves only input, offset, mask and weight."""

    @staticmethod
    def forward(ctx, input, offset, mask, weight, out_size, stride, padding, dilation, offset_groups, groups):
        ops = getattr(torch.ops, _NAME)
        out = ops.forward(input, offset, mask, weight, out_size, stride, padding, dilation, offset_groups, groups,
                          CHUNK_BYTES)
        ctx.save_for_backward(input, offset, mask, weight)
        ctx.conf = (stride, padding, dilation, offset_groups, groups)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, offset, mask, weight = ctx.saved_tensors
        ops = getattr(torch.ops, _NAME)
        need = ctx.needs_input_grad[:4]
        grads = ops.backward(grad_out, input, offset, mask, weight, *ctx.conf, need[0], need[1],
                             need[2] and mask is not None, need[3], CHUNK_BYTES)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 6


def deform_conv_cpu(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, stride: IntOrSeq = 1, padding: IntOrSeq = 0,
                    dilation: IntOrSeq = 1, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DCNv2 (Eq. 3) of CPU tensors by the compiled kernel; same arguments, layout and result as
    ``deform_conv.deform_conv_nd``. float32 and float64 run natively; half/bfloat16 inputs are computed in float32
    and returned in their dtype."""
    geo = _geometry(input, offset, weight, mask, stride, padding, dilation)
    if not cpu_kernel_available():
        raise RuntimeError("the deformable-convolution CPU kernel is not available (see the warning above)")
    cdtype = torch.promote_types(input.dtype, torch.float32)
    args = [t.to(cdtype) if t is not None else None for t in (input, offset, mask, weight)]
    out = _DeformConvCPUFunction.apply(*args, list(geo.out_size), list(geo.stride), list(geo.padding),
                                       list(geo.dilation), geo.G, geo.groups)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, *([1] * geo.n))
    return out.to(input.dtype)
