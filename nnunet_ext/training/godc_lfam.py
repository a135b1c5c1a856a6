"""nnU-Net trainers for GODC and LFAM (Ming & Xiao, "Towards Accurate Medical Image Segmentation
With Gradient-Optimized Dice Loss", IEEE SPL 2024).

- ``nnUNetTrainerGODC``: nnU-Net's network, GODC + CE (nnU-Net's ``DC_and_CE_loss`` with the GODC
  Dice class; ``DC_and_BCE_loss`` for region training).
- ``nnUNetTrainerGODCOnly``: GODC without CE, as in the paper.
- ``nnUNetTrainerLFAM``: the plan's U-Net (plain or residual encoder) with LFAM on every skip
  connection, nnU-Net's Dice + CE.
- ``nnUNetTrainerLFAMGODC``: the paper's method in nnU-Net, LFAM network + GODC + CE.
- ``nnUNetTrainerLFAMGODCCoarse``: as above without LFAM at full resolution (memory-bounded).
- ``nnUNetTrainerLFAMGODCPaper``: the paper's recipe, LFAM network + GODC alone, Adam 2e-4.
- ``nnUNetTrainerLFAMGODC_quick``, ``nnUNetTrainerGODC_quick``: a few iterations only, for smoke runs.

GODC needs per-sample Dice, so its trainers use ``batch_dice=False`` whatever the plan says. The LFAM
trainers use LFAM's defaults: the memory-lean DCN and the full offset/mask predictor.
"""
from nnunet_ext.architectures.lfam_unet import build_lfam_unet_from_plans
from nnunet_ext.losses.godc import GODCDiceLoss
from nnunet_ext.training.base import QUICK_SCHEDULE, nnUNetExtTrainer


class nnUNetTrainerGODC(nnUNetExtTrainer):
    dice_class = GODCDiceLoss
    batch_dice = False


class nnUNetTrainerGODCOnly(nnUNetTrainerGODC):
    weight_ce = 0.0


class nnUNetTrainerLFAM(nnUNetExtTrainer):
    """LFAM on the skips of every level (``lfam_min_level`` 0, as in the paper)."""
    network_factory = staticmethod(build_lfam_unet_from_plans)
    network_kwargs = {"lfam_min_level": 0}


class nnUNetTrainerLFAMGODC(nnUNetTrainerLFAM):
    dice_class = GODCDiceLoss
    batch_dice = False


class nnUNetTrainerLFAMGODCCoarse(nnUNetTrainerLFAMGODC):
    """LFAM only on the skips below full resolution: bounds memory for large 3D patches."""
    network_kwargs = {"lfam_min_level": 1}


class nnUNetTrainerLFAMGODCPaper(nnUNetTrainerLFAMGODC):
    """The paper's recipe: GODC alone (Sec. III), Adam with learning rate 2e-4."""
    adam_learning_rate = 2e-4
    weight_ce = 0.0


class nnUNetTrainerLFAMGODC_quick(nnUNetTrainerLFAMGODC):
    """``nnUNetTrainerLFAMGODC`` with the smoke-run schedule (``QUICK_SCHEDULE``, no mirroring)."""
    schedule = QUICK_SCHEDULE
    mirroring = False


class nnUNetTrainerGODC_quick(nnUNetTrainerGODC):
    """``nnUNetTrainerGODC`` with the smoke-run schedule (``QUICK_SCHEDULE``, no mirroring)."""
    schedule = QUICK_SCHEDULE
    mirroring = False
