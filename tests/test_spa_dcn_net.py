"""SPA-DCN-Net network: encoder skips, decoder outputs, deep supervision, gradients, plan checks."""
import pytest
import torch
from torchvision.models import mobilenet_v3_small

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.architectures.spa_dcn_net import (ENCODER_FEATURES, OUTPUT_STRIDES, SPADCNNet,
                                                  build_spa_dcn_net_from_plans, create_spa_dcn_net)
from nnunet_ext.plans.presets import configuration, make_plans
from tests.tiny_plans import tiny_plans

SMALL_DECODER = (32, 16, 16, 8, 8)


def plan_configuration(patch):
    plans = PlansManager(make_plans({"2d": configuration(2, patch)}))
    return plans, plans.get_configuration("2d")


def test_encoder_skip_channels_and_strides_as_documented():
    net = SPADCNNet(3, 2, decoder_channels=SMALL_DECODER)
    x = torch.randn(1, 3, 64, 96)
    skips, bottleneck = net.encode(x)
    assert [s.shape[1] for s in skips] == [16, 16, 24, 48] == list(ENCODER_FEATURES["skip_channels"])
    assert [64 // s.shape[2] for s in skips] == [2, 4, 8, 16] == list(ENCODER_FEATURES["skip_strides"])
    assert [96 // s.shape[3] for s in skips] == [2, 4, 8, 16]
    assert bottleneck.shape == (1, 96, 2, 3)
    # the encoder is MobileNetV3-Small's features 0..11 with a first conv for 3 -> here 3 input channels
    reference = mobilenet_v3_small(weights=None).features[:12]
    assert sum(p.numel() for p in net.encoder.parameters()) == sum(p.numel() for p in reference.parameters())
    one_channel = SPADCNNet(1, 2, decoder_channels=SMALL_DECODER)
    assert one_channel.encoder[0][0].weight.shape == (16, 1, 3, 3)
    assert (sum(p.numel() for p in one_channel.encoder.parameters())
            == sum(p.numel() for p in reference.parameters()) - 2 * 16 * 9)


@pytest.mark.parametrize("patch", [[64, 64], [64, 96]])
def test_forward_backward_at_the_plans_patch_with_deep_supervision_on_and_off(patch):
    torch.manual_seed(0)
    plans, conf = plan_configuration(patch)
    net = build_spa_dcn_net_from_plans(plans, conf, 1, 3, True, decoder_channels=SMALL_DECODER)
    x = torch.randn(2, 1, *patch)
    outputs = net(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, patch[0] // s, patch[1] // s) for s in OUTPUT_STRIDES]
    sum(o.square().mean() for o in outputs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    net.deep_supervision = False
    net.zero_grad(set_to_none=True)
    output = net(x)
    assert isinstance(output, torch.Tensor) and output.shape == (2, 3, *patch)
    output.mean().backward()
    assert net.encoder[0][0].weight.grad is not None
    # off = the first output of on (the same full-resolution head)
    net.eval()
    with torch.no_grad():
        off = net(x)
        net.deep_supervision = True
        torch.testing.assert_close(net(x)[0], off)


def test_paper_preset_parameter_count_and_variants():
    net = create_spa_dcn_net()
    encoder = sum(p.numel() for p in mobilenet_v3_small(weights=None).features[:12].parameters()) - 2 * 16 * 9
    # decoder: per stage (C_in, C_out) = (96+48, 256), (256+24, 128), (128+16, 64), (64+16, 32), (32, 16)
    stages = [(144, 256), (280, 128), (144, 64), (80, 32), (32, 16)]
    decoder = 0
    for c_in, c_out in stages:
        c_b = max(c_in // 4, 8)
        decoder += (2 * (c_in * c_in + c_in) + 3 * (9 * c_in * c_b + 2 * c_b) + 3 * c_b * c_in + c_in
                    + 9 * c_in * c_out + (9 * c_in + 1) * 27 + 2 * c_out)
    heads = sum(c * 2 + 2 for c in (256, 128, 64, 32, 16))
    assert sum(p.numel() for p in net.parameters()) == encoder + decoder + heads
    assert {create_spa_dcn_net(v).decoder_stages[0].lcn_mode
            for v in ("paper", "spa_dcn_only", "lcn_spa_dcn", "spa_lcn_dcn")} == {"gated", "none", "before_spa",
                                                                                  "after_spa"}
    with pytest.raises(ValueError, match="unknown SPA-DCN-Net variant"):
        create_spa_dcn_net("gated_after")


def test_plan_refusals_name_the_fix():
    plans = PlansManager(tiny_plans())
    with pytest.raises(ValueError, match="2D only.*use the 2d configuration"):
        build_spa_dcn_net_from_plans(plans, plans.get_configuration("3d_fullres"), 1, 2, True)
    plans_48, conf_48 = plan_configuration([48, 64])
    with pytest.raises(ValueError, match=r"divisible by 32.*\[48, 64\].*nnunet_ext_plan_spadcnnet"):
        build_spa_dcn_net_from_plans(plans_48, conf_48, 1, 2, True)
    with pytest.raises(ValueError, match="divisible by 32"):
        SPADCNNet(1, 2, decoder_channels=SMALL_DECODER)(torch.zeros(1, 1, 48, 64))


def test_conv_feature_map_size_scales_with_the_patch():
    net = SPADCNNet(1, 2, decoder_channels=SMALL_DECODER)
    small, wide = net.compute_conv_feature_map_size((64, 64)), net.compute_conv_feature_map_size((64, 128))
    # every map doubles except MobileNet's squeeze-excitation vectors (1x1 maps): a little under 2x
    assert 1.95 * small < wide < 2 * small
    assert small > sum(16 * 64 * 64 // s ** 2 for s in OUTPUT_STRIDES)




def disc_batch(n, size, generator):
    """Bright discs of random centre and radius on Gaussian noise, z-scored per image, and their masks."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.rand(n, 2, 1, 1, generator=generator) * size / 2 + size / 4
    radius = torch.rand(n, 1, 1, generator=generator) * size / 8 + size / 6
    mask = ((yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2 < radius ** 2).long()
    image = mask + 0.5 * torch.randn(n, size, size, generator=generator)
    image = (image - image.mean(dim=(1, 2), keepdim=True)) / image.std(dim=(1, 2), keepdim=True)
    return image[:, None], mask[:, None]


def test_eval_mode_segments_after_a_short_training():
    """Regression: with torchvision's BatchNorm momentum 0.01 in the encoder, the running statistics still held
    0.99^n of their initial (mean 0, variance 1) after n steps, and eval mode (nnU-Net's validation and inference)
    predicted no foreground at all: here Dice 0.000 in eval mode after 40 (and 50) steps while train mode reached
    0.98 on the same batch; with momentum 0.1 eval mode gives 0.94 after 40 steps. Trains on one batch of 8 discs
    (32x32) with nnU-Net's Dice + CE and Adam 1e-3, then compares the two modes on that batch."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    torch.manual_seed(0)
    x, y = disc_batch(8, 32, torch.Generator().manual_seed(0))
    net = SPADCNNet(1, 2, decoder_channels=SMALL_DECODER)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 33 + 5 * 4 and {m.momentum for m in norms} == {0.1}
    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    loss_fn.dc.apply_nonlin = softmax_helper_dim1
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    net.train()
    for _ in range(40):
        optimizer.zero_grad(set_to_none=True)
        train_logits = net(x)
        loss_fn(train_logits, y.float()).backward()
        optimizer.step()

    def dice(logits):
        p = logits.argmax(1, keepdim=True) == 1
        return float(2 * (p & (y == 1)).sum() / (p.sum() + (y == 1).sum()))
    net.eval()
    with torch.no_grad():
        eval_dice = dice(net(x))
    assert dice(train_logits) > 0.9
    assert eval_dice > 0.85, f"eval-mode Dice {eval_dice:.3f} (train mode {dice(train_logits):.3f})"
