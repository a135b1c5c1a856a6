"""Guards on the nnU-Net and dynamic-network-architectures internals this package mirrors.

``decoder_stage_outputs`` copies the stage loop of ``UNetDecoder.forward`` and ``build_dice_ce_loss`` the loss
construction of ``nnUNetTrainer._build_loss``; setup.cfg pins the versions they were read off
(nnunetv2 2.8.x, dynamic-network-architectures 0.4.x). If a new release changes either, these tests fail
before a trainer silently trains something else.
"""
import pytest
import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.architectures.plan_network import build_plan_network, decoder_stage_outputs
from nnunet_ext.training.base import nnUNetExtTrainer
from tests.test_trainer_contract import build_trainer, deep_supervision_targets, nnunet_folders  # noqa: F401
from tests.tiny_plans import TINY_PATCH


@pytest.mark.parametrize("arch", ["plain", "resenc"])
@pytest.mark.parametrize("configuration", sorted(TINY_PATCH))
def test_decoder_stage_loop_equals_unet_decoder_forward(configuration, arch):
    trainer = build_trainer(nnUNetTrainer, configuration, arch)
    net = build_plan_network(trainer.configuration_manager, 1, 3, enable_deep_supervision=True).eval()
    x = torch.randn(1, 1, *TINY_PATCH[configuration])
    with torch.no_grad():
        skips = net.encoder(x)
        features = decoder_stage_outputs(net.decoder, skips)
        mirrored = [seg(f) for seg, f in zip(net.decoder.seg_layers, features)][::-1]
        for ours, theirs in zip(mirrored, net(x), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("regions", [False, True])
@pytest.mark.parametrize("configuration", sorted(TINY_PATCH))
def test_base_trainer_loss_equals_nnunet_default_loss(configuration, regions):
    dataset_json = {"channel_names": {"0": "CT"}, "numTraining": 4, "file_ending": ".nii.gz",
                    "labels": ({"background": 0, "organ": [1, 2], "lesion": 2} if regions
                               else {"background": 0, "organ": 1, "lesion": 2}),
                    **({"regions_class_order": [1, 2]} if regions else {})}
    losses = []
    for trainer_class in (nnUNetTrainer, nnUNetExtTrainer):
        trainer = build_trainer(trainer_class, configuration, "plain")
        trainer.dataset_json = dataset_json
        trainer.label_manager = trainer.plans_manager.get_label_manager(dataset_json)
        losses.append(trainer._build_loss())
    ours, theirs = losses[1], losses[0]
    assert type(ours) is type(theirs) and type(ours.loss) is type(theirs.loss)
    assert tuple(ours.weight_factors) == pytest.approx(tuple(theirs.weight_factors))
    torch.manual_seed(0)
    heads = 2 if regions else 3
    outputs = [torch.randn(2, heads, *[int(p * s) for p, s in zip(TINY_PATCH[configuration], scale)])
               for scale in trainer._get_deep_supervision_scales()]
    targets = deep_supervision_targets(trainer, 2)
    if regions:  # region targets are one binary map per region
        targets = [torch.cat(((t >= 1), (t == 2)), 1).float() for t in targets]
    torch.testing.assert_close(ours(outputs, targets), theirs(outputs, targets), rtol=0, atol=0)
    assert isinstance(ours.loss.dc, nn.Module) and type(ours.loss.dc) is type(theirs.loss.dc)
