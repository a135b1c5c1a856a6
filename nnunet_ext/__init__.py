"""nnunet_ext: published segmentation methods as nnU-Net v2 trainers.

Every class lives in this package. The repository's ``trainers/`` folder (the folder that the
``nnUNet_extTrainer`` environment variable points at) only re-exports the trainer classes so that
nnU-Net's trainer lookup finds them; see ``nnunet_ext.environment``.
"""
