"""Dice + CE hybrids built from nnU-Net's own loss classes, shared by all ``nnunet_ext`` trainers.

``build_dice_ce_loss`` reproduces ``nnUNetTrainer._build_loss`` (nnunetv2 2.8.1) without the
deep-supervision wrapping: ``DC_and_CE_loss`` for label training, ``DC_and_BCE_loss`` for region
training, smooth 1e-5, ``do_bg`` False (softmax) / True (regions), ignore label handled exactly as
nnU-Net does.  Only the Dice class and the weights are exchangeable.  Wrap the result with
``DeepSupervisionWrapper(loss, deep_supervision_weights(n, ...))`` as nnU-Net does.

GODC + CE:   ``build_dice_ce_loss(lm, batch_dice=False, is_ddp=..., dice_class=GODCDiceLoss)``.
GODC alone:  same with ``weight_ce=0`` (``DC_and_CE_loss`` then skips CE; ``DC_and_BCE_loss``
computes BCE but multiplies it by 0).

Notes on nnU-Net's compound classes (checked against 2.8.1):
* they construct ``dice_class(apply_nonlin=softmax_helper_dim1 | torch.sigmoid, **soft_dice_kwargs)``,
  so ``batch_dice``, ``do_bg``, ``smooth`` and ``ddp`` reach the Dice class unchanged.  GODC
  raises on ``batch_dice=True`` (see ``godc.py``); nnU-Net's plans say ``batch_dice=True`` for 2d
  and often 3d_fullres, so GODC trainers must pass False.
* ``DC_and_CE_loss`` / ``DC_and_BCE_loss`` write into the kwargs dicts they get (``ignore_index``,
  ``reduction``); this factory always passes fresh dicts.
"""
from __future__ import annotations

from typing import Optional, Type

import numpy as np
import torch
from torch import nn

from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss


def build_dice_ce_loss(label_manager, batch_dice: bool, is_ddp: bool, weight_dice: float = 1.0,
                       weight_ce: float = 1.0, dice_class: Type[nn.Module] = MemoryEfficientSoftDiceLoss,
                       do_bg: Optional[bool] = None, smooth: float = 1e-5, compile_dice: bool = False,
                       ce_kwargs: Optional[dict] = None) -> nn.Module:
    """nnU-Net's Dice + CE (labels) or Dice + BCE (regions) loss with an exchangeable Dice class.

    :param label_manager: nnU-Net ``LabelManager`` (``has_regions``, ``ignore_label``).
    :param batch_dice: passed to the Dice class (must be False for GODC).
    :param is_ddp: passed to the Dice class as ``ddp``.
    :param do_bg: None = nnU-Net's default (False for softmax labels, True for regions).
    :param compile_dice: wrap ``loss.dc`` in ``torch.compile`` (what nnU-Net does when
        ``self._do_i_compile()``).
    :param ce_kwargs: extra arguments of the CE (``RobustCrossEntropyLoss``) or BCE (``BCEWithLogitsLoss``)
        term, e.g. ``{'weight': class_weights}``; copied, never modified.
    """
    soft_dice_kwargs = {'batch_dice': batch_dice, 'smooth': smooth, 'ddp': is_ddp}
    if label_manager.has_regions:
        soft_dice_kwargs['do_bg'] = True if do_bg is None else do_bg
        loss = DC_and_BCE_loss(dict(ce_kwargs or {}), soft_dice_kwargs, weight_ce=weight_ce, weight_dice=weight_dice,
                               use_ignore_label=label_manager.ignore_label is not None,
                               dice_class=dice_class)
    else:
        soft_dice_kwargs['do_bg'] = False if do_bg is None else do_bg
        loss = DC_and_CE_loss(soft_dice_kwargs, dict(ce_kwargs or {}), weight_ce=weight_ce, weight_dice=weight_dice,
                              ignore_label=label_manager.ignore_label, dice_class=dice_class)
    if compile_dice:
        loss.dc = torch.compile(loss.dc)
    return loss


def deep_supervision_weights(num_levels: int, lowest_weight: float = 0.0) -> np.ndarray:
    """nnU-Net's deep-supervision weights: 1/2**i, lowest-resolution level set to ``lowest_weight``,
    normalised to sum 1 (``nnUNetTrainer._build_loss``: lowest 0, or 1e-6 under DDP without
    torch.compile).  With a single level there is nothing to drop: returns ``[1.]`` (nnU-Net would
    divide by zero there)."""
    if num_levels < 1:
        raise ValueError(f'num_levels must be >= 1, got {num_levels}')
    if num_levels == 1:
        return np.ones(1)
    weights = np.array([1 / (2 ** i) for i in range(num_levels)])
    weights[-1] = lowest_weight
    return weights / weights.sum()
