"""Modulated deformable convolution (DCNv2) for 2D and 3D feature maps.

Reference: X. Zhu, H. Hu, S. Lin, J. Dai, "Deformable ConvNets v2: More Deformable, Better Results",
CVPR 2019 (DCNv2), building on J. Dai et al., "Deformable Convolutional Networks", ICCV 2017 (DCNv1).
For an output position p0 and the kernel points p_k (k = 1..K) of a regular kernel grid, DCNv2 computes

    y(p0) = sum_k  w_k * x(p0 * stride - padding + dilation * p_k + dp_k) * dm_k            (DCNv2, Eq. 3)

where dp_k is a learned fractional offset, dm_k in [0, 1] a learned modulation scalar and x(.) is
(bi/tri)linear interpolation with zeros outside the input.

What is in this module
----------------------
``deform_conv_nd``
    The memory-lean pure-PyTorch DCNv2 for N = 2 or 3 spatial dims (the only DCNv2 3D available for current torch;
    torchvision only has 2D), one ``torch.autograd.Function`` (``_DeformConvFunction``). Per chunk of kernel points
    the sampling positions ``out_idx * stride - padding + dilation * k + offset_k`` are computed in fp32 (fp64 for
    double inputs; no copy of an fp32 input), normalised for ``align_corners=True`` and sampled with ONE call of
    ``torch.nn.functional.grid_sample`` (mode ``'bilinear'`` = trilinear for 5D input, ``padding_mode='zeros'``;
    the chunk's kernel points stacked along the first output axis of the grid); the modulation multiplies the
    samples in place and a batched matmul over ``(C_in / groups) * K_chunk`` contracts them with the kernel.
    For backward it saves only input, offsets, mask and weight: the backward recomputes each chunk's samples and
    gets grad_input and the grid gradient from ``aten.grid_sampler_{2,3}d_backward``, grad_mask from the same
    samples (``sum_c dcols * samples``), grad_weight by a matmul. Peak memory of a layer: its inputs and output
    plus one chunk's samples and column gradients (``2 * C_in * kernel_chunk * voxels``) while it runs.
    Supported: stride, padding, dilation (per axis), conv groups, offset ("deformable") groups,
    ``mask=None`` (DCNv1), any float dtype (sampling runs in fp32 for half/bfloat16 inputs), axes of
    size 1 (such an axis is zero-padded to size 2 internally, because ``align_corners=True`` cannot
    address an axis of size 1: every normalised coordinate would map to voxel 0).
    Not supported: transposed deformable conv, 1D, double backward.
``deform_conv_cpu.deform_conv_cpu`` (own module)
    The compiled CPU kernel (C++, im2col + GEMM with the input channels-last, one fused sampling pass in backward;
    built on first use): what ``'auto'`` picks on the CPU. Same arguments and results as ``deform_conv_nd``, which
    stays the pure-PyTorch path for devices and machines without it.
``deform_conv_reference``
    The same computation by plain autograd (all kernel points at once; autograd keeps the ``C_in * K * voxels``
    samples twice, plain and modulated): the reference the tests compare the lean Function and the Triton kernels
    (``deform_conv_triton``) against.
``DeformConv``
    Module holding the kernel (and bias); ``backend`` picks the implementation per call (``resolve_backend``):
    ``'auto'`` = Triton on CUDA when triton is importable, else torchvision in 2D on CUDA, and the compiled CPU
    kernel on the CPU in 2D and 3D (the lean PyTorch path where it cannot be built); measured, torchvision's CPU
    kernels (naive backward) and the lean PyTorch path are several times slower there:
    ``benchmarks/deform_conv_and_lfam.py`` prints every backend side by side.
``ModulatedDeformConvBlock``
    A ``DeformConv`` with its own offset/mask predictor (``'full'``: a regular conv with the same kernel size,
    stride, padding and dilation, as in DCNv2; ``'separable'``: depthwise k^N + 1x1, about K times cheaper), whose
    last conv has zero weight and bias: offsets start at 0 = regular grid, the mask at sigmoid(0) = 0.5.
    ``forward(x, guide=None)`` predicts offsets and mask from ``guide`` (default: ``x``) and deforms ``x``; a
    different guide tensor (same spatial size, any channel count given as ``guide_channels``) is what SPA-DCN-Net
    and the decoder-guided LFAM use.

Offset / mask layout (identical to torchvision in 2D)
-----------------------------------------------------
* ``offset``: ``(B, N * G * K, *out)`` with ``G`` offset groups and ``K = prod(kernel_size)``; channel
  ``g * N * K + k * N + a`` holds the displacement of kernel point ``k`` of offset group ``g`` along
  spatial axis ``a`` in tensor order: ``(dy, dx)`` in 2D (torchvision's convention),
  ``(dz, dy, dx)`` in 3D. Kernel points are numbered like a row-major flattened ``(kd,) kh, kw``
  kernel, i.e. like ``weight.flatten(2)``.
* ``mask``: ``(B, G * K, *out)``, channel ``g * K + k``; used as given (NOT sigmoided inside).
* Offset group ``g`` covers input channels ``[g * C_in / G, (g + 1) * C_in / G)``.
* ``grid_sample`` wants the last grid axis ordered ``(x=W, y=H, z=D)``, the reverse of the tensor
  axes; the lean path writes each axis into its own contiguous plane of the grid (``grid_sample`` reads the grid
  through its strides), in reversed order.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from nnunet_ext.building_blocks.depthwise import DepthwiseConv3d

IntOrSeq = Union[int, Sequence[int]]

__all__ = ["deform_conv_nd", "deform_conv_reference", "DeformConv", "ModulatedDeformConvBlock",
           "deform_conv_output_size", "resolve_backend", "BACKENDS", "PREDICTORS"]

BACKENDS = ("auto", "cpp", "generic", "torchvision", "triton")
PREDICTORS = ("full", "separable")
# kernel points per chunk of the lean path (measured, see the module docstring)
DEFAULT_KERNEL_CHUNK = {2: 9, 3: 9}


def _ntuple(v: IntOrSeq, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    if len(v) != n:
        raise ValueError(f"{name} must be an int or have {n} entries, got {v}")
    return v


class _Geometry(NamedTuple):
    ksize: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    in_size: Tuple[int, ...]
    out_size: Tuple[int, ...]
    G: int  # offset groups
    groups: int  # conv groups

    @property
    def n(self) -> int:
        return len(self.ksize)

    @property
    def K(self) -> int:
        return math.prod(self.ksize)

    @property
    def L(self) -> int:
        return math.prod(self.out_size)


def deform_conv_output_size(in_size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                            padding: Sequence[int], dilation: Sequence[int]) -> Tuple[int, ...]:
    """Spatial output size of a (deformable) convolution, same formula as ``torch.nn.ConvNd``."""
    return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1
                 for i, k, s, p, d in zip(in_size, kernel_size, stride, padding, dilation))


def _geometry(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, mask: Optional[torch.Tensor],
              stride: IntOrSeq, padding: IntOrSeq, dilation: IntOrSeq) -> _Geometry:
    """Validate the shapes (clear errors naming the problem) and return the geometry of the call."""
    n = input.dim() - 2
    if n not in (2, 3):
        raise ValueError(f"deformable convolution supports 2 or 3 spatial dims, got input of shape "
                         f"{tuple(input.shape)}")
    if weight.dim() != n + 2:
        raise ValueError(f"weight must have {n + 2} dims for {n}D input, got {tuple(weight.shape)}")
    stride = _ntuple(stride, n, "stride")
    padding = _ntuple(padding, n, "padding")
    dilation = _ntuple(dilation, n, "dilation")
    B, c_in = input.shape[:2]
    in_size = tuple(input.shape[2:])
    c_out, c_in_per_group = weight.shape[:2]
    ksize = tuple(weight.shape[2:])
    K = math.prod(ksize)
    if c_in_per_group == 0 or c_in % c_in_per_group != 0:
        raise ValueError(f"input channels {c_in} not divisible by weight.shape[1] = {c_in_per_group}")
    groups = c_in // c_in_per_group
    if c_out % groups != 0:
        raise ValueError(f"output channels {c_out} not divisible by groups {groups}")
    out_size = deform_conv_output_size(in_size, ksize, stride, padding, dilation)
    if any(o <= 0 for o in out_size):
        raise ValueError(f"non-positive output size {out_size} for input {in_size}, kernel {ksize}")
    if offset.dim() != n + 2 or offset.shape[0] != B or tuple(offset.shape[2:]) != out_size \
            or offset.shape[1] == 0 or offset.shape[1] % (n * K) != 0:
        raise ValueError(f"offset must have shape (B={B}, {n}*G*K with K={K}, *{out_size}), "
                         f"got {tuple(offset.shape)}")
    G = offset.shape[1] // (n * K)
    if c_in % G != 0:
        raise ValueError(f"input channels {c_in} not divisible by offset groups {G}")
    if mask is not None and tuple(mask.shape) != (B, G * K, *out_size):
        raise ValueError(f"mask must have shape {(B, G * K, *out_size)}, got {tuple(mask.shape)}")
    return _Geometry(ksize, stride, padding, dilation, in_size, out_size, G, groups)


def _sampling_input(input: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """``input`` in the coordinate dtype (fp32, fp64 for double; no copy when it already is), with every axis of
    size 1 zero-padded to size 2 (``align_corners=True`` cannot address an axis of size 1), viewed as
    ``(B * G, C_in / G, *in)`` for ``grid_sample``."""
    x = input.to(torch.promote_types(input.dtype, torch.float32))
    if any(s == 1 for s in geo.in_size):
        pad = []
        for s in reversed(geo.in_size):
            pad += [0, 1 if s == 1 else 0]
        x = F.pad(x, pad)
    return x.reshape(x.shape[0] * geo.G, x.shape[1] // geo.G, *x.shape[2:])


def _grid_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-axis factor (tensor order) of the ``align_corners=True`` normalisation: -1 <-> 0, +1 <-> size - 1."""
    return torch.tensor([2.0 / (s - 1) for s in x.shape[2:]], device=x.device, dtype=x.dtype)


def _sampling_grid(x: torch.Tensor, offset: torch.Tensor, k0: int, k1: int, geo: _Geometry) -> torch.Tensor:
    """``grid_sample`` grid of kernel points ``k0 .. k1-1``, shape ``(B * G, Kc * out[0], *out[1:], N)``, last axis
    ordered (x, y[, z]): position ``o * stride - padding + dilation * k + offset_k`` normalised for
    ``align_corners=True`` (``x`` is the prepared input of ``_sampling_input``). One fused pass per axis: the
    normalised regular position (a small broadcastable tensor) plus ``scale * offset`` written into the grid."""
    n, K, Kc, out_size = geo.n, geo.K, k1 - k0, geo.out_size
    cdtype, device = x.dtype, x.device
    kidx = torch.stack(torch.meshgrid(*[torch.arange(k, device=device, dtype=cdtype) for k in geo.ksize],
                                      indexing="ij"), dim=-1).reshape(K, n)[k0:k1]
    B = offset.shape[0]
    off = offset.reshape(B, geo.G, K, n, *out_size)[:, :, k0:k1]
    terms = []  # per axis (normalised regular position, scale)
    for a in range(n):
        scale = 2.0 / (x.shape[2 + a] - 1)
        o = torch.arange(out_size[a], device=device, dtype=cdtype) * geo.stride[a] - geo.padding[a]
        view = [1] * n
        view[a] = out_size[a]
        terms.append(((o.view(1, *view) + geo.dilation[a] * kidx[:, a].view(Kc, *([1] * n))) * scale - 1, scale))
    if torch.is_grad_enabled() and offset.requires_grad:  # the autograd reference
        grid = torch.stack([base + scale * off[:, :, :, a] for a, (base, scale) in reversed(list(enumerate(terms)))],
                           dim=-1)
        return grid.view(B * geo.G, Kc * out_size[0], *out_size[1:], n)
    # one contiguous plane per axis (grid_sample reads the grid through its strides): no strided writes
    planes = torch.empty(B * geo.G, n, Kc, *out_size, device=device, dtype=cdtype)
    for a, (base, scale) in enumerate(terms):
        torch.add(base, off[:, :, :, a], alpha=scale, out=planes[:, n - 1 - a].view(B, geo.G, Kc, *out_size))
    return planes.view(B * geo.G, n, Kc * out_size[0], *out_size[1:]).movedim(1, -1)


def _mask_chunk(mask: torch.Tensor, k0: int, k1: int, geo: _Geometry, dtype: torch.dtype) -> torch.Tensor:
    """Modulation of kernel points ``k0 .. k1-1`` as ``(B, G, 1, Kc, L)`` (broadcasts over the channels)."""
    return mask.reshape(mask.shape[0], geo.G, 1, geo.K, geo.L)[:, :, :, k0:k1].to(dtype)


def _weight_chunk(weight: torch.Tensor, k0: int, k1: int, geo: _Geometry, dtype: torch.dtype) -> torch.Tensor:
    """Kernel of points ``k0 .. k1-1`` as ``(groups, C_out / groups, C_in / groups * Kc)`` (channel-major)."""
    c_out, cpg = weight.shape[:2]
    return weight.flatten(2)[:, :, k0:k1].reshape(geo.groups, c_out // geo.groups, cpg * (k1 - k0)).to(dtype)


def _chunks(K: int, kernel_chunk: int):
    return [(k0, min(K, k0 + kernel_chunk)) for k0 in range(0, K, kernel_chunk)]


class _DeformConvFunction(torch.autograd.Function):
    """Memory-lean DCNv2 (Eq. 3) as one autograd node: saves only input, offset, mask and weight.

    Forward, per chunk of kernel points: one ``grid_sample`` call samples all the chunk's points
    (``(B, G, C_in / G, Kc, L)``), the modulation multiplies them in place, a batched matmul contracts them with the
    chunk's kernel into the output. Backward, per chunk: the samples are recomputed (one ``grid_sample`` call),
    ``dcols = W_chunk^T @ grad_out``; ``grad_mask = sum_c dcols * samples``; ``grad_W += grad_out @ (mask *
    samples)^T``; ``aten.grid_sampler_{2,3}d_backward(mask * dcols)`` gives grad_input and the grid gradient, which
    the inverse normalisation turns into grad_offset. The transient memory is that of one chunk."""

    @staticmethod
    def forward(ctx, input, offset, mask, weight, geo: _Geometry, kernel_chunk: int):
        x = _sampling_input(input, geo)
        B = input.shape[0]
        c_out, cpg = weight.shape[:2]
        out = torch.zeros(B, geo.groups, c_out // geo.groups, geo.L, dtype=x.dtype, device=x.device)
        for k0, k1 in _chunks(geo.K, kernel_chunk):
            grid = _sampling_grid(x, offset, k0, k1, geo)
            s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            s = s.view(B, geo.G, -1, k1 - k0, geo.L)
            if mask is not None:
                s.mul_(_mask_chunk(mask, k0, k1, geo, x.dtype))
            cols = s.view(B, geo.groups, cpg * (k1 - k0), geo.L)
            out += torch.matmul(_weight_chunk(weight, k0, k1, geo, x.dtype), cols)
        ctx.save_for_backward(input, offset, mask, weight)
        ctx.geo, ctx.kernel_chunk = geo, kernel_chunk
        return out.view(B, c_out, *geo.out_size).to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, offset, mask, weight = ctx.saved_tensors
        geo = ctx.geo
        need_x, need_off, need_mask, need_w = ctx.needs_input_grad[:4]
        x = _sampling_input(input, geo)
        B, cdtype = input.shape[0], x.dtype
        c_out, cpg = weight.shape[:2]
        g = grad_out.to(cdtype).reshape(B, geo.groups, c_out // geo.groups, geo.L)
        sampler_backward = (torch.ops.aten.grid_sampler_2d_backward if geo.n == 2
                            else torch.ops.aten.grid_sampler_3d_backward)
        grad_x = torch.zeros_like(x) if need_x else None
        grad_off = offset.new_empty(B, geo.G, geo.K, geo.n, *geo.out_size, dtype=cdtype) if need_off else None
        grad_mask = mask.new_empty(B, geo.G, geo.K, geo.L, dtype=cdtype) if need_mask else None
        grad_w = weight.new_empty(geo.groups, c_out // geo.groups, cpg, geo.K, dtype=cdtype) if need_w else None
        scale = _grid_scale(x)
        for k0, k1 in _chunks(geo.K, ctx.kernel_chunk):
            Kc = k1 - k0
            grid = _sampling_grid(x, offset, k0, k1, geo)
            s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            s = s.view(B, geo.G, -1, Kc, geo.L)
            dcols = torch.matmul(_weight_chunk(weight, k0, k1, geo, cdtype).transpose(1, 2), g)
            dcols = dcols.view(B, geo.G, -1, Kc, geo.L)
            if mask is not None:
                m = _mask_chunk(mask, k0, k1, geo, cdtype)
                if need_mask:
                    grad_mask[:, :, k0:k1] = torch.linalg.vecdot(dcols, s, dim=2)
                s.mul_(m)
                dcols.mul_(m)
            if need_w:
                cols = s.view(B, geo.groups, cpg * Kc, geo.L)
                grad_w[..., k0:k1] = torch.matmul(g, cols.transpose(2, 3)).sum(0).view(geo.groups, -1, cpg, Kc)
            if need_x or need_off:
                gi, gg = sampler_backward(dcols.view(B * geo.G, -1, Kc * geo.out_size[0], *geo.out_size[1:]),
                                          x, grid, 0, 0, True, [need_x, True])
                if need_x:
                    grad_x += gi
                if need_off:
                    gg = gg.view(B, geo.G, Kc, *geo.out_size, geo.n)
                    for a in range(geo.n):
                        torch.mul(gg[..., geo.n - 1 - a], scale[a], out=grad_off[:, :, k0:k1, a])
        if need_x:
            grad_x = grad_x.view(B, -1, *grad_x.shape[2:])[(..., *[slice(0, s) for s in geo.in_size])]
            grad_x = grad_x.to(input.dtype)
        if need_off:
            grad_off = grad_off.view_as(offset).to(offset.dtype)
        if need_mask:
            grad_mask = grad_mask.view_as(mask).to(mask.dtype)
        if need_w:
            grad_w = grad_w.view(geo.groups, c_out // geo.groups, cpg, *geo.ksize).reshape_as(weight)
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_off, grad_mask, grad_w, None, None


def deform_conv_nd(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, stride: IntOrSeq = 1, padding: IntOrSeq = 0,
                   dilation: IntOrSeq = 1, mask: Optional[torch.Tensor] = None, *,
                   kernel_chunk: Optional[int] = None) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2, Zhu et al. 2019, Eq. 3) for 2D or 3D input: the memory-lean
    pure-PyTorch path (``_DeformConvFunction``).

    Same signature and semantics as ``torchvision.ops.deform_conv2d`` (and the same offset/mask layout, see the
    module docstring), generalised to N = 2 or 3 spatial dims.

    Args:
        input: ``(B, C_in, *in_size)``, N = 2 or 3 spatial dims.
        offset: ``(B, N * G * K, *out_size)``; per kernel point the displacement along each spatial
            axis in tensor order ((dy, dx) in 2D, (dz, dy, dx) in 3D), in voxels.
        weight: ``(C_out, C_in / groups, *kernel_size)``; ``groups`` (conv groups) is inferred as
            ``C_in // weight.shape[1]``, the number of offset groups ``G`` as
            ``offset.shape[1] // (N * K)`` (like torchvision).
        bias: ``(C_out,)`` or None.
        stride, padding, dilation: int or one entry per spatial axis.
        mask: ``(B, G * K, *out_size)`` modulation scalars (used as given), or None (= all ones, DCNv1).
        kernel_chunk: kernel points sampled per chunk (default ``DEFAULT_KERNEL_CHUNK[N]``): the transient memory is
            about ``2 * C_in * kernel_chunk * output voxels``; the result does not depend on it up to float rounding.

    Returns:
        ``(B, C_out, *out_size)`` in ``input``'s dtype.
    """
    geo = _geometry(input, offset, weight, mask, stride, padding, dilation)
    if kernel_chunk is None:
        kernel_chunk = DEFAULT_KERNEL_CHUNK[geo.n]
    kernel_chunk = max(1, min(int(kernel_chunk), geo.K))
    out = _DeformConvFunction.apply(input, offset, mask, weight, geo, kernel_chunk)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, *([1] * geo.n))
    return out


def deform_conv_reference(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, stride: IntOrSeq = 1, padding: IntOrSeq = 0,
                          dilation: IntOrSeq = 1, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DCNv2 (Eq. 3) by plain autograd: all ``C_in * K * voxels`` samples in one ``grid_sample`` call, modulated and
    contracted with the kernel by a batched matmul; autograd keeps the samples (twice: plain and modulated) for
    backward. The reference the tests compare ``deform_conv_nd`` (and the Triton kernels) against; same arguments."""
    geo = _geometry(input, offset, weight, mask, stride, padding, dilation)
    x = _sampling_input(input, geo)
    B = input.shape[0]
    c_out, cpg = weight.shape[:2]
    grid = _sampling_grid(x, offset, 0, geo.K, geo)
    s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True).view(B, geo.G, -1, geo.K,
                                                                                                geo.L)
    if mask is not None:
        s = s * _mask_chunk(mask, 0, geo.K, geo, x.dtype)
    out = torch.matmul(_weight_chunk(weight, 0, geo.K, geo, x.dtype), s.reshape(B, geo.groups, cpg * geo.K, geo.L))
    out = out.reshape(B, c_out, *geo.out_size)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, c_out, *([1] * geo.n))
    return out.to(input.dtype)


def resolve_backend(backend: str, dim: int, device: Union[str, torch.device]) -> str:
    """The implementation ``backend`` stands for on ``device`` for ``dim``-D input.

    ``'auto'`` (by measurement, ``benchmarks/deform_conv_and_lfam.py``): CUDA with triton importable -> ``'triton'``
    (``deform_conv_triton``); CUDA without triton -> ``'torchvision'`` in 2D (compiled CUDA kernels), ``'generic'`` in
    3D; CPU -> ``'cpp'`` (the compiled CPU kernel of ``deform_conv_cpu``) in 2D and 3D, or ``'generic'`` (the lean
    PyTorch path) where that kernel cannot be built. torchvision's CPU kernels are not chosen: their backward is
    naive, measured at many times the other paths; the Triton kernels only run on CPU under the interpreter, for
    tests. Explicit names are checked: ``'torchvision'`` is 2D only, ``'triton'`` needs triton and a CUDA tensor (or
    ``TRITON_INTERPRET=1``), ``'cpp'`` a CPU tensor and a buildable kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
    if backend == "torchvision" and dim != 2:
        raise ValueError("torchvision only implements 2D deformable convolution; use backend='generic' or 'auto'")
    device = torch.device(device)
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        from nnunet_ext.building_blocks.deform_conv_triton import triton_deform_conv_available
        available = triton_deform_conv_available(device)
        if backend == "triton":
            if not available:
                raise RuntimeError(f"backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on the "
                                   f"CPU); not available for device {device}")
            return "triton"
        if available:
            return "triton"
        return "torchvision" if dim == 2 else "generic"
    if backend == "cpp" or (backend == "auto" and device.type == "cpu"):
        from nnunet_ext.building_blocks.deform_conv_cpu import cpu_kernel_available
        if backend == "cpp" and (device.type != "cpu" or not cpu_kernel_available()):
            raise RuntimeError(f"backend='cpp' needs a CPU tensor and the compiled kernel "
                               f"(nnunet_ext.building_blocks.deform_conv_cpu); not available for device {device}")
        if cpu_kernel_available():
            return "cpp"
    return "generic" if backend == "auto" else backend


class DeformConv(nn.Module):
    """Modulated deformable convolution (DCNv2, Zhu et al. 2019) module, 2D or 3D.

    ``forward(x, offset, mask=None)`` with the layout described in the module docstring.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as in ``nn.ConvNd``.
        dim: 2 or 3.
        backend: one of ``BACKENDS``; ``'auto'`` picks per call from the input's device (``resolve_backend``),
            ``'cpp'`` the compiled CPU kernel (``deform_conv_cpu``), ``'generic'`` the lean PyTorch path
            (``deform_conv_nd``), ``'torchvision'``
            (``torchvision.ops.deform_conv2d``, 2D only), ``'triton'`` (``deform_conv_triton``).
    Offset groups are not a constructor argument: as in torchvision they follow from the channel
    count of the offset tensor passed to ``forward``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrSeq, dim: int,
                 stride: IntOrSeq = 1, padding: IntOrSeq = 0, dilation: IntOrSeq = 1, groups: int = 1,
                 bias: bool = True, backend: str = "auto"):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must be divisible "
                             f"by groups {groups}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
        if backend == "torchvision" and dim != 2:
            raise ValueError("torchvision only implements 2D deformable convolution; use backend='generic'")
        self.dim = dim
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _ntuple(kernel_size, dim, "kernel_size")
        self.stride = _ntuple(stride, dim, "stride")
        self.padding = _ntuple(padding, dim, "padding")
        self.dilation = _ntuple(dilation, dim, "dilation")
        self.groups = groups
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    @property
    def num_kernel_points(self) -> int:
        return math.prod(self.kernel_size)

    def reset_parameters(self) -> None:
        """Same default initialisation as ``nn.ConvNd``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def output_size(self, in_size: Sequence[int]) -> Tuple[int, ...]:
        return deform_conv_output_size(in_size, self.kernel_size, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        backend = resolve_backend(self.backend, self.dim, x.device)
        args = (x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if backend == "torchvision":
            from torchvision.ops import deform_conv2d
            return deform_conv2d(*args, mask=mask)
        if backend == "triton":
            from nnunet_ext.building_blocks.deform_conv_triton import deform_conv_triton
            return deform_conv_triton(*args, mask=mask)
        if backend == "cpp":
            from nnunet_ext.building_blocks.deform_conv_cpu import deform_conv_cpu
            return deform_conv_cpu(*args, mask=mask)
        return deform_conv_nd(*args, mask=mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, dim={self.dim}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class ModulatedDeformConvBlock(nn.Module):
    """DCNv2 (Zhu et al. 2019) with its own offset/mask predictor.

    ``forward(x, guide=None)``:
        om = offset_conv(guide if guide is not None else x)      # (B, (N + 1) * G * K, *out)
        offset, mask = om[:, :N*G*K], sigmoid(om[:, N*G*K:])      # layout as in the module docstring
        return DeformConv(x, offset, mask)

    Predictor (``predictor``):
        ``'full'``: ``offset_conv`` is a regular ``nn.ConvNd`` with the deformable conv's kernel size, stride,
            padding and dilation (DCNv2's design): ``guide_channels * (N + 1) * G * K * K`` multiply-adds per voxel.
        ``'separable'``: ``offset_conv`` is ``Sequential(depthwise k^N conv, 1x1 conv)`` (same kernel size, stride,
            padding and dilation on the depthwise part; ``DepthwiseConv3d`` in 3D): ``guide_channels * (K + (N + 1)
            * G * K)`` multiply-adds per voxel, i.e. about K times fewer (an interpretation: a depthwise-separable
            factorisation of the same receptive field; not in DCNv2).
    So ``guide`` must have the spatial size of ``x``. The predictor's last conv has zero weight and bias: at
    initialisation the sampling grid is the regular one and the modulation is a uniform 0.5, i.e. the block is a
    plain conv with half the kernel. With ``zero_init_weight=True`` the deformable kernel (and bias) start at zero
    too, so the block outputs exactly 0 (used for residual branches such as LFAM); note that then the predictor and
    the mask receive a zero gradient until the kernel has become non-zero (their gradient is proportional to the
    kernel).

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups, bias: of the deformable conv.
        dim: 2 or 3.
        padding: default ``dilation * (kernel_size - 1) // 2`` per axis ("same" for odd kernels).
        offset_groups: deformable groups G (``in_channels`` must be divisible by it).
        guide_channels: channels of the tensor the offsets are predicted from (default ``in_channels``).
        zero_init_weight: zero-initialise the deformable kernel and bias.
        backend: see ``DeformConv``.
        predictor: ``'full'`` (default) or ``'separable'``, see above.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrSeq, dim: int,
                 stride: IntOrSeq = 1, padding: Optional[IntOrSeq] = None, dilation: IntOrSeq = 1,
                 groups: int = 1, offset_groups: int = 1, bias: bool = True,
                 guide_channels: Optional[int] = None, zero_init_weight: bool = False,
                 backend: str = "auto", predictor: str = "full"):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if offset_groups < 1 or in_channels % offset_groups:
            raise ValueError(f"in_channels {in_channels} must be divisible by offset_groups {offset_groups}")
        if predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {predictor!r}, expected one of {PREDICTORS}")
        ks = _ntuple(kernel_size, dim, "kernel_size")
        dil = _ntuple(dilation, dim, "dilation")
        if padding is None:
            padding = tuple(d * (k - 1) // 2 for k, d in zip(ks, dil))
        self.dim = dim
        self.offset_groups = offset_groups
        self.predictor = predictor
        self.dcn = DeformConv(in_channels, out_channels, ks, dim, stride, padding, dil, groups, bias,
                              backend=backend)
        K = self.dcn.num_kernel_points
        self.n_offset_channels = dim * offset_groups * K
        self.n_mask_channels = offset_groups * K
        conv_op = nn.Conv2d if dim == 2 else nn.Conv3d
        self.guide_channels = in_channels if guide_channels is None else guide_channels
        n_pred = self.n_offset_channels + self.n_mask_channels
        geometry = dict(stride=self.dcn.stride, padding=self.dcn.padding, dilation=self.dcn.dilation)
        if predictor == "full":
            self.offset_conv = conv_op(self.guide_channels, n_pred, ks, bias=True, **geometry)
        elif dim == 3:
            self.offset_conv = nn.Sequential(DepthwiseConv3d(self.guide_channels, ks, **geometry),
                                             conv_op(self.guide_channels, n_pred, 1))
        else:
            self.offset_conv = nn.Sequential(conv_op(self.guide_channels, self.guide_channels, ks,
                                                     groups=self.guide_channels, **geometry),
                                             conv_op(self.guide_channels, n_pred, 1))
        self.reset_offset_predictor()
        if zero_init_weight:
            self.zero_init_weight()

    def reset_offset_predictor(self) -> None:
        """Zero offsets (regular grid) and mask logits 0 (mask 0.5) at initialisation: the predictor's last conv
        has zero weight and bias."""
        last = self.offset_conv if self.predictor == "full" else self.offset_conv[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def zero_init_weight(self) -> None:
        nn.init.zeros_(self.dcn.weight)
        if self.dcn.bias is not None:
            nn.init.zeros_(self.dcn.bias)

    def predict_offset_and_mask(self, guide: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(offset, mask)``; the mask is already passed through the sigmoid."""
        om = self.offset_conv(guide)
        offset, mask_logits = torch.split(om, [self.n_offset_channels, self.n_mask_channels], dim=1)
        return offset, torch.sigmoid(mask_logits)

    def forward(self, x: torch.Tensor, guide: Optional[torch.Tensor] = None) -> torch.Tensor:
        offset, mask = self.predict_offset_and_mask(x if guide is None else guide)
        return self.dcn(x, offset, mask)
