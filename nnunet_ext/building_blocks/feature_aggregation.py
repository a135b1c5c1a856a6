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
from typing import List, Optional, Sequence, Type, Union

import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd
from torch.utils.checkpoint import checkpoint

from nnunet_ext.building_blocks.scconv import ChannelRefinement, SpatialGate

KernelSize = Union[int, Sequence[int]]


def _padding(kernel_size: KernelSize):
    return [k // 2 for k in kernel_size] if isinstance(kernel_size, (list, tuple)) else kernel_size // 2


class FeatureInitialize(nn.Module):
    """FI block: 1x1 conv, then a ConvMixer block (residual depth-wise conv -> GELU -> norm, 1x1 -> GELU -> norm)."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, channels: int, kernel_size: KernelSize,
                 norm_op: Type[nn.Module], norm_op_kwargs: Optional[dict] = None):
        super().__init__()
        norm_op_kwargs = norm_op_kwargs or {}
        self.project = conv_op(in_channels, channels, 1)
        self.depthwise = nn.Sequential(conv_op(channels, channels, kernel_size, padding=_padding(kernel_size),
                                               groups=channels), nn.GELU(), norm_op(channels, **norm_op_kwargs))
        self.pointwise = nn.Sequential(conv_op(channels, channels, 1), nn.GELU(), norm_op(channels, **norm_op_kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        return self.pointwise(x + self.depthwise(x))


def shift_kernels(dim: int, kernel_size: int) -> torch.Tensor:
    """ACmix's shift initialisation: ``(k^d, k, ..., k)``, kernel ``i`` is one-hot at grid position ``i``
    (row-major), i.e. a cross-correlation with it shifts its input map by offset ``unravel(i) - k // 2``."""
    n = kernel_size ** dim
    return torch.eye(n).view(n, *([kernel_size] * dim))


class ShiftConvPath(nn.Module):
    """Eq. 7-8: ``Y_conv = Shift(FC(cat(q, k, v)))`` (ACmix's convolution path), ``C`` channels out."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int, heads: int, kernel_size: int = 3):
        super().__init__()
        self.heads, self.head_channels = heads, channels // heads
        dim = convert_conv_op_to_dim(conv_op)
        self.positions = kernel_size ** dim
        # the FC acts on the head axis of a (B, 3*heads, C/heads, N) view: a 1x1 Conv2d for every dimension
        self.fc = nn.Conv2d(3 * heads, self.positions, 1)
        self.shift = conv_op(self.head_channels * self.positions, channels, kernel_size, padding=kernel_size // 2,
                             groups=self.head_channels)
        with torch.no_grad():
            self.shift.weight.copy_(shift_kernels(dim, kernel_size).unsqueeze(0).repeat(
                channels, *([1] * (dim + 1))))
            self.shift.bias.zero_()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = q.shape
        n = prod(spatial)
        heads = [t.reshape(b, self.heads, self.head_channels, n) for t in (q, k, v)]
        mixed = self.fc(torch.cat(heads, dim=1))  # (B, k^d, C/heads, N)
        return self.shift(mixed.transpose(1, 2).reshape(b, self.head_channels * self.positions, *spatial))


def window_sizes(spatial: Sequence[int], window_size: int) -> List[int]:
    """Per axis the largest divisor of the axis size that is not above ``window_size``."""
    return [max(w for w in range(1, min(window_size, s) + 1) if s % w == 0) for s in spatial]


class WindowCrossAttention(nn.Module):
    """Multi-head cross-attention inside non-overlapping windows (``scaled_dot_product_attention``)."""

    def __init__(self, heads: int, window_size: int):
        super().__init__()
        self.heads, self.window_size = heads, window_size

    def _to_windows(self, x: torch.Tensor, windows: Sequence[int]) -> torch.Tensor:
        b, c, *spatial = x.shape
        d = len(spatial)
        split = [n for s, w in zip(spatial, windows) for n in (s // w, w)]
        x = x.reshape(b, self.heads, c // self.heads, *split)
        # (B, heads, head_ch, n1, w1, n2, w2, ...) -> (B, heads, n1, n2, ..., w1, w2, ..., head_ch)
        order = [0, 1, *range(3, 3 + 2 * d, 2), *range(4, 4 + 2 * d, 2), 2]
        return x.permute(order).reshape(b, self.heads * prod(s // w for s, w in zip(spatial, windows)),
                                        prod(windows), c // self.heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = q.shape
        d = len(spatial)
        windows = window_sizes(spatial, self.window_size)
        out = F.scaled_dot_product_attention(*(self._to_windows(t, windows) for t in (q, k, v)))
        counts = [s // w for s, w in zip(spatial, windows)]
        out = out.reshape(b, self.heads, *counts, *windows, c // self.heads)
        # back to (B, heads, head_ch, n1, w1, n2, w2, ...)
        order = [0, 1, 2 + 2 * d, *[i for a in range(d) for i in (2 + a, 2 + d + a)]]
        return out.permute(order).reshape(b, c, *spatial)


class CCAPM(nn.Module):
    """Convolution & Cross-Attention Parallel Module (Eq. 7-9): ``CCAPM(f1, f2)``, ``C`` channels in and out."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kernel_size: KernelSize, norm_op: Type[nn.Module],
                 norm_op_kwargs: Optional[dict] = None, heads: int = 4, window_size: int = 8, shift_kernel: int = 3):
        super().__init__()
        heads = gcd(heads, channels)
        self.fi_query, self.fi_key, self.fi_value = (
            FeatureInitialize(conv_op, channels, channels, kernel_size, norm_op, norm_op_kwargs) for _ in range(3))
        self.conv_path = ShiftConvPath(conv_op, channels, heads, shift_kernel)
        self.attention = WindowCrossAttention(heads, window_size)
        self.w_conv = nn.Parameter(torch.tensor(0.5))
        self.w_cross = nn.Parameter(torch.tensor(0.5))

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        q, k, v = self.fi_query(f1), self.fi_key(f2), self.fi_value(f2)
        return self.w_conv * self.conv_path(q, k, v) + self.w_cross * self.attention(q, k, v)


class SKFusion(nn.Module):
    """SKNet selection of two ``C``-channel maps (Eq. 10-12): per-channel softmax weights across the branches."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int, reduction: int = 16, min_dim: int = 32):
        super().__init__()
        hidden = max(channels // reduction, min_dim)
        self.squeeze = nn.Sequential(conv_op(channels, hidden, 1), nn.ReLU(inplace=True))
        self.select = conv_op(hidden, 2 * channels, 1)

    def weights(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        """``(B, 2, C, 1, ...)``: the branch weights, summing to 1 over dim 1 for every channel."""
        pooled = (y1 + y2).mean(dim=tuple(range(2, y1.ndim)), keepdim=True)
        logits = self.select(self.squeeze(pooled))
        return torch.softmax(logits.view(y1.shape[0], 2, y1.shape[1], *logits.shape[2:]), dim=1)

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        a = self.weights(y1, y2)
        return a[:, 0] * y1 + a[:, 1] * y2


class FeatureAggregationModule(nn.Module):
    """FAM (Eq. 6): ``SK(CCAPM_1(X_H, X_L), CCAPM_2(X_L, X_H))``."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kernel_size: KernelSize, norm_op: Type[nn.Module],
                 norm_op_kwargs: Optional[dict] = None, heads: int = 4, window_size: int = 8):
        super().__init__()
        self.ccapm_high, self.ccapm_low = (CCAPM(conv_op, channels, kernel_size, norm_op, norm_op_kwargs, heads,
                                                 window_size) for _ in range(2))
        self.fuse = SKFusion(conv_op, channels)

    def forward(self, x_h: torch.Tensor, x_l: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.ccapm_high(x_h, x_l), self.ccapm_low(x_l, x_h))


class SCRM(nn.Module):
    """Spatial-Channel Regulation Module: ``FAM(CR(SG(x)))``, ``C`` channels in and out.

    ``recompute``: in training, store only the inputs of the Spatial Gate, the Channel Refinement, the two CCAPMs
    and the SK fusion, and recompute their internals in the backward pass (``torch.utils.checkpoint``): the same
    values and gradients, with at most one CCAPM's internals alive at a time.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kernel_size: KernelSize, norm_op: Type[nn.Module],
                 norm_op_kwargs: Optional[dict] = None, heads: int = 4, window_size: int = 8, recompute: bool = False):
        super().__init__()
        self.spatial_gate = SpatialGate(channels)
        self.channel_refinement = ChannelRefinement(conv_op, channels, kernel_size)
        self.fam = FeatureAggregationModule(conv_op, channels, kernel_size, norm_op, norm_op_kwargs, heads,
                                            window_size)
        self.recompute = recompute

    def _run(self, module: nn.Module, *inputs: torch.Tensor):
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(module, *inputs, use_reentrant=False)
        return module(*inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_h, x_l = self._run(self.channel_refinement, self._run(self.spatial_gate, x))
        fam = self.fam
        return self._run(fam.fuse, self._run(fam.ccapm_high, x_h, x_l), self._run(fam.ccapm_low, x_l, x_h))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of the conv, norm and attention outputs for an input of spatial size ``input_size``
        (the unit of dynamic-network-architectures' planner estimate)."""
        c, cr = self.fam.fuse.select.out_channels // 2, self.channel_refinement
        refinement = cr.squeeze_high.out_channels + cr.squeeze_low.out_channels + 2 * c + cr.pwc_low.out_channels
        path = self.fam.ccapm_high.conv_path
        ccapm = 9 * c + path.positions * path.head_channels + 2 * c  # 3 FI x 3 maps, FC, shift, attention
        return int(prod(input_size)) * (c + refinement + 2 * ccapm + c)

