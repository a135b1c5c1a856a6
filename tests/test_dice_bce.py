"""SCRNet's Dice + 0.5 BCE (Eq. 13) equals nnU-Net's Dice + 0.5 CE on a 2-class softmax: checked numerically on
the logit difference, with and without nnU-Net's ignore label, and for region (sigmoid) training."""
import torch
from torch import nn

from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_ext.losses.compound import build_dice_ce_loss
from nnunet_ext.losses.dice_bce import SCRNET_WEIGHT_CE


def binary_case(seed: int = 0):
    torch.manual_seed(seed)
    logits = torch.randn(3, 2, 12, 10) * 3
    target = (torch.rand(3, 1, 12, 10) > 0.6).float()
    return logits, target, logits[:, 1:] - logits[:, :1]  # z = z1 - z0


def sigmoid_dice(z: torch.Tensor, target: torch.Tensor, batch_dice: bool) -> torch.Tensor:
    """The paper's Dice on the sigmoid output (nnU-Net's soft Dice, one foreground channel)."""
    dice = MemoryEfficientSoftDiceLoss(torch.sigmoid, batch_dice=batch_dice, do_bg=True, smooth=1e-5, ddp=False)
    return dice(z, target)


def test_softmax_ce_equals_bce_on_logit_difference():
    logits, target, z = binary_case()
    ce = nn.functional.cross_entropy(logits, target[:, 0].long())
    torch.testing.assert_close(ce, nn.functional.binary_cross_entropy_with_logits(z, target))


def test_nnunet_loss_equals_dice_plus_half_bce():
    labels = LabelManager({"background": 0, "lesion": 1}, regions_class_order=None)
    for batch_dice in (True, False):
        loss = build_dice_ce_loss(labels, batch_dice=batch_dice, is_ddp=False, weight_ce=SCRNET_WEIGHT_CE)
        logits, target, z = binary_case(1)
        expected = sigmoid_dice(z, target, batch_dice) + 0.5 * nn.functional.binary_cross_entropy_with_logits(z, target)
        torch.testing.assert_close(loss(logits, target), expected)


def test_with_ignore_label():
    labels = LabelManager({"background": 0, "lesion": 1, "ignore": 2}, regions_class_order=None)
    loss = build_dice_ce_loss(labels, batch_dice=False, is_ddp=False, weight_ce=SCRNET_WEIGHT_CE)
    logits, target, z = binary_case(2)
    target[:, :, :4] = 2  # ignored rows
    valid = (target != 2).float()
    bce = nn.functional.binary_cross_entropy_with_logits(z, target * valid, reduction="none")
    bce = (bce * valid).sum() / valid.sum()
    dice = MemoryEfficientSoftDiceLoss(torch.sigmoid, batch_dice=False, do_bg=True, smooth=1e-5, ddp=False)(
        z, target * valid, loss_mask=valid)
    torch.testing.assert_close(loss(logits, target), dice + 0.5 * bce)


def test_regions_use_dice_plus_half_bce():
    labels = LabelManager({"background": 0, "lesion": [1, 2], "core": 2}, regions_class_order=[1, 2])
    loss = build_dice_ce_loss(labels, batch_dice=False, is_ddp=False, weight_ce=SCRNET_WEIGHT_CE)
    torch.manual_seed(3)
    logits, target = torch.randn(2, 2, 8, 8), (torch.rand(2, 2, 8, 8) > 0.5).float()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
    expected = sigmoid_dice(logits, target, False) + 0.5 * bce
    torch.testing.assert_close(loss(logits, target), expected)
