"""Re-export for nnU-Net's trainer lookup (``nnUNet_extTrainer``); the classes live in nnunet_ext."""
from nnunet_ext.training.godc_lfam import (nnUNetTrainerGODC, nnUNetTrainerGODCOnly, nnUNetTrainerLFAM,
                                           nnUNetTrainerLFAMGODC, nnUNetTrainerLFAMGODC_quick,
                                           nnUNetTrainerLFAMGODCCoarse, nnUNetTrainerLFAMGODCPaper)

__all__ = ["nnUNetTrainerGODC", "nnUNetTrainerGODCOnly", "nnUNetTrainerLFAM", "nnUNetTrainerLFAMGODC",
           "nnUNetTrainerLFAMGODCCoarse", "nnUNetTrainerLFAMGODCPaper", "nnUNetTrainerLFAMGODC_quick"]
