"""Tests of nnunet_ext.architectures.dlkunet: paper parameter counts, shapes and gradients in 2D and 3D with deep
supervision on and off, the plan factory (depth bounded by variant and plan, the plan's strides)."""
import pytest
import torch
from torch import nn

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.architectures.dlkunet import DLKUNet, build_dlkunet_from_plans, create_dlkunet, variant_widths
from nnunet_ext.plans.presets import configuration, make_plans

PAPER_PARAMETERS = {"S": 1_131_379, "M": 4_494_451, "L": 17_708_659}  # paper Table 1: 1.13M, 4.49M, 17.70M


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMETERS))
def test_paper_configuration_has_the_exact_parameter_count(variant):
    net = create_dlkunet(variant)  # 1 input channel, 9 classes, 2D, no deep supervision
    assert count(net) == PAPER_PARAMETERS[variant]
    assert len(net.encoder) == len(variant_widths(variant)) == {"S": 3, "M": 4, "L": 5}[variant]  # Table 1 EBlocks
    assert len(net.fusion_blocks) == len(net.encoder) - 1 and len(net.heads) == 1


@pytest.mark.parametrize("variant", ["S", "M"])
def test_deep_supervision_heads_add_one_1x1_conv_per_lower_decoder_level(variant):
    heads = create_dlkunet(variant, deep_supervision=True)
    widths = variant_widths(variant)[1:-1]  # DFB outputs below full resolution
    assert count(heads) - PAPER_PARAMETERS[variant] == sum(w * 9 + 9 for w in widths)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_forward_backward_shapes_and_gradients(dim, deep_supervision):
    torch.manual_seed(0)
    size = [12, 16, 16] if dim == 3 else [32, 48]
    strides = [[1, 2, 2], [2, 2, 2]] if dim == 3 else [[2, 2], [2, 2]]  # anisotropic first pool in 3D
    net = DLKUNet(2, 4, {2: nn.Conv2d, 3: nn.Conv3d}[dim], [8, 16, 32], strides, deep_supervision=deep_supervision)
    x = torch.randn(2, 2, *size)
    out = net(x)
    if deep_supervision:
        assert [tuple(o.shape) for o in out] == [(2, 4, *size),
                                                 (2, 4, *[s // f for s, f in zip(size, strides[0])])]
        loss = sum(o.square().mean() for o in out)
    else:
        assert tuple(out.shape) == (2, 4, *size)
        loss = out.square().mean()
    loss.backward()
    # with deep supervision every parameter gets a gradient; without it the extra heads are unused
    unused = set() if deep_supervision else {"heads.1.weight", "heads.1.bias"}
    assert {n for n, p in net.named_parameters() if p.grad is None} == unused
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_odd_input_sizes_are_padded_back_in_the_decoder():
    net = create_dlkunet("S", input_channels=1, num_classes=3)
    assert net(torch.randn(1, 1, 27, 30)).shape == (1, 3, 27, 30)  # 27 -> 13 -> 6 -> up 12 -> padded to 13


def plans_manager(dim: int, patch, max_stages=None) -> PlansManager:
    return PlansManager(make_plans({"cfg": configuration(dim, patch, max_stages=max_stages)}))


@pytest.mark.parametrize("variant,max_stages,depth", [("S", None, 2), ("M", None, 3), ("L", None, 4), ("L", 3, 2)])
def test_plan_factory_depth_is_bounded_by_variant_and_plan(variant, max_stages, depth):
    pm = plans_manager(2, [64, 64], max_stages)
    cm = pm.get_configuration("cfg")
    net = build_dlkunet_from_plans(pm, cm, 1, 3, True, variant=variant)
    assert len(net.fusion_blocks) == depth
    assert [block[1].out_channels for block in net.encoder[1:]] == variant_widths(variant, depth)[1:]
    outputs = net(torch.randn(1, 1, 64, 64))
    assert [tuple(o.shape[2:]) for o in outputs] == [(64 // 2 ** i,) * 2 for i in range(depth)]


def test_plan_factory_uses_the_plans_anisotropic_3d_strides():
    pm = plans_manager(3, [8, 32, 32])
    cm = pm.get_configuration("cfg")
    strides = cm.network_arch_init_kwargs["strides"]
    assert strides[1] != strides[2]  # nnU-Net's planner pools the short axis later
    net = build_dlkunet_from_plans(pm, cm, 1, 2, True, variant="M")
    assert [list(block[0].kernel_size) for block in net.encoder[1:]] == strides[1:4]
    outputs = net(torch.randn(1, 1, 8, 32, 32))
    expected = [[8, 32, 32]]
    for stride in strides[1:3]:
        expected.append([s // f for s, f in zip(expected[-1], stride)])
    assert [list(o.shape[2:]) for o in outputs] == expected
    net.deep_supervision = False
    assert net(torch.randn(1, 1, 8, 32, 32)).shape == (1, 2, 8, 32, 32)


def test_feature_map_size_counts_every_conv_output():
    net = DLKUNet(1, 3, nn.Conv2d, [4, 8], [2], deep_supervision=False)
    # stem 16x16: 1 + 6*4 per voxel; EBlock 8x8: 4 + 6*8; DFB 16x16: transposed conv 4, block 8 + 6*4; head 3
    expected = 256 * (1 + 24) + 64 * (4 + 48) + 256 * (4 + 8 + 24) + 256 * 3
    assert net.compute_conv_feature_map_size([16, 16]) == expected


def test_bad_arguments_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown DLKUNet variant 'XL'"):
        create_dlkunet("XL")
    with pytest.raises(ValueError, match="needs deep_supervision_heads"):
        DLKUNet(1, 2, nn.Conv2d, [4, 8], [2], deep_supervision=True, deep_supervision_heads=False)
    with pytest.raises(ValueError, match="one width more than strides"):
        DLKUNet(1, 2, nn.Conv2d, [4, 8, 16], [2])
    pm = plans_manager(2, [64, 64])
    cm = pm.get_configuration("cfg")
    cm.network_arch_init_kwargs["strides"][0] = [2, 2]
    with pytest.raises(ValueError, match=r"first-stage strides \[2, 2\]"):
        build_dlkunet_from_plans(pm, cm, 1, 2, False)
