"""DLKUNet (Tang et al., DLKUNet, ``papers/dlkunet``, Sec. 3 and Table 1) built from an nnU-Net plan.

The network (Fig. 1): a stem ``DLKBlock(in -> C)`` at full resolution, ``depth`` downsamplings
``maxpool -> DLKBlock(C_i -> C_{i+1})`` (EBlocks), ``depth`` decoder fusion blocks (DFB) back to full
resolution and a 1x1 output conv (the reprojection layer). Widths double per level from ``C = 96``:

=========  =====  ==============================  ==========================
variant    depth  widths                          parameters (1 in, 9 classes)
=========  =====  ==============================  ==========================
S          2      96, 192, 384                    1,131,379 (Table 1: 1.13M)
M          3      96, 192, 384, 768               4,494,451 (Table 1: 4.49M)
L          4      96, 192, 384, 768, 1536         17,708,659 (Table 1: 17.70M)
=========  =====  ==============================  ==========================

Table 1 lists the EBlock count including the stem (S: 3) and the skip widths ({96, 192} for S);
the authors' code fixes which blocks these are, and the counts above are what it gives.

In nnU-Net: the dimension is the plan's ``conv_op`` (2D as in the paper, 3D with the same blocks),
the pooling/upsampling factor of each level is the plan's stride of that stage (anisotropic plans work;
the paper's pools are 2x2), and the depth is the variant's, bounded by the plan's number of
downsamplings. Deep supervision is an addition: one 1x1 head per DFB output (highest resolution
first; the full-resolution head is the paper's output conv). ``deep_supervision_heads=False`` builds
the paper's network without the extra heads; the plan factory always builds them so that the
training checkpoint loads into the predictor's network (built with deep supervision off).
"""
import pydoc
from typing import List, Optional, Sequence, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_pool_op
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_ext.building_blocks.lka import DecoderFusionBlock, DLKBlock

BASE_WIDTH = 96
VARIANT_DEPTH = {"S": 2, "M": 3, "L": 4}


def variant_widths(variant: str, depth: Optional[int] = None) -> List[int]:
    """Widths of stages 0..depth of ``variant`` (``depth`` defaults to the variant's own)."""
    if variant not in VARIANT_DEPTH:
        raise ValueError(f"unknown DLKUNet variant {variant!r}; choose one of {sorted(VARIANT_DEPTH)}")
    depth = VARIANT_DEPTH[variant] if depth is None else depth
    return [BASE_WIDTH * 2 ** i for i in range(depth + 1)]


class DLKUNet(nn.Module):
    """DLKUNet with stage widths ``features_per_stage`` (``depth + 1`` of them) and ``strides`` (``depth``
    pooling factors, an int or one per axis each). ``deep_supervision`` (a switch, needs the heads) makes
    ``forward`` return one logit map per DFB output, highest resolution first; otherwise the
    full-resolution logits only."""

    def __init__(self, input_channels: int, num_classes: int, conv_op: Type[_ConvNd],
                 features_per_stage: Sequence[int], strides: Sequence[Union[int, Sequence[int]]],
                 deep_supervision: bool = False, deep_supervision_heads: bool = True):
        super().__init__()
        if len(features_per_stage) != len(strides) + 1 or len(strides) < 1:
            raise ValueError(f"DLKUNet needs at least one downsampling and one width more than strides; got "
                             f"features_per_stage={list(features_per_stage)}, strides={list(strides)}")
        if deep_supervision and not deep_supervision_heads:
            raise ValueError("deep_supervision=True needs deep_supervision_heads=True")
        pool_op = get_matching_pool_op(conv_op, pool_type="max")
        self.encoder = nn.ModuleList([DLKBlock(conv_op, input_channels, features_per_stage[0])])
        self.encoder.extend(nn.Sequential(pool_op(stride, stride), DLKBlock(conv_op, c_in, c_out))
                            for stride, c_in, c_out in zip(strides, features_per_stage[:-1], features_per_stage[1:]))
        self.fusion_blocks = nn.ModuleList(
            DecoderFusionBlock(conv_op, features_per_stage[i + 1], features_per_stage[i], strides[i])
            for i in reversed(range(len(strides))))
        head_levels = range(len(strides)) if deep_supervision_heads else range(1)
        self.heads = nn.ModuleList(conv_op(features_per_stage[i], num_classes, 1) for i in head_levels)
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        decoded = []
        for fusion, skip in zip(self.fusion_blocks, reversed(skips[:-1])):
            x = fusion(x, skip)
            decoded.append(x)
        if not self.deep_supervision:
            return self.heads[0](decoded[-1])
        return [head(features) for head, features in zip(self.heads, reversed(decoded))]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of every conv output for an input of spatial size ``input_size`` (nnU-Net's planner
        uses it for its memory estimate)."""
        sizes = [np.asarray(input_size, dtype=np.int64)]
        for stage in self.encoder[1:]:
            sizes.append(sizes[-1] // np.asarray(stage[0].stride))
        total = sum(block.compute_conv_feature_map_size(size)
                    for block, size in zip([self.encoder[0]] + [s[1] for s in self.encoder[1:]], sizes))
        total += sum(fusion.compute_conv_feature_map_size(size)
                     for fusion, size in zip(self.fusion_blocks, reversed(sizes[:-1])))
        used_heads = len(self.heads) if self.deep_supervision else 1
        return int(total + sum(np.prod(size) * self.num_classes for size in sizes[:used_heads]))


def dlkunet_depth(variant: str, configuration_manager) -> int:
    """Number of downsamplings of ``variant`` on this plan: the variant's, at most the plan's."""
    variant_widths(variant)
    return min(VARIANT_DEPTH[variant], len(configuration_manager.network_arch_init_kwargs["strides"]) - 1)


def build_dlkunet_from_plans(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                             enable_deep_supervision: bool, variant: str = "S") -> DLKUNet:
    """DLKUNet ``variant`` on the plan's dimension (``conv_op``) and strides of its first ``depth`` downsamplings
    (``dlkunet_depth``); the plan's widths, kernel sizes and norm are not used (the variant fixes them)."""
    arch = configuration_manager.network_arch_init_kwargs
    conv_op = pydoc.locate(arch["conv_op"]) if isinstance(arch["conv_op"], str) else arch["conv_op"]
    strides = [list(s) if isinstance(s, (list, tuple)) else s for s in arch["strides"]]
    if any(s != 1 for s in np.atleast_1d(strides[0])):
        raise ValueError(f"DLKUNet keeps full resolution in its first stage, but the plan "
                         f"{plans_manager.plans_name!r} has first-stage strides {strides[0]}")
    depth = dlkunet_depth(variant, configuration_manager)
    if depth < 1:
        raise ValueError(f"DLKUNet needs a plan with at least one downsampling; plan {plans_manager.plans_name!r} "
                         f"has strides {strides}")
    return DLKUNet(num_input_channels, num_output_channels, conv_op, variant_widths(variant, depth),
                   strides[1:depth + 1], deep_supervision=enable_deep_supervision)


def create_dlkunet(variant: str, input_channels: int = 1, num_classes: int = 9, conv_op: Type[_ConvNd] = nn.Conv2d,
                   deep_supervision: bool = False) -> DLKUNet:
    """The paper's DLKUNet-S/M/L (Table 1; 2x2 pools, 1 input channel and 9 Synapse classes by default);
    extra heads only with ``deep_supervision``."""
    widths = variant_widths(variant)
    return DLKUNet(input_channels, num_classes, conv_op, widths, [2] * (len(widths) - 1),
                   deep_supervision=deep_supervision, deep_supervision_heads=deep_supervision)
