"""SCRNet's Feature Aggregation Module (Xu & Wang, "SCRNet", Sec. III-B, Eq. 6-12) and the SCRM
(Sec. III-A: Spatial Gate -> Channel Refinement -> FAM). One code path for 2D and 3D (``conv_op``).

- ``FeatureInitialize`` (FI): 1x1 conv + ConvMixer block (Trockman & Kolter): ``x + Norm(GELU(DWConv(x)))``
  then ``Norm(GELU(PWConv(x)))``. ConvMixer uses BatchNorm; we use the plan's ``norm_op`` (nnU-Net's choice
  for its small batches; it also keeps recomputation free of running statistics). The depth-wise kernel is
  the plan's kernel size of the stage (the paper does not give it).
- ``ShiftConvPath`` (Eq. 7-8, ACmix's convolution path): ``Y = cat(q, k, v)`` per head, a 1x1 "FC" from the
  ``3 * heads`` head maps to ``k^d`` maps for each of the ``C / heads`` head channels, then the shift: a grouped
  ``k^d``-kernel conv (``groups = C / heads``) initialised as ACmix does, with one-hot kernels that shift map
  ``i`` by offset ``i`` of the ``k^d`` grid (so each output is the sum of the ``k^d`` shifted maps), bias 0.
- ``WindowCrossAttention`` (the cross-attention path): multi-head attention, query from FI_1(f1), key and
  value from FI_2(f2) and FI_3(f2) (the FI blocks' 1x1 convs are the linear embeddings), computed with
  ``torch.nn.functional.scaled_dot_product_attention`` inside non-overlapping local windows. Global attention
  over the 65,536 pixels of a 256^2 patch is infeasible, so each window holds ``window_size`` pixels per axis
  (default 8 in 2D = 64 tokens, 4 in 3D = 64 tokens: bounded in 3D too); along an axis whose size is not a
  multiple, the largest divisor of the size not above ``window_size`` is used (no padding, no mask). ACmix
  attends over a sliding 7x7 neighbourhood with a learned positional encoding; we use windows (an exact
  partition, no unfolded keys) and no positional encoding (the FI blocks' depth-wise convs give position
  information, as in ConvMixer and CvT).
- ``CCAPM`` (Eq. 7-9): ``Y = w_conv * Y_conv + w_cross * Y_cross``, learnable scalars initialised 0.5 (ACmix).
- ``SKFusion`` (Eq. 10-12): the paper writes a "simplified SKNet" whose Eq. 12 mixes the pooled vectors; we
  use SKNet's selection (Li et al., CVPR 2019): ``s = GAP(Y1 + Y2)``, ``z = ReLU(FC(s))`` with
  ``d = max(C / 16, 32)``, one FC per branch, softmax across the two branches per channel, ``Out = a1 * Y1 +
  a2 * Y2``. SKNet's BatchNorm after the squeeze is left out (it fails on a batch of one).
- ``FeatureAggregationModule`` (Eq. 6): ``Y1 = CCAPM(X_H, X_L)``, ``Y2 = CCAPM(X_L, X_H)``, ``SK(Y1, Y2)``.
- ``SCRM``: ``FAM(CR(SG(x)))``, ``C`` -> ``C`` channels.
"""
from math import gcd, prod
from typing import List, Sequence, Tuple, Type, Union

import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nnunet_ext.building_blocks.convmixer_depthwise import depthwise_gelu_norm_residual
from nnunet_ext.building_blocks.depthwise import depthwise_conv
from nnunet_ext.building_blocks.gelu_norm import gelu_group_norm
from nnunet_ext.building_blocks.pointwise import pointwise_conv
from nnunet_ext.building_blocks.scconv import ChannelRefinement, SpatialGate

KernelSize = Union[int, Sequence[int]]


def _padding(kernel_size: KernelSize):
    return [k // 2 for k in kernel_size] if isinstance(kernel_size, (list, tuple)) else kernel_size // 2


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding, groups: int) -> torch.Tensor:
    return (F.conv2d, F.conv3d)[x.ndim - 4](x, weight, bias, padding=padding, groups=groups)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.movedim(1, -1).is_contiguous()


def _copy_channels_last_into(out: torch.Tensor, x: torch.Tensor) -> None:
    """``out[:] = x`` for a channels-last CPU ``x`` and an ``out`` contiguous per sample in the standard layout: one
    2-D transposed copy per sample (PyTorch's cache-blocked transpose copy)."""
    b, c = x.shape[:2]
    source = x.movedim(1, -1).reshape(b, -1, c)
    for i in range(b):
        out[i].view(c, -1).copy_(source[i].t())


def _relayout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` (``(B, C, ...)``) with the same values, contiguous in the standard layout or channels-last (the memory
    of ``x.movedim(1, -1)`` contiguous). On the CPU, between the two layouts, one 2-D transposed copy per sample
    (PyTorch's cache-blocked transpose copy): 0.077 s against 0.205 s for ``Tensor.contiguous`` of a
    ``(4, 96, 256, 256)`` map, 2 threads. A copy, so the values do not depend on the thread count."""
    if (_is_channels_last(x) if channels_last else x.is_contiguous()):
        return x
    b, c = x.shape[:2]
    if x.device.type != "cpu" or not (x.is_contiguous() or _is_channels_last(x)):
        return x.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else x.contiguous()
    if channels_last:
        out, source = torch.empty((b, *x.shape[2:], c), dtype=x.dtype), x.reshape(b, c, -1)
        for i in range(b):
            out[i].view(-1, c).copy_(source[i].t())
        return out.movedim(-1, 1)
    out = torch.empty(x.shape, dtype=x.dtype)
    _copy_channels_last_into(out, x)
    return out


class _ToStandardLayout(torch.autograd.Function):
    """Identity with the result contiguous in the standard layout and the gradient returned channels-last
    (``_relayout`` both ways): for the CCAPM output, whose sum is channels-last."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _relayout(x, False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _relayout(grad, True)


class _StandardGradientChunks(torch.autograd.Function):
    """``x.chunk(chunks, dim=1)`` (views) whose gradient is assembled contiguous in the standard layout: for the
    Feature-Initialize outputs, whose chunks' gradients arrive channels-last from the CCAPMs and whose group norm's
    backward would otherwise copy them with ``Tensor.contiguous``. On the CPU each chunk's gradient is written into
    its channels of the result by per-sample transposed copies (as ``_relayout``), one pass instead of the chunk
    backward's ``cat`` then ``_relayout``: a stage-0 SCRM (32 channels, 4 x 256^2, recomputed) fwd+bwd took 0.99x
    the CPU time (8.32 s vs 8.38 s, medians of 8 alternating runs, 2 threads, load 1.4; same bits). Copies, so the
    values do not depend on the thread count."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, chunks: int) -> Tuple[torch.Tensor, ...]:
        ctx.shape, ctx.chunks = x.shape, chunks
        return tuple(t.view_as(t) for t in x.chunk(chunks, dim=1))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        present = [g for g in grads if g is not None]
        out = present[0].new_empty(ctx.shape)
        width = ctx.shape[1] // ctx.chunks
        for j, grad in enumerate(grads):
            part = out[:, j * width:(j + 1) * width]
            if grad is None:
                part.zero_()
            elif grad.device.type == "cpu" and _is_channels_last(grad) and not grad.is_contiguous():
                _copy_channels_last_into(part, grad)
            else:
                part.copy_(grad)
        return out, None


class FeatureInitialize(nn.Module):
    """``blocks`` FI blocks that read the same input, computed together: block ``i`` is a 1x1 conv ``in -> C``
    then a ConvMixer block, ``p + Norm(GELU(DWConv(p)))`` then ``Norm(GELU(PWConv(.)))``. The blocks' 1x1
    projections are one ``in -> blocks * C`` conv, their depth-wise convs one depth-wise conv (``depthwise_conv``:
    on the CPU the compiled kernel in 2D, 2D slices in 3D; a 2.4x faster forward+backward than PyTorch's at stage
    0), their point-wise convs one grouped conv (``groups = blocks``), their norms one call: the same function as
    ``blocks`` separate blocks. ``forward`` returns ``(B, blocks * C, ...)``, block ``i`` in channels
    ``[i C, (i + 1) C)``.

    The norm is per-channel instance normalisation with an affine map (``nn.GroupNorm`` with one channel per
    group, which is ``InstanceNorm`` exactly): ConvMixer uses BatchNorm; we keep nnU-Net's default per-sample norm
    (its batches are 2-4 patches, and the SCRM recomputation would update BatchNorm's running statistics twice).
    """

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, channels: int, kernel_size: KernelSize,
                 blocks: int = 1, eps: float = 1e-5):
        super().__init__()
        width = blocks * channels
        self.blocks, self.channels = blocks, channels
        self.project = conv_op(in_channels, width, 1)
        self.depthwise = depthwise_conv(conv_op, width, kernel_size, padding=_padding(kernel_size))
        self.norm_depthwise = nn.GroupNorm(width, width, eps)
        self.pointwise = conv_op(width, width, 1, groups=blocks)
        self.norm_pointwise = nn.GroupNorm(width, width, eps)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """The ConvMixer blocks on the projected ``p``: on the CPU, ``p + Norm(GELU(DWConv(p)))`` is one compiled pass
        per plane (``depthwise_gelu_norm_residual``) and so is the point-wise half's ``Norm(GELU(.))``
        (``gelu_group_norm``). The fused depth-wise pass against the depth-wise kernel, ``gelu_group_norm`` and the
        residual add, fwd+bwd of an FI group (3 blocks), batch 4, 2 threads, medians of 7 alternating runs: 32
        channels at 256^2 466 -> 406 ms, 64 at 128^2 289 -> 255 ms."""
        p = depthwise_gelu_norm_residual(p, self.depthwise, self.norm_depthwise)
        return gelu_group_norm(pointwise_conv(p, self.pointwise.weight, self.pointwise.bias, self.blocks),
                               self.norm_pointwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(pointwise_conv(x, self.project.weight, self.project.bias))


def shift_kernels(dim: int, kernel_size: int) -> torch.Tensor:
    """ACmix's shift initialisation: ``(k^d, k, ..., k)``, kernel ``i`` is one-hot at grid position ``i``
    (row-major), i.e. a cross-correlation with it shifts its input map by offset ``unravel(i) - k // 2``."""
    n = kernel_size ** dim
    return torch.eye(n).view(n, *([kernel_size] * dim))


class ShiftConvPath(nn.Module):
    """Eq. 7-8: ``Y_conv = Shift(FC(cat(q, k, v)))`` (ACmix's convolution path), ``C`` channels out.

    ``fc`` maps the ``3 * heads`` head maps of each head channel to ``k^d`` maps (ACmix: a 1x1 conv without
    bias), ``shift`` is the grouped ``k^d``-kernel conv (``groups = C / heads``) initialised as shifts. Both are
    linear with nothing between them, so ``forward`` applies their composition, one grouped conv from the
    ``3 * heads`` maps of each head channel with weight ``W[o, t] = sum_i K[o, i] fc[i, t]`` and ``shift``'s bias
    (the same function as FC then shift; ``scale`` multiplies it, as CCAPM's ``w_conv``).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, heads: int, kernel_size: int = 3):
        super().__init__()
        self.heads, self.head_channels = heads, channels // heads
        dim = convert_conv_op_to_dim(conv_op)
        self.positions = kernel_size ** dim
        self.fc = nn.Linear(3 * heads, self.positions, bias=False)
        self.shift = conv_op(self.head_channels * self.positions, channels, kernel_size, padding=kernel_size // 2,
                             groups=self.head_channels)
        with torch.no_grad():
            self.shift.weight.copy_(shift_kernels(dim, kernel_size).unsqueeze(0).repeat(
                channels, *([1] * (dim + 1))))
            self.shift.bias.zero_()

    def stack_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(B, 3 C, ...)`` channels-last, channel ``(j * 3 + t) * heads + h`` = channel ``h * C / heads + j`` of
        ``(q, k, v)[t]``: the ``3 * heads`` maps of head channel ``j`` side by side (one group of the conv)."""
        b, c, *spatial = q.shape
        parts = [t.movedim(1, -1).reshape(b, *spatial, self.heads, self.head_channels).transpose(-1, -2)
                 for t in (q, k, v)]
        return torch.stack(parts, dim=-2).reshape(b, *spatial, 3 * c).movedim(-1, 1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        weight = torch.einsum("oi...,it->ot...", self.shift.weight, self.fc.weight)
        return _conv(self.stack_heads(q, k, v), scale * weight, scale * self.shift.bias, self.shift.padding,
                     self.head_channels)


def window_sizes(spatial: Sequence[int], window_size: int) -> List[int]:
    """Per axis the largest divisor of the axis size that is not above ``window_size``."""
    return [max(w for w in range(1, min(window_size, s) + 1) if s % w == 0) for s in spatial]


class WindowCrossAttention(nn.Module):
    """Multi-head cross-attention inside non-overlapping windows (``scaled_dot_product_attention``)."""

    def __init__(self, heads: int, window_size: int):
        super().__init__()
        self.heads, self.window_size = heads, window_size

    def _to_windows(self, x: torch.Tensor, windows: Sequence[int]) -> torch.Tensor:
        """``(B * heads * windows, tokens, C / heads)``, from a channels-last view of ``x`` (one copy)."""
        b, c, *spatial = x.shape
        d = len(spatial)
        split = [n for s, w in zip(spatial, windows) for n in (s // w, w)]
        x = x.movedim(1, -1).reshape(b, *split, self.heads, c // self.heads)
        # (B, n1, w1, n2, w2, ..., heads, head_ch) -> (B, heads, n1, n2, ..., w1, w2, ..., head_ch)
        order = [0, 1 + 2 * d, *range(1, 1 + 2 * d, 2), *range(2, 2 + 2 * d, 2), 2 + 2 * d]
        return x.permute(order).reshape(b * self.heads * prod(s // w for s, w in zip(spatial, windows)),
                                        prod(windows), c // self.heads)

    def windowed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """The attention output in window order, ``(B, heads, n1, n2, ..., w1, w2, ..., C / heads)``, and the
        window sizes."""
        b, c, *spatial = q.shape
        windows = window_sizes(spatial, self.window_size)
        out = F.scaled_dot_product_attention(*(self._to_windows(t, windows).unsqueeze(0) for t in (q, k, v)))
        counts = [s // w for s, w in zip(spatial, windows)]
        return out.reshape(b, self.heads, *counts, *windows, c // self.heads), windows

    @staticmethod
    def image_order(windowed: torch.Tensor) -> torch.Tensor:
        """A view of the windowed output as ``(B, n1, w1, n2, w2, ..., heads, C / heads)``: the order of a
        channels-last map viewed as ``(B, *spatial, C)`` with each axis split into windows."""
        d = (windowed.ndim - 3) // 2
        return windowed.permute(0, *[i for a in range(d) for i in (2 + a, 2 + d + a)], 1, 2 + 2 * d)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = q.shape
        out = self.image_order(self.windowed(q, k, v)[0])
        return out.reshape(b, *spatial, c).movedim(-1, 1)


class CCAPM(nn.Module):
    """Convolution & Cross-Attention Parallel Module (Eq. 7-9) on the Feature-Initialize outputs:
    ``CCAPM(q, k, v) = w_conv * Y_conv + w_cross * Y_cross``, ``C`` channels, learnable scalars initialised 0.5.
    ``w_conv`` scales the convolution path's composed weight and bias; ``w_cross * Y_cross`` is added in the
    attention's window order (one pass, no separate copy back to image order). The sum is channels-last; it is
    returned in the standard layout by per-sample transposed copies (``_relayout``), and the Feature-Initialize
    outputs get their gradient back in the standard layout the same way (``FeatureAggregationModule.ccapm_inputs``):
    a stage-0 SCRM (32 channels, 4 x 256^2, recomputed) fwd+bwd took 0.96x the CPU time of ``Tensor.contiguous``
    copies (A/B, 2 threads, load 4-6)."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int, heads: int = 4, window_size: int = 8,
                 shift_kernel: int = 3):
        super().__init__()
        heads = gcd(heads, channels)
        self.conv_path = ShiftConvPath(conv_op, channels, heads, shift_kernel)
        self.attention = WindowCrossAttention(heads, window_size)
        self.w_conv = nn.Parameter(torch.tensor(0.5))
        self.w_cross = nn.Parameter(torch.tensor(0.5))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = q.shape
        y_conv = self.conv_path(q, k, v, self.w_conv)
        windowed, windows = self.attention.windowed(q, k, v)
        split = [n for s, w in zip(spatial, windows) for n in (s // w, w)]
        y_conv = y_conv.movedim(1, -1).reshape(b, *split, self.attention.heads, c // self.attention.heads)
        y = torch.addcmul(y_conv, self.attention.image_order(windowed), self.w_cross)
        return _ToStandardLayout.apply(y.reshape(b, *spatial, c).movedim(-1, 1))


class SKFusion(nn.Module):
    """SKNet selection of two ``C``-channel maps (Eq. 10-12): per-channel softmax weights across the branches.

    The squeeze and select layers (SKNet's 1x1 convs on the pooled vector) are ``nn.Linear`` on ``(B, C)``: the same
    function, and on the CPU a 1x1 conv of a 1x1 map gives results that depend on the thread count (up to 3e-5
    apart with 1 and 2 threads) while the matrix product does not, so ``nnUNetv2_predict`` reproduces the final
    validation of ``nnUNetv2_train`` exactly.
    """

    def __init__(self, channels: int, reduction: int = 16, min_dim: int = 32):
        super().__init__()
        hidden = max(channels // reduction, min_dim)
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True))
        self.select = nn.Linear(hidden, 2 * channels)

    def weights(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        """``(B, 2, C, 1, ...)``: the branch weights, summing to 1 over dim 1 for every channel
        (``GAP(Y1 + Y2) = GAP(Y1) + GAP(Y2)``, without the sum map). The CCAPM returns its output in the standard
        layout: PyTorch's CPU mean over the spatial axes of a channels-last map sums in an order that depends on
        the thread count."""
        axes = tuple(range(2, y1.ndim))
        logits = self.select(self.squeeze(y1.mean(dim=axes) + y2.mean(dim=axes)))
        return torch.softmax(logits.view(y1.shape[0], 2, y1.shape[1], *([1] * len(axes))), dim=1)

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        a = self.weights(y1, y2)
        return torch.addcmul(a[:, 1] * y2, a[:, 0], y1)


class FeatureAggregationModule(nn.Module):
    """FAM (Eq. 6): ``SK(CCAPM_1(X_H, X_L), CCAPM_2(X_L, X_H))``.

    The six Feature-Initialize blocks are grouped by their input: ``fi_high`` on ``X_H`` = (query of CCAPM_1,
    key and value of CCAPM_2), ``fi_low`` on ``X_L`` = (key and value of CCAPM_1, query of CCAPM_2); each group
    is computed as one ``FeatureInitialize`` with ``blocks = 3``.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kernel_size: KernelSize, heads: int = 4,
                 window_size: int = 8, eps: float = 1e-5):
        super().__init__()
        self.fi_high, self.fi_low = (FeatureInitialize(conv_op, channels, channels, kernel_size, 3, eps)
                                     for _ in range(2))
        self.ccapm_high, self.ccapm_low = (CCAPM(conv_op, channels, heads, window_size) for _ in range(2))
        self.fuse = SKFusion(channels)

    def ccapm_inputs(self, high: torch.Tensor, low: torch.Tensor) -> Tuple[Tuple[torch.Tensor, ...], ...]:
        """``((q1, k1, v1), (q2, k2, v2))`` from the outputs of ``fi_high`` and ``fi_low``."""
        q1, k2, v2 = _StandardGradientChunks.apply(high, 3)
        k1, v1, q2 = _StandardGradientChunks.apply(low, 3)
        return (q1, k1, v1), (q2, k2, v2)

    def forward(self, x_h: torch.Tensor, x_l: torch.Tensor) -> torch.Tensor:
        first, second = self.ccapm_inputs(self.fi_high(x_h), self.fi_low(x_l))
        return self.fuse(self.ccapm_high(*first), self.ccapm_low(*second))


def _kept_attention_and_conv_ops() -> frozenset:
    """The ops whose outputs a recomputing SCRM keeps instead of recomputing: the attention kernels (CPU flash
    attention, and those SDPA picks on CUDA) and dense/grouped convolutions (the Channel Refinement's conv, the
    convolution path's shift conv): outputs of ``C`` channels computed from several times as many input values."""
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention", "convolution")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


_KEPT_OPS = _kept_attention_and_conv_ops()


def _keep_attention_and_conv_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy of a recomputing SCRM part: keep ``_KEPT_OPS``' outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_checkpoint_contexts():
    return create_selective_checkpoint_contexts(_keep_attention_and_conv_outputs)


class SCRM(nn.Module):
    """Spatial-Channel Regulation Module: ``FAM(CR(SG(x)))``, ``C`` channels in and out.

    Runs in the standard memory layout: channels-last made its convs faster on the CPU, but its group norms slower
    and dependent on the thread count (so ``nnUNetv2_predict`` could differ from the final validation); at
    256x256, batch 4, a training step took 9.4-9.8 s standard against 13.3-13.5 s channels-last with the norms
    computed in the standard layout. ``X_L`` is never materialised: ``fi_low``'s projection
    reads ``X_C2`` through ``ChannelRefinement.project_low``. ``recompute``: in training, for an input of at
    least ``recompute_min_elements`` elements per sample (``C * pixels``), store only the inputs of the parts
    (Spatial Gate with Channel Refinement, each Feature-Initialize group, each CCAPM, SK fusion) and recompute
    their internals in the backward pass (``torch.utils.checkpoint``): the same values and gradients for one more
    forward pass of the parts. The recomputation is selective (``torch.utils.checkpoint``'s policy
    ``_keep_attention_and_conv_outputs``): the outputs of the attention and of the dense/grouped convolutions, ``C``
    channels each, are kept and not computed again (a stage-0 SCRM, 32 channels at 4 x 256^2, fwd+bwd 3.85 -> 3.54 s
    for no change of its peak memory alone); the element-wise passes, norms, 1x1 and depth-wise convolutions,
    whose outputs are wider or cheap, are recomputed. Smaller (deeper) SCRMs store everything: their activations
    are a small part of the memory, while their 1x1 convs cost as much time as those of the large ones.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kernel_size: KernelSize, heads: int = 4,
                 window_size: int = 8, recompute: bool = False, eps: float = 1e-5,
                 recompute_min_elements: int = 0):
        super().__init__()
        self.spatial_gate = SpatialGate(channels)
        self.channel_refinement = ChannelRefinement(conv_op, channels, kernel_size)
        if self.channel_refinement.up_channels * 2 != channels:
            raise ValueError(f"SCRM needs the Channel Refinement split at the Spatial Gate's halves, got {channels}")
        self.fam = FeatureAggregationModule(conv_op, channels, kernel_size, heads, window_size, eps)
        self.recompute, self.recompute_min_elements = recompute, recompute_min_elements
        self._recomputing = False

    def _run(self, function, *inputs: torch.Tensor):
        if self._recomputing:
            return checkpoint(function, *inputs, use_reentrant=False, context_fn=_selective_checkpoint_contexts)
        return function(*inputs)

    def _refine(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.channel_refinement.high_and_squeezed_low(*self.spatial_gate.halves(x))

    def _initialise_low(self, x_c2: torch.Tensor) -> torch.Tensor:
        fi = self.fam.fi_low
        return fi.mix(self.channel_refinement.project_low(x_c2, fi.project))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fam = self.fam
        self._recomputing = (self.recompute and self.training and torch.is_grad_enabled()
                             and x[0].numel() >= self.recompute_min_elements)
        x_h, x_c2 = self._run(self._refine, x)
        first, second = fam.ccapm_inputs(self._run(fam.fi_high, x_h), self._run(self._initialise_low, x_c2))
        out = self._run(fam.fuse, self._run(fam.ccapm_high, *first), self._run(fam.ccapm_low, *second))
        return out

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of the conv, norm and attention outputs for an input of spatial size ``input_size``
        (the unit of dynamic-network-architectures' planner estimate)."""
        c, cr = self.fam.fuse.select.out_features // 2, self.channel_refinement
        refinement = cr.squeeze_high.out_channels + cr.squeeze_low.out_channels + 2 * c  # squeezes, GWC + PWC
        initialise = 2 * 5 * 3 * c  # 2 groups of 3 FI blocks: projection, depth-wise, norm, point-wise, norm
        ccapm = 3 * c + c + 3 * c + c  # stacked heads, conv path, attention windows (q, k, v), attention
        return int(prod(input_size)) * (c + refinement + initialise + 2 * ccapm + c)

