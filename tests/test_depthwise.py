"""``DepthwiseConv3d`` (2D slices on the CPU) equals ``nn.Conv3d`` with ``groups == channels``: values and gradients."""
import pytest
import torch
from torch import nn

from nnunet_ext.building_blocks.depthwise import DepthwiseConv3d, depthwise_conv


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
    assert type(depthwise_conv(nn.Conv2d, 4, 5, padding=2)) is nn.Conv2d
    conv3d = depthwise_conv(nn.Conv3d, 4, 7, padding=9, dilation=3)
    assert isinstance(conv3d, DepthwiseConv3d) and conv3d.groups == 4 and conv3d.dilation == (3, 3, 3)
