"""``depthwise_gelu_norm_residual`` (the compiled ConvMixer depth-wise pass) equals
``p + nn.GroupNorm(C, C)(F.gelu(depthwise conv(p)))``, values and every gradient."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.building_blocks import convmixer_depthwise, depthwise, gelu_norm
from nnunet_ext.building_blocks.convmixer_depthwise import _ConvMixerDepthwiseCPU, depthwise_gelu_norm_residual
from nnunet_ext.building_blocks.depthwise import DepthwiseConv2d, DepthwiseConv3d
from nnunet_ext.building_blocks.feature_aggregation import FeatureInitialize


@pytest.fixture(autouse=True)
def kernels_on_small_maps(monkeypatch):
    """The tests' maps are small: the kernels run on them (in use only on maps of at least their ``MIN_PLANE``)."""
    monkeypatch.setattr(depthwise, "MIN_PLANE", 1)
    monkeypatch.setattr(gelu_norm, "MIN_PLANE", 1)


def _block(channels: int, kernel: int = 3, dilation: int = 1, dtype=torch.float64):
    conv = DepthwiseConv2d(channels, kernel, padding=dilation * (kernel // 2), dilation=dilation).to(dtype)
    norm = nn.GroupNorm(channels, channels).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return conv, norm


def _reference(p, conv, norm):
    return p + norm(F.gelu(F.conv2d(p, conv.weight, conv.bias, padding=conv.padding, dilation=conv.dilation,
                                    groups=conv.groups)))


@pytest.mark.parametrize("shape, kernel, dilation", [((3, 4, 9, 11), 3, 1), ((2, 3, 12, 10), 5, 1),
                                                     ((2, 2, 15, 16), 7, 2), ((1, 3, 4, 5), 9, 1)])
def test_equals_the_composition(shape, kernel, dilation):
    """Values and gradients of the input, the conv's weight and bias and the norm's weight and bias, float64; the
    last case has a kernel wider than the map."""
    torch.manual_seed(0)
    conv, norm = _block(shape[1], kernel, dilation)
    p = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert convmixer_depthwise._fused_applies(p, conv, norm)
    params = (p, conv.weight, conv.bias, norm.weight, norm.bias)
    y = depthwise_gelu_norm_residual(p, conv, norm)
    grad = torch.randn_like(y)
    ours = (y, *torch.autograd.grad(y, params, grad))
    y_ref = _reference(p, conv, norm)
    theirs = (y_ref, *torch.autograd.grad(y_ref, params, grad))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    torch.manual_seed(0)
    p = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias, gamma, beta = (torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda *t: _ConvMixerDepthwiseCPU.apply(*t, 1, 1e-5),
                                    (p, weight, bias, gamma, beta))


def test_same_bits_with_1_and_2_threads():
    torch.manual_seed(0)
    conv, norm = _block(6, dtype=torch.float32)
    p = torch.randn(3, 6, 40, 70, requires_grad=True)
    grad = torch.randn(3, 6, 40, 70)
    params = (p, conv.weight, conv.bias, norm.weight, norm.bias)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = depthwise_gelu_norm_residual(p, conv, norm)
            results.append((y, *torch.autograd.grad(y, params, grad)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_the_composition_runs_where_the_fused_pass_does_not_apply(monkeypatch):
    """3D, a conv without bias, and (with the real threshold) small planes: the separate modules, same function."""
    torch.manual_seed(0)
    conv3d, norm3d = DepthwiseConv3d(3, 3, padding=1).double(), nn.GroupNorm(3, 3).double()
    p3d = torch.randn(1, 3, 4, 5, 6, dtype=torch.float64)
    no_bias, norm = DepthwiseConv2d(3, 3, padding=1, bias=False).double(), nn.GroupNorm(3, 3).double()
    p2d = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert not convmixer_depthwise._fused_applies(p3d, conv3d, norm3d)
    assert not convmixer_depthwise._fused_applies(p2d, no_bias, norm)
    torch.testing.assert_close(depthwise_gelu_norm_residual(p3d, conv3d, norm3d), p3d + norm3d(F.gelu(conv3d(p3d))))
    torch.testing.assert_close(depthwise_gelu_norm_residual(p2d, no_bias, norm), p2d + norm(F.gelu(no_bias(p2d))))
    monkeypatch.setattr(gelu_norm, "MIN_PLANE", 128 * 128)
    conv, norm = _block(3)
    assert not convmixer_depthwise._fused_applies(p2d, conv, norm)
    assert convmixer_depthwise._fused_applies(torch.randn(1, 3, 128, 128, dtype=torch.float64), conv, norm)


def test_feature_initialize_gives_the_same_function_fused_and_composed(monkeypatch):
    """SCRNet's Feature Initialize (three blocks) with the fused pass against the separate modules: output and
    parameter gradients."""
    torch.manual_seed(0)
    fi = FeatureInitialize(nn.Conv2d, 4, 4, 3, blocks=3).double()
    x = torch.randn(2, 4, 12, 10, dtype=torch.float64)
    grad = torch.randn(2, 12, 12, 10, dtype=torch.float64)
    results, fused_calls = [], []
    apply = _ConvMixerDepthwiseCPU.apply
    monkeypatch.setattr(_ConvMixerDepthwiseCPU, "apply", lambda *args: fused_calls.append(1) or apply(*args))
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(convmixer_depthwise, "_fused_applies", lambda *args: False)
        fi.zero_grad()
        y = fi(x)
        y.backward(grad)
        results.append((y.detach(), {n: p.grad.clone() for n, p in fi.named_parameters()}))
    assert len(fused_calls) == 1  # the first run only
    (y_fused, g_fused), (y_composed, g_composed) = results
    torch.testing.assert_close(y_fused, y_composed, rtol=1e-10, atol=1e-10)
    for name in g_fused:
        torch.testing.assert_close(g_fused[name], g_composed[name], rtol=1e-10, atol=1e-10, msg=name)
