"""SPA-DCN-Net trainers (deep-supervision levels, class-weighted CE, recipes, ablations, 3D refusal) and the
planning step that rounds the 2D patch to a multiple of 32."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ext.plans.presets import configuration, make_plans
from nnunet_ext.plans.spa_dcn_net import round_up_patch, spa_dcn_net_plans
from nnunet_ext.training.spa_dcn_net import (label_frequency_weights, nnUNetTrainerSPADCNNet,
                                             nnUNetTrainerSPADCNNet_quick, nnUNetTrainerSPADCNNetLCNAfterSPA,
                                             nnUNetTrainerSPADCNNetLCNBeforeSPA, nnUNetTrainerSPADCNNetNoLCN,
                                             nnUNetTrainerSPADCNNetPaper)
from tests.tiny_plans import DATASET_JSON, tiny_plans


@pytest.fixture(autouse=True)
def nnunet_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))


def make_trainer(cls, configuration_name="2d"):
    return cls(tiny_plans(), configuration_name, 0, DATASET_JSON, device=torch.device("cpu"))


def test_deep_supervision_levels_are_the_decoder_stages():
    trainer = make_trainer(nnUNetTrainerSPADCNNet)
    assert trainer._get_deep_supervision_scales() == [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25], [0.125, 0.125],
                                                      [0.0625, 0.0625]]
    trainer.enable_deep_supervision = False
    assert trainer._get_deep_supervision_scales() is None


@pytest.mark.parametrize("cls", [nnUNetTrainerSPADCNNet, nnUNetTrainerSPADCNNetPaper, nnUNetTrainerSPADCNNet_quick])
def test_3d_configuration_is_refused_naming_2d(cls):
    with pytest.raises(ValueError, match="2D only.*'3d_fullres'.*the 2d configuration"):
        make_trainer(cls, "3d_fullres")


def test_label_frequency_weights_by_hand():
    np.testing.assert_allclose(label_frequency_weights([90, 10]), [100 / 180, 100 / 20])
    np.testing.assert_allclose(label_frequency_weights([60, 30, 0, 10]), [100 / 240, 100 / 120, 1.0, 100 / 40])
    counts = np.array([700, 200, 100])
    assert (label_frequency_weights(counts) * counts).sum() / counts.sum() == pytest.approx(1.0)


class _FixedWeights(nnUNetTrainerSPADCNNet):
    ce_class_weights = (1.0, 2.0, 4.0)


class _WrongWeightCount(nnUNetTrainerSPADCNNet):
    ce_class_weights = (1.0, 2.0)


def test_fixed_class_weights_reach_the_ce_term_and_change_the_loss():
    torch.manual_seed(0)
    weighted, plain = make_trainer(_FixedWeights), make_trainer(nnUNetTrainerSPADCNNet)
    for trainer in (weighted, plain):
        trainer.enable_deep_supervision = False
        trainer._build_loss()
    torch.testing.assert_close(weighted.compound_loss.ce.weight, torch.tensor([1.0, 2.0, 4.0]))
    assert plain.compound_loss.ce.weight is None
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8)).float()
    ce = nn.functional.cross_entropy(logits, target[:, 0].long(), weight=torch.tensor([1.0, 2.0, 4.0]))
    weighted.compound_loss.weight_dice = 0
    assert weighted.compound_loss(logits, target).item() == pytest.approx(ce.item(), rel=1e-5)
    with pytest.raises(ValueError, match="2 class weights for 3 classes"):
        make_trainer(_WrongWeightCount)._build_loss()


def test_paper_recipe_is_weighted_ce_with_adam():
    trainer = make_trainer(nnUNetTrainerSPADCNNetPaper)
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3,
                                                         True)
    optimizer, _ = trainer.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 1e-3
    trainer._build_loss()
    assert trainer.compound_loss.weight_dice == 0 and trainer.compound_loss.weight_ce == 1
    assert trainer.ce_class_weights == "label_frequency"  # counted in on_train_start (end-to-end test)


@pytest.mark.parametrize("cls,mode", [(nnUNetTrainerSPADCNNet, "gated"), (nnUNetTrainerSPADCNNetNoLCN, "none"),
                                      (nnUNetTrainerSPADCNNetLCNBeforeSPA, "before_spa"),
                                      (nnUNetTrainerSPADCNNetLCNAfterSPA, "after_spa")])
def test_ablation_trainers_build_their_lcn_placement(cls, mode):
    trainer = make_trainer(cls)
    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3, False)
    assert {stage.lcn_mode for stage in network.decoder_stages} == {mode}


def test_planning_rounds_the_2d_patch_up_and_keeps_the_data():
    plans = make_plans({"2d": configuration(2, [40, 56]), "3d_fullres": configuration(3, [24, 40, 56])})
    new = spa_dcn_net_plans(plans)
    assert new["plans_name"] == "nnUNetPlans_SPADCN" and plans["plans_name"] == "nnUNetPlans"
    assert new["configurations"]["2d"]["patch_size"] == [64, 64]
    assert plans["configurations"]["2d"]["patch_size"] == [40, 56]  # the source is not modified
    for key in ("data_identifier", "batch_size", "architecture"):
        assert new["configurations"]["2d"][key] == plans["configurations"]["2d"][key]
    assert new["configurations"]["3d_fullres"] == plans["configurations"]["3d_fullres"]
    assert round_up_patch([32, 33, 64, 448]) == [32, 64, 64, 448]
    with pytest.raises(ValueError, match="2D only.*use the 2d configuration"):
        spa_dcn_net_plans(plans, "3d_fullres")
    with pytest.raises(ValueError, match="no configuration '2d_big'"):
        spa_dcn_net_plans(plans, "2d_big")


def test_planning_command_names_missing_plans(tmp_path):
    (tmp_path / "Dataset987_Missing").mkdir()
    env = {"nnUNet_preprocessed": str(tmp_path), "nnUNet_raw": str(tmp_path), "nnUNet_results": str(tmp_path),
           "PATH": ""}
    result = subprocess.run([sys.executable, "-m", "nnunet_ext.plans.spa_dcn_net", "-d", "987"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "Dataset987_Missing/nnUNetPlans.json does not exist" in result.stderr
    assert "nnUNetv2_plan_and_preprocess -d 987 -c 2d" in result.stderr
    (tmp_path / "Dataset987_Missing" / "nnUNetPlans.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "nnunet_ext.plans.spa_dcn_net", "-d", "987"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "nnUNetPlans.json is not valid JSON" in result.stderr
    (tmp_path / "Dataset987_Missing" / "nnUNetPlans.json").write_text(json.dumps(
        make_plans({"2d": configuration(2, [40, 56])}, dataset_name="Dataset987_Missing")))
    result = subprocess.run([sys.executable, "-m", "nnunet_ext.plans.spa_dcn_net", "-d", "987"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "Dataset987_Missing" / "nnUNetPlans_SPADCN.json").read_text())
    assert written["configurations"]["2d"]["patch_size"] == [64, 64]
    assert "[40, 56] -> [64, 64]" in result.stdout
