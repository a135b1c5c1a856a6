"""Trainer building blocks shared by the methods: nnU-Net's deep-supervision wrapping and the
papers' Adam recipes. Mixins go first in the bases and keep nnU-Net's exact ``__init__`` signature
(nnU-Net records its init arguments by inspecting it)."""
import torch

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_ext.losses.compound import deep_supervision_weights


def wrap_deep_supervision(trainer, loss: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``loss`` as ``nnUNetTrainer._build_loss`` does: weights 1/2^i over the deep-supervision
    levels, the lowest level 0 (1e-6 under DDP without torch.compile), normalised to sum 1."""
    if not trainer.enable_deep_supervision:
        return loss
    lowest_weight = 1e-6 if trainer.is_ddp and not trainer._do_i_compile() else 0.0
    num_levels = len(trainer._get_deep_supervision_scales())
    return DeepSupervisionWrapper(loss, deep_supervision_weights(num_levels, lowest_weight))


class AdamRecipeMixin:
    """Adam with initial learning rate ``adam_learning_rate`` (set by the subclass), nnU-Net's
    weight decay (3e-5) and poly learning-rate decay over the run."""
    adam_learning_rate: float

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.adam_learning_rate

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
