"""``measure.flops``: convolutions counted with their groups in backward, the compiled depthwise ops like the
convolutions they replace."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_ext.building_blocks import depthwise, gelu_norm
from nnunet_ext.building_blocks.convmixer_depthwise import _fused_applies, depthwise_gelu_norm_residual
from nnunet_ext.building_blocks.depthwise import DepthwiseConv2d
from nnunet_ext.evaluation.measure import flops


@pytest.fixture(autouse=True)
def kernel_on_small_maps(monkeypatch):
    """The tests' maps are small: the kernels run on them (in use only on maps of at least their ``MIN_PLANE``)."""
    monkeypatch.setattr(depthwise, "MIN_PLANE", 1)
    monkeypatch.setattr(gelu_norm, "MIN_PLANE", 1)


def _forward_flops(x: torch.Tensor, w: torch.Tensor) -> int:
    """2 per multiply-add of a stride-1 'same' convolution: every output voxel of every output channel reads
    ``C_in / groups * k^2`` inputs."""
    return 2 * x.shape[0] * w.shape[0] * x[0, 0].numel() * w[0].numel()


def test_grouped_convolution_backward_counts_its_groups():
    x = torch.randn(2, 12, 10, 11, requires_grad=True)
    for groups in (1, 3, 12):
        w = torch.randn(12, 12 // groups, 3, 3, requires_grad=True)
        forward = _forward_flops(x, w)
        assert flops(lambda: F.conv2d(x, w, None, padding=1, groups=groups)) == forward
        # input and weight gradients: one forward's multiply-adds each
        assert flops(lambda: F.conv2d(x, w, None, padding=1, groups=groups).sum().backward()) == 3 * forward


def test_compiled_depthwise_counted_like_the_convolution():
    conv = DepthwiseConv2d(6, 3, padding=1)
    x = torch.randn(2, 6, 9, 8, requires_grad=True)
    assert conv._kernel_applies(x)
    expected = 3 * _forward_flops(x, conv.weight)
    assert flops(lambda: conv(x).sum().backward()) == expected
    assert flops(lambda: F.conv2d(x, conv.weight, conv.bias, padding=1, groups=6).sum().backward()) == expected


def test_compiled_convmixer_pass_counts_its_depthwise_convolutions():
    """Forward: the depthwise conv; backward: its recomputation, input and weight gradients."""
    conv, norm = DepthwiseConv2d(6, 3, padding=1), torch.nn.GroupNorm(6, 6)
    x = torch.randn(2, 6, 9, 8, requires_grad=True)
    assert _fused_applies(x, conv, norm)
    forward = _forward_flops(x, conv.weight)
    assert flops(lambda: depthwise_gelu_norm_residual(x, conv, norm)) == forward
    assert flops(lambda: depthwise_gelu_norm_residual(x, conv, norm).sum().backward()) == 4 * forward
