"""Tests of nnunet_ext.training.dlkunet: the generated trainer variants, their network and deep-supervision levels
on nnU-Net plans, the paper recipe, and the loss-weight schedules applied by nnU-Net's epoch hook."""
import pickle

import pytest
import torch

from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_ext.architectures.dlkunet import DLKUNet
from nnunet_ext.losses.schedules import DynamicLossSchedule, PhaseLossSchedule
from nnunet_ext.training import dlkunet
from nnunet_ext.training.base import QUICK_SCHEDULE
from tests.tiny_plans import DATASET_JSON, tiny_plans


@pytest.fixture(autouse=True)
def nnunet_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))


def make_trainer(name: str, configuration: str = "2d"):
    return dlkunet.DLKUNET_TRAINERS[name](tiny_plans(), configuration, 0, DATASET_JSON, device=torch.device("cpu"))


def test_every_combination_is_generated_as_a_module_level_class():
    expected = {f"nnUNetTrainerDLKUNet{v}{loss}{recipe}" for v in "SML" for loss in ("", "PhaseLoss", "DynamicLoss")
                for recipe in ("", "_quick")} | {f"nnUNetTrainerDLKUNet{v}Paper" for v in "SML"}
    assert set(dlkunet.DLKUNET_TRAINERS) == expected
    for name, cls in dlkunet.DLKUNET_TRAINERS.items():
        assert getattr(dlkunet, name) is cls and cls.__qualname__ == name and cls.__module__ == dlkunet.__name__
        assert pickle.loads(pickle.dumps(cls)) is cls
    quick = dlkunet.nnUNetTrainerDLKUNetSDynamicLoss_quick
    assert quick.schedule == QUICK_SCHEDULE and quick.mirroring is False
    assert quick.loss_weight_schedule == DynamicLossSchedule() and quick.network_kwargs == {"variant": "S"}
    assert dlkunet.nnUNetTrainerDLKUNetLPhaseLoss.loss_weight_schedule == PhaseLossSchedule()
    assert dlkunet.nnUNetTrainerDLKUNetM.loss_weight_schedule is None


@pytest.mark.parametrize("variant,depth", [("S", 2), ("M", 3), ("L", 3)])  # tiny plan: 4 stages, 3 downsamplings
def test_network_and_deep_supervision_levels_follow_the_variant_and_plan(variant, depth):
    trainer = make_trainer(f"nnUNetTrainerDLKUNet{variant}")
    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3, True)
    assert isinstance(network, DLKUNet) and len(network.fusion_blocks) == depth
    scales = trainer._get_deep_supervision_scales()
    assert [list(s) for s in scales] == [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]][:depth]
    outputs = network(torch.randn(2, 1, 64, 64))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, int(64 * s[0]), int(64 * s[1])) for s in scales]
    trainer.network = network
    trainer.set_deep_supervision_enabled(False)
    assert network.deep_supervision is False and network(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_paper_recipe_uses_adam_with_the_papers_rate_and_decay():
    trainer = make_trainer("nnUNetTrainerDLKUNetSPaper")
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3,
                                                         True)
    optimizer, _ = trainer.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.param_groups[0]["weight_decay"] == 1e-5


@pytest.mark.parametrize("name,schedule", [("nnUNetTrainerDLKUNetSPhaseLoss", PhaseLossSchedule()),
                                           ("nnUNetTrainerDLKUNetSDynamicLoss", DynamicLossSchedule())])
def test_epoch_hook_applies_the_schedule_to_the_loss_and_logs_it(name, schedule):
    trainer = make_trainer(name)
    # what nnUNetTrainer.initialize does (without looking for the preprocessed data)
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3,
                                                         True)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    assert isinstance(trainer.loss, DeepSupervisionWrapper) and isinstance(trainer.loss.loss, DC_and_CE_loss)
    compound = trainer.loss.loss
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 3, (2, 1, 64, 64)).float()
    dice, ce = compound.dc(logits, target), compound.ce(logits, target[:, 0].long())
    for epoch in (0, trainer.num_epochs // 2, trainer.num_epochs - 1):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        weight_dice, weight_ce = schedule(epoch, trainer.num_epochs)
        assert (compound.weight_dice, compound.weight_ce) == (weight_dice, weight_ce)
        torch.testing.assert_close(compound(logits, target), weight_dice * dice + weight_ce * ce)
    log = open(trainer.log_file).read()
    assert log.count("loss weights: dice") == 3
    assert f"loss weights: dice {schedule(0, 1000)[0]:.4f}, ce {schedule(0, 1000)[1]:.4f}" in log
