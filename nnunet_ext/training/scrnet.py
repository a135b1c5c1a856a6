"""nnU-Net trainers for SCRNet (Xu & Wang, "SCRNet: Spatial-Channel Regulation Network for Medical Ultrasound
Image Segmentation"): attribute-only variants of ``nnUNetExtTrainer``.

- ``nnUNetTrainerSCRNet``: the SCRNet U-Net from the plan (``nnunet_ext.architectures.scrnet``), the paper's loss
  Dice + 0.5 x (B)CE (Eq. 13, ``nnunet_ext.losses.dice_bce``), nnU-Net's defaults otherwise (SGD 1e-2, poly
  decay, 1000 epochs, augmentation, deep supervision with heads on every decoder level).
- ``nnUNetTrainerSCRNetPaper``: the paper's optimiser, Adam with learning rate 1e-4 and weight decay 5e-4
  (Sec. IV-B), with nnU-Net's poly decay in place of the paper's unspecified annealing by 0.2.
- ``nnUNetTrainerSCRNet_quick``: ``nnUNetTrainerSCRNet`` on the smoke-run schedule (no mirroring).
"""
from nnunet_ext.architectures.scrnet import build_scrnet_from_plans
from nnunet_ext.losses.dice_bce import SCRNET_WEIGHT_CE
from nnunet_ext.training.base import QUICK_SCHEDULE, nnUNetExtTrainer


class nnUNetTrainerSCRNet(nnUNetExtTrainer):
    network_factory = staticmethod(build_scrnet_from_plans)
    weight_ce = SCRNET_WEIGHT_CE


class nnUNetTrainerSCRNetPaper(nnUNetTrainerSCRNet):
    adam_learning_rate = 1e-4
    adam_weight_decay = 5e-4


class nnUNetTrainerSCRNet_quick(nnUNetTrainerSCRNet):
    schedule = QUICK_SCHEDULE
    mirroring = False
