"""Epoch-driven Dice/CE weight schedules of DLKUNet (``papers/dlkunet``, Sec. 4.4, Eq. 10-13).

``Loss = alpha * DiceLoss + beta * CELoss`` (Eq. 10). A schedule is a callable
``(epoch, num_epochs) -> (alpha, beta)`` with nnU-Net's 0-based ``current_epoch``; the trainer base
(``nnunet_ext.training.base.nnUNetExtTrainer.loss_weight_schedule``) applies it at the start of every
epoch and writes the weights to nnU-Net's training log. The authors' training scripts compute such
weights but never pass the epoch to their loss, so their weights stay at the initial value; these move.
"""
from dataclasses import dataclass
from typing import Tuple

from scipy.special import expit

Weights = Tuple[float, float]


@dataclass(frozen=True)
class PhaseLossSchedule:
    """Eq. 11: ``(0.6, 0.4)`` for epochs ``1 .. switch_fraction * num_epochs`` (1-based, as the paper's
    ``[1, 200]`` of 400), ``(0.7, 0.3)`` after. The paper's switch at 200 of 400 epochs is scaled to the run:
    with nnU-Net's 0-based epochs, ``epoch + 1 <= switch_fraction * num_epochs`` is the first phase."""
    first: Weights = (0.6, 0.4)
    second: Weights = (0.7, 0.3)
    switch_fraction: float = 0.5

    def __call__(self, epoch: int, num_epochs: int) -> Weights:
        return self.first if epoch + 1 <= self.switch_fraction * num_epochs else self.second


@dataclass(frozen=True)
class DynamicLossSchedule:
    """Eq. 12-13: ``s = 1 - 1 / (1 + exp(-k (x - x0)))``, ``alpha = A + (1 - A) s``, ``beta = 1 + (B - 1) s``
    with ``x`` = nnU-Net's 0-based epoch (the authors' loop variable), ``x0 = midpoint_fraction * num_epochs``
    and the slope scaled to the run length, ``k = k_times_epochs / num_epochs``: the authors used
    ``k = 0.1`` for 300 epochs (``x0 = 150``), so ``k_times_epochs = 30`` keeps the sigmoid's shape over
    the run (``s`` falls from ``1 - 3e-7`` at the first epoch through 0.5 at the midpoint to about 0 at
    the end). ``alpha`` goes from about 1 to ``A``, ``beta`` from about ``B`` to 1."""
    A: float = 0.3
    B: float = 0.7
    midpoint_fraction: float = 0.5
    k_times_epochs: float = 30.0

    def __call__(self, epoch: int, num_epochs: int) -> Weights:
        k = self.k_times_epochs / num_epochs
        s = float(expit(-k * (epoch - self.midpoint_fraction * num_epochs)))  # = 1 - sigmoid(k (x - x0))
        return self.A + (1.0 - self.A) * s, 1.0 + (self.B - 1.0) * s
