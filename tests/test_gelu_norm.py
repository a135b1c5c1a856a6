"""``gelu_group_norm`` (the compiled GELU + instance-norm pass) equals ``nn.GroupNorm(C, C)(F.gelu(z))``."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.building_blocks import gelu_norm
from nnunet_ext.building_blocks.gelu_norm import _GeluInstanceNormCPU, gelu_group_norm


@pytest.fixture(autouse=True)
def kernel_on_small_maps(monkeypatch):
    """The tests' maps are small: the kernel runs on them (in use it only runs on maps of at least ``MIN_PLANE``)."""
    monkeypatch.setattr(gelu_norm, "MIN_PLANE", 1)


def _norm(channels: int, dtype=torch.float64) -> nn.GroupNorm:
    norm = nn.GroupNorm(channels, channels).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


@pytest.mark.parametrize("shape", [(3, 4, 7, 9), (2, 3, 5, 4, 6), (1, 2, 1, 2)])
def test_equals_group_norm_of_gelu(shape):
    """Values and gradients (input, weight, bias) against autograd through ``F.gelu`` and ``nn.GroupNorm``, 2D and
    3D, float64."""
    torch.manual_seed(0)
    norm = _norm(shape[1])
    z = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = gelu_group_norm(z, norm)
    grad = torch.randn_like(y)
    ours = (y, *torch.autograd.grad(y, (z, norm.weight, norm.bias), grad))
    y_ref = norm(F.gelu(z))
    theirs = (y_ref, *torch.autograd.grad(y_ref, (z, norm.weight, norm.bias), grad))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(3, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _GeluInstanceNormCPU.apply(*t, 1e-5), (z, gamma, beta))


def test_same_bits_with_1_and_2_threads():
    torch.manual_seed(0)
    norm = _norm(6, torch.float32)
    z = torch.randn(3, 6, 40, 70, requires_grad=True)
    grad = torch.randn(3, 6, 40, 70)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = gelu_group_norm(z, norm)
            results.append((y, *torch.autograd.grad(y, (z, norm.weight, norm.bias), grad)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_single_value_planes_are_refused_like_group_norm():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        gelu_group_norm(torch.randn(1, 2, 1, 1), nn.GroupNorm(2, 2))
