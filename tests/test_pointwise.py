"""Tests of nnunet_ext.building_blocks.pointwise: 1x1 convolutions as batched matrix products."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.building_blocks.pointwise import PointwiseConv2d, PointwiseConv3d, pointwise_conv, pointwise_conv_op

CONV = {2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize("dim, channels, out, groups, bias", [(2, 8, 12, 1, True), (2, 12, 12, 3, True),
                                                              (3, 6, 4, 2, False), (2, 4, 6, 1, False),
                                                              (3, 5, 3, 1, True)])
def test_pointwise_conv_is_the_1x1_convolution_in_value_and_gradient(dim, channels, out, groups, bias):
    """Against ``F.conv2d`` / ``F.conv3d`` in float64, values and the gradients of input, weight and bias, on a
    channel slice (strided batch) as SCRNet's Channel Refinement passes it."""
    torch.manual_seed(0)
    full = torch.randn(2, 2 * channels, *([5] * dim), dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out, channels // groups, *([1] * dim), dtype=torch.float64, requires_grad=True)
    b = torch.randn(out, dtype=torch.float64, requires_grad=True) if bias else None
    grad = torch.randn(2, out, *([5] * dim), dtype=torch.float64)
    results = []
    for function in (pointwise_conv, CONV[dim]):
        y = function(full[:, channels:], weight, b, groups=groups)
        inputs = [full, weight] + ([b] if bias else [])
        results.append((y, torch.autograd.grad(y, inputs, grad)))
    (y, grads), (y_ref, grads_ref) = results
    assert y.shape == y_ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [2, 3])
def test_pointwise_modules_equal_the_1x1_convolution_with_the_same_state_dict(dim):
    torch.manual_seed(0)
    assert pointwise_conv_op({2: nn.Conv2d, 3: nn.Conv3d}[dim]) is {2: PointwiseConv2d, 3: PointwiseConv3d}[dim]
    pointwise = pointwise_conv_op({2: nn.Conv2d, 3: nn.Conv3d}[dim])(6, 5).double()
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dim](6, 5, 1).double()
    conv.load_state_dict(pointwise.state_dict())
    x = torch.randn(3, 6, *([7] * dim), dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 5, *([7] * dim), dtype=torch.float64)
    out, expected = pointwise(x), conv(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out, (x, pointwise.weight, pointwise.bias), upstream)
    expected_grads = torch.autograd.grad(expected, (x, conv.weight, conv.bias), upstream)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    no_bias = pointwise_conv_op({2: nn.Conv2d, 3: nn.Conv3d}[dim])(6, 5, bias=False).double()
    torch.testing.assert_close(no_bias(x), CONV[dim](x, no_bias.weight), rtol=1e-12, atol=1e-12)


def test_pointwise_conv_gives_the_same_bits_with_one_and_two_threads():
    """End-to-end prediction equality needs results that do not depend on the thread count."""
    torch.manual_seed(1)
    x, w, b = torch.randn(2, 32, 64, 64), torch.randn(48, 32, 1, 1), torch.randn(48)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pointwise_conv(x, w, b)
        torch.set_num_threads(2)
        two = pointwise_conv(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
