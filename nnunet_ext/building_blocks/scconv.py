"""SCRNet's Spatial Gate and Channel Refinement (Xu & Wang, "SCRNet", Sec. III-A, Eq. 1-5), built on
SCConv's SRU and CRU (Li et al., CVPR 2023). One code path for 2D and 3D: ``conv_op`` picks the dimension.

Spatial Gate (Eq. 1-3), SCConv's SRU in the form of its reference code (the "current form"):
``GN(X)`` with per-channel scale ``gamma``; ``w_gamma = gamma / sum(gamma)`` (the paper's Eq. 1 writes
a softmax, the reference code normalises by the sum; we follow the code); ``W = sigmoid(GN(X) * w_gamma)``;
``W1 = where(W > t, 1, W)``, ``W2 = where(W > t, 0, W)`` with threshold ``t = 0.5``; ``X_w1 = W1 * X``,
``X_w2 = W2 * X`` (both on the raw input); output ``cat(X_w1^1 + X_w2^2, X_w1^2 + X_w2^1)`` over channel halves.
Computed in fewer passes over the maps, with the same values and gradients: ``WX = W * X``,
``X_w1 = where(W > t, X, WX)``, ``X_w2 = where(W > t, 0, WX)``; ``halves`` returns the two halves of Eq. 3 without
concatenating them (the Channel Refinement splits them again at ``alpha = 1/2``).

Channel Refinement (Eq. 4-5), SCConv's CRU without its fusion (SCRNet replaces it by the FAM): split the
channels at ``alpha = 1/2``, squeeze each part by 2 with a 1x1 conv (``X_C1``, ``X_C2``);
``X_H = GWC(X_C1) + PWC(X_C1)`` (group-wise conv, 2 groups, the plan's kernel size; point-wise conv), both
``C`` channels wide; ``X_L = cat(X_C2, PWC(X_C2))``, also ``C`` channels. ``X_L`` is only ever read by 1x1
convolutions (the Feature-Initialize projections), and ``P cat(X_C2, PWC(X_C2)) = (P_1 + P_2 W_pwc) X_C2`` for a
1x1 weight ``P = [P_1, P_2]``: ``project_low`` applies that composed weight to ``X_C2`` (``C / 4`` channels) instead
of materialising ``X_L`` (the same function; fewer operations).

Every 1x1 convolution of the SCRM runs as a batched matrix product (``pointwise.pointwise_conv``), see there.
"""
from math import gcd
from typing import Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from nnunet_ext.building_blocks.pointwise import pointwise_conv


class SpatialGate(nn.Module):
    """Spatial Gate (SCRNet Eq. 1-3; SCConv SRU).

    :param channels: C, must be even (the reconstruction adds channel halves crosswise).
    :param group_num: GroupNorm groups (SCConv's default inside ScConv: 4); ``gcd(group_num, C)`` is used
        so that narrow stages work.
    :param gate_threshold: the threshold of Eq. 2 (0.5).
    """

    def __init__(self, channels: int, group_num: int = 4, gate_threshold: float = 0.5):
        super().__init__()
        if channels % 2:
            raise ValueError(f"SpatialGate needs an even channel count (Eq. 3 adds channel halves), got {channels}")
        self.gn = nn.GroupNorm(gcd(group_num, channels), channels)
        self.gate_threshold = gate_threshold

    def _gate(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``W`` of Eq. 1 and the mask ``W > t`` of Eq. 2. ``GN(X) * w_gamma`` is one group norm whose affine
        map is ``(gamma * w_gamma, beta * w_gamma)`` (the same function without a pass over the map: the step at
        256^2, batch 4, see ``ChannelRefinement``)."""
        gamma = self.gn.weight
        w_gamma = gamma / gamma.sum()
        w = torch.sigmoid(F.group_norm(x, self.gn.num_groups, gamma * w_gamma, self.gn.bias * w_gamma, self.gn.eps))
        return w, w > self.gate_threshold

    def gate_weights(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W1, W2)`` of Eq. 2: the informative weights (1 above the threshold) and the non-informative
        ones (0 above the threshold)."""
        w, above = self._gate(x)
        return w.masked_fill(above, 1.0), w.masked_fill(above, 0.0)

    def halves(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two channel halves of Eq. 3, ``(X_w1^1 + X_w2^2, X_w1^2 + X_w2^1)``, with ``X_w1 = where(W > t, X,
        W X)`` and ``X_w2 = where(W > t, 0, W X)`` (= ``W1 X`` and ``W2 X``)."""
        w, above = self._gate(x)
        wx = w * x
        x_w1, x_w2 = torch.where(above, x, wx), wx.masked_fill(above, 0.0)
        half = x.shape[1] // 2
        return x_w1[:, :half] + x_w2[:, half:], x_w1[:, half:] + x_w2[:, :half]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.halves(x), dim=1)


# X_H = GWC + PWC runs as one dense conv up to this many squeezed channels (``folded_high_weight``): twice the
# multiply-adds of the 2-group conv, but one oneDNN call on a map read once. Forward + backward, CPU time at
# batch 4 with a squared sum on top (load 7-8): 8 channels at 256^2 0.44 s -> 0.29 s, 16 at 128^2 0.19 -> 0.17 s,
# while 64 at 32^2 went 0.10 -> 0.19 s (compute-bound there), so wider stages keep the two convs.
FOLD_MAX_CHANNELS = 16


class ChannelRefinement(nn.Module):
    """Channel Refinement (SCRNet Eq. 4-5; SCConv CRU without its fusion): ``C`` channels -> ``(X_H, X_L)``,
    each ``C`` channels.

    :param kernel_size: of the group-wise conv (SCConv: 3; here the plan's kernel size of the stage).
    :param alpha: split ratio (1/2), ``squeeze_ratio``: 1x1 squeeze factor (2), ``group_size``: GWC groups (2;
        ``gcd(group_size, squeezed channels)`` is used so that narrow stages work).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kernel_size: Union[int, Sequence[int]] = 3,
                 alpha: float = 0.5, squeeze_ratio: int = 2, group_size: int = 2):
        super().__init__()
        self.up_channels = int(alpha * channels)
        self.low_channels = channels - self.up_channels
        up_sq, low_sq = self.up_channels // squeeze_ratio, self.low_channels // squeeze_ratio
        if min(up_sq, low_sq) < 1:
            raise ValueError(f"ChannelRefinement: {channels} channels are too few for alpha={alpha} and "
                             f"squeeze ratio {squeeze_ratio}")
        padding = [k // 2 for k in kernel_size] if isinstance(kernel_size, (list, tuple)) else kernel_size // 2
        self.squeeze_high = conv_op(self.up_channels, up_sq, 1, bias=False)
        self.squeeze_low = conv_op(self.low_channels, low_sq, 1, bias=False)
        self.gwc = conv_op(up_sq, channels, kernel_size, padding=padding, groups=gcd(group_size, up_sq))
        self.pwc_high = conv_op(up_sq, channels, 1, bias=False)
        self.pwc_low = conv_op(low_sq, channels - low_sq, 1, bias=False)

    def high_and_squeezed_low(self, up: torch.Tensor, low: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(X_H, X_C2)`` from the two channel parts (``up``: the first ``alpha * C`` channels)."""
        x_c1 = pointwise_conv(up, self.squeeze_high.weight)
        if x_c1.shape[1] <= FOLD_MAX_CHANNELS:
            conv = (F.conv2d, F.conv3d)[x_c1.ndim - 4]
            return conv(x_c1, self.folded_high_weight(), self.gwc.bias, padding=self.gwc.padding), pointwise_conv(
                low, self.squeeze_low.weight)
        return self.gwc(x_c1) + pointwise_conv(x_c1, self.pwc_high.weight), pointwise_conv(low, self.squeeze_low.weight)

    def folded_high_weight(self) -> torch.Tensor:
        """``GWC + PWC`` of Eq. 4 as one dense kernel ``(C, alpha C / 2, k, ...)``: the group-wise kernels on the
        block diagonal, the point-wise weight added at the centre tap (same function: the centre tap always reads
        the pixel itself, also at the border)."""
        w, groups = self.gwc.weight, self.gwc.groups
        out, per_group, *kernel = w.shape
        eye = torch.eye(groups, dtype=w.dtype, device=w.device)
        dense = torch.einsum("goi...,gh->gohi...", w.view(groups, out // groups, per_group, *kernel), eye)
        pad = [p for k in reversed(kernel) for p in (k // 2, k // 2)]
        return dense.reshape(out, groups * per_group, *kernel) + F.pad(self.pwc_high.weight, pad)

    def project_low(self, x_c2: torch.Tensor, projection: _ConvNd) -> torch.Tensor:
        """``projection(X_L)`` for a 1x1 conv ``projection``, as one 1x1 conv of ``X_C2`` with the composed weight
        ``P_1 + P_2 W_pwc`` (``P_1``: the columns of ``P`` that read ``X_C2``, ``P_2``: those that read
        ``PWC(X_C2)``)."""
        p = projection.weight.flatten(1)
        low_sq = x_c2.shape[1]
        weight = p[:, :low_sq] + p[:, low_sq:] @ self.pwc_low.weight.flatten(1)
        return pointwise_conv(x_c2, weight, projection.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x_h, x_c2 = self.high_and_squeezed_low(*torch.split(x, [self.up_channels, self.low_channels], dim=1))
        return x_h, torch.cat((x_c2, pointwise_conv(x_c2, self.pwc_low.weight)), dim=1)
