"""The plan's own network, the base of the networks that wrap it, and its decoder loop."""
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch._dynamo import OptimizedModule

from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

SUPPORTED_PLAN_UNETS = (PlainConvUNet, ResidualEncoderUNet)
_ENCODER_KEY_ATTRIBUTES = ("key_to_encoder", "key_to_stem", "keys_to_in_proj", "key_to_lpe")


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


def unwrap_network(network: nn.Module) -> nn.Module:
    """The network inside DDP and ``torch.compile`` wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class PlanUNetWrapper(AbstractDynamicNetworkArchitectures):
    """Base of the networks built around the plan's U-Net (DPC-Net's PFE, the LFAM U-Net).

    Adopts the U-Net's ``encoder`` and ``decoder`` (the modules themselves, not copies) under the same attribute
    names, so the state-dict keys of the shared part are the plain U-Net's: nnU-Net's
    ``set_deep_supervision_enabled`` works unchanged and a plain nnU-Net checkpoint of the same plan holds every
    shared weight (``plan_network_keys``). Supported: dynamic-network-architectures' ``PlainConvUNet`` and
    ``ResidualEncoderUNet`` (nnU-Net's default and residual-encoder plans), 2D or 3D by ``conv_op``.
    """

    def __init__(self, plan_unet: nn.Module):
        super().__init__()
        supported = next((c for c in SUPPORTED_PLAN_UNETS if isinstance(plan_unet, c)), None)
        if supported is None or type(plan_unet).forward is not supported.forward \
                or not isinstance(getattr(plan_unet, "decoder", None), UNetDecoder):
            raise TypeError(
                f"{type(self).__name__} builds on the plan's U-Net, one of "
                f"{', '.join(c.__name__ for c in SUPPORTED_PLAN_UNETS)} from dynamic_network_architectures (with "
                f"their own forward and a UNetDecoder); got "
                f"{type(plan_unet).__module__}.{type(plan_unet).__qualname__}. "
                f"Use a plan whose network_class_name is one of these.")
        self.encoder = plan_unet.encoder
        self.decoder = plan_unet.decoder
        for attribute in _ENCODER_KEY_ATTRIBUTES:
            if hasattr(plan_unet, attribute):
                setattr(self, attribute, getattr(plan_unet, attribute))
        self.base_class_name = f"{type(plan_unet).__module__}.{type(plan_unet).__qualname__}"
        self.dim = convert_conv_op_to_dim(self.encoder.conv_op)

    @property
    def num_levels(self) -> int:
        """Decoder stages = nnU-Net's deep-supervision levels."""
        return len(self.decoder.stages)

    def plan_network_keys(self) -> List[str]:
        """State-dict keys of the adopted encoder and decoder (those a plain U-Net checkpoint of the plan holds)."""
        return [f"encoder.{k}" for k in self.encoder.state_dict()] + [f"decoder.{k}" for k in self.decoder.state_dict()]

    def plan_unet_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """nnU-Net's activation estimate of the adopted U-Net (its planner's VRAM proxy)."""
        assert len(input_size) == self.dim, "give the spatial size only: (x, y(, z))"
        return np.int64(self.encoder.compute_conv_feature_map_size(input_size)
                        + self.decoder.compute_conv_feature_map_size(input_size))


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
