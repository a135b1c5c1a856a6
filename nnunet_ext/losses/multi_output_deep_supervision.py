"""Deep supervision for networks with several output families per resolution level."""
from typing import Sequence

import torch
from torch import nn


class MultiOutputDeepSupervisionWrapper(nn.Module):
    """Like nnU-Net's ``DeepSupervisionWrapper``, for a network that returns several outputs per
    resolution level (DPC-Net: PFE, SpaCor and SemCor outputs, paper Eq. 13).

    ``output_levels[j]`` is the resolution level of output ``j``; it is compared with
    ``targets[output_levels[j]]`` (nnU-Net's deep-supervision targets, highest resolution first)
    and weighted by ``level_weights[output_levels[j]]``. The per-output weights are normalised to
    sum to 1, so the loss has the scale of a single nnU-Net loss.
    """

    def __init__(self, loss: nn.Module, level_weights: Sequence[float], output_levels: Sequence[int]):
        super().__init__()
        if max(output_levels) >= len(level_weights):
            raise ValueError(f"output levels {tuple(output_levels)} need {max(output_levels) + 1} level weights, "
                             f"got {len(level_weights)}")
        weights = [float(level_weights[level]) for level in output_levels]
        if sum(weights) <= 0:
            raise ValueError("at least one output must have a positive weight")
        self.loss = loss
        self.output_levels = tuple(output_levels)
        self.weight_factors = tuple(w / sum(weights) for w in weights)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != len(self.output_levels):
            raise ValueError(f"expected {len(self.output_levels)} outputs, got {len(outputs)}")
        return sum(weight * self.loss(output, targets[level])
                   for output, level, weight in zip(outputs, self.output_levels, self.weight_factors)
                   if weight != 0)
