"""A short training schedule for smoke runs: the demo, the end-to-end tests and CI.

nnU-Net has no command-line switch for the length of training; like its own
``nnUNetTrainer_1epoch`` and ``nnUNetTrainerNoMirroring`` variants, a trainer subclass sets it.
``QuickScheduleMixin`` runs ``QUICK_EPOCHS`` epochs of ``QUICK_TRAIN_ITERATIONS`` training and
``QUICK_VAL_ITERATIONS`` validation iterations and turns mirroring off (no mirror augmentation,
no test-time mirroring in the final validation: 8x faster sliding-window prediction on CPU).
Enough to exercise every stage of nnU-Net's pipeline, far too short to learn a useful model.
"""
import torch

QUICK_EPOCHS = 2
QUICK_TRAIN_ITERATIONS = 5
QUICK_VAL_ITERATIONS = 2


class QuickScheduleMixin:
    """Put first in the bases: ``class nnUNetTrainerX_quick(QuickScheduleMixin, nnUNetTrainerX)``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = QUICK_EPOCHS
        self.num_iterations_per_epoch = QUICK_TRAIN_ITERATIONS
        self.num_val_iterations_per_epoch = QUICK_VAL_ITERATIONS

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None
