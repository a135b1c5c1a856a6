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
    Functional, pure-PyTorch implementation for N = 2 or 3 spatial dims (the only DCNv2 3D available
    for current torch; torchvision only has 2D). Per kernel point the sampling positions
    ``out_idx * stride - padding + dilation * k + offset_k`` are computed in fp32 (fp64 for double
    inputs), normalised for ``align_corners=True`` and sampled with ONE call of
    ``torch.nn.functional.grid_sample`` (mode ``'bilinear'`` = trilinear for 5D input,
    ``padding_mode='zeros'``; all K kernel points are stacked along the first output axis of the
    grid). The samples are multiplied by the modulation mask and contracted with the kernel like a
    1x1(x1) convolution (a batched matmul over ``(C_in / groups) * K``).
    Supported: stride, padding, dilation (per axis), conv groups, offset ("deformable") groups,
    ``mask=None`` (DCNv1), any float dtype (sampling runs in fp32 for half/bfloat16 inputs), axes of
    size 1 (such an axis is zero-padded to size 2 internally, because ``align_corners=True`` cannot
    address an axis of size 1: every normalised coordinate would map to voxel 0).
    Not supported: transposed deformable conv, 1D.
``DeformConv``
    Module holding the kernel (and bias). 2D uses ``torchvision.ops.deform_conv2d`` (compiled kernels,
    CPU and CUDA), 3D uses ``deform_conv_nd``; ``backend='generic'`` forces the PyTorch
    implementation in 2D too (on CPU it is the faster one: torchvision's CPU backward is naive; with
    B=1, 16->16 channels, 128^2, k=3, fwd+bwd took 0.07 s generic vs 0.48 s torchvision on 2 cores).
    ``checkpoint=True`` evaluates the generic path in chunks of kernel points under
    ``torch.utils.checkpoint``: only input, offsets and mask are kept for backward (not the
    ``C_in * K * voxels`` samples) and the transient peak is one chunk's; costs one extra sampling
    pass (32^3, 16 channels: tensor peak 230 -> 93 MiB, time x1.3 on CPU).
    Works under ``torch.compile`` (``fullgraph=True``; no data-dependent Python control flow).

Memory of the PyTorch path: it materialises the ``C_in * K * voxels`` samples twice (plain and
modulated, both kept for backward), so at full resolution in 3D it costs ~2 * 27 = 54 copies of the
input feature map; ``checkpoint=True`` or applying it only at coarser levels bounds that.
``ModulatedDeformConvBlock``
    A ``DeformConv`` with its own offset/mask predictor (a regular conv with the same kernel size,
    stride, padding and dilation, zero-initialised weight and bias: offsets start at 0 = regular
    grid, the mask at sigmoid(0) = 0.5). ``forward(x, guide=None)`` predicts offsets and mask from
    ``guide`` (default: ``x``) and deforms ``x``; a different guide tensor (same spatial size, any
    channel count given as ``guide_channels``) is what SPA-DCN-Net and the decoder-guided LFAM use.

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
  axes; the implementation flips it once, after normalisation.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

IntOrSeq = Union[int, Sequence[int]]

__all__ = ["deform_conv_nd", "DeformConv", "ModulatedDeformConvBlock", "deform_conv_output_size"]


def _ntuple(v: IntOrSeq, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    if len(v) != n:
        raise ValueError(f"{name} must be an int or have {n} entries, got {v}")
    return v


def deform_conv_output_size(in_size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                            padding: Sequence[int], dilation: Sequence[int]) -> Tuple[int, ...]:
    """Spatial output size of a (deformable) convolution, same formula as ``torch.nn.ConvNd``."""
    return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1
                 for i, k, s, p, d in zip(in_size, kernel_size, stride, padding, dilation))


def deform_conv_nd(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, stride: IntOrSeq = 1, padding: IntOrSeq = 0,
                   dilation: IntOrSeq = 1, mask: Optional[torch.Tensor] = None, *,
                   checkpoint: bool = False, kernel_chunk: Optional[int] = None) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2, Zhu et al. 2019) for 2D or 3D input, pure PyTorch.

    Same signature and semantics as ``torchvision.ops.deform_conv2d`` (and the same offset/mask layout,
    see the module docstring), generalised to N = 2 or 3 spatial dims.

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
        checkpoint: if True (and grad is enabled) each chunk of kernel points is evaluated under
            ``torch.utils.checkpoint``: nothing of size ``C_in * K * voxels`` is kept for backward and
            the transient peak is that of one chunk; costs one extra sampling pass in backward.
        kernel_chunk: kernel points per chunk (default: all K at once without checkpointing,
            ``ceil(K / 3)`` with it). Chunks are summed; the result does not depend on the chunking
            up to float rounding.

    Returns:
        ``(B, C_out, *out_size)`` in ``input``'s dtype.
    """
    n = input.dim() - 2
    if n not in (2, 3):
        raise ValueError(f"deform_conv_nd supports 2 or 3 spatial dims, got input of shape {tuple(input.shape)}")
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

    # coordinates and sampling in fp32 (fp64 for double input)
    cdtype = torch.promote_types(input.dtype, torch.float32)
    x = input.to(cdtype)
    # align_corners=True cannot address an axis of size 1; pad such axes with one zero voxel at the end
    if any(s == 1 for s in in_size):
        pad = []
        for s in reversed(in_size):
            pad += [0, 1 if s == 1 else 0]
        x = F.pad(x, pad)

    checkpoint = checkpoint and torch.is_grad_enabled()
    if kernel_chunk is None:
        kernel_chunk = -(-K // 3) if checkpoint else K
    kernel_chunk = max(1, min(int(kernel_chunk), K))
    geometry = (ksize, stride, padding, dilation, out_size, G, groups)
    out = None
    for k0 in range(0, K, kernel_chunk):
        k1 = min(K, k0 + kernel_chunk)
        if checkpoint:
            part = _checkpoint(_deform_conv_kernel_points, x, offset, mask, weight, k0, k1, geometry,
                               use_reentrant=False)
        else:
            part = _deform_conv_kernel_points(x, offset, mask, weight, k0, k1, geometry)
        out = part if out is None else out + part
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, c_out, *([1] * n))
    return out.to(input.dtype)


def _deform_conv_kernel_points(x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor],
                               weight: torch.Tensor, k0: int, k1: int, geometry: tuple) -> torch.Tensor:
    """Contribution of kernel points ``k0 .. k1-1`` (flattened kernel order), without bias.
    ``x`` is already in the coordinate dtype and padded (size-1 axes); shapes are validated."""
    ksize, stride, padding, dilation, out_size, G, groups = geometry
    n = len(ksize)
    K = math.prod(ksize)
    Kc = k1 - k0
    B, c_in = x.shape[:2]
    in_size = tuple(x.shape[2:])
    c_out, c_in_per_group = weight.shape[:2]
    cdtype, device = x.dtype, x.device

    # regular sampling grid: position along axis a of kernel point k at output index o
    # base[k, *o, a] = o_a * stride_a - padding_a + dilation_a * k_a
    kidx = torch.stack(torch.meshgrid(*[torch.arange(k, device=device, dtype=cdtype) for k in ksize],
                                      indexing="ij"), dim=-1).reshape(K, n)[k0:k1]
    axes = []
    for a in range(n):
        o = torch.arange(out_size[a], device=device, dtype=cdtype) * stride[a] - padding[a]
        view = [1] * n
        view[a] = out_size[a]
        pos = o.view(1, *view) + dilation[a] * kidx[:, a].view(Kc, *([1] * n))
        axes.append(pos.expand(Kc, *out_size))
    base = torch.stack(axes, dim=-1)  # (Kc, *out, n)

    off = offset.reshape(B, G, K, n, *out_size)[:, :, k0:k1].to(cdtype).movedim(3, -1)  # (B, G, Kc, *out, n)
    # normalise for align_corners=True: -1 <-> voxel 0, +1 <-> voxel size-1
    scale = torch.tensor([2.0 / (s - 1) for s in in_size], device=device, dtype=cdtype)
    grid = off + base
    grid = grid.mul_(scale).sub_(1)
    grid = grid.flip(-1)  # grid_sample wants (x=W, y=H, z=D), tensors are (D, H, W)
    grid = grid.reshape(B * G, Kc * out_size[0], *out_size[1:], n)

    sampled = F.grid_sample(x.reshape(B * G, c_in // G, *in_size), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=True)
    sampled = sampled.view(B, G, c_in // G, Kc, *out_size)
    if mask is not None:
        m = mask.reshape(B, G, K, *out_size)[:, :, k0:k1].to(cdtype)
        sampled = sampled * m.unsqueeze(2)

    L = math.prod(out_size)
    # channels are ordered (G, C_in/G) == (groups, C_in/groups): contiguous C_in, then Kc
    cols = sampled.reshape(B, groups, c_in_per_group * Kc, L)
    w = weight.flatten(2)[:, :, k0:k1].reshape(groups, c_out // groups, c_in_per_group * Kc).to(cols.dtype)
    out = torch.matmul(w.unsqueeze(0), cols)  # (B, groups, C_out/groups, L)
    return out.reshape(B, c_out, *out_size)


class DeformConv(nn.Module):
    """Modulated deformable convolution (DCNv2, Zhu et al. 2019) module, 2D or 3D.

    ``forward(x, offset, mask=None)`` with the layout described in the module docstring.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as in ``nn.ConvNd``.
        dim: 2 or 3.
        backend: ``'auto'`` (2D: ``torchvision.ops.deform_conv2d``, 3D: ``deform_conv_nd``),
            ``'torchvision'`` (2D only) or ``'generic'`` (``deform_conv_nd`` also in 2D).
        checkpoint: generic path only: chunked + checkpointed evaluation (see ``deform_conv_nd``).
    Offset groups are not a constructor argument: as in torchvision they follow from the channel
    count of the offset tensor passed to ``forward``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrSeq, dim: int,
                 stride: IntOrSeq = 1, padding: IntOrSeq = 0, dilation: IntOrSeq = 1, groups: int = 1,
                 bias: bool = True, backend: str = "auto", checkpoint: bool = False):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must be divisible "
                             f"by groups {groups}")
        if backend not in ("auto", "torchvision", "generic"):
            raise ValueError(f"unknown backend {backend!r}")
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
        self.use_torchvision = dim == 2 and backend in ("auto", "torchvision")
        self.checkpoint = checkpoint
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
        if self.use_torchvision:
            from torchvision.ops import deform_conv2d
            return deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                                 dilation=self.dilation, mask=mask)
        return deform_conv_nd(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask,
                              checkpoint=self.checkpoint)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, dim={self.dim}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, backend={'torchvision' if self.use_torchvision else 'generic'}"
                f"{', checkpoint=True' if self.checkpoint else ''}")


class ModulatedDeformConvBlock(nn.Module):
    """DCNv2 (Zhu et al. 2019) with its own offset/mask predictor.

    ``forward(x, guide=None)``:
        om = offset_conv(guide if guide is not None else x)      # (B, (N + 1) * G * K, *out)
        offset, mask = om[:, :N*G*K], sigmoid(om[:, N*G*K:])      # layout as in the module docstring
        return DeformConv(x, offset, mask)

    The offset conv is a regular ``nn.ConvNd`` with the deformable conv's kernel size, stride, padding
    and dilation, so ``guide`` must have the spatial size of ``x``. Its weight and bias are
    zero-initialised: at initialisation the sampling grid is the regular one and the modulation is a
    uniform 0.5, i.e. the block is a plain conv with half the kernel. With ``zero_init_weight=True``
    the deformable kernel (and bias) start at zero too, so the block outputs exactly 0 (used for
    residual branches such as LFAM); note that then the offset conv and the mask receive a zero
    gradient until the kernel has become non-zero (their gradient is proportional to the kernel).

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups, bias: of the deformable conv.
        dim: 2 or 3.
        padding: default ``dilation * (kernel_size - 1) // 2`` per axis ("same" for odd kernels).
        offset_groups: deformable groups G (``in_channels`` must be divisible by it).
        guide_channels: channels of the tensor the offsets are predicted from (default ``in_channels``).
        zero_init_weight: zero-initialise the deformable kernel and bias.
        backend, checkpoint: see ``DeformConv``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrSeq, dim: int,
                 stride: IntOrSeq = 1, padding: Optional[IntOrSeq] = None, dilation: IntOrSeq = 1,
                 groups: int = 1, offset_groups: int = 1, bias: bool = True,
                 guide_channels: Optional[int] = None, zero_init_weight: bool = False,
                 backend: str = "auto", checkpoint: bool = False):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if offset_groups < 1 or in_channels % offset_groups:
            raise ValueError(f"in_channels {in_channels} must be divisible by offset_groups {offset_groups}")
        ks = _ntuple(kernel_size, dim, "kernel_size")
        dil = _ntuple(dilation, dim, "dilation")
        if padding is None:
            padding = tuple(d * (k - 1) // 2 for k, d in zip(ks, dil))
        self.dim = dim
        self.offset_groups = offset_groups
        self.dcn = DeformConv(in_channels, out_channels, ks, dim, stride, padding, dil, groups, bias,
                              backend=backend, checkpoint=checkpoint)
        K = self.dcn.num_kernel_points
        self.n_offset_channels = dim * offset_groups * K
        self.n_mask_channels = offset_groups * K
        conv_op = nn.Conv2d if dim == 2 else nn.Conv3d
        self.guide_channels = in_channels if guide_channels is None else guide_channels
        self.offset_conv = conv_op(self.guide_channels, self.n_offset_channels + self.n_mask_channels, ks,
                                   stride=self.dcn.stride, padding=self.dcn.padding, dilation=self.dcn.dilation,
                                   bias=True)
        self.reset_offset_predictor()
        if zero_init_weight:
            self.zero_init_weight()

    def reset_offset_predictor(self) -> None:
        """Zero offsets (regular grid) and mask logits 0 (mask 0.5) at initialisation."""
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

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
