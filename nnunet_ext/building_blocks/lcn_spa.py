"""Blocks of SPA-DCN-Net: gated local contrast normalisation, spatial pyramid attention, and the
EnhancedDeformConvBlock that chains them with a modulated deformable convolution.

Method: S. M. Jian, A. B. Azman, "SPA-DCN-NET: A Gated Multi-Scale Local Contrast Normalization Network for
Ultrasound Image Segmentation of Liver", IJACSA 16(11), 2025 (``papers/spa_dcn_net.txt``), Sec. III.C-H.
One code path for 2D and 3D, chosen by ``conv_op`` (the network itself is 2D because its encoder is).

``local_contrast_normalization`` (Eq. 2)
    ``LCN(x) = (x - mu_local) / (sigma_local + eps)`` per channel, with ``mu_local`` and ``sigma_local`` the mean
    and standard deviation over a box window centred on each position. Interpretations (the paper gives no window
    size, kernel shape or eps): box windows (separable, positions outside the map not counted, so the statistics
    are exact at the border); ``sigma_local + eps`` is realised as ``sqrt(sigma_local^2 + eps^2)`` (same role,
    smooth, so the gradient stays finite on constant regions such as ReLU zeros), ``eps = 1e-3``. The title's
    "multi-scale" LCN: with several windows, ``X_LCN`` is the mean of the single-window LCNs.
    Default windows (7, 15): at a decoder stage of stride s they span 7s and 15s input pixels, larger than the
    speckle grain at full resolution and small enough that a depth-dependent gain is nearly constant inside them.
``GatedLCN`` (Eq. 3)
    ``out = G_LCN * X_LCN + G_identity * X``, ``G_LCN = sigmoid(conv1x1(X_LCN))``,
    ``G_identity = 1 - sigmoid(conv1x1(X))``: two independent 1x1 convs (C -> C, so the gates act per channel and
    per position, "channel-by-channel or spatially position-by-space"). Both convs are zero-initialised: the block
    starts as the even mix ``0.5 * X_LCN + 0.5 * X``.
``SpatialPyramidAttention`` (Sec. III.E, Fig. 3)
    The pooling pyramid of SPANet (Guo et al., the paper's ref. [14]) replaced by parallel dilated 3x3 convs, as
    the paper states. Interpretation of the unspecified parts: each branch ``conv(C -> C_b, 3x3, dilation d)
    -> norm -> ReLU`` with dilations (1, 2, 4) and ``C_b = max(C // 4, 8)``; a 1x1 conv fuses the concatenated
    branches to ``C`` channels and a sigmoid gives the attention map ``A`` (per channel and position); output
    ``x * A``.
``EnhancedDeformConvBlock`` (Sec. III.C, G, H; Eq. 5-7)
    ``guide = SPA(GatedLCN(x))``; offsets (2 * 9 channels in 2D) and the sigmoid modulation mask (9 channels) are
    predicted from ``guide`` by a zero-initialised 3x3 conv (offsets 0 = regular grid, mask 0.5 at the start);
    the DCNv2 (``nnunet_ext.building_blocks.deform_conv``) runs on the block's input ``x`` (the concatenated
    decoder features, Eq. 5-6), then BN and ReLU (Eq. 7). ``lcn_mode`` gives the ablations of the paper's
    Table VII: ``'gated'`` (Gated LCN -> SPA, the method), ``'before_spa'`` (plain LCN -> SPA), ``'after_spa'``
    (SPA -> plain LCN), ``'none'`` (SPA only).
    Gradients: the LCN, gates and SPA reach the output only through the offset/mask conv, which starts at zero, so
    in the very first backward pass their gradients are exactly zero (present, not None: DDP without
    ``find_unused_parameters`` is fine); after the first optimiser step they are non-zero (tested).
    DCN backend (``dcn_backend='auto'``): chosen per call from the input's device, ``torchvision.ops.deform_conv2d``
    on CUDA (compiled kernels) and the pure-PyTorch ``deform_conv_nd`` on CPU (faster there:
    ``benchmarks/spa_dcn_net.py`` measures both); 3D always uses ``deform_conv_nd``.
"""
from __future__ import annotations

from typing import Sequence, Type

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_batchnorm
from torch import nn

from nnunet_ext.building_blocks.deform_conv import ModulatedDeformConvBlock, deform_conv_nd

__all__ = ["local_contrast_normalization", "LocalContrastNormalization", "GatedLCN", "SpatialPyramidAttention",
           "EnhancedDeformConvBlock", "LCN_MODES", "DCN_BACKENDS"]

LCN_MODES = ("gated", "before_spa", "after_spa", "none")
DCN_BACKENDS = ("auto", "torchvision", "generic")


def _box_means(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a centred ``window``-wide box of every channel, positions outside the map not counted.

    Separable: one depthwise convolution with a constant kernel per spatial axis (oneDNN's depthwise kernels are
    the fastest box filter on CPU: 0.26 s fwd+bwd for 4x32x256^2 on one core vs 0.42 s for ``avg_pool2d``), then
    division by the number of positions inside the map (the same filter applied to a one-channel map of ones)."""
    dim = x.dim() - 2
    conv = F.conv2d if dim == 2 else F.conv3d
    channels = x.shape[1]
    summed, count = x, torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    for axis in range(dim):
        shape = [1] * dim
        shape[axis] = window
        padding = [0] * dim
        padding[axis] = window // 2
        kernel = torch.ones(channels, 1, *shape, dtype=x.dtype, device=x.device)
        summed = conv(summed, kernel, padding=padding, groups=channels)
        count = conv(count, kernel[:1], padding=padding)
    return summed / count


def local_contrast_normalization(x: torch.Tensor, windows: Sequence[int] = (7, 15), eps: float = 1e-3) -> torch.Tensor:
    """Eq. 2 per channel over box windows (mean over ``windows``):
    ``(x - mu_local) / sqrt(sigma_local^2 + eps^2)``, ``sigma_local^2 = max(E_local[x^2] - mu_local^2, 0)``.
    Windows must be odd (centred). Statistics are computed in fp32 (the variance is a difference of squares)."""
    if x.dim() not in (4, 5):
        raise ValueError(f"local contrast normalisation needs a 2D or 3D batch (B, C, ...), got shape {tuple(x.shape)}")
    if not windows or any(w < 1 or w % 2 == 0 for w in windows):
        raise ValueError(f"LCN windows must be odd positive sizes, got {tuple(windows)}")
    xf = x.float()
    channels = xf.shape[1]
    out = 0
    for window in windows:
        mean, mean_sq = _box_means(torch.cat((xf, xf * xf), dim=1), window).split(channels, dim=1)
        var = torch.addcmul(mean_sq, mean, mean, value=-1).clamp_min(0)
        out = out + (xf - mean) * torch.rsqrt(var + eps * eps)
    return (out / len(windows)).to(x.dtype)


class LocalContrastNormalization(nn.Module):
    """Parameter-free module form of ``local_contrast_normalization`` (Eq. 2)."""

    def __init__(self, windows: Sequence[int] = (7, 15), eps: float = 1e-3):
        super().__init__()
        self.windows = tuple(int(w) for w in windows)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_contrast_normalization(x, self.windows, self.eps)

    def extra_repr(self) -> str:
        return f"windows={self.windows}, eps={self.eps}"


class GatedLCN(nn.Module):
    """Eq. 3: ``sigmoid(conv1x1(X_LCN)) * X_LCN + (1 - sigmoid(conv1x1(X))) * X`` with ``X_LCN = LCN(X)``."""

    def __init__(self, channels: int, conv_op: Type[nn.Module] = nn.Conv2d, windows: Sequence[int] = (7, 15),
                 eps: float = 1e-3):
        super().__init__()
        self.lcn = LocalContrastNormalization(windows, eps)
        self.gate_lcn = conv_op(channels, channels, 1)
        self.gate_identity = conv_op(channels, channels, 1)
        for conv in (self.gate_lcn, self.gate_identity):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_lcn = self.lcn(x)
        g_lcn = torch.sigmoid(self.gate_lcn(x_lcn))
        g_identity = 1.0 - torch.sigmoid(self.gate_identity(x))
        return g_lcn * x_lcn + g_identity * x


class SpatialPyramidAttention(nn.Module):
    """``x * sigmoid(conv1x1(cat_d(ReLU(norm(conv3x3_dilation_d(x))))))`` over the dilations ``d``."""

    def __init__(self, channels: int, conv_op: Type[nn.Module] = nn.Conv2d, dilations: Sequence[int] = (1, 2, 4),
                 branch_channels: int | None = None, norm_op: Type[nn.Module] | None = None):
        super().__init__()
        if branch_channels is None:
            branch_channels = max(channels // 4, 8)
        norm_op = get_matching_batchnorm(conv_op) if norm_op is None else norm_op
        self.dilations = tuple(int(d) for d in dilations)
        self.branches = nn.ModuleList(
            nn.Sequential(conv_op(channels, branch_channels, 3, padding=d, dilation=d, bias=False),
                          norm_op(branch_channels), nn.ReLU(inplace=True))
            for d in self.dilations)
        self.fuse = conv_op(branch_channels * len(self.dilations), channels, 1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map ``A`` in (0, 1), shape of ``x``."""
        return torch.sigmoid(self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class EnhancedDeformConvBlock(nn.Module):
    """Gated LCN -> SPA -> DCNv2 (offsets and mask from the SPA output, applied to the input) -> BN -> ReLU.

    Args:
        in_channels, out_channels: of the block (the deformable conv maps ``in_channels -> out_channels``).
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        lcn_mode: one of ``LCN_MODES`` (Table VII ablations, see the module docstring).
        lcn_windows, lcn_eps: of the LCN; spa_dilations: of the SPA branches.
        dcn_backend: ``'auto'`` (torchvision on CUDA, pure PyTorch on CPU), ``'torchvision'`` or ``'generic'``.
    """

    def __init__(self, in_channels: int, out_channels: int, conv_op: Type[nn.Module] = nn.Conv2d,
                 lcn_mode: str = "gated", lcn_windows: Sequence[int] = (7, 15), lcn_eps: float = 1e-3,
                 spa_dilations: Sequence[int] = (1, 2, 4), dcn_backend: str = "auto"):
        super().__init__()
        if lcn_mode not in LCN_MODES:
            raise ValueError(f"lcn_mode must be one of {LCN_MODES}, got {lcn_mode!r}")
        if dcn_backend not in DCN_BACKENDS:
            raise ValueError(f"dcn_backend must be one of {DCN_BACKENDS}, got {dcn_backend!r}")
        self.dim = convert_conv_op_to_dim(conv_op)
        if dcn_backend == "torchvision" and self.dim != 2:
            raise ValueError("torchvision only has a 2D deformable convolution; use dcn_backend='generic' or 'auto'")
        self.lcn_mode = lcn_mode
        self.dcn_backend = dcn_backend
        if lcn_mode == "gated":
            self.lcn = GatedLCN(in_channels, conv_op, lcn_windows, lcn_eps)
        elif lcn_mode in ("before_spa", "after_spa"):
            self.lcn = LocalContrastNormalization(lcn_windows, lcn_eps)
        else:
            self.lcn = None
        self.spa = SpatialPyramidAttention(in_channels, conv_op, spa_dilations)
        self.dcn = ModulatedDeformConvBlock(in_channels, out_channels, 3, self.dim, bias=False, backend="generic")
        self.norm = get_matching_batchnorm(conv_op)(out_channels)
        self.nonlin = nn.ReLU(inplace=True)

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """The features the offsets and the modulation mask are predicted from."""
        if self.lcn_mode == "after_spa":
            return self.lcn(self.spa(x))
        return self.spa(x if self.lcn is None else self.lcn(x))

    def _use_torchvision(self, x: torch.Tensor) -> bool:
        return self.dim == 2 and (self.dcn_backend == "torchvision" or (self.dcn_backend == "auto" and x.is_cuda))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.dcn.predict_offset_and_mask(self.guide(x))
        conv = self.dcn.dcn
        if self._use_torchvision(x):
            from torchvision.ops import deform_conv2d
            y = deform_conv2d(x, offset, conv.weight, None, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, mask=mask)
        else:
            y = deform_conv_nd(x, offset, conv.weight, None, conv.stride, conv.padding, conv.dilation, mask)
        return self.nonlin(self.norm(y))

    def extra_repr(self) -> str:
        return f"lcn_mode={self.lcn_mode!r}, dcn_backend={self.dcn_backend!r}"
