"""Tests for nnunet_ext.losses.compound (Dice + CE factory, deep-supervision weights)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_ext.losses import GODCDiceLoss, build_dice_ce_loss, deep_supervision_weights

LABELS = {'background': 0, 'liver': 1, 'tumor': 2}
LABELS_IGNORE = {'background': 0, 'liver': 1, 'tumor': 2, 'ignore': 3}
REGIONS = {'background': 0, 'whole': (1, 2), 'core': 2}
REGIONS_IGNORE = {'background': 0, 'whole': (1, 2), 'core': 2, 'ignore': 3}


def hand_dice_terms(P, G, mask, smooth=1e-5, godc=False):
    """-mean(DC) (plain per-sample soft Dice) or GODC L - 1; P, G: (b, c, ...), mask (b, 1, ...)."""
    axes = tuple(range(2, P.ndim))
    I = (P * G * mask).sum(axes)
    SP, SG = (P * mask).sum(axes), (G * mask).sum(axes)
    dc = (2 * I + smooth) / (SP + SG + smooth)
    if not godc:
        return -dc.mean()
    U = SP + SG - I
    return (U / U.mean(0, keepdim=True) * (1 - dc)).mean() - 1


# --------------------------------------------------------------------------------------------------
# deep supervision weights
# --------------------------------------------------------------------------------------------------
def test_deep_supervision_weights_match_nnunet():
    # nnU-Net: 1/2**i, last set to 0, normalised. 4 levels: [1, 1/2, 1/4, 0] / (7/4)
    np.testing.assert_allclose(deep_supervision_weights(4), [4 / 7, 2 / 7, 1 / 7, 0.], rtol=1e-12)
    # 6 levels (typical 3d_fullres): [1, .5, .25, .125, .0625, 0] / (31/16)
    np.testing.assert_allclose(deep_supervision_weights(6), [16 / 31, 8 / 31, 4 / 31, 2 / 31, 1 / 31, 0.],
                               rtol=1e-12)
    # DDP without compile: lowest = 1e-6 before normalisation
    s = 1 + 0.5 + 0.25 + 1e-6
    np.testing.assert_allclose(deep_supervision_weights(4, 1e-6), [1 / s, 0.5 / s, 0.25 / s, 1e-6 / s], rtol=1e-12)
    # keeping the lowest at its natural 1/8 gives the un-truncated series [8, 4, 2, 1] / 15
    np.testing.assert_allclose(deep_supervision_weights(4, 0.125), [8 / 15, 4 / 15, 2 / 15, 1 / 15], rtol=1e-12)
    np.testing.assert_allclose(deep_supervision_weights(1), [1.])
    assert abs(deep_supervision_weights(5).sum() - 1) < 1e-12
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


# --------------------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dice_class', [MemoryEfficientSoftDiceLoss, GODCDiceLoss])
def test_factory_labels_returns_dc_and_ce_with_weights(dice_class):
    lm = LabelManager(LABELS, None)
    assert not lm.has_regions and lm.ignore_label is None
    loss = build_dice_ce_loss(lm, batch_dice=False, is_ddp=False, weight_dice=0.7, weight_ce=1.9,
                              dice_class=dice_class)
    assert type(loss) is DC_and_CE_loss and type(loss.dc) is dice_class
    assert loss.dc.do_bg is False and loss.dc.smooth == 1e-5 and loss.dc.ddp is False and loss.ignore_label is None
    assert loss.weight_dice == 0.7 and loss.weight_ce == 1.9

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 7)
    y = torch.randint(0, 3, (2, 1, 6, 7))
    P = torch.softmax(logits, 1)
    G = F.one_hot(y[:, 0], 3).movedim(-1, 1).float()
    dice = hand_dice_terms(P[:, 1:], G[:, 1:], torch.ones_like(G[:, :1]), godc=dice_class is GODCDiceLoss)
    ce = -torch.log_softmax(logits, 1).gather(1, y).mean()
    torch.testing.assert_close(loss(logits, y), 0.7 * dice + 1.9 * ce)
    torch.testing.assert_close(loss.dc(logits, y), dice)
    # GODC alone: weight_ce = 0
    alone = build_dice_ce_loss(lm, False, False, weight_ce=0, dice_class=dice_class)
    torch.testing.assert_close(alone(logits, y), dice)


@pytest.mark.parametrize('dice_class', [MemoryEfficientSoftDiceLoss, GODCDiceLoss])
def test_factory_labels_ignore_label(dice_class):
    lm = LabelManager(LABELS_IGNORE, None)
    assert lm.ignore_label == 3
    loss = build_dice_ce_loss(lm, batch_dice=False, is_ddp=False, dice_class=dice_class)
    assert type(loss) is DC_and_CE_loss and loss.ignore_label == 3 and loss.ce.ignore_index == 3

    torch.manual_seed(1)
    logits = torch.randn(2, 3, 3, 4, 5)
    y = torch.randint(0, 4, (2, 1, 3, 4, 5))
    mask = (y != 3).float()
    P = torch.softmax(logits, 1)
    G = F.one_hot(torch.where(y == 3, 0, y)[:, 0], 3).movedim(-1, 1).float()
    dice = hand_dice_terms(P[:, 1:], G[:, 1:], mask, godc=dice_class is GODCDiceLoss)
    valid = y[:, 0] != 3
    ce = -torch.log_softmax(logits, 1).movedim(1, -1)[valid].gather(1, y[:, 0][valid][:, None]).mean()
    torch.testing.assert_close(loss(logits, y), dice + ce)


@pytest.mark.parametrize('ignore', [False, True])
@pytest.mark.parametrize('dice_class', [MemoryEfficientSoftDiceLoss, GODCDiceLoss])
def test_factory_regions_returns_dc_and_bce(dice_class, ignore):
    lm = LabelManager(REGIONS_IGNORE if ignore else REGIONS, [1, 2])
    assert lm.has_regions
    loss = build_dice_ce_loss(lm, batch_dice=False, is_ddp=False, weight_dice=1.3, weight_ce=0.4,
                              dice_class=dice_class)
    assert type(loss) is DC_and_BCE_loss and type(loss.dc) is dice_class
    assert loss.dc.do_bg is True and loss.dc.smooth == 1e-5 and loss.use_ignore_label is ignore

    torch.manual_seed(2)
    logits = torch.randn(2, 2, 6, 6)
    lab = torch.randint(0, 4 if ignore else 3, (2, 6, 6))
    regions = torch.stack([(lab == 1) | (lab == 2), lab == 2], 1)
    target = torch.cat([regions, (lab == 3)[:, None]], 1) if ignore else regions
    mask = (lab != 3)[:, None].float()
    G = regions.float()
    dice = hand_dice_terms(torch.sigmoid(logits), G, mask, godc=dice_class is GODCDiceLoss)
    bce_all = F.binary_cross_entropy_with_logits(logits, G, reduction='none')
    if ignore:
        # nnU-Net divides the masked sum over (voxel, region) by the number of valid VOXELS (mask has 1 channel)
        bce = (bce_all * mask).sum() / mask.sum()
    else:
        bce = bce_all.mean()
    torch.testing.assert_close(loss(logits, target), 1.3 * dice + 0.4 * bce)


def test_factory_options_and_kwargs_isolation():
    lm = LabelManager(LABELS_IGNORE, None)
    loss = build_dice_ce_loss(lm, batch_dice=True, is_ddp=True, do_bg=True)
    assert loss.dc.batch_dice is True and loss.dc.ddp is True and loss.dc.do_bg is True
    # GODC refuses batch Dice (needs per-sample unions)
    with pytest.raises(ValueError, match='batch_dice'):
        build_dice_ce_loss(lm, batch_dice=True, is_ddp=False, dice_class=GODCDiceLoss)
    # a second loss without ignore label is not contaminated by the first one's ignore_index
    loss2 = build_dice_ce_loss(LabelManager(LABELS, None), batch_dice=False, is_ddp=False)
    assert loss2.ce.ignore_index == -100
    regions = build_dice_ce_loss(LabelManager(REGIONS_IGNORE, [1, 2]), False, False)
    regions2 = build_dice_ce_loss(LabelManager(REGIONS, [1, 2]), False, False)
    assert regions.ce.reduction == 'none' and regions2.ce.reduction == 'mean'
