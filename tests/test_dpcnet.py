"""DPC-Net: shapes in 2D and 3D, deep-supervision switching, gradients, parameter counts, and the network against
a literal implementation of the paper's equations (values and gradients)."""
import pytest
import torch
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_ext.architectures.dpcnet import PAPER_PRESET_PFE_KWARGS, DPCNet, dpcnet_paper_preset
from nnunet_ext.losses.compound import deep_supervision_weights
from nnunet_ext.losses.multi_output_deep_supervision import MultiOutputDeepSupervisionWrapper
from tests.test_pyramid_correlation import randomise, reference_semcor_logits, reference_spacor

NUM_CLASSES = 3
OPS = {2: (nn.Conv2d, nn.InstanceNorm2d), 3: (nn.Conv3d, nn.InstanceNorm3d)}


def small_pfe_kwargs(dim: int, anisotropic: bool = False) -> dict:
    """A 4-stage plan-like U-Net; the anisotropic variant does not pool the first axis at first."""
    conv_op, norm_op = OPS[dim]
    strides = [[1] * dim] + [[2] * dim] * 3
    kernels = [[3] * dim] * 4
    if anisotropic:
        strides[1] = [1] + [2] * (dim - 1)
        kernels[0] = [1] + [3] * (dim - 1)
    return dict(input_channels=2, n_stages=4, features_per_stage=[4, 8, 16, 32], conv_op=conv_op,
                kernel_sizes=kernels, strides=strides, n_conv_per_stage=2, num_classes=NUM_CLASSES,
                n_conv_per_stage_decoder=2, conv_bias=True, norm_op=norm_op,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={"inplace": True}, deep_supervision=True)


def make_dpcnet(dim: int, anisotropic: bool = False, seed: int = 0) -> DPCNet:
    torch.manual_seed(seed)
    return DPCNet(PlainConvUNet(**small_pfe_kwargs(dim, anisotropic)))


def level_shapes(input_shape, strides):
    """Spatial shape of each decoder level (nnU-Net's deep-supervision scales)."""
    shapes, shape = [], list(input_shape)
    for stride in strides[:-1]:
        shape = [s // st for s, st in zip(shape, stride)]
        shapes.append(tuple(shape))
    return shapes


@pytest.mark.parametrize("dim,anisotropic", [(2, False), (3, False), (3, True)])
def test_output_shapes_with_and_without_deep_supervision(dim, anisotropic):
    net = make_dpcnet(dim, anisotropic)
    spatial = (16, 24, 32)[:dim] if not anisotropic else (8, 16, 24)
    x = torch.randn(2, 2, *spatial)
    levels = level_shapes(spatial, small_pfe_kwargs(dim, anisotropic)["strides"])
    assert len(levels) == net.num_levels == 3

    outputs = net(x)
    expected_levels = DPCNet.output_levels(3)
    assert expected_levels == (0, 1, 0, 1, 2, 1, 2)  # sem_0..1, pfe_0..2, spa_1..2
    assert isinstance(outputs, list) and len(outputs) == len(expected_levels)
    for output, level in zip(outputs, expected_levels):
        assert tuple(output.shape) == (2, NUM_CLASSES, *levels[level])

    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled(False) does
    single = net(x)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (2, NUM_CLASSES, *spatial)
    # without deep supervision the network returns exactly the first deep-supervision output (sem_0)
    torch.testing.assert_close(single, outputs[0])


@pytest.mark.parametrize("dim", [2, 3])
def test_one_training_step_reaches_every_parameter(dim):
    net = make_dpcnet(dim)
    spatial = (16, 16, 16)[:dim]
    x = torch.randn(2, 2, *spatial)
    target_full = torch.randint(0, NUM_CLASSES, (2, 1, *spatial)).float()
    targets = [target_full]
    for shape in level_shapes(spatial, small_pfe_kwargs(dim)["strides"])[1:]:
        targets.append(nn.functional.interpolate(target_full, size=shape, mode="nearest"))
    loss = MultiOutputDeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False}, {}, ignore_label=None,
                       dice_class=MemoryEfficientSoftDiceLoss),
        deep_supervision_weights(3, lowest_weight=1e-6), DPCNet.output_levels(3))
    loss(net(x), targets).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    zero = [name for name, p in net.named_parameters() if not torch.any(p.grad != 0)]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


def test_deterministic_for_a_fixed_seed():
    x = torch.randn(1, 2, 16, 16, 16)
    a, b = make_dpcnet(3, seed=7), make_dpcnet(3, seed=7)
    for out_a, out_b in zip(a(x), b(x)):
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    assert not torch.equal(make_dpcnet(3, seed=8)(x)[0], a(x)[0])


def test_pfe_is_the_plan_unet_with_its_state_dict_keys():
    torch.manual_seed(0)
    plain = PlainConvUNet(**small_pfe_kwargs(3))
    net = make_dpcnet(3)
    pfe_keys = {k for k in net.state_dict() if k.startswith(("encoder.", "decoder."))}
    assert pfe_keys == set(plain.state_dict())
    # loading the plain U-Net's weights into the PFE reproduces its deep-supervision outputs
    net.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 2, 16, 16, 16)
    plain_outputs = plain(x)
    dpc_outputs = net(x)
    pfe_outputs = dpc_outputs[2:5]  # after sem_0, sem_1
    for ours, theirs in zip(pfe_outputs, plain_outputs, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_residual_encoder_plan_is_supported_in_2d():
    conv_op, norm_op = OPS[2]
    pfe = ResidualEncoderUNet(
        input_channels=1, n_stages=4, features_per_stage=[4, 8, 16, 32], conv_op=conv_op, kernel_sizes=3,
        strides=[1, 2, 2, 2], n_blocks_per_stage=[1, 2, 2, 2], num_classes=2, n_conv_per_stage_decoder=1,
        conv_bias=True, norm_op=norm_op, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
        deep_supervision=False)
    net = DPCNet(pfe)
    out = net(torch.randn(1, 1, 32, 32))
    assert tuple(out.shape) == (1, 2, 32, 32)


def test_refuses_an_unsupported_network_and_too_shallow_plans():
    with pytest.raises(TypeError, match="Conv2d"):
        DPCNet(nn.Conv2d(1, 1, 3))
    kwargs = small_pfe_kwargs(2) | dict(n_stages=2, features_per_stage=[4, 8], strides=[[1, 1], [2, 2]],
                                         kernel_sizes=[[3, 3]] * 2)
    with pytest.raises(ValueError, match="at least 2 decoder levels"):
        DPCNet(PlainConvUNet(**kwargs))


def spacor_parameters(channels: int, hidden: int, classes: int) -> int:
    """f_spa (3 convs 3x3x3: 1->h->h->1), g_spa (1x1x1 C->C) and the 1x1x1 head, all with bias."""
    f_spa = (27 * hidden + hidden) + (27 * hidden * hidden + hidden) + (27 * hidden + 1)
    return f_spa + (channels * channels + channels) + (channels * classes + classes)


def semcor_parameters(channels: int, higher: int, classes: int) -> int:
    """f_sem (Linear 2(C+D)->C->C->C), g_sem (1x1x1 C->C) and the 1x1x1 head, all with bias."""
    f_sem = (2 * (channels + higher) * channels + channels) + 2 * (channels * channels + channels)
    return f_sem + (channels * channels + channels) + (channels * classes + classes)


def test_paper_preset_parameter_counts():
    net = dpcnet_paper_preset()
    pfe = sum(p.numel() for n, p in net.named_parameters() if n.startswith(("encoder.", "decoder.")))
    spa = sum(p.numel() for n, p in net.named_parameters() if n.startswith(("spacor.", "spa_heads.")))
    sem = sum(p.numel() for n, p in net.named_parameters() if n.startswith(("semcor.", "sem_heads.")))
    assert pfe == 22_582_152  # paper Table 4 baseline: 22.58M
    assert pfe == sum(p.numel() for p in PlainConvUNet(**PAPER_PRESET_PFE_KWARGS).parameters())
    c = PAPER_PRESET_PFE_KWARGS["features_per_stage"]  # decoder levels 0..3 have c[0..3] channels
    assert spa == sum(spacor_parameters(c[i], c[i - 1], 2) for i in (1, 2, 3)) == 680_521
    assert sem == sum(semcor_parameters(c[i], c[i + 1], 2) for i in (0, 1, 2)) == 194_886
    assert sum(p.numel() for p in net.parameters()) == pfe + spa + sem


def reference_forward(net: DPCNet, x: torch.Tensor) -> list:
    """DPC-Net's deep-supervision outputs from the paper's equations as written (SpaCor and SemCor of
    ``tests/test_pyramid_correlation``), with the network's own modules and weights."""
    features = net.pyramid_features(x)
    spa = [reference_spacor(net.spacor[i - 1], features[i], features[i - 1]) for i in range(1, net.num_levels)]
    sem_inputs = [features[0]] + spa
    return ([reference_semcor_logits(net.semcor[i], sem_inputs[i], spa[i], net.sem_heads[i])
             for i in range(net.num_levels - 1)]
            + [net.pfe_logits(i, f) for i, f in enumerate(features)]
            + [head(f) for head, f in zip(net.spa_heads, spa)])


@pytest.mark.parametrize("dim,anisotropic", [(2, False), (3, False), (3, True)])
def test_network_equals_the_equations_with_gradients(dim, anisotropic):
    """The reordered SpaCor/SemCor computation is the same function: every output and the gradient of every
    parameter and of the input agree with the literal equations (double precision, random weights and biases)."""
    net = randomise(make_dpcnet(dim, anisotropic), seed=5).double()
    spatial = (16, 24, 32)[:dim] if not anisotropic else (8, 16, 24)
    x = torch.randn(2, 2, *spatial, dtype=torch.float64, requires_grad=True)
    ours, reference = net(x), reference_forward(net, x)
    assert len(ours) == len(reference) == 7
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    leaves = [x, *net.parameters()]
    weights = [torch.randn_like(o) for o in ours]

    def grads(outputs):
        return torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)), leaves)
    for name, a, b in zip(["input"] + [n for n, _ in net.named_parameters()], grads(ours), grads(reference),
                          strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}")
