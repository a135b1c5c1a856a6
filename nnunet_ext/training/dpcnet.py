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
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.architectures.dpcnet import DPCNet, build_dpcnet_from_plans
from nnunet_ext.losses.compound import build_dice_ce_loss, deep_supervision_weights
from nnunet_ext.losses.multi_output_deep_supervision import MultiOutputDeepSupervisionWrapper
from nnunet_ext.training.quick_schedule import QuickScheduleMixin
from nnunet_ext.training.recipes import AdamRecipeMixin

LOWEST_LEVEL_WEIGHT = 1e-6


class nnUNetTrainerDPCNet(nnUNetTrainer):
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> DPCNet:
        return build_dpcnet_from_plans(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels, enable_deep_supervision)

    def _build_loss(self):
        loss = build_dice_ce_loss(self.label_manager, batch_dice=self.configuration_manager.batch_dice,
                                  is_ddp=self.is_ddp, compile_dice=self._do_i_compile())
        if not self.enable_deep_supervision:
            return loss
        num_levels = len(self._get_deep_supervision_scales())
        return MultiOutputDeepSupervisionWrapper(
            loss, deep_supervision_weights(num_levels, lowest_weight=LOWEST_LEVEL_WEIGHT),
            DPCNet.output_levels(num_levels))


class nnUNetTrainerDPCNetPaper(AdamRecipeMixin, nnUNetTrainerDPCNet):
    """DPC-Net with the paper's optimiser: Adam, initial learning rate 1e-4 (Sec. IV)."""
    adam_learning_rate = 1e-4


class nnUNetTrainerDPCNet_quick(QuickScheduleMixin, nnUNetTrainerDPCNet):
    """``nnUNetTrainerDPCNet`` with the short smoke-run schedule of ``quick_schedule``."""
