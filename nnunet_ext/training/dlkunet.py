"""nnU-Net trainers for DLKUNet (Tang et al., ``papers/dlkunet``), generated for every

- variant ``S``, ``M``, ``L`` (``nnunet_ext.architectures.dlkunet``; depth bounded by the plan's strides),
- loss: nnU-Net's Dice + CE (``""``), the phase-based schedule (``PhaseLoss``, Eq. 11) or the dynamic schedule
  (``DynamicLoss``, Eq. 12-13) of ``nnunet_ext.losses.schedules``, applied every epoch by the trainer base,
- schedule: nnU-Net's (1000 epochs, SGD 1e-2, poly) or the smoke run (``_quick``),

plus the paper's optimiser per variant (``Paper``: Adam 1e-3, weight decay 1e-5, nnU-Net's poly decay instead of the
paper's step decay; Dice + CE), named ``nnUNetTrainerDLKUNet<variant><loss><recipe>`` (e.g.
``nnUNetTrainerDLKUNetLPhaseLoss``, ``nnUNetTrainerDLKUNetSDynamicLoss_quick``, ``nnUNetTrainerDLKUNetMPaper``).
The classes are generated below and bound in this module's globals with their own ``__module__``/``__qualname__``,
so pickling, the registry and nnU-Net's lookup by name find them.
"""
from typing import Dict

from nnunet_ext.architectures.dlkunet import VARIANT_DEPTH, build_dlkunet_from_plans, dlkunet_depth
from nnunet_ext.losses.schedules import DynamicLossSchedule, PhaseLossSchedule
from nnunet_ext.training.base import QUICK_SCHEDULE, nnUNetExtTrainer


class DLKUNetDeepSupervisionMixin:
    """One deep-supervision level per DFB output: nnU-Net's scales of the first ``depth`` levels."""

    def _get_deep_supervision_scales(self):
        scales = super()._get_deep_supervision_scales()
        if scales is None:
            return None
        return scales[:dlkunet_depth(self.network_kwargs["variant"], self.configuration_manager)]


LOSS_VARIANTS = {
    "": {},
    "PhaseLoss": {"loss_weight_schedule": PhaseLossSchedule()},
    "DynamicLoss": {"loss_weight_schedule": DynamicLossSchedule()},
}
RECIPES = {
    "": {},
    "Paper": {"adam_learning_rate": 1e-3, "adam_weight_decay": 1e-5},
    "_quick": {"schedule": QUICK_SCHEDULE, "mirroring": False},
}


COMBINATIONS = [(loss, recipe) for loss in LOSS_VARIANTS for recipe in ("", "_quick")] + [("", "Paper")]


def _generate() -> Dict[str, type]:
    trainers = {}
    for variant in VARIANT_DEPTH:
        for loss_name, recipe_name in COMBINATIONS:
            name = f"nnUNetTrainerDLKUNet{variant}{loss_name}{recipe_name}"
            doc = (f"DLKUNet-{variant}, {loss_name or 'Dice + CE'} loss, "
                   f"{recipe_name.strip('_') or 'nnU-Net'} recipe (generated in {__name__}).")
            attributes = {"__module__": __name__, "__qualname__": name, "__doc__": doc,
                          "network_factory": staticmethod(build_dlkunet_from_plans),
                          "network_kwargs": {"variant": variant}, **LOSS_VARIANTS[loss_name], **RECIPES[recipe_name]}
            trainers[name] = type(name, (DLKUNetDeepSupervisionMixin, nnUNetExtTrainer), attributes)
    return trainers


DLKUNET_TRAINERS: Dict[str, type] = _generate()
globals().update(DLKUNET_TRAINERS)
__all__ = sorted(DLKUNET_TRAINERS)
