"""The accuracy benchmark's budget trainers (``benchmarks/trainers/nnunet_ext_budget_trainers.py``): made from their
name, found by nnU-Net's own trainer lookup through ``nnUNet_extTrainer``, seeded, and refused when misnamed."""
import os

import pytest
import torch
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from benchmarks.accuracy import BUDGET_TRAINERS
from benchmarks.trainers import nnunet_ext_budget_trainers as budget
from nnunet_ext.environment import trainers_folder
from nnunet_ext.training.base import TrainingSchedule, nnUNetExtTrainer
from nnunet_ext.training.dpcnet import nnUNetTrainerDPCNet
from tests.tiny_plans import DATASET_JSON, tiny_plans


def test_name_gives_schedule_base_and_no_mirroring():
    cls = budget.make_budget_trainer("nnUNetTrainerDPCNet_budget3x7seed5")
    assert cls.__name__ == "nnUNetTrainerDPCNet_budget3x7seed5" == budget.budget_trainer_name("nnUNetTrainerDPCNet",
                                                                                                3, 7, 5)
    assert cls.__bases__ == (nnUNetTrainerDPCNet,)
    assert cls.schedule == TrainingSchedule(3, 7, budget.VAL_ITERATIONS) and cls.mirroring is False
    assert budget.make_budget_trainer("nnUNetTrainer_budget1x1seed0").__bases__ == (nnUNetExtTrainer,)


def test_nnunet_lookup_finds_it_through_nnUNet_extTrainer(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(trainers_folder()), str(BUDGET_TRAINERS)]))
    cls = recursive_find_trainer_class_by_name("nnUNetTrainerSCRNet_budget2x4seed1")
    assert cls.__name__ == "nnUNetTrainerSCRNet_budget2x4seed1"
    assert cls.schedule == TrainingSchedule(2, 4, budget.VAL_ITERATIONS)


def test_same_seed_same_initial_network_and_schedule_in_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))

    def initial_weights(name):
        torch.manual_seed(len(name) * 1000 + torch.randint(1000, (1,)).item())  # any state before the constructor
        trainer = budget.make_budget_trainer(name)(tiny_plans(), "2d", 0, DATASET_JSON, torch.device("cpu"))
        assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == \
            (2, 3, budget.VAL_ITERATIONS)
        network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                     trainer.label_manager.num_segmentation_heads)
        return torch.cat([p.detach().flatten() for p in network.parameters()])

    first, again = initial_weights("nnUNetTrainer_budget2x3seed4"), initial_weights("nnUNetTrainer_budget2x3seed4")
    other_seed = initial_weights("nnUNetTrainer_budget2x3seed5")
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)


@pytest.mark.parametrize("name, error, text", [
    ("nnUNetTrainerDPCNet_budget3x7", ValueError, "<trainer>_budget<epochs>x<iterations>seed<seed>"),
    ("nnUNetTrainerDPCNet_budget0x7seed0", ValueError, "at least 1"),
    ("nnUNetTrainerDPCNett_budget1x1seed0", KeyError, "nnUNetTrainerDPCNet"),
])
def test_bad_names_are_refused(name, error, text):
    with pytest.raises(error, match=text):
        budget.make_budget_trainer(name)


def test_other_attributes_are_not_trainers():
    assert not hasattr(budget, "nnUNetTrainerDPCNet")
