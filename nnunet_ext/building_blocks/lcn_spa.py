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
    Implementation (same function as autograd through Eq. 2, tested in fp64): the box means are products with
    banded mean matrices along each axis (GEMMs; the last axis of all windows in one), and an autograd Function
    with the backward written out saves only ``x`` and per window ``mu_local``, ``1/sqrt(sigma^2 + eps^2)`` and the
    clamp mask. Measured fwd+bwd over the five decoder-stage inputs of a 256x256 batch of 4 (2 threads, CPU time,
    load 7): 4.73 s with separable depthwise convolutions under autograd, 2.78 s this way; writing ``[x, x^2]`` and
    the backward's ``[a - mu t, t]`` into one buffer instead of ``torch.cat`` of temporaries: a further 3.48 s ->
    2.98 s (load 7.7).
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
    DCN backend (``dcn_backend``, one of ``deform_conv.BACKENDS``): ``'auto'`` chooses per call from the input's
    device like every ``DeformConv`` (``deform_conv.resolve_backend``: the compiled CPU kernel on the CPU, Triton or
    torchvision on CUDA); ``benchmarks/spa_dcn_net.py --backends`` times the training step with each.
"""
from __future__ import annotations

import functools
import math
from typing import List, Sequence, Tuple, Type

import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_batchnorm
from torch import nn

from nnunet_ext.building_blocks.deform_conv import BACKENDS, ModulatedDeformConvBlock
from nnunet_ext.building_blocks.pointwise import pointwise_conv_op

__all__ = ["local_contrast_normalization", "LocalContrastNormalization", "GatedLCN", "SpatialPyramidAttention",
           "EnhancedDeformConvBlock", "LCN_MODES", "DCN_BACKENDS"]

LCN_MODES = ("gated", "before_spa", "after_spa", "none")
DCN_BACKENDS = BACKENDS


@functools.lru_cache(maxsize=64)
def _box_mean_matrix(n: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``M[i, j] = 1 / n_i`` for ``|i - j| <= window // 2``, else 0, with ``n_i`` the number of such ``j`` inside
    ``0..n-1``: ``M @ v`` is the centred box mean of ``v`` along one axis, positions outside the map not counted."""
    i = torch.arange(n, device=device)
    band = ((i[:, None] - i[None, :]).abs() <= window // 2).to(dtype)
    return band / band.sum(1, keepdim=True)


def _along(x: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` (n x n) applied along the non-last axis ``axis`` of ``x`` (one batched left multiplication)."""
    shape = x.shape
    return torch.matmul(matrix, x.reshape(math.prod(shape[:axis]), shape[axis], -1)).view(shape)


def _box_means(s: torch.Tensor, windows: Tuple[int, ...]) -> List[torch.Tensor]:
    """The box mean of ``s`` over each window: the separable mean matrices along every spatial axis, the last axis
    of all windows in one GEMM (``s @ [M_1^T | M_2^T]``)."""
    mats = [[_box_mean_matrix(n, w, s.dtype, s.device) for n in s.shape[2:]] for w in windows]
    width = s.shape[-1]
    y = s @ torch.cat([m[-1] for m in mats]).T
    out = []
    for k, m in enumerate(mats):
        yk = y[..., k * width:(k + 1) * width]
        for axis, matrix in enumerate(m[:-1], start=2):
            yk = _along(yk, axis, matrix)
        out.append(yk)
    return out


def _box_means_adjoint(grads: Sequence[torch.Tensor], windows: Tuple[int, ...]) -> torch.Tensor:
    """``sum_k adjoint_k(grads[k])`` of ``_box_means`` (the transposed matrices; the last axis of every window
    accumulated into one output by ``addmm_``)."""
    mats = [[_box_mean_matrix(n, w, grads[0].dtype, grads[0].device) for n in grads[0].shape[2:]] for w in windows]
    out = None
    for g, m in zip(grads, mats):
        for axis, matrix in enumerate(m[:-1], start=2):
            g = _along(g, axis, matrix.T)
        if out is None:
            out = g @ m[-1]
        else:  # accumulate inside the GEMM (no concatenated copy)
            out.view(-1, out.shape[-1]).addmm_(g.reshape(-1, g.shape[-1]), m[-1])
    return out


class _LCNFunction(torch.autograd.Function):
    """Eq. 2 averaged over windows with a hand-written backward (see ``local_contrast_normalization``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, windows: Tuple[int, ...], eps: float) -> torch.Tensor:
        channels = x.shape[1]
        out, saved = None, []
        both = x.new_empty((x.shape[0], 2 * channels, *x.shape[2:]))
        both[:, :channels] = x
        torch.mul(x, x, out=both[:, channels:])
        for mean_both in _box_means(both, windows):
            mean, mean_sq = mean_both.split(channels, dim=1)
            var = torch.addcmul(mean_sq, mean, mean, value=-1)
            valid = var >= 0  # clamp_min's gradient passes where var >= 0
            r = var.clamp_min_(0).add_(eps * eps).rsqrt_()
            x_hat = (x - mean).mul_(r)
            out = x_hat if out is None else out.add_(x_hat)
            saved += [mean, r, valid]
        ctx.windows = windows
        ctx.save_for_backward(x, *saved)
        return out.div_(len(windows))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        # see local_contrast_normalization's docstring for the formula
        x, *saved = ctx.saved_tensors
        g = grad_out / len(ctx.windows)
        grad_x, box_grads = None, []
        for k in range(len(ctx.windows)):
            mean, r, valid = saved[3 * k:3 * k + 3]
            a = g * r
            both = x.new_empty((x.shape[0], 2 * x.shape[1], *x.shape[2:]))  # [a - mu t, t]
            t = torch.sub(x, mean, out=both[:, x.shape[1]:]).mul_(r).mul_(a).mul_(r).mul_(valid)
            torch.addcmul(a, mean, t, value=-1, out=both[:, :x.shape[1]])
            box_grads.append(both)
            grad_x = a if grad_x is None else grad_x.add_(a)
        with torch.autocast(x.device.type, enabled=False):
            u_mean, u_mean_sq = _box_means_adjoint(box_grads, ctx.windows).split(x.shape[1], dim=1)
        return grad_x.sub_(u_mean).addcmul_(x, u_mean_sq, value=-1), None, None


def local_contrast_normalization(x: torch.Tensor, windows: Sequence[int] = (7, 15), eps: float = 1e-3) -> torch.Tensor:
    """Eq. 2 per channel over box windows (mean over ``windows``):
    ``(x - mu_local) / sqrt(sigma_local^2 + eps^2)``, ``sigma_local^2 = max(E_local[x^2] - mu_local^2, 0)``.
    Windows must be odd (centred). Computed in fp32 (fp64 stays fp64; the variance is a difference of squares).

    Box means as GEMMs with banded mean matrices (``_box_means``) rather than depthwise convolutions: forward of both
    windows on 4x64x256^2: 0.43 s vs 0.56 s, 4x160x128^2: 0.17 s vs 0.37 s, 4x288x64^2: 0.03 s vs 0.14 s (the
    dense band wastes multiplications at 256, yet oneDNN's depthwise kernels are slower still; ``avg_pool`` was
    slower than both). The hand-written backward (``_LCNFunction``) replaces about 20 autograd nodes per window by a
    few fused in-place passes: ``dL/dx = sum_w [a_w - B_w^T(a_w - mu_w t_w) - x B_w^T(t_w)] / n_windows`` with
    ``a = g r``, ``r = (sigma^2 + eps^2)^(-1/2)``, ``t = (x - mu) r^2 a [sigma^2 >= 0]`` (``B_w`` the box mean)."""
    if x.dim() not in (4, 5):
        raise ValueError(f"local contrast normalisation needs a 2D or 3D batch (B, C, ...), got shape {tuple(x.shape)}")
    if not windows or any(w < 1 or w % 2 == 0 for w in windows):
        raise ValueError(f"LCN windows must be odd positive sizes, got {tuple(windows)}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        return _LCNFunction.apply(x.to(work), tuple(int(w) for w in windows), float(eps)).to(x.dtype)


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
        self.gate_lcn = pointwise_conv_op(conv_op)(channels, channels)
        self.gate_identity = pointwise_conv_op(conv_op)(channels, channels)
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
        self.fuse = pointwise_conv_op(conv_op)(branch_channels * len(self.dilations), channels)

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
        dcn_backend: one of ``deform_conv.BACKENDS`` (``'auto'``: per call from the device, see ``DeformConv``).
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
        self.dcn = ModulatedDeformConvBlock(in_channels, out_channels, 3, self.dim, bias=False, backend=dcn_backend)
        self.norm = get_matching_batchnorm(conv_op)(out_channels)
        self.nonlin = nn.ReLU(inplace=True)

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """The features the offsets and the modulation mask are predicted from."""
        if self.lcn_mode == "after_spa":
            return self.lcn(self.spa(x))
        return self.spa(x if self.lcn is None else self.lcn(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.norm(self.dcn(x, guide=self.guide(x))))

    def extra_repr(self) -> str:
        return f"lcn_mode={self.lcn_mode!r}, dcn_backend={self.dcn_backend!r}"
