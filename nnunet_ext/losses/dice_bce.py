"""SCRNet's loss (Eq. 13): ``Dice(pred, gt) + 0.5 * BCE(pred, gt)`` on a sigmoid output, as nnU-Net's Dice + CE.

nnU-Net trains a binary task (background + one label) as a 2-class softmax with logits ``(z0, z1)``. Its softmax
probability of the label is ``e^z1 / (e^z0 + e^z1) = sigmoid(z1 - z0)``, so on the logit ``z = z1 - z0``:

- CE: ``-log softmax(z)_y = -[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))] = BCE(sigmoid(z), y)``;
- Dice: nnU-Net's soft Dice without background (``do_bg=False``) scores ``softmax(z)_1 = sigmoid(z)``, the
  paper's Dice of the sigmoid output.

So ``DC_and_CE_loss`` with ``weight_ce = 0.5`` is Eq. 13 exactly (nnU-Net's Dice smoothing 1e-5 and the plan's
``batch_dice`` are kept), and for several labels it is its softmax generalisation: Dice over the foreground labels
+ 0.5 x multi-class CE. Region-based training (sigmoid outputs) uses ``DC_and_BCE_loss`` with the same weight,
i.e. Eq. 13 per region. nnU-Net's ignore label, deep supervision (1/2^i weights per output) and DDP handling
apply unchanged (``nnunet_ext.losses.compound.build_dice_ce_loss``). ``tests/test_dice_bce.py`` checks the
equivalences numerically.
"""

SCRNET_WEIGHT_CE = 0.5
"""Weight of the (B)CE term next to a Dice weight of 1 (SCRNet Eq. 13, following CMU-Net and CMUNeXt)."""
