"""nnU-Net trainers for SPA-DCN-Net (Jian & Azman, IJACSA 2025, ``papers/spa_dcn_net.txt``).

- ``nnUNetTrainerSPADCNNet``: SPA-DCN-Net (gated LCN before SPA), nnU-Net's defaults otherwise (Dice + CE with
  deep supervision over the five decoder stages, SGD 1e-2, poly, nnU-Net's augmentation and inference).
- ``nnUNetTrainerSPADCNNetPaper``: the paper's recipe (Sec. III.I): class-weighted CE alone, weights from the
  training set's label frequencies, Adam with learning rate 1e-3 (nnU-Net's poly decay and weight decay 3e-5 kept;
  the paper states neither).
- Table VII ablations (nnU-Net's defaults otherwise): ``nnUNetTrainerSPADCNNetNoLCN`` (SPA-DCN only),
  ``nnUNetTrainerSPADCNNetLCNBeforeSPA`` (plain LCN -> SPA), ``nnUNetTrainerSPADCNNetLCNAfterSPA`` (SPA -> LCN).
- ``nnUNetTrainerSPADCNNet_quick``: the smoke-run schedule (2 epochs x 5 iterations, no mirroring).

2D only: a 3D configuration is refused when the trainer is created. The patch size must be divisible by 32: plan
with ``nnunet_ext_plan_spadcnnet -d ID`` and use ``-p nnUNetPlans_SPADCN`` for training and prediction; another
patch is refused when the network is built (training and ``nnUNetv2_predict``), naming that command.

Class weights (``ce_class_weights``): None (unweighted CE), a sequence (one weight per class, the option), or
``'label_frequency'``: ``w_c = N / (K * N_c)`` over the voxels of the fold's training cases (``N_c`` voxels of
class ``c``, ``K`` classes, the ignore label not counted; the paper does not say how it computed its
``class_weights_tensor``), i.e. inverse frequency scaled so that the voxel-average weight is 1; an absent class gets
weight 1. nnU-Net builds the loss also where no training labels are read (``--val``, the predictor does not, tests);
the weights only act in training steps, so they are counted at the start of training (``on_train_start``, after
nnU-Net's split) and written into the CE term, and the log shows them.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from nnunet_ext.architectures.spa_dcn_net import OUTPUT_STRIDES, build_spa_dcn_net_from_plans
from nnunet_ext.training.base import QUICK_SCHEDULE, nnUNetExtTrainer


def label_frequency_weights(counts: Sequence[int]) -> np.ndarray:
    """``N / (K * N_c)`` per class from voxel counts ``N_c``; absent classes get 1."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.ones_like(counts)
    weights[present] = counts.sum() / (len(counts) * counts[present])
    return weights


class nnUNetTrainerSPADCNNet(nnUNetExtTrainer):
    network_factory = staticmethod(build_spa_dcn_net_from_plans)
    network_kwargs = {"lcn_mode": "gated"}
    supported_dimensions = (2,)
    ce_class_weights: Optional[Union[Sequence[float], str]] = None

    def _get_deep_supervision_scales(self):
        """One level per decoder stage (strides 1, 2, 4, 8, 16), whatever depth the plan's own U-Net has."""
        if not self.enable_deep_supervision:
            return None
        return [[1.0 / s] * 2 for s in OUTPUT_STRIDES]

    def ce_loss_kwargs(self) -> dict:
        if self.ce_class_weights is None:
            return {}
        num_classes = self.label_manager.num_segmentation_heads
        if self.label_manager.has_regions:
            raise ValueError(f"{type(self).__name__}: class-weighted CE needs label (softmax) training, but "
                             f"dataset.json defines regions")
        if isinstance(self.ce_class_weights, str):
            if self.ce_class_weights != "label_frequency":
                raise ValueError(f"ce_class_weights must be None, a sequence or 'label_frequency', "
                                 f"got {self.ce_class_weights!r}")
            weights = [1.0] * num_classes  # replaced by the counted weights in on_train_start
        else:
            weights = list(self.ce_class_weights)
            if len(weights) != num_classes:
                raise ValueError(f"{type(self).__name__}: {len(weights)} class weights for {num_classes} classes")
        return {"weight": torch.tensor(weights, dtype=torch.float32, device=self.device)}

    def count_training_labels(self) -> np.ndarray:
        """Voxels per class over the fold's training cases (preprocessed segmentations)."""
        num_classes = self.label_manager.num_segmentation_heads
        train_keys, _ = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, train_keys)
        counts = np.zeros(num_classes, dtype=np.int64)
        for key in train_keys:
            seg = np.asarray(dataset.load_case(key)[1])
            # -1 marks background outside the nonzero region; nnU-Net's transforms make it 0 in training
            values, n = np.unique(np.maximum(seg, 0), return_counts=True)
            for value, count in zip(values.astype(int), n):
                if value == self.label_manager.ignore_label:
                    continue
                if not 0 <= value < num_classes:
                    raise ValueError(f"training case {key} in {self.preprocessed_dataset_folder} has label {value}, "
                                     f"outside 0..{num_classes - 1}")
                counts[value] += count
        return counts

    def on_train_start(self):
        super().on_train_start()
        if self.ce_class_weights == "label_frequency":
            counts = self.count_training_labels()
            weights = label_frequency_weights(counts)
            self.compound_loss.ce.weight = torch.tensor(weights, dtype=torch.float32, device=self.device)
            self.print_to_log_file(f"class-weighted CE: voxels per class {counts.tolist()}, "
                                   f"weights {np.round(weights, 4).tolist()}")


class nnUNetTrainerSPADCNNetPaper(nnUNetTrainerSPADCNNet):
    """The paper's recipe: class-weighted CE (label frequencies), no Dice term, Adam 1e-3."""
    weight_dice = 0.0
    ce_class_weights = "label_frequency"
    adam_learning_rate = 1e-3


class nnUNetTrainerSPADCNNetNoLCN(nnUNetTrainerSPADCNNet):
    """Table VII "SPA-DCN only": no LCN."""
    network_kwargs = {"lcn_mode": "none"}


class nnUNetTrainerSPADCNNetLCNBeforeSPA(nnUNetTrainerSPADCNNet):
    """Table VII "LCN-SPA-DCN": plain (ungated) LCN before SPA."""
    network_kwargs = {"lcn_mode": "before_spa"}


class nnUNetTrainerSPADCNNetLCNAfterSPA(nnUNetTrainerSPADCNNet):
    """Table VII "SPA-LCN-DCN": plain LCN after SPA."""
    network_kwargs = {"lcn_mode": "after_spa"}


class nnUNetTrainerSPADCNNet_quick(nnUNetTrainerSPADCNNet):
    """``nnUNetTrainerSPADCNNet`` with the smoke-run schedule."""
    schedule = QUICK_SCHEDULE
    mirroring = False
