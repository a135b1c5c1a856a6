"""Losses: GODC (gradient-optimized Dice) and nnU-Net Dice+CE hybrids shared by the trainers."""
from nnunet_ext.losses.compound import build_dice_ce_loss, deep_supervision_weights
from nnunet_ext.losses.godc import GODCDiceLoss

__all__ = ['GODCDiceLoss', 'build_dice_ce_loss', 'deep_supervision_weights']
