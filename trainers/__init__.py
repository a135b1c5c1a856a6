"""The folder ``nnUNet_extTrainer`` points at (installed as ``nnunet_ext.trainers``): re-exports only."""
