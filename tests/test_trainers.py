"""Trainer classes from a plans dict: the network and the loss each trainer really builds, and one
training step through them (2D and 3D)."""
import pytest
import torch
from torch import nn

from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_ext.architectures.dpcnet import DPCNet
from nnunet_ext.architectures.lfam_unet import LFAMUNet
from nnunet_ext.losses.godc import GODCDiceLoss
from nnunet_ext.losses.multi_output_deep_supervision import MultiOutputDeepSupervisionWrapper
from nnunet_ext.training import dpcnet, godc_lfam

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumor": 2},
                "numTraining": 4, "file_ending": ".nii.gz"}
CONFIGURATIONS = {
    "2d": dict(patch=[32, 32], kernels=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]],
               ops=("Conv2d", "InstanceNorm2d")),
    "3d_fullres": dict(patch=[8, 16, 16], kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                       strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], ops=("Conv3d", "InstanceNorm3d")),
}


def make_plans() -> dict:
    """A plans dict in nnU-Net 2.8's format with a tiny 2d and 3d_fullres configuration (batch_dice
    True, as nnU-Net's planner writes it for many datasets)."""
    configurations = {}
    for name, c in CONFIGURATIONS.items():
        conv, norm = c["ops"]
        configurations[name] = {
            "data_identifier": f"nnUNetPlans_{name}", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": c["patch"], "spacing": [1.0] * len(c["patch"]), "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False], "batch_dice": True,
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": f"torch.nn.{conv}",
                                "kernel_sizes": c["kernels"], "strides": c["strides"], "n_conv_per_stage": [2] * 3,
                                "n_conv_per_stage_decoder": [2] * 2, "conv_bias": True, "norm_op": f"torch.nn.{norm}",
                                "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}
    return {"dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans", "configurations": configurations,
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
            "continue_training": False}


@pytest.fixture
def make_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))

    def make(trainer_class, configuration):
        trainer = trainer_class(make_plans(), configuration, 0, DATASET_JSON, device=torch.device("cpu"))
        trainer.num_input_channels = 1
        trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                             1, trainer.label_manager.num_segmentation_heads,
                                                             trainer.enable_deep_supervision)
        return trainer
    return make


def deep_supervision_targets(trainer, spatial):
    target = torch.randint(0, 3, (2, 1, *spatial)).float()
    return [nn.functional.interpolate(target, scale_factor=list(scale), mode="nearest") if i else target
            for i, scale in enumerate(trainer._get_deep_supervision_scales())]


def one_training_step(trainer):
    spatial = trainer.configuration_manager.patch_size
    loss = trainer._build_loss()
    value = loss(trainer.network(torch.randn(2, 1, *spatial)), deep_supervision_targets(trainer, spatial))
    value.backward()
    assert torch.isfinite(value)
    return loss, {name for name, p in trainer.network.named_parameters() if p.grad is None}


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_dpcnet_trainer_supervises_all_output_families(make_trainer, configuration):
    trainer = make_trainer(dpcnet.nnUNetTrainerDPCNet, configuration)
    assert isinstance(trainer.network, DPCNet)
    loss, without_gradient = one_training_step(trainer)
    assert isinstance(loss, MultiOutputDeepSupervisionWrapper) and isinstance(loss.loss, DC_and_CE_loss)
    assert loss.output_levels == DPCNet.output_levels(2)  # 3 stages -> 2 deep-supervision levels
    assert all(w > 0 for w in loss.weight_factors) and sum(loss.weight_factors) == pytest.approx(1)
    assert not without_gradient
    trainer.set_deep_supervision_enabled(False)  # nnU-Net's own switch, used before the final validation
    assert trainer.network(torch.randn(1, 1, *trainer.configuration_manager.patch_size)).shape[1] == 3


@pytest.mark.parametrize("trainer_class,ce_weight", [(godc_lfam.nnUNetTrainerGODC, 1.0),
                                                     (godc_lfam.nnUNetTrainerGODCOnly, 0.0),
                                                     (godc_lfam.nnUNetTrainerLFAMGODC, 1.0),
                                                     (godc_lfam.nnUNetTrainerLFAMGODCPaper, 0.0)])
def test_godc_trainers_use_per_sample_godc(make_trainer, trainer_class, ce_weight):
    trainer = make_trainer(trainer_class, "3d_fullres")
    loss, without_gradient = one_training_step(trainer)
    assert isinstance(loss, DeepSupervisionWrapper)
    assert isinstance(loss.loss.dc, GODCDiceLoss) and loss.loss.dc.batch_dice is False  # the plan says True
    assert loss.loss.weight_ce == ce_weight
    # nnU-Net's weighting: the lowest of the 2 levels gets weight 0 outside DDP
    assert loss.weight_factors == pytest.approx((1.0, 0.0))
    assert without_gradient <= {"decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"}


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
@pytest.mark.parametrize("trainer_class,levels", [(godc_lfam.nnUNetTrainerLFAM, (0, 1)),
                                                  (godc_lfam.nnUNetTrainerLFAMGODCCoarse, (1,))])
def test_lfam_trainers_build_the_lfam_unet(make_trainer, configuration, trainer_class, levels):
    trainer = make_trainer(trainer_class, configuration)
    assert isinstance(trainer.network, LFAMUNet)
    assert tuple(trainer.network.lfam_levels) == levels
    _, without_gradient = one_training_step(trainer)
    assert not any(name.startswith("lfam.") for name in without_gradient)


@pytest.mark.parametrize("trainer_class,learning_rate", [(dpcnet.nnUNetTrainerDPCNetPaper, 1e-4),
                                                         (godc_lfam.nnUNetTrainerLFAMGODCPaper, 2e-4)])
def test_paper_recipes_use_adam(make_trainer, trainer_class, learning_rate):
    trainer = make_trainer(trainer_class, "2d")
    optimizer, scheduler = trainer.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == trainer.initial_lr == learning_rate
    assert trainer.my_init_kwargs["configuration"] == "2d"  # nnU-Net recorded the init arguments
