"""The contract every registered trainer keeps, swept over the registry (a new trainer is tested by being registered).

Per trainer: nnU-Net's own lookup through ``nnUNet_extTrainer`` returns the registered class, which pickles, and the
README's trainer table lists it. Per trainer x configuration (2d, 3d_fullres, where the trainer supports the
dimension) x architecture (plain and residual-encoder plans): the trainer builds its network and loss from the plan
as nnU-Net does; one training step with nnU-Net's DDP deep-supervision weights (lowest level 1e-6) gives every
parameter a finite gradient; with deep supervision off (nnU-Net's switch) the network returns one tensor of the
patch size with one channel per segmentation head. Trainers that build the same network and loss (they differ only
in optimiser, schedule or loss-weight schedule; ``step_signature``) share one step: the others are checked to build
exactly that network and loss.
"""
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunet_ext.environment import trainers_folder
from nnunet_ext.training.base import nnUNetExtTrainer
from nnunet_ext.training.registry import TRAINERS
from tests.tiny_plans import DATASET_JSON, TINY_PATCH, tiny_plans

README = Path(__file__).resolve().parents[1] / "README.md"
ARCHITECTURES = ("plain", "resenc")


def sweep() -> list:
    return [pytest.param(name, configuration, arch, id=f"{name}-{configuration}-{arch}")
            for name, cls in TRAINERS.items() for configuration, patch in TINY_PATCH.items()
            if len(patch) in getattr(cls, "supported_dimensions", (2, 3)) for arch in ARCHITECTURES]


def build_trainer(trainer_class, configuration: str, arch: str):
    trainer = trainer_class(tiny_plans(arch), configuration, 0, DATASET_JSON, device=torch.device("cpu"))
    trainer.num_input_channels = 1
    trainer.network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, trainer.label_manager.num_segmentation_heads,
        trainer.enable_deep_supervision)
    return trainer


def deep_supervision_targets(trainer, batch: int):
    target = torch.randint(0, 3, (batch, 1, *trainer.configuration_manager.patch_size)).float()
    return [nn.functional.interpolate(target, scale_factor=[float(s) for s in scale], mode="nearest") if i else target
            for i, scale in enumerate(trainer._get_deep_supervision_scales())]


@pytest.fixture(autouse=True)
def nnunet_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_extTrainer", str(trainers_folder()))


def test_registry_holds_trainers_of_the_package():
    assert TRAINERS and all(name.startswith("nnUNetTrainer") for name in TRAINERS)
    assert all(cls.__module__.startswith("nnunet_ext.training.") for cls in TRAINERS.values())


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_nnunet_lookup_finds_the_registered_class(name):
    found = recursive_find_trainer_class_by_name(name)
    # the very class of the package, not a copy from the module nnU-Net imported from the folder and dropped
    assert found is TRAINERS[name]
    assert pickle.loads(pickle.dumps(found)) is found


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_readme_trainer_table_lists_it(name):
    rows = [line for line in README.read_text().splitlines() if line.startswith("|")]
    assert any(re.search(rf"`{re.escape(name)}`", row) for row in rows), f"README's trainer table lacks {name}"


def step_signature(cls) -> tuple:
    """What decides a training step: trainers that differ only in their optimiser, schedule, mirroring or loss-weight
    schedule (e.g. DLKUNet's 27 generated variants of 3 networks) build the same network and loss."""
    return (cls.build_network_architecture.__func__, getattr(cls, "network_factory", None),
            tuple(sorted(getattr(cls, "network_kwargs", {}).items())), getattr(cls, "dice_class", None),
            getattr(cls, "weight_dice", 1.0), getattr(cls, "weight_ce", 1.0), getattr(cls, "batch_dice", None),
            getattr(cls, "output_levels", None), cls._build_loss, cls._get_deep_supervision_scales,
            getattr(cls, "ce_loss_kwargs", None))


STEPPED = {}  # (step signature, configuration, arch) -> (parameter shapes, loss type) of a trainer already stepped


@pytest.mark.parametrize("name,configuration,arch", sweep())
def test_training_step_and_inference_output(name, configuration, arch):
    torch.manual_seed(0)
    trainer = build_trainer(TRAINERS[name], configuration, arch)
    assert trainer.my_init_kwargs["configuration"] == configuration  # nnU-Net recorded the init arguments
    trainer.lowest_level_weight = 1e-6  # nnU-Net's weighting under DDP: every output contributes
    loss = trainer._build_loss()
    shapes = {n: tuple(p.shape) for n, p in trainer.network.named_parameters()}
    key = (step_signature(TRAINERS[name]), configuration, arch)
    if key in STEPPED:  # the same network and loss as a trainer whose step was checked: same computation
        assert STEPPED[key] == (shapes, type(loss))
        return
    patch = trainer.configuration_manager.patch_size
    value = loss(trainer.network(torch.randn(2, 1, *patch)), deep_supervision_targets(trainer, 2))
    value.backward()
    assert torch.isfinite(value)
    without_gradient = [n for n, p in trainer.network.named_parameters() if p.grad is None]
    assert not without_gradient, f"parameters without gradient: {without_gradient}"
    assert all(torch.isfinite(p.grad).all() for p in trainer.network.parameters())

    trainer.set_deep_supervision_enabled(False)  # nnU-Net's switch before the final validation and inference
    trainer.network.eval()
    with torch.no_grad():
        output = trainer.network(torch.randn(1, 1, *patch))
    assert isinstance(output, torch.Tensor)
    assert tuple(output.shape) == (1, trainer.label_manager.num_segmentation_heads, *patch)
    STEPPED[key] = (shapes, type(loss))


class _Only2D(nnUNetExtTrainer):
    supported_dimensions = (2,)


def test_unsupported_dimension_is_refused_with_the_configuration_to_use():
    with pytest.raises(ValueError, match=r"2D only.*'3d_fullres' is 3D.*2d configuration"):
        _Only2D(tiny_plans(), "3d_fullres", 0, DATASET_JSON, device=torch.device("cpu"))
    trainer = _Only2D(tiny_plans(), "2d", 0, DATASET_JSON, device=torch.device("cpu"))
    configuration_3d = trainer.plans_manager.get_configuration("3d_fullres")
    with pytest.raises(ValueError, match="2D only"):  # the predictor's path: the network builder
        _Only2D.build_network_architecture(trainer.plans_manager, configuration_3d, 1, 3, True)
