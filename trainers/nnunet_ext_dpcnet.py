"""Re-export for nnU-Net's trainer lookup (``nnUNet_extTrainer``); the classes live in nnunet_ext."""
from nnunet_ext.training.dpcnet import (nnUNetTrainerDPCNet, nnUNetTrainerDPCNet_quick,
                                        nnUNetTrainerDPCNetPaper)

__all__ = ["nnUNetTrainerDPCNet", "nnUNetTrainerDPCNetPaper", "nnUNetTrainerDPCNet_quick"]
