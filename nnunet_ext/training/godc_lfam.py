"""nnU-Net trainers for GODC and LFAM (Ming & Xiao, "Towards Accurate Medical Image Segmentation
With Gradient-Optimized Dice Loss", IEEE SPL 2024).

One trainer per concern, combined by inheritance:

- ``nnUNetTrainerGODC``: nnU-Net's network, GODC + CE (nnU-Net's ``DC_and_CE_loss`` with the GODC
  Dice class; ``DC_and_BCE_loss`` for region training).
- ``nnUNetTrainerGODCOnly``: GODC without CE, as in the paper.
- ``nnUNetTrainerLFAM``: the plan's U-Net (plain or residual encoder) with LFAM on every skip
  connection, nnU-Net's Dice + CE.
- ``nnUNetTrainerLFAMGODC``: the paper's method in nnU-Net, LFAM network + GODC + CE.
- ``nnUNetTrainerLFAMGODCCoarse``: as above without LFAM at full resolution (memory-bounded).
- ``nnUNetTrainerLFAMGODCPaper``: the paper's recipe, LFAM network + GODC alone, Adam 2e-4.
- ``nnUNetTrainerLFAMGODC_quick``: a few iterations only, for smoke runs.

GODC needs per-sample Dice, so these trainers use ``batch_dice=False`` whatever the plan says.
"""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.architectures.lfam_unet import LFAMUNet, build_lfam_unet_from_plans
from nnunet_ext.losses.compound import build_dice_ce_loss
from nnunet_ext.losses.godc import GODCDiceLoss
from nnunet_ext.training.quick_schedule import QuickScheduleMixin
from nnunet_ext.training.recipes import AdamRecipeMixin, wrap_deep_supervision


class nnUNetTrainerGODC(nnUNetTrainer):
    ce_weight = 1.0

    def _build_loss(self):
        loss = build_dice_ce_loss(self.label_manager, batch_dice=False, is_ddp=self.is_ddp,
                                  weight_ce=self.ce_weight, dice_class=GODCDiceLoss,
                                  compile_dice=self._do_i_compile())
        return wrap_deep_supervision(self, loss)


class nnUNetTrainerGODCOnly(nnUNetTrainerGODC):
    ce_weight = 0.0


class nnUNetTrainerLFAM(nnUNetTrainer):
    """LFAM on the skips of levels ``lfam_min_level`` and coarser (0 = every skip, as in the paper).
    ``lfam_checkpoint`` recomputes the 3D deformable sampling in backward instead of storing it
    (same result; about half the LFAM activation memory for a few percent more time)."""
    lfam_min_level = 0
    lfam_checkpoint = True

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> LFAMUNet:
        return build_lfam_unet_from_plans(plans_manager, configuration_manager, num_input_channels,
                                          num_output_channels, enable_deep_supervision,
                                          lfam_min_level=cls.lfam_min_level, checkpoint=cls.lfam_checkpoint)


class nnUNetTrainerLFAMGODC(nnUNetTrainerLFAM, nnUNetTrainerGODC):
    pass


class nnUNetTrainerLFAMGODCCoarse(nnUNetTrainerLFAMGODC):
    """LFAM only on the skips below full resolution: bounds memory for large 3D patches."""
    lfam_min_level = 1


class nnUNetTrainerLFAMGODCPaper(AdamRecipeMixin, nnUNetTrainerLFAMGODC):
    """The paper's recipe: GODC alone (Sec. III), Adam with learning rate 2e-4."""
    adam_learning_rate = 2e-4
    ce_weight = 0.0


class nnUNetTrainerLFAMGODC_quick(QuickScheduleMixin, nnUNetTrainerLFAMGODC):
    """``nnUNetTrainerLFAMGODC`` with the short smoke-run schedule of ``quick_schedule``."""
