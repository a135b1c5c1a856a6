"""SCRNet (Xu & Wang, "SCRNet: Spatial-Channel Regulation Network for Medical Ultrasound Image Segmentation",
Sec. III-C, Fig. 3) built from an nnU-Net plan, 2D or 3D by the plan's ``conv_op``.

- Encoder stage ``s``: max-pool by the plan's stride ``s`` (none where the stride is 1), a conv block (the plan's
  ``n_conv_per_stage`` convs of the plan's kernel size, norm and nonlinearity; 2 convs for residual-encoder plans,
  which give blocks instead: SCRNet is a plain U-Net), then the SCRM (``nnunet_ext.building_blocks
  .feature_aggregation``). Every encoder stage has an SCRM, the deepest (bottleneck) one included: the paper puts
  it in every encoder block.
- Decoder stage: 3x3 transposed conv with the stride of the stage below (padding 1, ``output_padding = stride - 1``,
  so sizes double exactly; 3x3x3 in 3D), concatenation with the skip, a conv block (the plan's
  ``n_conv_per_stage_decoder`` convs).
- Output: a 1x1 conv head per decoder stage (``pointwise.PointwiseConv2d``/``3d``: ``nn.Conv2d``/``3d``'s parameters,
  computed as a matrix product; the same function, and at 4 x 32 x 256^2 -> 2 classes oneDNN's conv took 0.25 s of
  forward + backward per step; the training step with matrix-product heads took 0.98x the CPU time, A/B, load 1.9).
  With deep supervision off (the paper's network) only the full-resolution head is computed; with it on (our
  addition, for nnU-Net's deep-supervision loss) the network returns every head's logits, highest resolution
  first, one per nnU-Net deep-supervision level.
- Widths, depth, kernel sizes and strides all come from the plan. The SCRM's windowed cross-attention uses
  windows of 8 pixels per axis in 2D and 4 in 3D (64 tokens each).
- ``checkpoint_scrm`` (default on): every SCRM whose input has at least ``recompute_min_elements`` elements per
  sample (default 256 x 32^2: at a 256^2 patch the four highest-resolution stages) stores only the inputs of its
  parts (Spatial Gate with Channel Refinement, the two Feature-Initialize groups, the two CCAPMs, SK fusion) and
  recomputes their internals in the backward pass (``torch.utils.checkpoint``, ``SCRM.recompute``): identical
  values and gradients, a fraction of the training memory for one more forward pass of those SCRMs; the deeper
  SCRMs store their activations (little memory, and their 1x1 convs cost as much as those of the large ones).
"""
import pydoc
from typing import List, Optional, Sequence, Type, Union

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import (convert_conv_op_to_dim, get_matching_convtransp,
                                                                  get_matching_pool_op)
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

from nnunet_ext.building_blocks.feature_aggregation import SCRM
from nnunet_ext.building_blocks.pointwise import pointwise_conv_op

DEFAULT_WINDOW = {2: 8, 3: 4}
# SCRMs whose input has at least this many elements per sample recompute their parts (256 channels x 32^2 pixels)
RECOMPUTE_MIN_ELEMENTS = 256 * 32 * 32


def _as_list(value: Union[int, Sequence[int]], dim: int) -> List[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * dim


class SCRNet(nn.Module):
    """The SCRNet U-Net. ``deep_supervision`` is a plain attribute (switched by ``nnUNetExtTrainer``)."""

    def __init__(self, input_channels: int, num_classes: int, features_per_stage: Sequence[int],
                 conv_op: Type[_ConvNd], kernel_sizes: Sequence, strides: Sequence,
                 n_conv_per_stage: Sequence[int], n_conv_per_stage_decoder: Sequence[int],
                 norm_op: Type[nn.Module], norm_op_kwargs: Optional[dict] = None,
                 nonlin: Type[nn.Module] = nn.LeakyReLU, nonlin_kwargs: Optional[dict] = None,
                 conv_bias: bool = True, deep_supervision: bool = False, window_size: Optional[int] = None,
                 heads: int = 4, checkpoint_scrm: bool = True, recompute_min_elements: int = RECOMPUTE_MIN_ELEMENTS):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        n_stages = len(features_per_stage)
        if not (len(kernel_sizes) == len(strides) == len(n_conv_per_stage) == n_stages
                and len(n_conv_per_stage_decoder) == n_stages - 1 and n_stages >= 2):
            raise ValueError(f"SCRNet needs >= 2 stages and per-stage kernel sizes, strides and conv counts; got "
                             f"{n_stages} widths, {len(kernel_sizes)} kernels, {len(strides)} strides, "
                             f"{len(n_conv_per_stage)} encoder and {len(n_conv_per_stage_decoder)} decoder conv counts")
        self.kernel_sizes = [_as_list(k, dim) for k in kernel_sizes]
        self.strides = [_as_list(s, dim) for s in strides]
        self.features_per_stage = list(features_per_stage)
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        window_size = DEFAULT_WINDOW[dim] if window_size is None else window_size
        block = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=None,
                     dropout_op_kwargs=None, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        pool_op = get_matching_pool_op(conv_op, pool_type="max")

        self.pools, self.encoder_convs, self.scrms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        channels = input_channels
        for s, width in enumerate(self.features_per_stage):
            stride = self.strides[s]
            self.pools.append(pool_op(stride, stride) if any(v > 1 for v in stride) else nn.Identity())
            self.encoder_convs.append(StackedConvBlocks(n_conv_per_stage[s], conv_op, channels, width,
                                                        self.kernel_sizes[s], 1, **block))
            self.scrms.append(SCRM(conv_op, width, self.kernel_sizes[s], heads, window_size, recompute=checkpoint_scrm,
                                   eps=(norm_op_kwargs or {}).get("eps", 1e-5),
                                   recompute_min_elements=recompute_min_elements))
            channels = width

        transp_op, head_op = get_matching_convtransp(conv_op), pointwise_conv_op(conv_op)
        self.upsamples, self.decoder_convs, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(n_stages - 1, 0, -1):  # lowest resolution first
            below, width, stride = self.features_per_stage[s], self.features_per_stage[s - 1], self.strides[s]
            self.upsamples.append(transp_op(below, width, 3, stride, padding=1,
                                            output_padding=[v - 1 for v in stride], bias=conv_bias))
            self.decoder_convs.append(StackedConvBlocks(n_conv_per_stage_decoder[s - 1], conv_op, 2 * width, width,
                                                        self.kernel_sizes[s - 1], 1, **block))
            self.heads.append(head_op(width, num_classes, bias=True))

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        skips = []
        for s in range(len(self.scrms)):
            x = self.scrms[s](self.encoder_convs[s](self.pools[s](x)))
            skips.append(x)
        outputs = []
        last = len(self.upsamples) - 1
        for i, (up, conv, head) in enumerate(zip(self.upsamples, self.decoder_convs, self.heads)):
            x = conv(torch.cat((up(x), skips[-(i + 2)]), dim=1))
            if self.deep_supervision or i == last:
                outputs.append(head(x))
        return outputs[::-1] if self.deep_supervision else outputs[0]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements of one forward pass (nnU-Net's planner memory estimate): the conv blocks and
        heads as dynamic-network-architectures counts them, plus the SCRMs' conv and attention outputs."""
        total, size, sizes = 0, list(input_size), []
        for s, (convs, scrm) in enumerate(zip(self.encoder_convs, self.scrms)):
            size = [v // st for v, st in zip(size, self.strides[s])]
            sizes.append(size)
            total += convs.compute_conv_feature_map_size(size) + scrm.compute_conv_feature_map_size(size)
        for i, (convs, width) in enumerate(zip(self.decoder_convs, self.features_per_stage[-2::-1])):
            size = sizes[-(i + 2)]
            total += np.prod([width, *size]) + convs.compute_conv_feature_map_size(size)
            total += np.prod([self.num_classes, *size])
        return int(total)


def build_scrnet_from_plans(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool = True, window_size: Optional[int] = None, heads: int = 4,
                            checkpoint_scrm: bool = True,
                            recompute_min_elements: int = RECOMPUTE_MIN_ELEMENTS) -> SCRNet:
    """SCRNet on the plan's depth, widths, kernel sizes, strides, norm and nonlinearity (plain or residual-encoder
    plans; the latter's ``n_blocks_per_stage`` is not used: SCRNet's encoder stages have 2 plain convs there)."""
    arch = dict(configuration_manager.network_arch_init_kwargs)
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        if isinstance(arch.get(key), str):
            arch[key] = pydoc.locate(arch[key])
    n_stages = arch["n_stages"]
    return SCRNet(num_input_channels, num_output_channels, arch["features_per_stage"], arch["conv_op"],
                  arch["kernel_sizes"], arch["strides"], arch.get("n_conv_per_stage", [2] * n_stages),
                  arch["n_conv_per_stage_decoder"], arch["norm_op"], arch.get("norm_op_kwargs"),
                  arch.get("nonlin") or nn.LeakyReLU, arch.get("nonlin_kwargs"), arch.get("conv_bias", True),
                  deep_supervision=enable_deep_supervision, window_size=window_size, heads=heads,
                  checkpoint_scrm=checkpoint_scrm, recompute_min_elements=recompute_min_elements)

