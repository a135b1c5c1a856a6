"""nnU-Net trainers for DPC-Net (Zhang et al., Med. Phys. 2022).

- ``nnUNetTrainerDPCNet``: DPC-Net on the plan's U-Net, nnU-Net's defaults otherwise (SGD 1e-2,
  poly schedule, Dice + CE, data augmentation, sampling, sliding-window inference).
- ``nnUNetTrainerDPCNetPaper``: the paper's optimiser, Adam with initial learning rate 1e-4
  (nnU-Net's poly decay and weight decay 3e-5 kept; the paper states neither).
- ``nnUNetTrainerDPCNet_quick``: a few iterations only, for the demo and smoke tests.

Loss (paper Eq. 13): nnU-Net's Dice + CE on every output of the three families (PFE, SpaCor,
SemCor), each compared with nnU-Net's deep-supervision target of its level and weighted with
nnU-Net's per-level weight ``1/2^i``. nnU-Net sets the lowest level's weight to 0; here it is 1e-6
so that every parameter receives a gradient in every step (DDP without ``find_unused_parameters``).
Validation and inference use the highest-resolution SemCor output ``sem_0``.
"""
import torch

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.architectures.dpcnet import DPCNet, build_dpcnet_from_plans
from nnunet_ext.losses.compound import deep_supervision_weights
from nnunet_ext.losses.multi_output_deep_supervision import MultiOutputDeepSupervisionWrapper
from nnunet_ext.training.quick_schedule import QuickScheduleMixin

LOWEST_LEVEL_WEIGHT = 1e-6


class nnUNetTrainerDPCNet(nnUNetTrainer):
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> DPCNet:
        return build_dpcnet_from_plans(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels, enable_deep_supervision)

    def _build_loss(self):
        loss = super()._build_loss()
        if not self.enable_deep_supervision:
            return loss
        num_levels = len(self._get_deep_supervision_scales())
        return MultiOutputDeepSupervisionWrapper(
            loss.loss,  # the Dice + CE that nnU-Net wrapped for its single-family deep supervision
            deep_supervision_weights(num_levels, lowest_weight=LOWEST_LEVEL_WEIGHT),
            DPCNet.output_levels(num_levels))


class nnUNetTrainerDPCNetPaper(nnUNetTrainerDPCNet):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)


class nnUNetTrainerDPCNet_quick(QuickScheduleMixin, nnUNetTrainerDPCNet):
    """``nnUNetTrainerDPCNet`` with the short smoke-run schedule of ``quick_schedule``."""
