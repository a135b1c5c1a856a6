"""Spatial and semantic correlation modules of DPC-Net (Zhang et al., "Decoupled Pyramid
Correlation Network for Liver Tumor Segmentation from CT images", Med. Phys. 2022).

Both modules relate the pyramid features of two adjacent resolution levels. Level 0 is the highest
resolution; ``F_i`` has ``C_i`` channels. Dimensionality (2D or 3D) follows ``conv_op``.

Interpretations where the paper is silent (also listed in the README):

- SpaCor regresses its attention map at ``F_{i-1}``'s resolution, an integer multiple of ``F_i``'s per axis (the
  plan's pooling strides). The hidden width of the 3-layer
  ``f_spa`` is ``C_{i-1}``, the channel count of the level at whose resolution it runs ("the number
  of channels is kept consistent with that of each level", Sec. IV). Upsampling is (bi/tri)linear
  interpolation (``align_corners=False``) and the way back to ``F_i``'s size is area (average)
  interpolation, so resampling adds no parameters.
- SemCor's 3-layer perceptron has ``C_i`` neurons per layer (Sec. IV) and recalibrates the level's
  own input (``F_i^spa``, or ``F_0`` at level 0), as the text of Sec. III.E describes
  ("multiply the attention vector with F_i^spa"): the SpaCor-first ordering of Table 4.

Computation (the same functions as the equations, evaluated in a cheaper order; ``tests/test_dpcnet.py``
checks values and gradients against a literal implementation of the equations):

- SpaCor's squeeze (Eq. 5) never concatenates ``[up(F_i), F_{i-1}]`` and keeps only the argmax channel for
  backward (``upsampled_channel_squeeze``): on the CPU a compiled kernel interpolates each channel's row and updates
  the running channel sum and maximum; elsewhere the channel sum commutes with the linear upsampling and the channel
  maximum of ``up(F_i)`` is taken chunk by chunk (channels-last).
- ``f_spa``'s one-channel input and output layers are matrix products with an im2col of the one-channel map and
  a shifted sum of one-channel maps (``conv_from_one_channel``, ``conv_to_one_channel``), and the 1x1 convolutions
  (``g_spa``, the heads) plain matrix products (``pointwise_conv``): oneDNN's ``conv3d`` is several times slower
  on the CPU for these shapes (numbers in the docstrings).
- ``g_spa`` (a 1x1 conv: linear per voxel, bias included since interpolation weights sum to 1) commutes
  with the upsampling, so it runs at ``F_i``'s resolution: ``g_spa(up(F_i)) = up(g_spa(F_i))``.
- ``area(sigmoid(A) * up(G))`` is one autograd Function (``attention_resample``) that never upsamples ``G``: with
  integer resolution ratios it is a ``3^dim``-tap stencil on ``G`` whose per-voxel weights come from the one-channel
  attention map (a compiled kernel on the CPU); backward keeps only the per-tap weight maps and ``G``.
- The compiled CPU kernels (``csrc/upsampled_channel_squeeze_cpu.cpp``, ``csrc/attention_resample_cpu.cpp``; off
  with ``NNUNET_EXT_SQUEEZE_CPU_KERNEL=0`` / ``NNUNET_EXT_ATTENTION_RESAMPLE_CPU_KERNEL=0``, or where no C++ compiler
  is found) give the same function up to float rounding, and the same bits for any number of threads (tested).
- SemCor's output feeds only its 1x1 segmentation head, and ``head(a * g_sem(X)) = (W_h diag(a) W_g) X +
  W_h (a * b_g) + b_h`` with ``a`` constant over space: one per-sample 1x1 map (``torch.baddbmm``)
  instead of two full-resolution convolutions and a product. DPC-Net stacks it with the other head that reads the
  same ``X`` (``shared_input_heads``: one matrix product, one input gradient).
"""
import itertools
from typing import Callable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list

from nnunet_ext.building_blocks.cpu_extension import load_cpu_extension
from nnunet_ext.building_blocks.pointwise import pointwise_conv

_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# the compiled ops' namespaces (torch.ops.<name>)
_RESAMPLE_KERNEL = "nnunet_ext_attention_resample_cpu"
_SQUEEZE_KERNEL = "nnunet_ext_upsampled_channel_squeeze_cpu"
CHUNK_ELEMENTS = 2 ** 22
"""Largest full-resolution temporary (elements) that the Functions below create per channel chunk."""


def _channel_chunks(tensor: torch.Tensor, voxels: int) -> List[slice]:
    """Channel slices of ``tensor`` such that a chunk upsampled to ``voxels`` voxels per channel has at
    most ``CHUNK_ELEMENTS`` elements (at least one channel per chunk)."""
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, tensor.shape[0] * voxels))
    return [slice(c, min(c + per_chunk, tensor.shape[1])) for c in range(0, tensor.shape[1], per_chunk)]


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode=_LINEAR_MODE[x.ndim - 2], align_corners=False)


def _upsample_vjp(grad: torch.Tensor, coarse_size: Sequence[int]) -> torch.Tensor:
    """Adjoint of ``_upsample`` to ``grad``'s size, applied to ``grad`` (PyTorch's own backward)."""
    with torch.enable_grad():
        probe = grad.new_zeros(grad.shape[:2] + tuple(coarse_size), requires_grad=True)
        (result,) = torch.autograd.grad(_upsample(probe, grad.shape[2:]), probe, grad)
    return result


def _linear_taps(coarse_size: Sequence[int], fine_size: Sequence[int], device) -> List[Tuple[torch.Tensor,
                                                                                          torch.Tensor]]:
    """The ``2^dim`` taps of ``_upsample`` from ``coarse_size`` to ``fine_size``: per tap, the flat coarse
    index and the weight of every fine voxel (PyTorch's rule for ``align_corners=False``: source
    coordinate ``max(0, (j + 0.5) * in / out - 0.5)``, lower neighbour its floor, upper neighbour clamped)."""
    per_axis, stride = [], 1
    dim = len(fine_size)
    for axis in reversed(range(dim)):
        n_in, n_out = coarse_size[axis], fine_size[axis]
        src = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_(min=0)
        lower = src.long()
        upper = torch.where(lower < n_in - 1, lower + 1, lower)
        frac = src - lower
        shape = [1] * dim
        shape[axis] = n_out
        per_axis.insert(0, ((lower * stride).view(shape), (upper * stride).view(shape),
                            (1 - frac).view(shape), frac.view(shape)))
        stride *= n_in
    taps = []
    for corner in itertools.product((0, 1), repeat=dim):
        index = sum(axis[c] for axis, c in zip(per_axis, corner))
        weight = 1
        for axis, c in zip(per_axis, corner):
            weight = weight * axis[2 + c]
        taps.append((index, weight))
    return taps


def attention_resample_kernel_available() -> bool:
    """Build (first call on a machine) or load ``csrc/attention_resample_cpu.cpp``; False (with a warning) when it
    cannot be built, or when ``NNUNET_EXT_ATTENTION_RESAMPLE_CPU_KERNEL=0``."""
    return load_cpu_extension("attention_resample_cpu.cpp", _RESAMPLE_KERNEL, "attention-resampling CPU kernel",
                              "NNUNET_EXT_ATTENTION_RESAMPLE_CPU_KERNEL")


def squeeze_kernel_available() -> bool:
    """Build (first call on a machine) or load ``csrc/upsampled_channel_squeeze_cpu.cpp``; False (with a warning)
    when it cannot be built, or when ``NNUNET_EXT_SQUEEZE_CPU_KERNEL=0``."""
    return load_cpu_extension("upsampled_channel_squeeze_cpu.cpp", _SQUEEZE_KERNEL, "SpaCor squeeze CPU kernel",
                              "NNUNET_EXT_SQUEEZE_CPU_KERNEL")


def _kernel_applies(available: Callable[[], bool], *tensors: torch.Tensor) -> bool:
    """Whether a compiled kernel runs ``tensors``: float32/float64 CPU tensors and the kernel ``available()``."""
    return (all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)
            and available())


class _UpsampledChannelAvgMax(torch.autograd.Function):
    """``T = Avg_c([up(high), low]) + Max_c([up(high), low])`` (Eq. 5) without the concatenation.

    Forward on the CPU (float32/float64): the compiled kernel ``csrc/upsampled_channel_squeeze_cpu.cpp``, one thread
    per output row, which interpolates each channel's row from the four coarse rows around it and updates the row's
    running channel sum and maximum (measured at level 1 of the benchmark plan, ``high`` 2 x 64 x 16x32x32, 2
    threads, memory kept: forward 8 ms against 35 ms for the chunked PyTorch path below). Elsewhere: the channel sum
    of ``up(high)`` is ``up`` of ``high``'s channel sum; its channel maximum is taken over channel chunks of
    ``up(high)`` (temporaries of at most ``CHUNK_ELEMENTS``), each upsampled in the channels-last layout, where
    PyTorch's CPU kernel is vectorised over channels and the channel maximum reads contiguous memory (0.07 s against
    0.18 s in the standard layout, measured earlier; the maximum is exact in any layout). Saved for backward: the
    argmax channel per voxel (index into the concatenation). Backward: the average spreads ``g / C`` over all
    channels (through the adjoint upsampling for ``high``); the maximum routes ``g`` to the argmax channel,
    for ``high`` by scattering it onto the ``2^dim`` coarse voxels of the interpolation with their weights; after
    the compiled forward the kernel does both in one pass per plane (``low``) and per block of channels (``high``),
    forward + backward 17 ms against 53 ms at level 1. Ties of the maximum go to the first channel (as
    ``torch.max``; ``amax`` would share the gradient).
    """

    @staticmethod
    def forward(ctx, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        ctx.shapes = (high.shape, low.shape)
        if _kernel_applies(squeeze_kernel_available, high, low):
            unit_depth = (slice(None), slice(None), None) if low.ndim == 4 else (...,)
            out, argmax = getattr(torch.ops, _SQUEEZE_KERNEL).forward(high[unit_depth].contiguous(),
                                                                      low[unit_depth].contiguous())
            ctx.compiled = True
            ctx.save_for_backward(argmax.view((low.shape[0], 1) + low.shape[2:]))
            return out.view((low.shape[0], 1) + low.shape[2:])
        ctx.compiled = False
        fine = low.shape[2:]
        n_high, n_low = high.shape[1], low.shape[1]
        total = _upsample(high.sum(1, keepdim=True), fine) + low.sum(1, keepdim=True)
        best, argmax = low.max(1, keepdim=True)
        argmax += n_high
        # last chunk first: with ``>=`` an earlier channel wins a tie, as in ``torch.max`` of the concatenation
        for chunk in reversed(_channel_chunks(high, low[0, 0].numel())):
            part = high[:, chunk].contiguous(memory_format=_CHANNELS_LAST[high.ndim])
            value, index = _upsample(part, fine).max(1, keepdim=True)
            wins = value >= best
            best = torch.where(wins, value, best)
            argmax = torch.where(wins, index + chunk.start, argmax)
        ctx.save_for_backward(argmax)
        return total / (n_high + n_low) + best

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (argmax,) = ctx.saved_tensors
        high_shape, low_shape = ctx.shapes
        n_high, n_low = high_shape[1], low_shape[1]
        batch, coarse, fine = high_shape[0], high_shape[2:], low_shape[2:]
        mean_grad = grad / (n_high + n_low)
        if ctx.compiled:
            unit_depth = (slice(None), slice(None), None) if len(fine) == 2 else (...,)
            grad_high, grad_low = getattr(torch.ops, _SQUEEZE_KERNEL).backward(
                grad[unit_depth].contiguous(), argmax[unit_depth].contiguous(),
                _upsample_vjp(mean_grad, coarse)[unit_depth], n_high, n_low)
            return grad_high.view(high_shape), grad_low.view(low_shape)

        from_low = argmax >= n_high
        grad_low = mean_grad.expand(low_shape).contiguous()
        grad_low.scatter_add_(1, (argmax - n_high).clamp_(min=0), torch.where(from_low, grad, 0))

        grad_high = _upsample_vjp(mean_grad, coarse).expand(high_shape).contiguous()
        max_grad = torch.where(from_low, 0, grad).view(batch, -1)
        channel_offset = (argmax.clamp(max=n_high - 1) * coarse.numel()).view(batch, -1)
        flat = grad_high.view(batch, -1)
        for index, weight in _linear_taps(coarse, fine, grad.device):
            flat.scatter_add_(1, channel_offset + index.reshape(1, -1), max_grad * weight.reshape(1, -1).to(grad.dtype))
        return grad_high, grad_low


def upsampled_channel_squeeze(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """SpaCor's squeeze (Eq. 5): channel average + channel maximum of ``[up(high), low]``, shape
    ``(B, 1, *low.shape[2:])``; ``up`` is linear interpolation to ``low``'s size."""
    return _UpsampledChannelAvgMax.apply(high, low)


def _integer_factors(coarse_size: Sequence[int], fine_size: Sequence[int]) -> List[int]:
    """Per-axis resolution ratio ``fine / coarse``; it must be an integer (nnU-Net's pooling strides)."""
    factors = [fine // coarse for coarse, fine in zip(coarse_size, fine_size)]
    if any(f * c != n for f, c, n in zip(factors, coarse_size, fine_size)):
        raise ValueError(f"the fine size {tuple(fine_size)} must be an integer multiple of {tuple(coarse_size)}")
    return factors


def _phase_weights(factor: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``(factor, 3)``: the weight of coarse neighbours ``p - 1, p, p + 1`` in ``_upsample``'s value at fine index
    ``factor * p + s`` (row ``s``). PyTorch's rule (``align_corners=False``) puts that fine voxel at coarse coordinate
    ``p + o`` with ``o = (s + 0.5) / factor - 0.5``, ``|o| < 0.5``; the clamping at the borders is the same as
    replicating the border voxel, so with a replicate-padded input every phase is this 3-tap stencil."""
    weights = torch.zeros(factor, 3, dtype=torch.float64)
    for s in range(factor):
        o = (s + 0.5) / factor - 0.5
        if o < 0:
            weights[s, 0], weights[s, 1] = -o, 1 + o
        else:
            weights[s, 1], weights[s, 2] = 1 - o, o
    return weights.to(dtype=dtype, device=device)


_AXIS_LETTERS = ("zyx", "abc", "ijk")  # coarse position, phase, tap: up to three spatial axes


def _tap_maps_equation(dim: int) -> str:
    """``einsum`` equation from the attention in block layout ``(B, n_0, f_0, n_1, f_1, ..)`` and one ``(f, 3)``
    phase-weight matrix per axis to the tap maps ``(B, 3, .., 3, n_0, n_1, ..)``."""
    position, phase, tap = (letters[3 - dim:] for letters in _AXIS_LETTERS)
    block = "".join(p + s for p, s in zip(position, phase))
    return f"B{block}," + ",".join(s + t for s, t in zip(phase, tap)) + f"->B{tap}{position}"


class _AttentionResample(torch.autograd.Function):
    """``area(attention * up(G))`` (Eq. 6 and the resampling back to ``F_i``'s size) without any ``C x fine``
    tensor. With an integer ratio ``f`` per axis, every fine voxel's ``up(G)`` is a 3-tap stencil per axis over the
    replicate-padded ``G`` (``_phase_weights``), and ``area`` averages each ``f^dim`` block, so

        ``out(p) = sum_k M_k(p) * G_pad(p + k)``,  ``M_k(p) = mean over the block of p of attention * weight_k``,

    over the ``3^dim`` taps ``k``: ``M`` is computed once from the one-channel attention (an ``einsum``) and the
    ``C``-channel work is ``3^dim`` multiply-adds at ``G``'s resolution. Backward keeps ``M`` (``3^dim / f^dim``
    times the attention's size) and ``G``: ``grad G`` is the transposed stencil (then the replicate padding's
    adjoint), ``grad M_k`` the channel sums of ``grad * G_pad(p + k)``, ``grad attention`` the ``einsum``'s
    adjoint.

    The stencil and its two gradients run in the compiled kernel ``csrc/attention_resample_cpu.cpp`` on the CPU
    (float32/float64; the padding is a clamped index there, and the results do not depend on the thread count).
    Measured at level 1 of the benchmark plan (``G`` 2 x 64 x 16x32x32, forward + backward of this Function, 2
    threads, memory kept): 24 ms, against 69 ms for ``_stencil`` and ``_stencil_backward``, the same stencil in
    PyTorch (channels-last; 0.26 s in the standard layout, and 0.49 s for upsampling ``G`` by channel chunks,
    multiplying and area-pooling with PyTorch's kernels, measured earlier); level 2 (2 x 128 x 8x16x16): 8.3 against
    13.9 ms. Elsewhere, or with ``NNUNET_EXT_ATTENTION_RESAMPLE_CPU_KERNEL=0``: the PyTorch stencil. Both give the
    same result up to float rounding (tested)."""

    @staticmethod
    def _tap_maps(attention: torch.Tensor, coarse: torch.Tensor):
        """The phase weights per axis, the block volume, the tap maps ``M`` ``(B, 3^dim, *size)`` (taps row-major)
        and the taps in use, as (flat index, tap) pairs: an axis with ratio 1 uses only its centre tap, a larger
        ratio all three (``_phase_weights``)."""
        size = coarse.shape[2:]
        factors = _integer_factors(size, attention.shape[2:])
        weights = [_phase_weights(f, coarse.dtype, coarse.device) for f in factors]
        block_shape = [attention.shape[0]]
        for n, f in zip(size, factors):
            block_shape += [n, f]
        volume = 1
        for f in factors:
            volume *= f
        maps = torch.einsum(_tap_maps_equation(len(size)), attention.reshape(block_shape), *weights) / volume
        used = [(i, tap) for i, tap in enumerate(itertools.product(range(3), repeat=len(size)))
                if all(f > 1 or t == 1 for f, t in zip(factors, tap))]
        return weights, volume, maps.reshape(attention.shape[0], -1, *size), used

    @staticmethod
    def _tap_maps_adjoint(grad_maps: torch.Tensor, weights: List[torch.Tensor], volume: int,
                          attention_shape: torch.Size) -> torch.Tensor:
        """The gradient of the attention from that of the tap maps ``(B, 3^dim, *size)``: the ``einsum``'s adjoint."""
        dim = len(weights)
        lhs, rhs = _tap_maps_equation(dim).split("->")
        block, *phase_weights = lhs.split(",")
        grad_maps = grad_maps.view(grad_maps.shape[0], *([3] * dim), *grad_maps.shape[2:])
        return (torch.einsum(f"{rhs},{','.join(phase_weights)}->{block}", grad_maps, *weights) / volume).reshape(
            attention_shape)

    @staticmethod
    def _kernel_arguments(maps: torch.Tensor, used: list, coarse: torch.Tensor):
        """The kernel's 3D form: the used taps' maps ``(B, T, D, H, W)``, their offsets ``(T, 3)`` in ``{-1, 0, 1}``
        and ``coarse`` ``(B, C, D, H, W)``, with a unit depth axis added in 2D."""
        if len(used) < maps.shape[1]:
            maps = maps.index_select(1, torch.tensor([i for i, _ in used], device=maps.device))
        offsets = torch.tensor([tap for _, tap in used], dtype=torch.long).sub_(1)
        if coarse.ndim == 4:
            maps, coarse, offsets = maps.unsqueeze(2), coarse.unsqueeze(2), F.pad(offsets, (1, 0))
        return maps.contiguous(), offsets, coarse.contiguous()

    @staticmethod
    def _window(tap: Tuple[int, ...], size: Sequence[int]) -> tuple:
        return (slice(None), slice(None)) + tuple(slice(t, t + n) for t, n in zip(tap, size))

    @staticmethod
    def _stencil(maps: torch.Tensor, used: list, coarse: torch.Tensor) -> torch.Tensor:
        """``sum_k M_k * G_pad(p + k)`` in PyTorch. The ``C``-channel tensors are channels-last here (the per-voxel
        weight multiplies a contiguous run of channels, the channel sums of the backward read contiguous memory; the
        operations are elementwise, so the values do not depend on the layout)."""
        padded = F.pad(coarse, (1, 1) * (coarse.ndim - 2), mode="replicate")
        padded = padded.contiguous(memory_format=_CHANNELS_LAST[coarse.ndim])
        out = torch.zeros_like(coarse, memory_format=_CHANNELS_LAST[coarse.ndim])
        for i, tap in used:
            out.addcmul_(maps[:, i:i + 1], padded[_AttentionResample._window(tap, coarse.shape[2:])])
        return out.contiguous()

    @staticmethod
    def _stencil_backward(grad: torch.Tensor, maps: torch.Tensor, used: list,
                          coarse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The gradients of ``_stencil`` with respect to the maps (zero for unused taps) and to ``coarse``."""
        size = coarse.shape[2:]
        padded = F.pad(coarse, (1, 1) * len(size), mode="replicate")
        padded = padded.contiguous(memory_format=_CHANNELS_LAST[coarse.ndim])
        grad = grad.contiguous(memory_format=_CHANNELS_LAST[grad.ndim])
        grad_padded = torch.zeros_like(padded)
        grad_maps = torch.zeros_like(maps)
        for i, tap in used:
            window = _AttentionResample._window(tap, size)
            grad_padded[window].addcmul_(maps[:, i:i + 1], grad)
            grad_maps[:, i] = (grad * padded[window]).sum(1)
        for axis in range(2, grad_padded.ndim):  # adjoint of the replicate padding: borders fold back
            n = grad_padded.shape[axis]
            grad_padded.narrow(axis, 1, 1).add_(grad_padded.narrow(axis, 0, 1))
            grad_padded.narrow(axis, n - 2, 1).add_(grad_padded.narrow(axis, n - 1, 1))
            grad_padded = grad_padded.narrow(axis, 1, n - 2)
        return grad_maps, grad_padded.contiguous()

    @staticmethod
    def forward(ctx, attention: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        weights, volume, maps, used = _AttentionResample._tap_maps(attention, coarse)
        ctx.save_for_backward(maps, coarse)
        ctx.tap_maps = (weights, volume, used, attention.shape)
        if not _kernel_applies(attention_resample_kernel_available, attention, coarse):
            return _AttentionResample._stencil(maps, used, coarse)
        return getattr(torch.ops, _RESAMPLE_KERNEL).forward(
            *_AttentionResample._kernel_arguments(maps, used, coarse)).view(coarse.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        maps, coarse = ctx.saved_tensors
        weights, volume, used, attention_shape = ctx.tap_maps
        if _kernel_applies(attention_resample_kernel_available, maps, coarse):
            arguments = _AttentionResample._kernel_arguments(maps, used, coarse)
            used_grad, grad_coarse = getattr(torch.ops, _RESAMPLE_KERNEL).backward(
                grad.contiguous().view(arguments[2].shape), *arguments)
            used_grad = used_grad.view(*used_grad.shape[:2], *coarse.shape[2:])
            if len(used) < maps.shape[1]:
                index = torch.tensor([i for i, _ in used], device=maps.device)
                used_grad = torch.zeros_like(maps).index_copy_(1, index, used_grad)
            grad_maps, grad_coarse = used_grad, grad_coarse.view(coarse.shape)
        else:
            grad_maps, grad_coarse = _AttentionResample._stencil_backward(grad, maps, used, coarse)
        return _AttentionResample._tap_maps_adjoint(grad_maps, weights, volume, attention_shape), grad_coarse


def attention_resample(attention: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``area(attention * up(coarse))`` at ``coarse``'s size; ``attention`` is ``(B, 1, *fine)``, ``up`` linear
    interpolation to the fine size and ``area`` average interpolation back."""
    return _AttentionResample.apply(attention, coarse)


class _SpatialAvgMax(torch.autograd.Function):
    """``[Avg_s(x), Max_s(x)]`` over all spatial axes, ``(B, 2C)``, keeping only the argmax voxels for backward;
    the gradient is built in one dense tensor (average part) plus a scatter (maximum part). Ties of the
    maximum go to the first voxel (as ``torch.max``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        best, argmax = flat.max(2)
        ctx.save_for_backward(argmax)
        ctx.shape = x.shape
        return torch.cat((flat.mean(2), best), dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (argmax,) = ctx.saved_tensors
        shape = ctx.shape
        grad_mean, grad_max = grad.split(shape[1], dim=1)
        voxels = shape[2:].numel()
        result = (grad_mean / voxels).unsqueeze(2).expand(*shape[:2], voxels).contiguous()
        result.scatter_add_(2, argmax.unsqueeze(2), grad_max.unsqueeze(2))
        return result.view(shape)


def spatial_avg_max(x: torch.Tensor) -> torch.Tensor:
    """Spatial average and maximum of each channel, concatenated: ``(B, 2C)``."""
    return _SpatialAvgMax.apply(x)


def _stack_taps(x: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """im2col of a one-channel map ``(B, 1, *S)``: ``(B, K, *S)`` with ``out_t(v) = x(v + t - pad)`` for each of the
    ``K = prod(kernel)`` kernel taps ``t`` (row-major), zero outside (the padding ``(k - 1) // 2`` of an odd kernel)."""
    pads = [(k - 1) // 2 for k in kernel]
    windows = F.pad(x, [p for p in reversed(pads) for _ in range(2)])
    for axis, k in enumerate(kernel):
        windows = windows.unfold(2 + axis, k, 1)  # (B, 1, *S, *kernel) view
    dim = len(kernel)
    windows = windows.squeeze(1).movedim(tuple(range(-dim, 0)), tuple(range(1, dim + 1)))
    return windows.reshape(x.shape[0], -1, *x.shape[2:])


def _sum_taps(z: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """Adjoint of ``_stack_taps``: ``(B, K, *S) -> (B, 1, *S)``, ``out(u) = sum_t z_t(u - t + pad)``, as ``K``
    shifted additions of one-channel maps into a padded buffer."""
    pads = [(k - 1) // 2 for k in kernel]
    size = z.shape[2:]
    full = z.new_zeros(z.shape[0], *(n + 2 * p for n, p in zip(size, pads)))
    for t, tap in enumerate(itertools.product(*(range(k) for k in kernel))):
        full[(slice(None),) + tuple(slice(a, a + n) for a, n in zip(tap, size))] += z[:, t]
    return full[(slice(None),) + tuple(slice(p, p + n) for p, n in zip(pads, size))].unsqueeze(1)


class _SumTaps(torch.autograd.Function):
    """``_sum_taps`` with ``_stack_taps`` as its backward (nothing saved)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, kernel: Tuple[int, ...]) -> torch.Tensor:
        ctx.kernel = kernel
        return _sum_taps(z, kernel)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _stack_taps(grad.contiguous(), ctx.kernel), None


class _ConvFromOneChannel(torch.autograd.Function):
    """``baddbmm(b, W, im2col(x))`` for a one-channel ``x``: the ``(C, 1, *kernel)`` weight is the ``C x K`` matrix
    of a 1x1 conv over the ``K`` stacked taps. Backward keeps only ``x`` and ``W`` and stacks the taps again for the
    weight gradient (``K`` times ``x``'s size, about a full-resolution feature map, not kept between the passes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        b, channels = x.shape[0], weight.shape[0]
        taps = _stack_taps(x, weight.shape[2:]).view(b, -1, x[0, 0].numel())
        y = x.new_empty(b, channels, *x.shape[2:])  # written through a view: the output must not be one
        torch.baddbmm(bias.view(1, channels, 1).expand(b, -1, -1), weight.view(1, channels, -1).expand(b, -1, -1),
                      taps, out=y.view(b, channels, -1))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        kernel = tuple(weight.shape[2:])
        b, channels = x.shape[0], weight.shape[0]
        grad = grad.reshape(b, channels, -1)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_taps = torch.bmm(weight.view(1, channels, -1).transpose(1, 2).expand(b, -1, -1), grad)
            grad_x = _sum_taps(grad_taps.view(b, -1, *x.shape[2:]), kernel)
        if ctx.needs_input_grad[1]:
            taps = _stack_taps(x, kernel).view(b, -1, grad.shape[2])
            grad_weight = torch.bmm(grad, taps.transpose(1, 2)).sum(0).view_as(weight)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2))
        return grad_x, grad_weight, grad_bias


def conv_from_one_channel(x: torch.Tensor, conv: _ConvNd) -> torch.Tensor:
    """``conv(x)`` for a one-channel ``x`` and a stride-1, 'same'-padded ``conv`` with bias (``f_spa``'s first
    layer), as the matrix product of the ``C x K`` weight with the ``K``-tap im2col of ``x`` (``torch.baddbmm``),
    keeping only ``x`` for backward (``_ConvFromOneChannel``).

    The same function as the convolution; measured on the CPU (fwd + bwd, 2 threads, 1 -> 32 channels, 3x3x3,
    2 x 32x64x64): 0.08 s against 0.13 s for ``conv3d``, whose oneDNN kernel is slow with one input channel."""
    return _ConvFromOneChannel.apply(x, conv.weight, conv.bias)


def conv_to_one_channel(x: torch.Tensor, conv: _ConvNd) -> torch.Tensor:
    """``conv(x)`` for a stride-1, 'same'-padded ``conv`` with one output channel and bias (``f_spa``'s last layer):
    ``z = W' x``, a ``K x C`` matrix product per voxel (``W'`` the weight with its kernel axes flipped), then the
    ``K`` one-channel maps ``z_t`` shifted and summed (``_sum_taps``: ``out(v) = sum_t W_t x(v + t - pad)``).

    The same function as the convolution; measured on the CPU (fwd + bwd, 2 threads, 32 -> 1 channels, 3x3x3,
    2 x 32x64x64): 0.06 s against 0.21 s for ``conv3d``, whose oneDNN kernel is slow with one output channel."""
    kernel = tuple(conv.weight.shape[2:])
    dim = len(kernel)
    flipped = conv.weight[0].flip(tuple(range(1, dim + 1))).flatten(1).t()  # (K, C)
    z = torch.bmm(flipped.expand(x.shape[0], -1, -1), x.flatten(2)).view(x.shape[0], -1, *x.shape[2:])
    return _SumTaps.apply(z, kernel) + conv.bias.view(1, 1, *[1] * dim)


class SpatialCorrelation(nn.Module):
    """SpaCor (paper Sec. III.D): refines the high-level feature ``F_i`` with a spatial attention
    map derived jointly from ``F_i`` and the low-level feature ``F_{i-1}``.

    - ``T = Avg_c([F_i^up, F_{i-1}]) + Max_c([F_i^up, F_{i-1}])``  (Eq. 5, channel squeeze)
    - ``A = f_spa(T)``, a 3-layer conv net conv-LeakyReLU-conv-LeakyReLU-conv (Eq. 4, 5); its one-channel input
      and output layers run as ``conv_from_one_channel`` / ``conv_to_one_channel`` (same function)
    - ``F_i^spa = sigmoid(A) * g_spa(F_i^up)``, ``g_spa`` a 1x1 conv (Eq. 6), then resampled back
      to ``F_i``'s size.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, hidden_channels: int,
                 kernel_size: Union[int, Sequence[int]], nonlin: Type[nn.Module],
                 nonlin_kwargs: Optional[dict] = None):
        super().__init__()
        nonlin_kwargs = nonlin_kwargs or {}
        kernel_size = maybe_convert_scalar_to_list(conv_op, kernel_size)
        padding = [(k - 1) // 2 for k in kernel_size]
        self.f_spa = nn.Sequential(
            conv_op(1, hidden_channels, kernel_size, padding=padding),
            nonlin(**nonlin_kwargs),
            conv_op(hidden_channels, hidden_channels, kernel_size, padding=padding),
            nonlin(**nonlin_kwargs),
            conv_op(hidden_channels, 1, kernel_size, padding=padding),
        )
        self.g_spa = conv_op(channels, channels, 1)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """``high`` = F_i (coarser), ``low`` = F_{i-1} (finer); returns F_i^spa at F_i's size."""
        first, nonlin_1, middle, nonlin_2, last = self.f_spa
        hidden = nonlin_2(middle(nonlin_1(conv_from_one_channel(upsampled_channel_squeeze(high, low), first))))
        attention = torch.sigmoid(conv_to_one_channel(hidden, last))
        # g_spa(up(F_i)) = up(g_spa(F_i)): the 1x1 conv runs at F_i's resolution
        return attention_resample(attention, pointwise_conv(high, self.g_spa.weight, self.g_spa.bias))


class SemanticCorrelation(nn.Module):
    """SemCor (paper Sec. III.E): refines the low-level feature ``X_i`` with a channel attention
    vector derived jointly from ``X_i`` and the high-level ``F_{i+1}^spa``.

    - ``T = [Avg_s([X_i, F_{i+1}^spa]), Max_s([X_i, F_{i+1}^spa])]`` (Eq. 8, spatial squeeze of
      each input; the two inputs have different resolutions, so they are squeezed separately and
      the vectors concatenated, which equals squeezing their channel concatenation)
    - ``A = f_sem(T)``, a 3-layer perceptron with LeakyReLUs and ``C_i`` outputs (Eq. 7, 8)
    - ``F_i^sem = sigmoid(A) * g_sem(X_i)``, ``g_sem`` a 1x1 conv (Eq. 9)

    ``F_i^sem`` feeds only DPC-Net's 1x1 segmentation head of the level, so ``forward`` returns that head's
    logits, computed without ``F_i^sem`` (module docstring).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, higher_channels: int,
                 nonlin: Type[nn.Module], nonlin_kwargs: Optional[dict] = None):
        super().__init__()
        nonlin_kwargs = nonlin_kwargs or {}
        self.f_sem = nn.Sequential(
            nn.Linear(2 * (channels + higher_channels), channels),
            nonlin(**nonlin_kwargs),
            nn.Linear(channels, channels),
            nonlin(**nonlin_kwargs),
            nn.Linear(channels, channels),
        )
        self.g_sem = conv_op(channels, channels, 1)

    def attention(self, x: torch.Tensor, higher: torch.Tensor) -> torch.Tensor:
        """``sigmoid(A)`` of Eq. 7-8, ``(B, C_i)``; squeeze order ``[Avg(X), Avg(F^spa), Max(X), Max(F^spa)]``."""
        x_avg, x_max = spatial_avg_max(x).chunk(2, dim=1)
        higher_avg, higher_max = spatial_avg_max(higher).chunk(2, dim=1)
        return torch.sigmoid(self.f_sem(torch.cat((x_avg, higher_avg, x_max, higher_max), dim=1)))

    def head_map(self, x: torch.Tensor, higher: torch.Tensor, head: _ConvNd) -> Tuple[torch.Tensor, torch.Tensor]:
        """``head(F_i^sem)`` as a per-sample 1x1 map of ``x``: weight ``W_h diag(a) W_g`` ``(B, K, C_i)`` and bias
        ``W_h (a * b_g) + b_h`` ``(B, K)``."""
        scaled_head = head.weight.flatten(1) * self.attention(x, higher).unsqueeze(1)  # (B, K, C) = W_h diag(a)
        return scaled_head @ self.g_sem.weight.flatten(1), scaled_head @ self.g_sem.bias + head.bias

    def forward(self, x: torch.Tensor, higher: torch.Tensor, head: _ConvNd) -> torch.Tensor:
        """``x`` = X_i (finer), ``higher`` = F_{i+1}^spa (coarser), ``head`` = the level's 1x1 segmentation conv;
        returns ``head(F_i^sem)`` (``head_map`` applied to ``x``)."""
        return shared_input_heads(x, [self.head_map(x, higher, head)])[0]


def shared_input_heads(x: torch.Tensor, heads: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> List[torch.Tensor]:
    """The logits of several 1x1 heads of one input ``x`` ``(B, C, *S)``, each a ``(weight, bias)`` pair with a
    ``(K, C)`` or per-sample ``(B, K, C)`` weight and a ``(K,)`` or ``(B, K)`` bias, as one ``torch.baddbmm`` with
    the weights stacked: forward reads ``x`` once, and backward gives ``x`` one gradient instead of one per head plus
    their sum (each a full-resolution pass)."""
    b = x.shape[0]
    weight = torch.cat([w.expand(b, -1, -1) for w, _ in heads], dim=1)
    bias = torch.cat([bias.expand(b, -1) for _, bias in heads], dim=1)
    logits = torch.baddbmm(bias.unsqueeze(2), weight, x.flatten(2)).view(b, -1, *x.shape[2:])
    return list(logits.split([w.shape[-2] for w, _ in heads], dim=1))
