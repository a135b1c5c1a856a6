"""Gradient-Optimized Dice loss (GODC) as a drop-in ``dice_class`` for nnU-Net v2.

Reference
---------
Q. Ming and X. Xiao, "Towards Accurate Medical Image Segmentation With Gradient-Optimized Dice
Loss", IEEE Signal Processing Letters, 2024 (doi 10.1109/LSP.2023.3329437), Sec. II.

Definitions (per sample ``b`` and class ``c``; sums over the voxels ``v`` of that sample)
---------------------------------------------------------------------------------------
* Eq. (1): soft intersection and soft union

      I = sum_v P_v * G_v,       U = sum_v P_v + G_v - P_v * G_v

* Eq. (2): Dice  DC = 2 I / (I + U) = 2 I / (sum P + sum G).  The paper uses no smoothing; like
  nnU-Net's ``MemoryEfficientSoftDiceLoss`` we compute

      DC = (2 I + smooth) / max(sum P + sum G + smooth, 1e-8)

  so that the value is defined for empty classes (``smooth`` = 1e-5 in nnU-Net's trainers, which
  changes nothing measurable for non-empty objects).
* Eq. (6): plain Dice loss  L_DC = 1 - DC.
* Eq. (7): its gradient w.r.t. a voxel,

      dL_DC/dP_v = -(2 G_v - IoU (1 - G_v)) / ((1 + IoU)^2 U),

  is inversely proportional to the union U: for the same relative error a small object gets
  much larger per-voxel gradients than a large one.
* Eq. (8): GODC  L = (1 - DC) * ||U||*, with ||U||* "the union normalised within a batch".
  Implemented (``specs/methods.md`` §2) as

      L = mean_{b,c} [ w_{b,c} * (1 - DC_{b,c}) ],     w_{b,c} = U_{b,c} / mean_b U_{.,c},

  with ``w`` DETACHED from the autograd graph.  Since dL/dP_v = w * dL_DC/dP_v and w is
  proportional to U, the 1/U of Eq. (7) cancels: per-voxel gradients no longer depend on the
  object size (they scale with 1/mean_b U instead, one number per class and batch).  Normalising
  by the batch mean keeps mean_b w = 1, so the loss stays on the scale of plain Dice.  The
  weight is not differentiated: the paper's analysis (Eq. 7 times the weight) is only the
  gradient of GODC if the weight is treated as a constant.

Conventions of this implementation
----------------------------------
* Sign / offset.  nnU-Net's dice classes return ``-mean(DC)`` (= plain loss - 1) and compound
  losses add that to CE.  :class:`GODCDiceLoss` returns ``L - 1`` computed as
  ``mean(w * (1 - DC)) - 1``.  The gradient is exactly the gradient of ``L``.  Whenever no class
  is degenerate (see below) ``mean(w) = 1`` and the returned value is identical to
  ``-mean(w * DC)``; with ``w = 1`` for all entries it equals nnU-Net's ``-mean(DC)``.
* ``batch_dice=True`` raises ``ValueError``.  The weights compare unions of different samples;
  a batch Dice has one union per class and would make ``w = 1`` (GODC = batch Dice), which is not
  the method.  nnU-Net's planner writes ``batch_dice: True`` for 2d and (often) 3d_fullres, so a
  GODC trainer must pass ``batch_dice=False`` explicitly; we raise instead of silently ignoring
  the plan value so that the choice is visible in the trainer code.
* Degenerate classes.  If ``mean_b U_{.,c} == 0`` (class absent in every sample AND predicted
  probability exactly 0 everywhere) the weights of that class are set to 1 (the limit of equal
  unions; the term is then 1 - DC = 0).  Otherwise a sample with U = 0 gets w = 0.  Everything is
  finite: no division by zero anywhere.
* Precision.  All sums, the nonlinearity included, are computed in float32 with autocast
  disabled, whatever the input dtype (fp16/bf16 under AMP).
* Targets and masks exactly as ``MemoryEfficientSoftDiceLoss``: a label map (b, 1, ...) or
  (b, ...) is one-hot encoded; a target with the input's shape is taken as one-hot / regions;
  ``loss_mask`` (b, 1, ...) with 1 = valid removes voxels (nnU-Net's ignore label) from all sums;
  ``do_bg=False`` drops channel 0 (softmax training).  Region (sigmoid) training works through
  ``apply_nonlin=torch.sigmoid`` and one-hot targets, as in ``DC_and_BCE_loss``.
* DDP.  With ``ddp=True`` and an initialised ``torch.distributed`` process group, the
  normaliser ``mean_b U`` is the mean over the GLOBAL batch: the detached per-class union sums and
  the local sample count are all-reduced (SUM) across ranks.  The Dice terms themselves stay
  per-rank (they are per-sample anyway), so no gradient crosses ranks; DDP's gradient averaging
  then yields the gradient of the global-batch GODC when all ranks hold equally many samples.
  Without an initialised process group (or ``ddp=False``) the weights are normalised per rank.
  Every rank must call ``forward`` equally often (a collective is issued each call).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn


class GODCDiceLoss(nn.Module):
    """Gradient-Optimized Dice loss (Ming & Xiao 2024, Eq. 8), nnU-Net ``dice_class`` compatible.

    Same constructor and ``forward(x, y, loss_mask=None)`` as nnU-Net's
    ``MemoryEfficientSoftDiceLoss``; usable as ``dice_class`` in ``DC_and_CE_loss`` /
    ``DC_and_BCE_loss``.  Returns ``mean_{b,c}(w * (1 - DC)) - 1`` (see module docstring).

    :param apply_nonlin: softmax (label training) / sigmoid (regions) / None (x already
        probabilities). Applied in float32.
    :param batch_dice: must be False (GODC needs per-sample Dice); True raises ``ValueError``.
    :param do_bg: include channel 0 (True) or drop it (False, nnU-Net's softmax setting).
    :param smooth: added to numerator and denominator of the Dice (nnU-Net uses 1e-5).
    :param ddp: normalise the weights over the global batch when torch.distributed is initialised.
    """

    def __init__(self, apply_nonlin: Callable = None, batch_dice: bool = False, do_bg: bool = True,
                 smooth: float = 1., ddp: bool = True):
        super().__init__()
        if batch_dice:
            raise ValueError(
                "GODCDiceLoss requires per-sample Dice (batch_dice=False): its weights w = U_b / mean_b(U) "
                "compare the unions of different samples, which a batch Dice does not have. nnU-Net plans "
                "set batch_dice=True for 2d/3d_fullres; pass batch_dice=False for GODC explicitly.")
        self.apply_nonlin = apply_nonlin
        self.batch_dice = False
        self.do_bg = do_bg
        self.smooth = float(smooth)
        self.ddp = ddp

    def _mean_union(self, union: torch.Tensor) -> torch.Tensor:
        """Detached per-class mean union over the batch (global batch under DDP). union: (b, c)."""
        u = union.detach()
        sums = u.sum(0)
        count = torch.full((1,), float(u.shape[0]), dtype=torch.float32, device=u.device)
        if self.ddp and torch.distributed.is_available() and torch.distributed.is_initialized():
            buf = torch.cat((sums, count))
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
            sums, count = buf[:-1], buf[-1:]
        return sums / count.clamp_min(1.)

    def compute_terms(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-(sample, class) Dice, detached weights and soft unions, each of shape (b, c').

        c' = c - 1 when ``do_bg`` is False.  Gradient flows through the returned Dice only.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.apply_nonlin is not None:
                x = self.apply_nonlin(x)
            axes = tuple(range(2, x.ndim))

            with torch.no_grad():
                if x.ndim != y.ndim:
                    y = y.view((y.shape[0], 1, *y.shape[1:]))
                if x.shape == y.shape:
                    # target is already one-hot (or regions)
                    y_onehot = y.to(torch.float32)
                else:
                    y_onehot = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
                    y_onehot.scatter_(1, y.long(), 1)
                if not self.do_bg:
                    y_onehot = y_onehot[:, 1:]
                if loss_mask is not None:
                    loss_mask = loss_mask.to(torch.float32)
                    y_onehot = y_onehot * loss_mask
                sum_gt = y_onehot.sum(axes, dtype=torch.float32)

            if not self.do_bg:
                x = x[:, 1:]
            if loss_mask is not None:
                x = x * loss_mask
            intersect = (x * y_onehot).sum(axes, dtype=torch.float32)
            sum_pred = x.sum(axes, dtype=torch.float32)

            # Eq. (1) union, Eq. (2) Dice (with nnU-Net's smoothing)
            union = sum_pred + sum_gt - intersect
            dc = (2 * intersect + self.smooth) / (sum_pred + sum_gt + self.smooth).clamp_min(1e-8)

            with torch.no_grad():
                u = union.detach()
                mean_u = self._mean_union(u)  # (c',)
                degenerate = mean_u <= 0
                w = u / torch.where(degenerate, torch.ones_like(mean_u), mean_u)
                w = torch.where(degenerate[None], torch.ones_like(w), w)
        return dc, w, union

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        dc, w, _ = self.compute_terms(x, y, loss_mask)
        # mean over (sample, class); sum/numel keeps empty batches finite (value -1, zero gradient)
        loss = (w * (1 - dc)).sum() / max(dc.numel(), 1)
        return loss - 1
