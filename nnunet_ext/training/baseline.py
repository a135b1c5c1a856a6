"""nnU-Net's own network and loss under this package's schedules, for comparisons and fine-tuning sources.

- ``nnUNetTrainer_quick``: nnU-Net's default trainer with the smoke-run schedule (``QUICK_SCHEDULE``, no
  mirroring): the baseline next to the methods' ``_quick`` variants in demos and tests, and a plain nnU-Net
  checkpoint to fine-tune DPC-Net or LFAM from (``-pretrained_weights``).
- ``nnUNetTrainer_demo``: the same with the demo schedule (``DEMO_SCHEDULE``, no mirroring): nnU-Net's network in
  ``nnunet_ext_demo --trainer nnUNetTrainer_demo``, next to the default ``nnUNetTrainerDPCNet_demo``.
"""
from nnunet_ext.training.base import DEMO_SCHEDULE, QUICK_SCHEDULE, nnUNetExtTrainer


class nnUNetTrainer_quick(nnUNetExtTrainer):
    schedule = QUICK_SCHEDULE
    mirroring = False


class nnUNetTrainer_demo(nnUNetExtTrainer):
    schedule = DEMO_SCHEDULE
    mirroring = False
