"""The plan's own network, the base that plugin architectures wrap, and its decoder loop."""
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans


def build_plan_network(configuration_manager, num_input_channels: int, num_output_channels: int,
                       enable_deep_supervision: bool) -> nn.Module:
    """Build and initialise the configuration's network exactly as ``nnUNetTrainer`` does."""
    return get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels,
        num_output_channels,
        allow_init=True,
        deep_supervision=enable_deep_supervision)


def decoder_stage_outputs(decoder: UNetDecoder, skips: Sequence[torch.Tensor],
                          align_skip: Optional[Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]] = None
                          ) -> List[torch.Tensor]:
    """The feature maps of ``decoder``'s stages, lowest resolution first: the loop of
    ``UNetDecoder.forward`` (dynamic_network_architectures 0.4) without its segmentation layers.
    ``align_skip(stage, skip, upsampled)``, if given, replaces each skip before the fusion."""
    outputs, below = [], skips[-1]
    for s, (transpconv, stage) in enumerate(zip(decoder.transpconvs, decoder.stages)):
        upsampled = transpconv(below)
        skip = skips[-(s + 2)]
        if align_skip is not None:
            skip = align_skip(s, skip, upsampled)
        below = stage(torch.cat((upsampled, skip), dim=1))
        outputs.append(below)
    return outputs
