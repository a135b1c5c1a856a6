"""DPC-Net's SpaCor and SemCor blocks: the reordered computation (``pyramid_correlation``) against a literal
implementation of the paper's equations, values and gradients in double precision (and gradcheck), 2D and 3D, one
or several channel chunks, factor-2, stride-1 and non-integer resolution ratios; the squeeze and the attention
resampling both with their compiled CPU kernels and on the PyTorch path."""
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.nn import functional as F

from nnunet_ext.building_blocks import pyramid_correlation as pc

LINEAR = {2: "bilinear", 3: "trilinear"}
# (coarse size, fine size): nnU-Net's factor 2, an axis kept (stride 1), and non-integer ratios
SIZES = [((3, 5), (6, 10)), ((3, 4), (7, 9)), ((2, 2, 3), (4, 4, 6)), ((2, 2, 3), (2, 4, 5))]
# the attention resampling needs integer ratios (nnU-Net's strides): factor 2, an axis kept, factor 3
INTEGER_SIZES = [((3, 5), (6, 10)), ((2, 3), (6, 3)), ((2, 2, 3), (4, 4, 6)), ((2, 3, 2), (2, 6, 6))]


def reference_squeeze(high, low):
    """Eq. 5 literally: concatenate [up(F_i), F_{i-1}], channel average + channel maximum."""
    up = F.interpolate(high, size=low.shape[2:], mode=LINEAR[low.ndim - 2], align_corners=False)
    cat = torch.cat((up, low), dim=1)
    return cat.mean(1, keepdim=True) + cat.amax(1, keepdim=True)


def reference_resample(attention, coarse):
    """Eq. 6 with g_spa already applied, literally: area(attention * up(G)) back to G's size."""
    up = F.interpolate(coarse, size=attention.shape[2:], mode=LINEAR[coarse.ndim - 2], align_corners=False)
    return F.interpolate(attention * up, size=coarse.shape[2:], mode="area")


def reference_spacor(module: pc.SpatialCorrelation, high, low):
    """SpaCor (Eq. 4-6) as written: g_spa on the upsampled F_i, product at F_{i-1}'s size, area back."""
    up = F.interpolate(high, size=low.shape[2:], mode=LINEAR[low.ndim - 2], align_corners=False)
    attention = torch.sigmoid(module.f_spa(reference_squeeze(high, low)))
    return F.interpolate(attention * module.g_spa(up), size=high.shape[2:], mode="area")


def reference_semcor_logits(module: pc.SemanticCorrelation, x, higher, head):
    """SemCor (Eq. 7-9) as written, then the level's 1x1 head: head(sigmoid(f_sem(T)) * g_sem(X))."""
    axes = tuple(range(2, x.ndim))
    squeeze = torch.cat((x.mean(axes), higher.mean(axes), x.amax(axes), higher.amax(axes)), dim=1)
    attention = torch.sigmoid(module.f_sem(squeeze))
    return head(attention.view(*attention.shape, *([1] * len(axes))) * module.g_sem(x))


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and biases (He init leaves biases at zero, which would hide bias errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)
    return module


def assert_values_and_gradients_equal(function, reference, inputs):
    """``function(*inputs)`` equals ``reference(*inputs)`` in value and in the gradient of every input for one random
    output gradient (double precision, 1e-12); returns ``function``'s output."""
    ours = function(*inputs)
    expected = reference(*inputs)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(expected, inputs, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    return ours


def use_path(path: str, monkeypatch, chunk_elements: int = pc.CHUNK_ELEMENTS) -> None:
    """``"compiled"``: the squeeze and the attention resampling run their compiled CPU kernels (which must build
    here); ``"pytorch"``: both run their PyTorch path, the squeeze by channel chunks of ``chunk_elements``."""
    if path == "compiled":
        assert pc.squeeze_kernel_available() and pc.attention_resample_kernel_available()
    else:
        monkeypatch.setattr(pc, "squeeze_kernel_available", lambda: False)
        monkeypatch.setattr(pc, "attention_resample_kernel_available", lambda: False)
        monkeypatch.setattr(pc, "CHUNK_ELEMENTS", chunk_elements)


@pytest.fixture(params=["compiled", "pytorch"])
def path(request, monkeypatch):
    use_path(request.param, monkeypatch)
    return request.param


@pytest.mark.parametrize("coarse,fine", SIZES)
@pytest.mark.parametrize("variant, chunk_elements", [("compiled", None), ("pytorch", pc.CHUNK_ELEMENTS),
                                                     ("pytorch", 50)],
                         ids=["compiled", "pytorch-one-chunk", "pytorch-chunks-of-50-elements"])
def test_squeeze_equals_eq5(coarse, fine, variant, chunk_elements, monkeypatch):
    use_path(variant, monkeypatch, chunk_elements)
    torch.manual_seed(0)
    high = torch.randn(2, 5, *coarse, dtype=torch.float64, requires_grad=True)
    low = torch.randn(2, 3, *fine, dtype=torch.float64, requires_grad=True)
    ours = assert_values_and_gradients_equal(pc.upsampled_channel_squeeze, reference_squeeze, (high, low))
    assert ours.shape == (2, 1, *fine)


def test_squeeze_maximum_by_hand(path):
    """1D-like 2D case: high (1 channel, 1x2) upsamples to [a, .75a+.25b, .25a+.75b, b] along x."""
    high = torch.tensor([[[[0.0, 4.0]]]])
    low = torch.tensor([[[[2.0, 2.0, 2.0, 2.0]]]])
    # up(high) = [0, 1, 3, 4]; average of [up, low] = [1, 1.5, 2.5, 3]; maximum = [2, 2, 3, 4]
    expected = torch.tensor([[[[3.0, 3.5, 5.5, 7.0]]]])
    torch.testing.assert_close(pc.upsampled_channel_squeeze(high, low), expected)


@pytest.mark.parametrize("variant, chunk_elements", [("compiled", None), ("pytorch", pc.CHUNK_ELEMENTS),
                                                     ("pytorch", 1)],
                         ids=["compiled", "pytorch-one-chunk", "pytorch-one-channel-chunks"])
def test_squeeze_maximum_tie_goes_to_the_first_channel(variant, chunk_elements, monkeypatch):
    """Two equal channels of F_i tie for the maximum everywhere: as ``torch.max`` of the concatenation, the maximum's
    gradient goes to the first one only, also when the channels are in different chunks."""
    use_path(variant, monkeypatch, chunk_elements)
    torch.manual_seed(5)
    channel = torch.randn(1, 1, 2, 3, 4, dtype=torch.float64)
    high = channel.repeat(1, 2, 1, 1, 1).requires_grad_()
    low = torch.full((1, 3, 4, 6, 8), -100.0, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(1, 1, 4, 6, 8, dtype=torch.float64)
    grad_high, = torch.autograd.grad(pc.upsampled_channel_squeeze(high, low), high, grad)
    probe = channel.clone().requires_grad_()
    up = F.interpolate(probe, size=(4, 6, 8), mode="trilinear", align_corners=False)
    mean_part, = torch.autograd.grad(up, probe, grad / 5)
    max_part, = torch.autograd.grad(up, probe, grad)
    torch.testing.assert_close(grad_high[:, 1:], mean_part, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_high[:, :1], mean_part + max_part, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("coarse,fine", INTEGER_SIZES)
def test_attention_resample_equals_the_product_and_passes_gradcheck(coarse, fine, path):
    torch.manual_seed(1)
    attention = torch.rand(2, 1, *fine, dtype=torch.float64, requires_grad=True)
    coarse_feature = torch.randn(2, 4, *coarse, dtype=torch.float64, requires_grad=True)
    ours = assert_values_and_gradients_equal(pc.attention_resample, reference_resample, (attention, coarse_feature))
    assert ours.shape == coarse_feature.shape
    assert gradcheck(pc.attention_resample, (attention, coarse_feature), fast_mode=True)


def test_attention_resample_refuses_a_non_integer_ratio(path):
    with pytest.raises(ValueError, match="integer multiple"):
        pc.attention_resample(torch.rand(1, 1, 7, 9), torch.randn(1, 2, 3, 4))


@pytest.mark.parametrize("coarse,fine", [SIZES[1], SIZES[3]], ids=["2d", "3d"])
@pytest.mark.parametrize("variant", ["compiled", "pytorch"])
def test_squeeze_passes_gradcheck(coarse, fine, variant, monkeypatch):
    use_path(variant, monkeypatch, chunk_elements=50)  # PyTorch path: one channel per chunk
    torch.manual_seed(4)
    high = torch.randn(2, 3, *coarse, dtype=torch.float64, requires_grad=True)
    low = torch.randn(2, 2, *fine, dtype=torch.float64, requires_grad=True)
    assert gradcheck(pc.upsampled_channel_squeeze, (high, low), fast_mode=True)


@pytest.mark.parametrize("kernel", [(3, 3, 3), (1, 3, 3), (3, 3), (5, 3)])
def test_one_channel_convolutions_equal_the_convolution(kernel):
    """f_spa's first (1 -> C) and last (C -> 1) layers: im2col + matrix product and matrix product + shifted sum
    against the convolution module itself, values and gradients of input, weight and bias (double)."""
    conv_op = nn.Conv2d if len(kernel) == 2 else nn.Conv3d
    padding = [(k - 1) // 2 for k in kernel]
    torch.manual_seed(6)
    size = (5, 6, 7)[:len(kernel)]
    for function, conv, channels in ((pc.conv_from_one_channel, conv_op(1, 4, kernel, padding=padding), 1),
                                     (pc.conv_to_one_channel, conv_op(4, 1, kernel, padding=padding), 4)):
        conv = randomise(conv, 7).double()
        x = torch.randn(2, channels, *size, dtype=torch.float64, requires_grad=True)
        ours, expected = function(x, conv), conv(x)
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(ours)
        leaves = (x, conv.weight, conv.bias)
        for a, b in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(expected, leaves, grad),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [2, 3])
def test_first_layer_keeps_only_its_one_channel_input_for_backward(dim):
    """``f_spa``'s first layer keeps its one-channel input and weight (``saved_tensors_hooks``), not the ``K``-tap
    im2col (27 times the input in 3D), and stacks the taps again in backward: same gradients as the convolution."""
    torch.manual_seed(8)
    conv_op = nn.Conv2d if dim == 2 else nn.Conv3d
    conv = conv_op(1, 8, 3, padding=1).double()
    x = torch.randn(2, 1, *(12,) * dim, dtype=torch.float64, requires_grad=True)
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), tuple(t.shape))] = t.numel()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = pc.conv_from_one_channel(x, conv)
    assert sum(saved.values()) == x.numel() + conv.weight.numel()
    grad = torch.randn_like(out)
    leaves = (x, conv.weight, conv.bias)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(conv(x), leaves, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_shared_input_heads_equal_separate_heads():
    """Two 1x1 heads of one map (a shared ``(K, C)`` one and a per-sample ``(B, K, C)`` one) as one matrix product:
    the logits and the gradients of the map, weights and biases of the heads applied separately (double)."""
    torch.manual_seed(9)
    x = torch.randn(2, 5, 4, 6, 3, dtype=torch.float64, requires_grad=True)
    shared = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),
              torch.randn(3, dtype=torch.float64, requires_grad=True))
    per_sample = (torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True),
                  torch.randn(2, 2, dtype=torch.float64, requires_grad=True))
    ours = pc.shared_input_heads(x, [per_sample, shared])
    expected = [torch.einsum("bkc,bc...->bk...", per_sample[0], x) + per_sample[1].view(2, 2, 1, 1, 1),
                F.conv3d(x, shared[0].view(3, 5, 1, 1, 1), shared[1])]
    leaves = (x, *shared, *per_sample)
    weights = [torch.randn_like(e) for e in expected]
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b)

    def grads(outputs):
        return torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)), leaves)
    for a, b in zip(grads(ours), grads(expected), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (2, 3, 3, 4, 5)])
def test_spatial_avg_max_by_value_and_gradcheck(shape):
    torch.manual_seed(2)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    axes = tuple(range(2, x.ndim))
    torch.testing.assert_close(pc.spatial_avg_max(x), torch.cat((x.mean(axes), x.amax(axes)), dim=1))
    assert gradcheck(pc.spatial_avg_max, (x,), fast_mode=True)


@pytest.mark.parametrize("dim", [2, 3])
def test_spacor_and_semcor_modules_equal_the_equations(dim, path):
    """Values and gradients of every parameter and input against the literal equations, random weights."""
    conv_op = nn.Conv2d if dim == 2 else nn.Conv3d
    torch.manual_seed(3)
    spacor = randomise(pc.SpatialCorrelation(conv_op, 6, 4, 3, nn.LeakyReLU), 0).double()
    semcor = randomise(pc.SemanticCorrelation(conv_op, 4, 6, nn.LeakyReLU), 1).double()
    head = randomise(conv_op(4, 3, 1), 2).double()
    high = torch.randn(2, 6, *(4,) * dim, dtype=torch.float64, requires_grad=True)
    low = torch.randn(2, 4, *(8,) * dim, dtype=torch.float64, requires_grad=True)

    def outputs(spa_fn, sem_fn):
        spa = spa_fn(spacor, high, low)
        return spa, sem_fn(semcor, low, spa, head)
    ours = outputs(pc.SpatialCorrelation.forward, pc.SemanticCorrelation.forward)
    reference = outputs(reference_spacor, reference_semcor_logits)
    assert ours[1].shape == (2, 3, *(8,) * dim)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    leaves = [high, low, *spacor.parameters(), *semcor.parameters(), *head.parameters()]
    weights = [torch.randn_like(o) for o in ours]

    def grads(outs):
        return torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), leaves)
    for a, b in zip(grads(ours), grads(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# float32 shapes like the benchmark plan's levels, small: factor 2 on every axis, an axis kept (ratio 1), 2D, odd sizes
FLOAT32_SIZES = [((4, 6, 8), (8, 12, 16)), ((3, 6, 8), (3, 12, 16)), ((6, 10), (12, 20)), ((3, 5, 7), (6, 10, 14))]


@pytest.mark.parametrize("coarse,fine", FLOAT32_SIZES)
def test_compiled_kernels_match_the_pytorch_path_in_float32(coarse, fine, monkeypatch):
    """The squeeze's value and argmax routing (through its gradient) and the resampling's value and gradients, with
    the kernels and on the PyTorch path, float32 (rounding differs only in the order of the sums)."""
    torch.manual_seed(6)
    high = torch.randn(2, 8, *coarse, requires_grad=True)
    low = torch.randn(2, 4, *fine, requires_grad=True)
    attention = torch.rand(2, 1, *fine, requires_grad=True)

    def run():
        squeezed = pc.upsampled_channel_squeeze(high, low)
        resampled = pc.attention_resample(attention, high)
        grads = torch.autograd.grad((squeezed * 1.5).sum() + (resampled * resampled).sum(), (high, low, attention))
        return squeezed, resampled, *grads
    use_path("compiled", monkeypatch)
    compiled = run()
    monkeypatch.undo()
    use_path("pytorch", monkeypatch)
    for a, b in zip(compiled, run(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_kernels_give_the_same_bits_with_1_and_2_threads(monkeypatch):
    use_path("compiled", monkeypatch)
    torch.manual_seed(7)
    high = torch.randn(2, 16, 4, 8, 8, requires_grad=True)
    low = torch.randn(2, 8, 8, 16, 16, requires_grad=True)
    attention = torch.rand(2, 1, 8, 16, 16, requires_grad=True)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            squeezed = pc.upsampled_channel_squeeze(high, low)
            resampled = pc.attention_resample(attention, high)
            grads = torch.autograd.grad(squeezed.sum() + (resampled * resampled).sum(), (high, low, attention))
            results.append((squeezed, resampled, *grads))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
