"""``DepthwiseConv3d`` (2D slices on the CPU) equals ``nn.Conv3d`` with ``groups == channels``, ``DepthwiseConv2d``
(the compiled kernel) ``F.conv2d``: values and gradients."""
import pytest
import torch
from torch import nn

from nnunet_ext.building_blocks import depthwise
from nnunet_ext.building_blocks.depthwise import (DepthwiseConv2d, DepthwiseConv3d, _DepthwiseConv2dCPU,
                                                  depthwise_conv)


@pytest.fixture(autouse=True)
def kernel_on_small_maps(monkeypatch):
    """The tests' maps are small: the kernel runs on them (in use it only runs on maps of at least ``MIN_PLANE``)."""
    monkeypatch.setattr(depthwise, "MIN_PLANE", 1)


@pytest.mark.parametrize("kernel,padding,dilation,stride,shape", [
    (7, 9, 3, 1, (2, 4, 10, 12, 9)),           # LKA's dilated 7x7x7
    (5, 2, 1, 1, (1, 3, 6, 7, 8)),             # LKA's 5x5x5
    (3, 1, 1, 2, (2, 3, 9, 8, 7)),             # strided
    ((1, 3, 3), (0, 1, 1), 1, 1, (1, 2, 5, 6, 6)),  # anisotropic kernel
])
def test_equals_grouped_conv3d(kernel, padding, dilation, stride, shape):
    torch.manual_seed(0)
    fast = DepthwiseConv3d(shape[1], kernel, padding=padding, dilation=dilation, stride=stride).double()
    reference = nn.Conv3d(shape[1], shape[1], kernel, padding=padding, dilation=dilation, stride=stride,
                          groups=shape[1]).double()
    reference.load_state_dict(fast.state_dict())  # same parameters and keys
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y, y_reference = fast(x), reference(x)
    torch.testing.assert_close(y, y_reference)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, fast.weight, fast.bias), grad)
    theirs = torch.autograd.grad(y_reference, (x, reference.weight, reference.bias), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_factory_picks_the_module_by_dimension():
    conv2d = depthwise_conv(nn.Conv2d, 4, 5, padding=2)
    assert isinstance(conv2d, DepthwiseConv2d) and conv2d.groups == 4 and conv2d.padding == (2, 2)
    conv3d = depthwise_conv(nn.Conv3d, 4, 7, padding=9, dilation=3)
    assert isinstance(conv3d, DepthwiseConv3d) and conv3d.groups == 4 and conv3d.dilation == (3, 3, 3)


def _reference_grads(x, conv, grad):
    """Values and (input, weight, bias) gradients of ``F.conv2d`` with ``conv``'s parameters."""
    xr = x.detach().clone().requires_grad_()
    w, b = conv.weight.detach().clone().requires_grad_(), conv.bias.detach().clone().requires_grad_()
    y = nn.functional.conv2d(xr, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    return (y, *torch.autograd.grad(y, (xr, w, b), grad))


@pytest.mark.parametrize("kernel,dilation", [(3, 1), (5, 2), (7, 3), (3, 2), (9, 1)])
@pytest.mark.parametrize("shape", [(3, 4, 9, 12), (1, 2, 2, 3), (2, 3, 1, 8), (1, 5, 17, 4)])
def test_depthwise_conv2d_kernel_equals_grouped_conv2d(kernel, dilation, shape):
    """The compiled kernel against ``F.conv2d`` in float64, including maps smaller than the kernel's reach."""
    torch.manual_seed(0)
    conv = DepthwiseConv2d(shape[1], kernel, padding=dilation * (kernel // 2), dilation=dilation).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert conv._kernel_applies(x)
    y = conv(x)
    grad = torch.randn_like(y)
    ours = (y, *torch.autograd.grad(y, (x, conv.weight, conv.bias), grad))
    for a, b in zip(ours, _reference_grads(x, conv, grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_depthwise_conv2d_kernel_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _DepthwiseConv2dCPU.apply(*t, 2), (x, w, b))
    assert torch.autograd.gradcheck(lambda *t: _DepthwiseConv2dCPU.apply(*t, None, 1), (x, w))


def test_depthwise_conv2d_kernel_same_bits_with_1_and_2_threads():
    """One thread per (sample, channel) plane and the weight gradient summed over the samples in order."""
    torch.manual_seed(0)
    conv = DepthwiseConv2d(6, 3, padding=1)
    x = torch.randn(3, 6, 40, 70, requires_grad=True)
    grad = torch.randn(3, 6, 40, 70)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = conv(x)
            results.append((y, *torch.autograd.grad(y, (x, conv.weight, conv.bias), grad)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,shape", [
    (dict(kernel_size=3, padding=1, stride=2), (2, 3, 9, 8)),          # strided
    (dict(kernel_size=(1, 3), padding=(0, 1)), (1, 2, 5, 6)),          # not square
    (dict(kernel_size=3, padding=0), (1, 2, 5, 6)),                    # not "same"
])
def test_depthwise_conv2d_falls_back_to_conv2d(kwargs, shape):
    torch.manual_seed(0)
    conv = DepthwiseConv2d(shape[1], **kwargs).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert not conv._kernel_applies(x)
    y = conv(x)
    grad = torch.randn_like(y)
    ours = (y, *torch.autograd.grad(y, (x, conv.weight, conv.bias), grad))
    for a, b in zip(ours, _reference_grads(x, conv, grad)):
        torch.testing.assert_close(a, b)


def test_small_maps_go_to_conv2d(monkeypatch):
    monkeypatch.setattr(depthwise, "MIN_PLANE", 64 * 64)
    conv = DepthwiseConv2d(4, 3, padding=1)
    assert conv._kernel_applies(torch.randn(1, 4, 64, 64)) and not conv._kernel_applies(torch.randn(1, 4, 32, 64))
