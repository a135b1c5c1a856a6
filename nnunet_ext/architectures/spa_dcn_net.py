"""SPA-DCN-Net: a MobileNetV3-Small encoder and a decoder of EnhancedDeformConvBlocks (2D).

Method: S. M. Jian, A. B. Azman, "SPA-DCN-NET: A Gated Multi-Scale Local Contrast Normalization Network for
Ultrasound Image Segmentation of Liver", IJACSA 16(11), 2025 (``papers/spa_dcn_net.txt``), Sec. III.B-C, Fig. 1.
The blocks are in ``nnunet_ext.building_blocks.lcn_spa``.

Encoder
    ``torchvision.models.mobilenet_v3_small(weights=None).features[:12]`` (no download; the paper does not say
    whether it used ImageNet weights). The first conv is replaced by one with the plan's input channels
    (torchvision's initialisation). ``features[12]`` (the 96 -> 576 1x1 conv feeding the classifier) is dropped:
    the paper's deepest feature has 96 channels.
    BatchNorm momentum 0.1 (PyTorch's default, as in the decoder), not torchvision's MobileNetV3 default 0.01 (its
    ImageNet recipe; the paper gives none). The running statistics start at mean 0, variance 1 and keep a share
    ``(1 - momentum)^n`` of that start after ``n`` training steps: 0.67 after 40 steps with 0.01, while the
    activations of this from-scratch encoder have variances far from 1 (about 0.1 after the first conv). Through the
    encoder's 33 cascaded BatchNorms, eval mode (nnU-Net's validation and inference) then shrank the features towards
    zero: after 40 steps on the robustness benchmark's task, Dice 0.93 in train mode and 0.000 in eval mode on the
    same batch; the same weights with momentum 0.1 give 0.91 in eval mode (``(0.9)^40 = 1.5%`` of the start left).
    The test ``test_eval_mode_segments_after_a_short_training`` guards this.
    The paper lists skips of "16, 24, 40, 48, 96 channels at H/2 .. H/32", which is inconsistent (40 and 48 are both
    at H/16 in MobileNetV3-Small); here the skips are taken at distinct strides, the last block of each resolution:

    ========  =========  ========  ===========================
    feature   channels   stride    role
    ========  =========  ========  ===========================
    0         16         2         skip of decoder stage 3
    1         16         4         skip of decoder stage 2
    3         24         8         skip of decoder stage 1
    8         48         16        skip of decoder stage 0
    11        96         32        decoder input (bottleneck)
    ========  =========  ========  ===========================

Decoder (five stages, Sec. III.C)
    Stage s: nearest-neighbour x2 upsampling, concatenation with the skip of the same stride (stage 4 reaches full
    resolution and has no skip), EnhancedDeformConvBlock ``(C_below + C_skip) -> decoder_channels[s]``. The paper
    does not give the decoder widths; the default ``(256, 128, 64, 32, 16)`` is the common U-Net decoder of
    encoder-agnostic segmentation libraries (segmentation_models_pytorch's default). A 1x1 conv maps the last
    stage to the classes.
Deep supervision (an addition; the paper trains the full-resolution output only)
    A 1x1 head on every decoder stage; with ``deep_supervision`` on the network returns the five logits highest
    resolution first (strides 1, 2, 4, 8, 16), the first being the paper's head. Off: one tensor from the last head.
Input size
    Every spatial axis must be divisible by 32 (five stride-2 stages); ``build_spa_dcn_net_from_plans`` refuses a
    plan whose patch size is not and names the planning command that fixes it (``nnunet_ext_plan_spadcnnet``).
"""
from __future__ import annotations

from functools import partial
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_small

from nnunet_ext.building_blocks.lcn_spa import DCN_BACKENDS, LCN_MODES, EnhancedDeformConvBlock
from nnunet_ext.building_blocks.pointwise import PointwiseConv2d

__all__ = ["SPADCNNet", "build_spa_dcn_net_from_plans", "create_spa_dcn_net", "ENCODER_FEATURES",
           "OUTPUT_STRIDES", "TOTAL_STRIDE", "PLANNER_COMMAND", "ENCODER_NORM"]

ENCODER_FEATURES = {"skip_indices": (0, 1, 3, 8), "skip_channels": (16, 16, 24, 48), "skip_strides": (2, 4, 8, 16),
                    "bottleneck_index": 11, "bottleneck_channels": 96, "bottleneck_stride": 32}
OUTPUT_STRIDES = (1, 2, 4, 8, 16)
"""Stride of each output with deep supervision on (highest resolution first)."""
TOTAL_STRIDE = 32
ENCODER_NORM = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.1)
"""The encoder's norm layer: torchvision's eps, PyTorch's default momentum (see the module docstring)."""
PLANNER_COMMAND = "nnunet_ext_plan_spadcnnet"


class SPADCNNet(nn.Module):
    """SPA-DCN-Net (see the module docstring).

    Args:
        input_channels, num_classes: of the task.
        decoder_channels: widths of the five decoder stages (H/16 .. H).
        deep_supervision: return the five stage logits (True) or the full-resolution logits only (False).
        lcn_mode, lcn_windows, spa_dilations, dcn_backend: of every EnhancedDeformConvBlock (``lcn_mode`` is the
            Table VII ablation switch: ``'gated'``, ``'before_spa'``, ``'after_spa'``, ``'none'``).
    """

    def __init__(self, input_channels: int, num_classes: int,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), deep_supervision: bool = False,
                 lcn_mode: str = "gated", lcn_windows: Sequence[int] = (7, 15),
                 spa_dilations: Sequence[int] = (1, 2, 4), dcn_backend: str = "auto"):
        super().__init__()
        if len(decoder_channels) != len(OUTPUT_STRIDES):
            raise ValueError(f"SPA-DCN-Net has {len(OUTPUT_STRIDES)} decoder stages, got decoder_channels "
                             f"{tuple(decoder_channels)}")
        if lcn_mode not in LCN_MODES or dcn_backend not in DCN_BACKENDS:
            raise ValueError(f"lcn_mode must be one of {LCN_MODES} and dcn_backend one of {DCN_BACKENDS}, "
                             f"got {lcn_mode!r}, {dcn_backend!r}")
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.decoder_channels = tuple(int(c) for c in decoder_channels)
        self.deep_supervision = deep_supervision

        features = mobilenet_v3_small(weights=None, norm_layer=ENCODER_NORM).features[
            :ENCODER_FEATURES["bottleneck_index"] + 1]
        first = features[0][0]
        features[0][0] = nn.Conv2d(input_channels, first.out_channels, first.kernel_size, first.stride,
                                   first.padding, bias=False)
        nn.init.kaiming_normal_(features[0][0].weight, mode="fan_out")  # torchvision's MobileNetV3 init
        self.encoder = features

        skip_channels = list(ENCODER_FEATURES["skip_channels"])[::-1] + [0]  # stride 16, 8, 4, 2, none
        below = ENCODER_FEATURES["bottleneck_channels"]
        stages = []
        for skip, out in zip(skip_channels, self.decoder_channels):
            stages.append(EnhancedDeformConvBlock(below + skip, out, nn.Conv2d, lcn_mode=lcn_mode,
                                                  lcn_windows=lcn_windows, spa_dilations=spa_dilations,
                                                  dcn_backend=dcn_backend))
            below = out
        self.decoder_stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(PointwiseConv2d(c, num_classes) for c in self.decoder_channels)

    def encode(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Skips (strides 2, 4, 8, 16) and the stride-32 bottleneck."""
        if x.dim() != 4 or any(s % TOTAL_STRIDE for s in x.shape[2:]):
            raise ValueError(f"SPA-DCN-Net needs a 2D batch (B, C, H, W) with H and W divisible by {TOTAL_STRIDE}, "
                             f"got shape {tuple(x.shape)}")
        skips = []
        for i, layer in enumerate(self.encoder):
            x = layer(x)
            if i in ENCODER_FEATURES["skip_indices"]:
                skips.append(x)
        return skips, x

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        skips, below = self.encode(x)
        stage_outputs = []
        for s, stage in enumerate(self.decoder_stages):
            below = F.interpolate(below, scale_factor=2, mode="nearest")
            if s < len(skips):
                below = torch.cat((below, skips[-(s + 1)]), dim=1)
            below = stage(below)
            stage_outputs.append(below)
        if not self.deep_supervision:
            return self.heads[-1](stage_outputs[-1])
        return [head(out) for head, out in zip(self.heads[::-1], stage_outputs[::-1])]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Elements of every conv-like layer output for one sample (nnU-Net's planner memory proxy), counted by a
        forward pass with hooks at batch size 1 (convolutions, deformable convs, norms)."""
        counted = (nn.Conv2d, nn.BatchNorm2d, EnhancedDeformConvBlock)
        total = [0]

        def hook(module, inputs, output):
            total[0] += output.numel()
        handles = [m.register_forward_hook(hook) for m in self.modules() if isinstance(m, counted)]
        was_training = self.training
        try:
            self.eval()
            with torch.no_grad():
                self(torch.zeros(1, self.input_channels, *input_size, device=next(self.parameters()).device))
        finally:
            for h in handles:
                h.remove()
            self.train(was_training)
        return total[0]


def check_patch_size(patch_size: Sequence[int]) -> None:
    """Refuse a patch that SPA-DCN-Net cannot take, naming the planning command that fixes it."""
    if len(patch_size) != 2:
        raise ValueError(f"SPA-DCN-Net is 2D only (MobileNetV3-Small encoder), but the plan's patch size "
                         f"{list(patch_size)} is {len(patch_size)}D: use the 2d configuration.")
    if any(int(s) % TOTAL_STRIDE for s in patch_size):
        raise ValueError(f"SPA-DCN-Net needs a patch size divisible by {TOTAL_STRIDE}, the plan has "
                         f"{list(patch_size)}: run `{PLANNER_COMMAND} -d DATASET_ID` and train and predict with its "
                         f"plans (`-p nnUNetPlans_SPADCN`).")


def build_spa_dcn_net_from_plans(plans_manager, configuration_manager, num_input_channels: int,
                                 num_output_channels: int, enable_deep_supervision: bool = True,
                                 **kwargs) -> SPADCNNet:
    """nnU-Net network factory: SPA-DCN-Net for the plan's 2D patch (``kwargs`` go to ``SPADCNNet``).
    Widths and depth are the paper's, not the plan's; the plan only has to give a 2D patch divisible by 32."""
    check_patch_size(configuration_manager.patch_size)
    return SPADCNNet(num_input_channels, num_output_channels, deep_supervision=enable_deep_supervision, **kwargs)


def create_spa_dcn_net(variant: str = "paper", input_channels: int = 1, num_classes: int = 2,
                       deep_supervision: bool = False) -> SPADCNNet:
    """Paper presets: ``'paper'`` (gated LCN before SPA) and the Table VII ablations ``'spa_dcn_only'``,
    ``'lcn_spa_dcn'`` (plain LCN before SPA), ``'spa_lcn_dcn'`` (plain LCN after SPA); 1 channel, 2 classes
    (background, liver) by default as in the paper."""
    modes = {"paper": "gated", "spa_dcn_only": "none", "lcn_spa_dcn": "before_spa", "spa_lcn_dcn": "after_spa"}
    if variant not in modes:
        raise ValueError(f"unknown SPA-DCN-Net variant {variant!r}; known: {', '.join(modes)}")
    return SPADCNNet(input_channels, num_classes, deep_supervision=deep_supervision, lcn_mode=modes[variant])
