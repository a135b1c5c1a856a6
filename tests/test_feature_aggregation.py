"""FAM blocks (SCRNet Eq. 6-12) and the SCRM: shapes and gradients in 2D/3D, the shift initialisation against
explicit shifts, the composed conv path against FC-then-shift, grouped Feature-Initialize blocks against separate
ConvMixer blocks, windowed attention against a per-window computation, SK weights, path weights, the fused SCRM
against its blocks applied one after the other."""
import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nnunet_ext.building_blocks.feature_aggregation import (CCAPM, SCRM, FeatureAggregationModule, FeatureInitialize,
                                                             ShiftConvPath, SKFusion, WindowCrossAttention,
                                                             _relayout, _StandardGradientChunks, _ToStandardLayout,
                                                             window_sizes)

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
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


@pytest.mark.parametrize("dim", [2, 3])
def test_conv_path_is_fc_then_shift(dim):
    """Eq. 8 as ACmix writes it: per head channel j, FC (no bias) over the 3 * heads maps (q, k, v heads) to k^d
    maps, then the grouped shift conv; the path computes it as one conv with the composed weight."""
    torch.manual_seed(0)
    channels, heads = 8, 4
    path = ShiftConvPath(CONV[dim], channels, heads)
    with torch.no_grad():
        path.shift.weight.add_(0.1 * torch.randn_like(path.shift.weight))  # trained, no longer pure shifts
        path.shift.bias.uniform_(-1, 1)
    spatial = (6, 5) if dim == 2 else (4, 5, 3)
    q, k, v = (torch.randn(2, channels, *spatial) for _ in range(3))
    hc = channels // heads
    head_maps = torch.cat([t.reshape(2, heads, hc, -1) for t in (q, k, v)], dim=1)  # (B, 3 heads, hc, N)
    mixed = torch.einsum("it,btjn->bjin", path.fc.weight, head_maps)  # (B, hc, k^d, N)
    expected = path.shift(mixed.reshape(2, hc * path.positions, *spatial))
    torch.testing.assert_close(path(q, k, v), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(path(q, k, v, torch.tensor(0.3)), 0.3 * expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [2, 3])
def test_grouped_feature_initialize_equals_separate_convmixer_blocks(dim):
    torch.manual_seed(0)
    conv = (F.conv2d, F.conv3d)[dim - 2]
    c, blocks = 4, 3
    fi = FeatureInitialize(CONV[dim], 6, c, 3, blocks)
    with torch.no_grad():
        for norm in (fi.norm_depthwise, fi.norm_pointwise):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, *([5] * dim))
    out = fi(x)
    assert out.shape == (2, blocks * c, *([5] * dim))
    for i in range(blocks):
        rows = slice(i * c, (i + 1) * c)

        def norm(t, module):
            return F.instance_norm(t, weight=module.weight[rows], bias=module.bias[rows], eps=1e-5)
        p = conv(x, fi.project.weight[rows], fi.project.bias[rows])
        p = p + norm(F.gelu(conv(p, fi.depthwise.weight[rows], fi.depthwise.bias[rows], padding=1, groups=c)),
                     fi.norm_depthwise)
        expected = norm(F.gelu(conv(p, fi.pointwise.weight[rows], fi.pointwise.bias[rows])), fi.norm_pointwise)
        torch.testing.assert_close(out[:, rows], expected, atol=1e-5, rtol=1e-5)


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
    sk = SKFusion(16)
    y1, y2 = torch.randn(3, 16, 5, 7), torch.randn(3, 16, 5, 7)
    a = sk.weights(y1, y2)
    assert a.shape == (3, 2, 16, 1, 1)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(3, 16, 1, 1))
    assert (a > 0).all() and a.std() > 0  # genuinely per channel, not a constant 0.5
    torch.testing.assert_close(sk(y1, y2), a[:, 0] * y1 + a[:, 1] * y2)
    assert sk.squeeze[0].out_features == 32  # SKNet's d = max(C / 16, 32)


@pytest.mark.parametrize("dim", [2, 3])
def test_ccapm_is_weighted_sum_of_paths(dim):
    torch.manual_seed(0)
    ccapm = CCAPM(CONV[dim], 8, heads=4, window_size=4)
    assert ccapm.w_conv.item() == 0.5 and ccapm.w_cross.item() == 0.5
    q, k, v = (torch.randn(2, 8, *([8] * dim)) for _ in range(3))
    expected = 0.5 * ccapm.conv_path(q, k, v) + 0.5 * ccapm.attention(q, k, v)
    torch.testing.assert_close(ccapm(q, k, v), expected)
    with torch.no_grad():
        ccapm.w_conv.fill_(0.2)
        ccapm.w_cross.fill_(1.5)
    expected = 0.2 * ccapm.conv_path(q, k, v) + 1.5 * ccapm.attention(q, k, v)
    torch.testing.assert_close(ccapm(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_fam_routes_features_into_the_ccapms():
    """Eq. 6: CCAPM_1 takes its query from X_H and key/value from X_L, CCAPM_2 the reverse."""
    torch.manual_seed(0)
    fam = FeatureAggregationModule(nn.Conv2d, 8, 3, window_size=4)
    x_h, x_l = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8)
    (q1, k1, v1), (q2, k2, v2) = fam.ccapm_inputs(fam.fi_high(x_h), fam.fi_low(x_l))
    (q1b, k1b, v1b), (q2b, k2b, v2b) = fam.ccapm_inputs(fam.fi_high(x_h), fam.fi_low(x_l + 1.0))
    torch.testing.assert_close(q1, q1b)
    torch.testing.assert_close(k2, k2b)
    torch.testing.assert_close(v2, v2b)
    assert not any(torch.allclose(a, b) for a, b in ((k1, k1b), (v1, v1b), (q2, q2b)))
    expected = fam.fuse(fam.ccapm_high(q1, k1, v1), fam.ccapm_low(q2, k2, v2))
    torch.testing.assert_close(fam(x_h, x_l), expected)


@pytest.mark.parametrize("dim", [2, 3])
def test_scrm_equals_its_blocks_in_sequence(dim):
    """The SCRM's fused forward (X_L folded into the FI projection) is FAM(CR(SG(x)))."""
    torch.manual_seed(0)
    scrm = SCRM(CONV[dim], 16, 3, window_size=4)
    x = torch.randn(2, 16, *([8] * dim))
    expected = scrm.fam(*scrm.channel_refinement(scrm.spatial_gate(x)))
    out = scrm(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.is_contiguous()


def assert_every_parameter_has_gradient(module: nn.Module):
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    assert any(p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("dim", [2, 3])
def test_blocks_shapes_and_gradients(dim):
    torch.manual_seed(0)
    shape = SHAPE[dim]
    c = shape[1]
    fi = FeatureInitialize(CONV[dim], 3, c, 3)
    x3 = torch.randn(shape[0], 3, *shape[2:], requires_grad=True)
    y = fi(x3)
    assert y.shape == shape
    y.square().mean().backward()
    assert_every_parameter_has_gradient(fi)
    assert x3.grad.abs().sum() > 0

    fam = FeatureAggregationModule(CONV[dim], c, 3, window_size=4)
    x_h, x_l = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    y = fam(x_h, x_l)
    assert y.shape == shape
    y.square().mean().backward()
    assert_every_parameter_has_gradient(fam)
    assert x_h.grad.abs().sum() > 0 and x_l.grad.abs().sum() > 0

    scrm = SCRM(CONV[dim], c, 3, window_size=4)
    x = torch.randn(shape, requires_grad=True)
    y = scrm(x)
    assert y.shape == shape
    y.square().mean().backward()
    assert_every_parameter_has_gradient(scrm)
    assert scrm.compute_conv_feature_map_size(shape[2:]) > 20 * math.prod(shape[1:])



def test_fam_does_not_depend_on_the_thread_count():
    """The FAM (CCAPM outputs relaid out to the standard layout, SK means over them) is bit-identical with 1 and 2
    threads, value and input gradients; the CCAPM returns a standard-contiguous map."""
    torch.manual_seed(0)
    fam = FeatureAggregationModule(nn.Conv2d, 32, 3)
    x_h, x_l = (torch.randn(2, 32, 32, 32) for _ in range(2))
    assert fam.ccapm_high(*fam.ccapm_inputs(fam.fi_high(x_h), fam.fi_low(x_l))[0]).is_contiguous()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            inputs = [t.clone().requires_grad_() for t in (x_h, x_l)]
            out = fam(*inputs)
            out.square().sum().backward()
            results.append((out, *(t.grad for t in inputs)))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("dim", [2, 3])
def test_relayout_functions_are_identities_with_the_stated_layouts(dim):
    """``_ToStandardLayout``: the same values, standard-contiguous, gradient returned unchanged and channels-last;
    ``_StandardGradientChunks``: the chunks' values, their gradients (channels-last, standard, a channel slice, or
    none: zeros) assembled unchanged and standard-contiguous; ``_relayout`` of a map in neither layout (a channel
    slice) is a plain contiguous copy."""
    shape = SHAPE[dim]
    x = torch.randn(shape[0], *shape[2:], shape[1], dtype=torch.float64).movedim(-1, 1).requires_grad_()
    grad = torch.randn(shape, dtype=torch.float64)
    out = _ToStandardLayout.apply(x)
    assert out.is_contiguous() and torch.equal(out, x)
    out.backward(grad)
    assert x.grad.movedim(1, -1).is_contiguous() and torch.equal(x.grad, grad)

    y = torch.randn(shape[0], 4 * shape[1], *shape[2:], dtype=torch.float64, requires_grad=True)
    chunks = _StandardGradientChunks.apply(y, 4)
    assert len(chunks) == 4 and all(torch.equal(a, b) for a, b in zip(chunks, y.chunk(4, dim=1)))
    grad_last = torch.randn(shape[0], *shape[2:], shape[1], dtype=torch.float64).movedim(-1, 1)
    grad_standard = torch.randn(shape, dtype=torch.float64)
    grad_slice = torch.randn(shape[0], shape[1] + 1, *shape[2:], dtype=torch.float64)[:, 1:]
    torch.autograd.backward(chunks[:3], (grad_last, grad_standard, grad_slice))
    assert y.grad.is_contiguous()
    assert torch.equal(y.grad, torch.cat((grad_last, grad_standard, grad_slice, torch.zeros(shape, dtype=y.dtype)), 1))

    sliced = x.detach()[:, 1:]
    for channels_last in (False, True):
        copy = _relayout(sliced, channels_last)
        assert torch.equal(copy, sliced)
        assert (copy.movedim(1, -1) if channels_last else copy).is_contiguous()


@pytest.mark.parametrize("dim", [2, 3])
def test_recomputing_scrm_keeps_attention_and_conv_outputs(dim):
    """The selective recomputation runs the attention and the dense/grouped convolutions once, as an SCRM that stores
    everything does, and recomputes the rest (the Spatial Gate's group norm runs twice)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func] += 1
            return func(*args, **(kwargs or {}))

    conv_op = (nn.Conv2d, nn.Conv3d)[dim - 2]
    counts = {}
    for recompute in (True, False):
        torch.manual_seed(0)
        scrm = SCRM(conv_op, 8, 3, heads=2, window_size=4, recompute=recompute).train()
        x = torch.randn(1, 8, *([8] * dim), requires_grad=True)
        with CountOps() as mode:
            scrm(x).sum().backward()
        counts[recompute] = mode.counts
    aten = torch.ops.aten
    attention = [op for op in counts[False] if "scaled_dot_product" in str(op) and "backward" not in str(op)]
    assert attention and all(counts[True][op] == counts[False][op] for op in attention)
    assert counts[True][aten.convolution.default] == counts[False][aten.convolution.default] > 0
    assert counts[True][aten.native_group_norm.default] == 2 * counts[False][aten.native_group_norm.default]
