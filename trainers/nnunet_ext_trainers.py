"""Re-export of every registered trainer for nnU-Net's lookup (``nnUNet_extTrainer`` points at this folder).

nnU-Net imports the modules of this folder as top-level modules and drops them again after the lookup, so the
classes are defined in ``nnunet_ext`` and only re-exported here (see ``nnunet_ext.training.registry``).
"""
from nnunet_ext.training.registry import TRAINERS

globals().update(TRAINERS)
__all__ = list(TRAINERS)
