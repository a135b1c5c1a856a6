"""SCRNet from nnU-Net plans (2D and 3D, plain and residual-encoder plans): forward/backward at the plan's patch
size with deep supervision on and off, every parameter's gradient, recomputation equal to storing, determinism;
and the trainers: network, loss weights (Dice + 0.5 CE), paper optimiser, smoke schedule."""
import pytest
import torch

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.architectures.scrnet import SCRNet, build_scrnet_from_plans
from nnunet_ext.training.scrnet import nnUNetTrainerSCRNet, nnUNetTrainerSCRNet_quick, nnUNetTrainerSCRNetPaper
from tests.tiny_plans import DATASET_JSON, tiny_plans

CASES = [("2d", "plain"), ("3d_fullres", "plain"), ("2d", "resenc")]


def build(configuration: str, arch: str = "plain", seed: int = 0, **kwargs) -> tuple:
    plans_manager = PlansManager(tiny_plans(arch))
    configuration_manager = plans_manager.get_configuration(configuration)
    torch.manual_seed(seed)
    return build_scrnet_from_plans(plans_manager, configuration_manager, 1, 3, True, **kwargs), configuration_manager


@pytest.mark.parametrize("configuration, arch", CASES)
def test_forward_backward_deep_supervision_on_and_off(configuration, arch):
    net, cm = build(configuration, arch)
    arch_kwargs = cm.network_arch_init_kwargs
    assert isinstance(net, SCRNet) and len(net.scrms) == arch_kwargs["n_stages"]
    assert [s.fam.fuse.select.out_features // 2 for s in net.scrms] == arch_kwargs["features_per_stage"]
    patch = list(cm.patch_size)
    x = torch.randn(2, 1, *patch)
    outputs = net(x)
    # one output per nnU-Net deep-supervision level, highest resolution first
    expected, size = [], patch
    for stride in arch_kwargs["strides"][:-1]:
        size = [s // st for s, st in zip(size, stride)]
        expected.append((2, 3, *size))
    assert [tuple(o.shape) for o in outputs] == expected
    sum(o.square().mean() for o in outputs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing

    net.deep_supervision = False
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, *patch)
    torch.testing.assert_close(out, outputs[0])
    net.eval()
    with torch.no_grad():
        assert net(x[:1]).shape == (1, 3, *patch)


def test_recomputation_gives_the_stored_result_and_gradients():
    results = []
    for checkpoint_scrm in (True, False):
        net, cm = build("2d", checkpoint_scrm=checkpoint_scrm, recompute_min_elements=0)
        torch.manual_seed(1)
        outputs = net(torch.randn(2, 1, *cm.patch_size))
        sum(o.mean() for o in outputs).backward()
        results.append((outputs, {n: p.grad for n, p in net.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_only_large_scrms_recompute():
    net, cm = build("2d", recompute_min_elements=16 * 32 * 32)
    net.train()
    widths, size, recomputing = net.features_per_stage, list(cm.patch_size), []
    for scrm, width, stride in zip(net.scrms, widths, net.strides):
        size = [s // st for s, st in zip(size, stride)]
        scrm(torch.randn(1, width, *size))
        recomputing.append((scrm._recomputing, width * size[0] * size[1] >= 16 * 32 * 32))
    assert all(a == b for a, b in recomputing) and any(a for a, _ in recomputing) and not all(a for a, _ in recomputing)


def test_determinism_under_a_fixed_seed():
    runs = []
    for seed in (0, 0, 1):
        net, cm = build("2d", seed=seed)
        torch.manual_seed(123)
        runs.append(net(torch.randn(1, 1, *cm.patch_size))[0].detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.allclose(runs[0], runs[2])


def test_decoder_uses_3x3_transposed_convs_and_max_pools():
    net, _ = build("2d")
    assert all(tuple(u.kernel_size) == (3, 3) and tuple(u.stride) == (2, 2) for u in net.upsamples)
    assert all(isinstance(p, torch.nn.MaxPool2d) for p in net.pools[1:])
    assert isinstance(net.pools[0], torch.nn.Identity)
    assert net.compute_conv_feature_map_size([64, 64]) > 0


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_heads_are_the_1x1_convolutions_of_their_parameters(configuration):
    """The heads (matrix products) against ``F.conv2d``/``conv3d`` with their weights: values and gradients in
    float64, and the state dict of ``nn.Conv`` heads."""
    net, cm = build(configuration)
    net.double()
    conv = (torch.nn.functional.conv2d, torch.nn.functional.conv3d)[len(cm.patch_size) - 2]
    for head in net.heads:
        assert isinstance(head, torch.nn.modules.conv._ConvNd) and head.kernel_size == (1,) * len(cm.patch_size)
        assert set(head.state_dict()) == {"weight", "bias"}
        x = torch.randn(2, head.in_channels, *[5] * len(cm.patch_size), dtype=torch.float64, requires_grad=True)
        grad = torch.randn(2, head.out_channels, *[5] * len(cm.patch_size), dtype=torch.float64)
        results = []
        for fn in (head, lambda t: conv(t, head.weight, head.bias)):
            out = fn(x)
            results.append((out, *torch.autograd.grad(out, (x, head.weight, head.bias), grad)))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.fixture
def make_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))

    def make(trainer_class):
        trainer = trainer_class(tiny_plans(), "2d", 0, DATASET_JSON, device=torch.device("cpu"))
        trainer.num_input_channels = 1
        trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                             1, 3, trainer.enable_deep_supervision)
        return trainer
    return make


def test_trainer_loss_is_dice_plus_half_ce(make_trainer):
    trainer = make_trainer(nnUNetTrainerSCRNet)
    assert isinstance(trainer.network, SCRNet) and trainer.network.deep_supervision
    trainer._build_loss()
    loss = trainer.compound_loss
    assert loss.weight_dice == 1.0 and loss.weight_ce == 0.5
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 1, 16, 16)).float()
    expected = loss.dc(logits, target) + 0.5 * loss.ce(logits, target[:, 0].long())
    torch.testing.assert_close(loss(logits, target), expected)


def test_paper_and_quick_variants(make_trainer):
    paper = make_trainer(nnUNetTrainerSCRNetPaper)
    optimizer, _ = paper.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 1e-4 and optimizer.param_groups[0]["weight_decay"] == 5e-4
    quick = make_trainer(nnUNetTrainerSCRNet_quick)
    assert (quick.num_epochs, quick.num_iterations_per_epoch) == (2, 5) and quick.compound_loss is None
    assert nnUNetTrainerSCRNet_quick.weight_ce == 0.5
