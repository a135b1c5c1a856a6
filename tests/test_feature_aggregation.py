"""FAM blocks (SCRNet Eq. 6-12) and the SCRM: shapes and gradients in 2D/3D, the shift initialisation against
explicit shifts, windowed attention against a per-window computation, SK weights, path weights."""
import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nnunet_ext.building_blocks.feature_aggregation import (CCAPM, SCRM, FeatureAggregationModule, FeatureInitialize,
                                                             ShiftConvPath, SKFusion, WindowCrossAttention,
                                                             window_sizes)

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
SHAPE = {2: (2, 16, 16, 24), 3: (2, 8, 8, 8, 12)}


def shifted(x: torch.Tensor, offset) -> torch.Tensor:
    """``out[p] = x[p + offset]``, zero outside (cross-correlation with a one-hot kernel at ``offset + 1``)."""
    d = len(offset)
    padded = F.pad(x, [1] * (2 * d))
    index = [slice(None), slice(None)] + [slice(1 + o, 1 + o + s) for o, s in zip(offset, x.shape[2:])]
    return padded[tuple(index)]


@pytest.mark.parametrize("dim", [2, 3])
def test_shift_initialisation_equals_shifts(dim):
    torch.manual_seed(0)
    channels, heads = 8, 4
    path = ShiftConvPath(CONV[dim], channels, heads)
    head_channels, positions = channels // heads, 3 ** dim
    x = torch.randn(2, head_channels * positions, *([5] * dim))
    offsets = list(itertools.product([-1, 0, 1], repeat=dim))  # row-major: kernel i is one-hot at offsets[i] + 1
    out = path.shift(x)
    for o in range(channels):
        g = o // (channels // head_channels)  # output channel o belongs to group g (its k^d input maps)
        expected = sum(shifted(x[:, g * positions + i: g * positions + i + 1], off) for i, off in enumerate(offsets))
        torch.testing.assert_close(out[:, o: o + 1], expected)


def test_window_sizes_largest_divisor():
    assert window_sizes([256, 10, 7, 4, 11], 8) == [8, 5, 7, 4, 1]


@pytest.mark.parametrize("dim", [2, 3])
def test_window_attention_equals_per_window_attention(dim):
    torch.manual_seed(0)
    heads, window, channels = 2, 4, 6
    spatial = (8, 12) if dim == 2 else (4, 8, 12)
    q, k, v = (torch.randn(2, channels, *spatial) for _ in range(3))
    out = WindowCrossAttention(heads, window)(q, k, v)
    assert out.shape == q.shape
    hc = channels // heads
    for start in itertools.product(*(range(0, s, window) for s in spatial)):
        region = (slice(None), slice(None)) + tuple(slice(a, a + window) for a in start)
        tokens = [t[region].reshape(2, heads, hc, -1).transpose(2, 3) for t in (q, k, v)]  # (B, heads, T, hc)
        attn = torch.softmax(tokens[0] @ tokens[1].transpose(2, 3) / math.sqrt(hc), dim=-1)
        expected = (attn @ tokens[2]).transpose(2, 3).reshape(out[region].shape)
        torch.testing.assert_close(out[region], expected, atol=1e-5, rtol=1e-5)


def test_window_attention_is_local():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 16, 16) for _ in range(3))
    attention = WindowCrossAttention(2, 8)
    k2, v2 = k.clone(), v.clone()
    k2[..., 8:, :] += 1.0  # change keys and values outside the top windows only
    v2[..., 8:, :] -= 2.0
    a, b = attention(q, k, v), attention(q, k2, v2)
    torch.testing.assert_close(a[..., :8, :], b[..., :8, :])
    assert not torch.allclose(a[..., 8:, :], b[..., 8:, :])


def test_sk_weights_sum_to_one_per_channel():
    torch.manual_seed(0)
    sk = SKFusion(nn.Conv2d, 16)
    y1, y2 = torch.randn(3, 16, 5, 7), torch.randn(3, 16, 5, 7)
    a = sk.weights(y1, y2)
    assert a.shape == (3, 2, 16, 1, 1)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(3, 16, 1, 1))
    assert (a > 0).all() and a.std() > 0  # genuinely per channel, not a constant 0.5
    torch.testing.assert_close(sk(y1, y2), a[:, 0] * y1 + a[:, 1] * y2)
    assert sk.squeeze[0].out_channels == 32  # SKNet's d = max(C / 16, 32)


def test_ccapm_is_weighted_sum_of_paths_with_half_weights():
    torch.manual_seed(0)
    ccapm = CCAPM(nn.Conv2d, 8, 3, nn.InstanceNorm2d, {"affine": True}, heads=4, window_size=4)
    assert ccapm.w_conv.item() == 0.5 and ccapm.w_cross.item() == 0.5
    f1, f2 = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)
    q, k, v = ccapm.fi_query(f1), ccapm.fi_key(f2), ccapm.fi_value(f2)
    expected = 0.5 * ccapm.conv_path(q, k, v) + 0.5 * ccapm.attention(q, k, v)
    torch.testing.assert_close(ccapm(f1, f2), expected)


def assert_every_parameter_has_gradient(module: nn.Module):
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    assert any(p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("dim", [2, 3])
def test_blocks_shapes_and_gradients(dim):
    torch.manual_seed(0)
    shape = SHAPE[dim]
    c = shape[1]
    norm_kwargs = {"affine": True}
    fi = FeatureInitialize(CONV[dim], 3, c, 3, NORM[dim], norm_kwargs)
    x3 = torch.randn(shape[0], 3, *shape[2:], requires_grad=True)
    y = fi(x3)
    assert y.shape == shape
    y.square().mean().backward()
    assert_every_parameter_has_gradient(fi)
    assert x3.grad.abs().sum() > 0

    fam = FeatureAggregationModule(CONV[dim], c, 3, NORM[dim], norm_kwargs, window_size=4)
    x_h, x_l = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    y = fam(x_h, x_l)
    assert y.shape == shape
    y.square().mean().backward()
    assert_every_parameter_has_gradient(fam)
    assert x_h.grad.abs().sum() > 0 and x_l.grad.abs().sum() > 0

    scrm = SCRM(CONV[dim], c, 3, NORM[dim], norm_kwargs, window_size=4)
    x = torch.randn(shape, requires_grad=True)
    y = scrm(x)
    assert y.shape == shape
    y.square().mean().backward()
    assert_every_parameter_has_gradient(scrm)
    assert scrm.compute_conv_feature_map_size(shape[2:]) > 20 * math.prod(shape[1:])
