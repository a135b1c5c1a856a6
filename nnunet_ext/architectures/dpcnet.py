"""DPC-Net: Decoupled Pyramid Correlation Network (Zhang et al., Med. Phys. 2022).

The Pyramid Feature Encoder (PFE) is the U-Net of the nnU-Net plan (``PlainConvUNet`` or
``ResidualEncoderUNet``: depth, widths, kernels, strides and 2D/3D all come from the plan). Its
decoder stage outputs are the pyramid features ``F_0`` (highest resolution) .. ``F_{L-1}``, with
``L`` = number of decoder stages = number of nnU-Net deep-supervision levels. On top of them:

- SpaCor at levels ``1..L-1`` gives ``F_i^spa`` (``nnunet_ext.building_blocks.pyramid_correlation``),
- SemCor at levels ``0..L-2`` gives ``F_i^sem`` from ``F_i^spa`` (``F_0`` at level 0) and
  ``F_{i+1}^spa``,
- a 1x1 segmentation head per output: the PFE heads are the plan U-Net's own ``seg_layers``; a SemCor
  head is applied as a per-sample 1x1 map of SemCor's input (``SemanticCorrelation.head_map``), which gives
  ``head(F_i^sem)`` without materialising ``F_i^sem`` (the only consumer of ``F_i^sem`` is its head). The heads run
  as matrix products (``pointwise_conv``, the same function; faster than ``conv3d`` on the CPU), and the two heads
  that read the same map (SemCor's and the PFE head at level 0, SemCor's and the SpaCor head above) as one
  (``shared_input_heads``).

Outputs
    Deep supervision on: one flat list, ``[sem_0 .. sem_{L-2}, pfe_0 .. pfe_{L-1}, spa_1 .. spa_{L-1}]``
    (``DPCNet.output_levels(L)`` gives each entry's resolution level). Entry 0 is the
    highest-resolution refined output ``sem_0``, which nnU-Net's ``validation_step`` reads.
    Deep supervision off: ``sem_0`` only, the prediction used for validation and inference.

The network keeps the plan U-Net's ``encoder`` and ``decoder`` attributes (same state-dict keys as
the plain U-Net), and ``decoder.deep_supervision`` switches the outputs, so nnU-Net's
``set_deep_supervision_enabled`` works unchanged.
"""
from typing import List, Tuple, Union

import torch
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.initialization.weight_init import InitWeights_He

from nnunet_ext.architectures.plan_network import PlanUNetWrapper, build_plan_network, decoder_stage_outputs
from nnunet_ext.building_blocks.pointwise import pointwise_conv
from nnunet_ext.building_blocks.pyramid_correlation import (SemanticCorrelation, SpatialCorrelation,
                                                             shared_input_heads)


class DPCNet(PlanUNetWrapper):
    def __init__(self, pyramid_feature_encoder: nn.Module):
        """``pyramid_feature_encoder``: the plan's U-Net (``PlainConvUNet`` or ``ResidualEncoderUNet``) with at
        least two decoder stages; its encoder, decoder and segmentation layers become DPC-Net's PFE."""
        super().__init__(pyramid_feature_encoder)
        num_levels = self.num_levels
        if num_levels < 2:
            raise ValueError(f"DPC-Net needs at least 2 decoder levels (a plan with n_stages >= 3), got {num_levels}.")

        channels = self.level_channels
        kernel_sizes = self.encoder.kernel_sizes  # per resolution level, level 0 first
        conv_op, num_classes = self.encoder.conv_op, self.decoder.num_classes
        nonlin, nonlin_kwargs = self.encoder.nonlin, self.encoder.nonlin_kwargs
        self.spacor = nn.ModuleList(
            SpatialCorrelation(conv_op, channels[i], channels[i - 1], kernel_sizes[i - 1], nonlin, nonlin_kwargs)
            for i in range(1, num_levels))
        self.semcor = nn.ModuleList(
            SemanticCorrelation(conv_op, channels[i], channels[i + 1], nonlin, nonlin_kwargs)
            for i in range(num_levels - 1))
        self.spa_heads = nn.ModuleList(conv_op(channels[i], num_classes, 1) for i in range(1, num_levels))
        self.sem_heads = nn.ModuleList(conv_op(channels[i], num_classes, 1) for i in range(num_levels - 1))
        for module in (self.spacor, self.semcor, self.spa_heads, self.sem_heads):
            module.apply(InitWeights_He(1e-2))

    @property
    def level_channels(self) -> List[int]:
        """Channels of the pyramid features ``F_0 .. F_{L-1}`` (the encoder's skip widths)."""
        return list(self.encoder.output_channels[:self.num_levels])

    @staticmethod
    def output_levels(num_levels: int) -> Tuple[int, ...]:
        """Resolution level of each deep-supervision output, in output order (sem, pfe, spa)."""
        return tuple(range(num_levels - 1)) + tuple(range(num_levels)) + tuple(range(1, num_levels))

    def pyramid_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Decoder stage outputs ``[F_0, .., F_{L-1}]``, highest resolution first (the same
        computation as ``UNetDecoder.forward`` without its segmentation layers)."""
        return decoder_stage_outputs(self.decoder, self.encoder(x))[::-1]

    def pfe_head(self, level: int) -> nn.Module:
        """The PFE's 1x1 segmentation conv of ``level`` (``decoder.seg_layers`` are ordered like the decoder stages:
        lowest resolution first)."""
        return self.decoder.seg_layers[self.num_levels - 1 - level]

    def pfe_logits(self, level: int, feature: torch.Tensor) -> torch.Tensor:
        head = self.pfe_head(level)
        return pointwise_conv(feature, head.weight, head.bias)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        features = self.pyramid_features(x)
        if not self.decoder.deep_supervision:
            spa_1 = self.spacor[0](features[1], features[0])
            return self.semcor[0](features[0], spa_1, self.sem_heads[0])

        num_levels = self.num_levels
        spa = [self.spacor[i - 1](features[i], features[i - 1]) for i in range(1, num_levels)]
        sem_inputs = [features[0]] + spa  # X_i: F_0 at level 0, F_i^spa above
        # the SemCor head of level i shares its input X_i with the PFE head (level 0) or the SpaCor head (above)
        sem, pfe, spa_logits = [], [], []
        for i in range(num_levels - 1):
            other = self.pfe_head(0) if i == 0 else self.spa_heads[i - 1]
            sem_i, other_i = shared_input_heads(sem_inputs[i], [
                self.semcor[i].head_map(sem_inputs[i], spa[i], self.sem_heads[i]),
                (other.weight.flatten(1), other.bias)])
            sem.append(sem_i)
            (pfe if i == 0 else spa_logits).append(other_i)
        pfe += [self.pfe_logits(i, features[i]) for i in range(1, num_levels)]
        head = self.spa_heads[-1]
        spa_logits.append(pointwise_conv(spa[-1], head.weight, head.bias))
        return sem + pfe + spa_logits


def build_dpcnet_from_plans(plans_manager, configuration_manager, num_input_channels: int,
                            num_output_channels: int, enable_deep_supervision: bool = True) -> DPCNet:
    """DPC-Net whose PFE is the plan's U-Net (the signature of
    ``nnUNetTrainer.build_network_architecture``; used for training and by the predictor)."""
    return DPCNet(build_plan_network(configuration_manager, num_input_channels, num_output_channels,
                                     enable_deep_supervision))


PAPER_PRESET_PFE_KWARGS = dict(
    input_channels=1, n_stages=5, features_per_stage=[32, 64, 128, 256, 512], conv_op=nn.Conv3d,
    kernel_sizes=[[3, 3, 3]] * 5, strides=[[1, 1, 1]] + [[2, 2, 2]] * 4, n_conv_per_stage=[2] * 5,
    num_classes=2, n_conv_per_stage_decoder=[2] * 4, conv_bias=True, norm_op=nn.InstanceNorm3d,
    norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
    deep_supervision=True)
"""The paper's PFE (Sec. IV): 5 levels, widths 32..512 (the text says "max 320", but only 512
reproduces the Table 4 baseline of 22.58M parameters), 3x3x3 kernels, 1 input channel, 2 classes."""


def dpcnet_paper_preset() -> DPCNet:
    """DPC-Net on the paper's PFE (``PAPER_PRESET_PFE_KWARGS``), deep supervision on."""
    pfe = PlainConvUNet(**PAPER_PRESET_PFE_KWARGS)
    pfe.apply(PlainConvUNet.initialize)
    return DPCNet(pfe)
