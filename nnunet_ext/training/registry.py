"""Every trainer of the package, by name: the single list that nnU-Net's lookup, the tests and the docs read.

A method registers its trainers by adding its module to ``METHOD_MODULES``; every ``nnUNetTrainer`` subclass defined
in (or generated into) that module is a registered trainer. nnU-Net finds them through the environment variable
``nnUNet_extTrainer``, which points at the repository's ``trainers/`` folder (installed as ``nnunet_ext.trainers``):
its one module re-exports ``TRAINERS`` (see ``nnunet_ext.environment``). ``nnunet_ext.training.trainer_names`` keeps a
torch-free copy of the names (regenerate it with ``python -m nnunet_ext.training.trainer_names`` after registering a
trainer; a test checks it).
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Type

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.training.trainer_names import unknown_trainer_message

METHOD_MODULES = (
    "nnunet_ext.training.baseline",
    "nnunet_ext.training.dlkunet",
    "nnunet_ext.training.dpcnet",
    "nnunet_ext.training.godc_lfam",
    "nnunet_ext.training.scrnet",
    "nnunet_ext.training.spa_dcn_net",
)


def _trainers_of(module_name: str) -> Dict[str, Type[nnUNetTrainer]]:
    module = importlib.import_module(module_name)
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and obj.__module__ == module_name}


def _collect() -> Dict[str, Type[nnUNetTrainer]]:
    trainers: Dict[str, Type[nnUNetTrainer]] = {}
    for module_name in METHOD_MODULES:
        for name, cls in _trainers_of(module_name).items():
            if name in trainers:
                raise RuntimeError(f"trainer name {name} is defined twice ({trainers[name].__module__} and "
                                   f"{module_name}); nnU-Net looks trainers up by name")
            trainers[name] = cls
    return dict(sorted(trainers.items()))


TRAINERS: Dict[str, Type[nnUNetTrainer]] = _collect()


def trainer_names() -> List[str]:
    return list(TRAINERS)


def get_trainer(name: str) -> Type[nnUNetTrainer]:
    """The registered trainer ``name``; an unknown name raises ``KeyError`` suggesting the close matches."""
    if name in TRAINERS:
        return TRAINERS[name]
    raise KeyError(unknown_trainer_message(name, TRAINERS))
