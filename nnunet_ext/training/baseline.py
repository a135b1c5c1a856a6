"""nnU-Net's own network and loss under this package's schedules, for comparisons and fine-tuning sources.

- ``nnUNetTrainer_quick``: nnU-Net's default trainer with the smoke-run schedule (``QUICK_SCHEDULE``, no
  mirroring): the baseline next to the methods' ``_quick`` variants in demos and tests, and a plain nnU-Net
  checkpoint to fine-tune DPC-Net or LFAM from (``-pretrained_weights``).
"""
from nnunet_ext.training.base import QUICK_SCHEDULE, nnUNetExtTrainer


class nnUNetTrainer_quick(nnUNetExtTrainer):
    schedule = QUICK_SCHEDULE
    mirroring = False
