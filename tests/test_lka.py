"""Tests of nnunet_ext.building_blocks.lka (DLKUNet blocks), 2D and 3D."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.building_blocks.lka import LKA, DecoderFusionBlock, DepthwiseSeparableConv, DLKBlock, pad_to

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
DIMS = sorted(CONV)


def delta_kernel(channels: int, size: int, dim: int, at_last_axis: int, value: float = 1.0) -> torch.Tensor:
    """Depthwise kernel (channels, 1, size, ..., size): ``value`` at the centre, moved to index ``at_last_axis``
    along the last axis."""
    kernel = torch.zeros(channels, 1, *[size] * dim)
    index = [size // 2] * (dim - 1) + [at_last_axis]
    kernel[(slice(None), 0, *index)] = value
    return kernel


@pytest.mark.parametrize("dim", DIMS)
def test_lka_on_a_hand_built_input(dim):
    """x = the last-axis index (a ramp). 5x5 depthwise = 2 * identity, dilated 7x7 = one tap one step right of
    the centre (dilation 3: reads 3 voxels to the right, zero beyond the border), 1x1 = 0.5 with bias 1:
    attn[..., j] = 0.5 * 2 * x[..., j + 3] + 1 = (j + 3) + 1 inside, 1 where j + 3 is outside; out = x * attn."""
    width = 10
    lka = LKA(CONV[dim], 1)
    with torch.no_grad():
        lka.depthwise.weight.copy_(delta_kernel(1, 5, dim, 2, 2.0))
        lka.depthwise.bias.zero_()
        lka.depthwise_dilated.weight.copy_(delta_kernel(1, 7, dim, 4))
        lka.depthwise_dilated.bias.zero_()
        lka.pointwise.weight.fill_(0.5)
        lka.pointwise.bias.fill_(1.0)
    x = torch.arange(width, dtype=torch.float32).expand(1, 1, *[6] * (dim - 1), width).contiguous()
    j = torch.arange(width, dtype=torch.float32)
    expected_row = j * torch.where(j + 3 < width, j + 3 + 1, torch.ones(width))
    assert torch.equal(lka(x), expected_row.expand_as(x))


@pytest.mark.parametrize("dim", DIMS)
def test_lka_equals_its_definition_with_random_weights(dim):
    torch.manual_seed(0)
    conv = {2: F.conv2d, 3: F.conv3d}[dim]
    lka = LKA(CONV[dim], 4)
    x = torch.randn(2, 4, *[12] * dim)
    attn = conv(x, lka.depthwise.weight, lka.depthwise.bias, padding=2, groups=4)
    attn = conv(attn, lka.depthwise_dilated.weight, lka.depthwise_dilated.bias, padding=9, dilation=3, groups=4)
    attn = conv(attn, lka.pointwise.weight, lka.pointwise.bias)
    torch.testing.assert_close(lka(x), x * attn)
    # 5^d + 7^d depthwise kernels with bias, a dense 1x1 with bias
    assert sum(p.numel() for p in lka.parameters()) == 4 * (5 ** dim + 1) + 4 * (7 ** dim + 1) + 4 * 4 + 4


@pytest.mark.parametrize("dim", DIMS)
def test_depthwise_separable_conv(dim):
    torch.manual_seed(0)
    conv = DepthwiseSeparableConv(CONV[dim], 3, 5)
    x = torch.randn(2, 3, *[7] * dim)
    assert conv.depthwise.groups == 3 and conv.pointwise.kernel_size == (1,) * dim
    assert sum(p.numel() for p in conv.parameters()) == 3 * 3 ** dim + 3 + 3 * 5 + 5
    expected = conv.pointwise(torch.cat([conv.depthwise(x)[:, c:c + 1] for c in range(3)], dim=1))
    torch.testing.assert_close(conv(x), expected)
    assert conv(x).shape == (2, 5, *[7] * dim)


@pytest.mark.parametrize("dim", DIMS)
def test_dlk_block_shapes_parameters_and_gradients(dim):
    torch.manual_seed(0)
    block = DLKBlock(CONV[dim], 3, 8)
    x = torch.randn(2, 3, *[9] * dim, requires_grad=True)
    out = block(x)
    assert out.shape == (2, 8, *[9] * dim)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    k = 3 ** dim
    convs = (3 * k + 3 + 3 * 8 + 8) + (8 * k + 8 + 8 * 8 + 8)
    norms = 2 * 2 * 8
    lka = 8 * (5 ** dim + 1) + 8 * (7 ** dim + 1) + 8 * 8 + 8
    assert sum(p.numel() for p in block.parameters()) == convs + norms + lka
    assert isinstance(block.convs[1], {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim])
    assert block.compute_conv_feature_map_size([9] * dim) == 9 ** dim * (3 + 6 * 8)


def test_pad_to_centres_with_the_extra_voxel_at_the_end():
    x = torch.ones(1, 1, 2, 3)
    padded = pad_to(x, (5, 4))
    assert padded.shape == (1, 1, 5, 4)
    # height: 3 more -> 1 before, 2 after; width: 1 more -> 0 before, 1 after
    assert padded[0, 0, :, :3].sum(dim=1).tolist() == [0, 3, 3, 0, 0]
    assert padded[0, 0, :, 3].abs().sum() == 0
    assert pad_to(x, (2, 3)) is x


@pytest.mark.parametrize("dim,stride,below,skip", [(2, [2, 2], [4, 5], [9, 10]), (3, [1, 2, 2], [3, 4, 4], [3, 8, 9])])
def test_decoder_fusion_block_upsamples_pads_and_fuses(dim, stride, below, skip):
    torch.manual_seed(0)
    dfb = DecoderFusionBlock(CONV[dim], 16, 8, stride)
    low = torch.randn(2, 16, *below)
    high = torch.randn(2, 8, *skip)
    out = dfb(low, high)
    assert out.shape == (2, 8, *skip)
    assert tuple(dfb.upsample.kernel_size) == tuple(stride) == tuple(dfb.upsample.stride)
    assert dfb.block.in_channels == 16 and dfb.block.out_channels == 8
    # the same as concatenating the skip with the padded upsampled map by hand
    expected = dfb.block(torch.cat((high, pad_to(dfb.upsample(low), skip)), dim=1))
    torch.testing.assert_close(out, expected)
