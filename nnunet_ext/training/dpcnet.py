"""nnU-Net trainers for DPC-Net (Zhang et al., Med. Phys. 2022).

- ``nnUNetTrainerDPCNet``: DPC-Net on the plan's U-Net, nnU-Net's defaults otherwise (SGD 1e-2,
  poly schedule, Dice + CE, data augmentation, sampling, sliding-window inference).
- ``nnUNetTrainerDPCNetPaper``: the paper's optimiser, Adam with initial learning rate 1e-4
  (nnU-Net's poly decay and weight decay 3e-5 kept; the paper states neither).
- ``nnUNetTrainerDPCNet_quick``: a few iterations only, for smoke tests (``nnunet_ext_demo --quick``).
- ``nnUNetTrainerDPCNet_demo``: ``nnunet_ext_demo``'s default, long enough to learn the synthetic LiTS task.

Loss (paper Eq. 13): nnU-Net's Dice + CE on every output of the three families (PFE, SpaCor,
SemCor), each compared with nnU-Net's deep-supervision target of its level and weighted with
nnU-Net's per-level weight ``1/2^i``. nnU-Net sets the lowest level's weight to 0; here it is 1e-6
so that every parameter receives a gradient in every step (DDP without ``find_unused_parameters``).
Validation and inference use the highest-resolution SemCor output ``sem_0``.
"""
from nnunet_ext.architectures.dpcnet import DPCNet, build_dpcnet_from_plans
from nnunet_ext.training.base import DEMO_SCHEDULE, QUICK_SCHEDULE, nnUNetExtTrainer


class nnUNetTrainerDPCNet(nnUNetExtTrainer):
    network_factory = staticmethod(build_dpcnet_from_plans)
    output_levels = staticmethod(DPCNet.output_levels)
    lowest_level_weight = 1e-6


class nnUNetTrainerDPCNetPaper(nnUNetTrainerDPCNet):
    """DPC-Net with the paper's optimiser: Adam, initial learning rate 1e-4 (Sec. IV)."""
    adam_learning_rate = 1e-4


class nnUNetTrainerDPCNet_quick(nnUNetTrainerDPCNet):
    """``nnUNetTrainerDPCNet`` with the smoke-run schedule (``QUICK_SCHEDULE``, no mirroring)."""
    schedule = QUICK_SCHEDULE
    mirroring = False


class nnUNetTrainerDPCNet_demo(nnUNetTrainerDPCNet):
    """``nnUNetTrainerDPCNet`` with the demo schedule (``DEMO_SCHEDULE``, no mirroring)."""
    schedule = DEMO_SCHEDULE
    mirroring = False
