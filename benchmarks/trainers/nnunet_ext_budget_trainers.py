"""Trainer variants with a benchmark's training budget and seed, made on demand from their name.

``nnUNetv2_train`` and ``nnUNetv2_predict`` look a trainer up by name in the folders of ``nnUNet_extTrainer``;
``benchmarks.accuracy`` lists this folder there next to the package's. A name

    <registered trainer or nnUNetTrainer>_budget<E>x<I>seed<S>     e.g. nnUNetTrainerDPCNet_budget20x25seed0

is answered (module ``__getattr__``, PEP 562) with a subclass of that trainer that trains ``E`` epochs of ``I``
iterations (``VAL_ITERATIONS`` validation iterations per epoch), without mirroring (augmentation and test-time
mirroring off, as in the ``_quick`` variants: both sides of a comparison alike), and seeds Python's, NumPy's and
torch's generators with ``S`` before nnU-Net builds the network, so that two trainers of one budget start from the
same random state (with ``nnUNet_n_proc_DA=0`` the augmentation runs in the training process and draws from the same
seeded NumPy stream). ``nnUNetTrainer`` itself maps to ``nnUNetExtTrainer``, whose defaults are nnU-Net's.
Everything else (network, loss, optimiser, plan) is the named trainer's.
"""
from __future__ import annotations

import random
import re

import numpy as np
import torch

from nnunet_ext.training.base import TrainingSchedule, nnUNetExtTrainer
from nnunet_ext.training.registry import get_trainer

NAME = re.compile(r"(?P<base>nnUNetTrainer\w*?)_budget(?P<epochs>\d+)x(?P<iterations>\d+)seed(?P<seed>\d+)")
VAL_ITERATIONS = 2
_made: dict = {}


def budget_trainer_name(base: str, epochs: int, iterations: int, seed: int) -> str:
    return f"{base}_budget{epochs}x{iterations}seed{seed}"


def make_budget_trainer(name: str) -> type:
    """The trainer class ``name`` (see the module docstring); ValueError for a name of another form."""
    match = NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not <trainer>_budget<epochs>x<iterations>seed<seed>")
    base_name = match["base"]
    base = nnUNetExtTrainer if base_name == "nnUNetTrainer" else get_trainer(base_name)
    if not issubclass(base, nnUNetExtTrainer):
        raise ValueError(f"{base_name} does not take a schedule (not an nnUNetExtTrainer)")
    epochs, iterations, seed = int(match["epochs"]), int(match["iterations"]), int(match["seed"])
    if epochs < 1 or iterations < 1:
        raise ValueError(f"{name}: epochs and iterations must be at least 1")

    def seeded_init(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        base.__init__(self, plans, configuration, fold, dataset_json, device)

    return type(name, (base,), {"__init__": seeded_init, "__module__": __name__, "mirroring": False,
                                "schedule": TrainingSchedule(epochs, iterations, VAL_ITERATIONS)})


def __getattr__(name: str) -> type:
    if NAME.fullmatch(name) is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _made:
        _made[name] = make_budget_trainer(name)
    return _made[name]
