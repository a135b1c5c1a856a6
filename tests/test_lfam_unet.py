"""Tests of nnunet_ext.architectures.lfam_unet (LFAM U-Net on nnU-Net's PlainConvUNet / ResidualEncoderUNet)."""
import copy

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.architectures.lfam_unet import LFAM, LFAMUNet, build_lfam_unet_from_plans

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
NUM_CLASSES = 3


def arch_kwargs(arch: str, dim: int, n_stages: int = 4) -> dict:
    """Small nnU-Net style plan (as in plans.json: strings for the classes)."""
    feats = [4, 8, 16, 32, 32][:n_stages]
    if dim == 3:
        # anisotropic first stage kernel, like nnU-Net plans for thick slices
        kernels = [[1, 3, 3]] + [[3, 3, 3]] * (n_stages - 1)
        strides = [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1)
    else:
        kernels = [[3, 3]] * n_stages
        strides = [[1, 1]] + [[2, 2]] * (n_stages - 1)
    kw = {
        "n_stages": n_stages,
        "features_per_stage": feats,
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": kernels,
        "strides": strides,
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if arch == PLAIN:
        kw["n_conv_per_stage"] = [2] * n_stages
    else:
        kw["n_blocks_per_stage"] = [1, 2, 2, 2, 2][:n_stages]
    return kw


def patch(dim):
    return (16, 16, 16) if dim == 3 else (32, 32)


def build_base(arch, dim, ds=True, seed=0, n_stages=4):
    torch.manual_seed(seed)
    return get_network_from_plans(arch, arch_kwargs(arch, dim, n_stages), REQ_IMPORT, 1, NUM_CLASSES,
                                  allow_init=True, deep_supervision=ds)


def make_plans(arch, dim):
    return {
        "dataset_name": "Dataset999_Test",
        "plans_name": "test",
        "configurations": {
            "cfg": {
                "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                "patch_size": list(patch(dim)), "spacing": [1.0] * dim,
                "architecture": {"network_class_name": arch, "arch_kwargs": arch_kwargs(arch, dim),
                                 "_kw_requires_import": REQ_IMPORT},
            }
        },
    }


def randomise_lfam(net, scale=0.3, seed=123):
    """Move every LFAM away from the identity (non-zero kernel and offsets)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.lfam.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


CONFIGS = [(a, d) for a in (PLAIN, RESENC) for d in (2, 3)]
IDS = [f"{a.split('.')[-1]}-{d}d" for a, d in CONFIGS]


@pytest.mark.parametrize("arch,dim", CONFIGS, ids=IDS)
@pytest.mark.parametrize("offset_source", ["skip", "skip_and_decoder"])
def test_shapes_ds_on_off_and_identity_at_init(arch, dim, offset_source):
    base = build_base(arch, dim, ds=True)
    plain = build_base(arch, dim, ds=True, seed=1)  # different random init ...
    net = LFAMUNet(base, offset_source=offset_source)
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)  # ... then same weights
    assert missing == [] and all(k.startswith("lfam.") for k in unexpected) and len(unexpected) > 0
    net.eval(), plain.eval()
    x = torch.randn(2, 1, *patch(dim))
    with torch.no_grad():
        out, ref = net(x), plain(x)
    assert isinstance(out, list) and len(out) == 3
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.shape == (2, NUM_CLASSES, *[s // 2 ** i for s in patch(dim)])
        torch.testing.assert_close(o, r, atol=1e-6, rtol=0)
    # deep supervision off: one tensor, as nnU-Net's set_deep_supervision_enabled does it
    net.decoder.deep_supervision = False
    plain.decoder.deep_supervision = False
    with torch.no_grad():
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, NUM_CLASSES, *patch(dim))
    torch.testing.assert_close(single, plain(x), atol=1e-6, rtol=0)
    # once the LFAMs are not the identity any more, the output differs from the plain U-Net
    randomise_lfam(net)
    with torch.no_grad():
        assert (net(x) - single).abs().max() > 1e-4


@pytest.mark.parametrize("arch,dim", CONFIGS, ids=IDS)
@pytest.mark.parametrize("predictor", ["separable", "full"])
def test_backward_every_parameter_gets_gradient(arch, dim, predictor):
    torch.manual_seed(0)
    net = LFAMUNet(build_base(arch, dim, ds=True), predictor=predictor)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(2, 1, *patch(dim))
    target = [torch.randn_like(o) for o in net(x)]

    def step():
        opt.zero_grad(set_to_none=True)
        out = net(x)
        assert [o.shape for o in out] == [t.shape for t in target]
        loss = sum(((o - t) ** 2).mean() for o, t in zip(out, target))
        loss.backward()
        for name, p in net.named_parameters():
            assert p.grad is not None, name
        return {n: p.grad.abs().sum().item() for n, p in net.lfam.named_parameters()}

    g0 = step()
    # first step: only the deformable kernels move; offset/mask convs get an exact zero gradient
    for n, v in g0.items():
        if n.endswith("dcn.weight"):
            assert v > 0, n
        else:
            assert "offset_conv" in n and v == 0, n
    opt.step()
    g1 = step()
    # second step: the kernel is non-zero, so the predictor's last conv moves; the separable predictor's depthwise
    # conv sits behind that (zero-initialised) 1x1 conv and gets its first non-zero gradient one step later
    for n, v in g1.items():
        if predictor == "separable" and "offset_conv.0." in n:
            assert v == 0, n
        else:
            assert v > 0, n
    opt.step()
    for n, v in step().items():
        assert v > 0, n


@pytest.mark.parametrize("dim", [2, 3])
def test_decoder_guided_offsets_get_gradients(dim):
    net = LFAMUNet(build_base(PLAIN, dim), offset_source="skip_and_decoder")
    for lvl, m in net.lfam.items():
        c = net.encoder.output_channels[int(lvl)]
        assert m.dcn_block.guide_channels == 2 * c
    randomise_lfam(net, scale=0.1)
    x = torch.randn(1, 1, *patch(dim))
    sum(o.square().mean() for o in net(x)).backward()
    for n, p in net.lfam.named_parameters():
        assert p.grad.abs().sum() > 0, n


def test_independent_weights_per_level():
    net = LFAMUNet(build_base(PLAIN, 3))
    assert net.lfam_levels == (0, 1, 2)
    ptrs = [p.data_ptr() for p in net.lfam.parameters()]
    assert len(ptrs) == len(set(ptrs)) == 3 * 3  # 3 levels x (dcn weight, offset weight, offset bias)
    # the separable predictor: depthwise weight and bias, 1x1 weight and bias
    assert len(list(LFAMUNet(build_base(PLAIN, 3), predictor="separable").lfam.parameters())) == 3 * 5
    # channels and kernels follow the plan per level: (1,3,3) at full resolution, 3x3x3 below
    assert tuple(net.lfam["0"].dcn_block.dcn.weight.shape) == (4, 4, 1, 3, 3)
    assert tuple(net.lfam["1"].dcn_block.dcn.weight.shape) == (8, 8, 3, 3, 3)
    assert tuple(net.lfam["2"].dcn_block.dcn.weight.shape) == (16, 16, 3, 3, 3)
    # changing one level's weights leaves the others untouched
    before = {k: v.clone() for k, v in net.lfam.state_dict().items()}
    with torch.no_grad():
        net.lfam["1"].dcn_block.dcn.weight.add_(1.0)
    after = net.lfam.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["1.dcn_block.dcn.weight"]


@pytest.mark.parametrize("levels,min_level,expected", [
    (None, 0, (0, 1, 2)),
    (None, 1, (1, 2)),
    ([0, 2], 0, (0, 2)),
    ([0, 2], 1, (2,)),
    ([], 0, ()),
])
def test_levels_option_restricts_lfam(levels, min_level, expected):
    base = build_base(PLAIN, 3)
    ref_base = copy.deepcopy(base)
    net = LFAMUNet(base, levels=levels, min_level=min_level)
    assert net.lfam_levels == expected
    assert sorted(net.lfam.keys()) == [str(i) for i in expected]
    randomise_lfam(net, scale=0.1)
    called = []
    for lvl, m in net.lfam.items():
        m.register_forward_hook(lambda mod, inp, out, lvl=lvl: called.append(int(lvl)))
    # the skips the decoder receives: aligned (changed) exactly at the chosen levels
    seen = {}
    net.decoder.register_forward_pre_hook(lambda mod, args: seen.update(skips=[s.detach() for s in args[0]]))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = net(x)
        raw = ref_base.encoder(x)
    assert sorted(called) == list(expected)
    for lvl in range(4):
        same = torch.equal(seen["skips"][lvl], raw[lvl])
        assert same == (lvl not in expected), lvl
    # feature-map estimate grows only with the LFAM levels
    fm = net.compute_conv_feature_map_size((16, 16, 16))
    fm_base = ref_base.compute_conv_feature_map_size((16, 16, 16))
    assert (fm > fm_base) == (len(expected) > 0) and fm >= fm_base
    if not expected:
        torch.testing.assert_close(out[0], ref_base(x)[0])


def test_invalid_levels_and_unsupported_architectures():
    with pytest.raises(ValueError, match="out of range"):
        LFAMUNet(build_base(PLAIN, 2), levels=[3])  # level 3 is the bottleneck
    res_unet = ResidualUNet(1, 3, [4, 8, 16], torch.nn.Conv2d, 3, [1, 2, 2], 1, 2, 1,
                            norm_op=torch.nn.InstanceNorm2d)
    with pytest.raises(TypeError, match="ResidualUNet"):
        LFAMUNet(res_unet)
    with pytest.raises(TypeError, match="Conv2d"):
        LFAMUNet(torch.nn.Conv2d(1, 1, 3))


@pytest.mark.parametrize("arch,dim", [(PLAIN, 3), (RESENC, 2)])
def test_builder_from_plans(arch, dim):
    pm = PlansManager(make_plans(arch, dim))
    cm = pm.get_configuration("cfg")
    net = build_lfam_unet_from_plans(pm, cm, 1, NUM_CLASSES, enable_deep_supervision=False, lfam_min_level=1)
    assert isinstance(net, LFAMUNet) and net.base_class_name.endswith(arch.split(".")[-1])
    assert net.lfam_levels == (1, 2) and net.decoder.deep_supervision is False
    x = torch.randn(1, 1, *cm.patch_size)
    y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, NUM_CLASSES, *cm.patch_size)
    # identical to the plan's plain network with the same weights
    plain = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                   cm.network_arch_init_kwargs_req_import, 1, NUM_CLASSES,
                                   deep_supervision=False)
    plain.load_state_dict(net.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), atol=1e-6, rtol=0)
    # planner hook: LFAM levels add to the base network's feature-map estimate
    assert net.compute_conv_feature_map_size(cm.patch_size) > plain.compute_conv_feature_map_size(cm.patch_size)


def test_builder_refuses_unsupported_plan_architecture():
    plans = make_plans(PLAIN, 2)
    a = plans["configurations"]["cfg"]["architecture"]
    a["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualUNet"
    a["arch_kwargs"]["n_blocks_per_stage"] = a["arch_kwargs"].pop("n_conv_per_stage")
    pm = PlansManager(plans)
    with pytest.raises(TypeError, match="ResidualUNet"):
        build_lfam_unet_from_plans(pm, pm.get_configuration("cfg"), 1, 2)


def test_lfam_module_is_identity_at_init_and_feature_map_size():
    m = LFAM(6, 3, kernel_size=3)
    x = torch.randn(1, 6, 4, 5, 6)
    assert torch.equal(m(x), x)
    # estimate: offset/mask out 4*27, sigmoid mask 27, DCN out + sum 2*6 (the lean DCN keeps no samples); the
    # separable predictor adds its depthwise output (6)
    assert m.feature_map_size((4, 5, 6)) == (108 + 27 + 12) * 120
    assert LFAM(6, 3, kernel_size=3, predictor="separable").feature_map_size((4, 5, 6)) == (108 + 27 + 12 + 6) * 120
    with pytest.raises(ValueError, match="odd"):
        LFAM(6, 2, kernel_size=2)
