"""The plan's own network, the base that plugin architectures wrap."""
from torch import nn

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
