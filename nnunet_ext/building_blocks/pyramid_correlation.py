"""Spatial and semantic correlation modules of DPC-Net (Zhang et al., "Decoupled Pyramid
Correlation Network for Liver Tumor Segmentation from CT images", Med. Phys. 2022).

Both modules relate the pyramid features of two adjacent resolution levels. Level 0 is the highest
resolution; ``F_i`` has ``C_i`` channels. Dimensionality (2D or 3D) follows ``conv_op``.

Interpretations where the paper is silent (also listed in the README):

- SpaCor regresses its attention map at ``F_{i-1}``'s resolution. The hidden width of the 3-layer
  ``f_spa`` is ``C_{i-1}``, the channel count of the level at whose resolution it runs ("the number
  of channels is kept consistent with that of each level", Sec. IV). Upsampling is (bi/tri)linear
  interpolation and the way back to ``F_i``'s size is area (average) interpolation, so resampling
  adds no parameters.
- SemCor's 3-layer perceptron has ``C_i`` neurons per layer (Sec. IV) and recalibrates the level's
  own input (``F_i^spa``, or ``F_0`` at level 0), as the text of Sec. III.E describes
  ("multiply the attention vector with F_i^spa"): the SpaCor-first ordering of Table 4.
"""
from typing import Optional, Sequence, Type, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import (convert_conv_op_to_dim,
                                                                  maybe_convert_scalar_to_list)

_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}


class SpatialCorrelation(nn.Module):
    """SpaCor (paper Sec. III.D): refines the high-level feature ``F_i`` with a spatial attention
    map derived jointly from ``F_i`` and the low-level feature ``F_{i-1}``.

    - ``T = Avg_c([F_i^up, F_{i-1}]) + Max_c([F_i^up, F_{i-1}])``  (Eq. 5, channel squeeze)
    - ``A = f_spa(T)``, a 3-layer conv net conv-LeakyReLU-conv-LeakyReLU-conv (Eq. 4, 5)
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
        self.upsample_mode = _LINEAR_MODE[convert_conv_op_to_dim(conv_op)]

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """``high`` = F_i (coarser), ``low`` = F_{i-1} (finer); returns F_i^spa at F_i's size."""
        high_up = F.interpolate(high, size=low.shape[2:], mode=self.upsample_mode, align_corners=False)
        x = torch.cat((high_up, low), dim=1)
        squeeze = x.mean(dim=1, keepdim=True) + x.amax(dim=1, keepdim=True)
        attention = torch.sigmoid(self.f_spa(squeeze))
        refined = attention * self.g_spa(high_up)
        return F.interpolate(refined, size=high.shape[2:], mode="area")


class SemanticCorrelation(nn.Module):
    """SemCor (paper Sec. III.E): refines the low-level feature ``X_i`` with a channel attention
    vector derived jointly from ``X_i`` and the high-level ``F_{i+1}^spa``.

    - ``T = [Avg_s([X_i, F_{i+1}^spa]), Max_s([X_i, F_{i+1}^spa])]`` (Eq. 8, spatial squeeze of
      each input; the two inputs have different resolutions, so they are squeezed separately and
      the vectors concatenated, which equals squeezing their channel concatenation)
    - ``A = f_sem(T)``, a 3-layer perceptron with LeakyReLUs and ``C_i`` outputs (Eq. 7, 8)
    - ``F_i^sem = sigmoid(A) * g_sem(X_i)``, ``g_sem`` a 1x1 conv (Eq. 9)
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

    def forward(self, x: torch.Tensor, higher: torch.Tensor) -> torch.Tensor:
        """``x`` = X_i (finer), ``higher`` = F_{i+1}^spa (coarser); returns F_i^sem."""
        spatial_axes = tuple(range(2, x.ndim))
        squeeze = torch.cat((x.mean(dim=spatial_axes), higher.mean(dim=spatial_axes),
                             x.amax(dim=spatial_axes), higher.amax(dim=spatial_axes)), dim=1)
        attention = torch.sigmoid(self.f_sem(squeeze))
        return attention.view(*attention.shape, *([1] * len(spatial_axes))) * self.g_sem(x)
