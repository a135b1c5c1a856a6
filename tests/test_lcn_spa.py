"""Blocks of SPA-DCN-Net: gated LCN (Eq. 2-3), spatial pyramid attention, EnhancedDeformConvBlock (Eq. 5-7)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter
from torch import nn

from nnunet_ext.building_blocks.lcn_spa import (LCN_MODES, EnhancedDeformConvBlock, GatedLCN, SpatialPyramidAttention,
                                                local_contrast_normalization)

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
EPS = 1e-3


def lcn_by_hand(x: np.ndarray, window: int) -> np.ndarray:
    """Eq. 2 with explicit windows: mean and (population) std of the in-map positions of each centred window."""
    out = np.zeros_like(x, dtype=np.float64)
    r = window // 2
    for b, c, i, j in np.ndindex(*x.shape):
        patch = x[b, c, max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1].astype(np.float64)
        out[b, c, i, j] = (x[b, c, i, j] - patch.mean()) / np.sqrt(patch.var() + EPS ** 2)
    return out


HAND_BUILT = np.array([[[[0, 1, 2, 3, 4],
                         [2, 2, 2, 2, 2],
                         [9, 0, 9, 0, 9],
                         [1, 1, 5, 1, 1]],
                        [[3, 3, 3, 3, 3],
                         [3, 3, 3, 3, 3],
                         [3, 3, 8, 3, 3],
                         [3, 3, 3, 3, 3]]]], dtype=np.float32)


def test_lcn_equals_eq2_by_hand_single_and_multi_scale():
    x = torch.from_numpy(HAND_BUILT)
    for window in (1, 3, 5):
        expected = lcn_by_hand(HAND_BUILT, window)
        np.testing.assert_allclose(local_contrast_normalization(x, (window,), EPS).numpy(), expected, atol=1e-4)
    # hand value: window 3 at (row 0, col 0) of channel 0 covers [[0, 1], [2, 2]]: mean 1.25, var 0.6875
    corner = local_contrast_normalization(x, (3,), EPS)[0, 0, 0, 0].item()
    assert corner == pytest.approx(-1.25 / np.sqrt(0.6875 + 1e-6))
    multi = (lcn_by_hand(HAND_BUILT, 3) + lcn_by_hand(HAND_BUILT, 5)) / 2
    np.testing.assert_allclose(local_contrast_normalization(x, (3, 5), EPS).numpy(), multi, atol=1e-4)
    # a constant region is 0 (not NaN) and has a finite gradient
    flat = torch.ones(1, 1, 6, 6, requires_grad=True)
    out = local_contrast_normalization(flat, (3,), EPS)
    out.sum().backward()
    assert torch.all(out == 0) and torch.isfinite(flat.grad).all()


def lcn_autograd_reference(x: torch.Tensor, windows, eps: float = EPS) -> torch.Tensor:
    """Eq. 2 written literally with autograd: box means by ``avg_pool`` (positions outside the map not counted)."""
    pool = F.avg_pool2d if x.dim() == 4 else F.avg_pool3d
    out = 0
    for w in windows:
        mean = pool(x, w, 1, w // 2, count_include_pad=False)
        mean_sq = pool(x * x, w, 1, w // 2, count_include_pad=False)
        out = out + (x - mean) / torch.sqrt((mean_sq - mean * mean).clamp_min(0) + eps ** 2)
    return out / len(windows)


@pytest.mark.parametrize("shape,windows", [((2, 3, 20, 17), (7, 15)), ((2, 3, 20, 17), (1, 5)),
                                           ((1, 2, 9, 11, 10), (3, 7)), ((1, 4, 40, 36), (15,))])
def test_lcn_value_and_gradient_equal_the_autograd_definition(shape, windows):
    """The hand-written backward of the LCN (separable box-mean matrices) against autograd through Eq. 2, in fp64;
    the ReLU'd input has flat zero regions (clamped variance)."""
    torch.manual_seed(0)
    for x in (torch.randn(shape, dtype=torch.float64), torch.relu(torch.randn(shape, dtype=torch.float64) - 0.5)):
        x.requires_grad_(True)
        upstream = torch.randn(shape, dtype=torch.float64)
        out = local_contrast_normalization(x, windows, EPS)
        expected = lcn_autograd_reference(x, windows)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        grad, = torch.autograd.grad(out, x, upstream)
        expected_grad, = torch.autograd.grad(expected, x, upstream)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-8)
    small = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: local_contrast_normalization(v, (3, 5), 0.1), (small,))
    # fp32 input is computed in fp32 and stays fp32
    x32 = torch.randn(shape)
    assert local_contrast_normalization(x32, windows).dtype == torch.float32
    torch.testing.assert_close(local_contrast_normalization(x32, windows),
                               lcn_autograd_reference(x32.double(), windows).float(), rtol=1e-4, atol=1e-4)


def test_gated_lcn_equals_eq3_on_hand_built_input():
    x = torch.from_numpy(HAND_BUILT)
    block = GatedLCN(2, nn.Conv2d, windows=(3,), eps=EPS)
    x_lcn = torch.from_numpy(lcn_by_hand(HAND_BUILT, 3)).float()
    # zero-initialised gate convs: G_LCN = sigmoid(0) = 0.5, G_identity = 1 - 0.5
    np.testing.assert_allclose(block(x).detach().numpy(), (0.5 * x_lcn + 0.5 * x).numpy(), atol=1e-4)
    # gates from known 1x1 convs: G_LCN = sigmoid(2 * x_lcn_c - 0.5), G_identity = 1 - sigmoid(-x_c + 1)
    with torch.no_grad():
        block.gate_lcn.weight.copy_(torch.diag(torch.tensor([2.0, 2.0])).view(2, 2, 1, 1))
        block.gate_lcn.bias.fill_(-0.5)
        block.gate_identity.weight.copy_(-torch.eye(2).view(2, 2, 1, 1))
        block.gate_identity.bias.fill_(1.0)
    g_lcn = 1 / (1 + np.exp(-(2 * x_lcn.numpy() - 0.5)))
    g_id = 1 - 1 / (1 + np.exp(-(-HAND_BUILT + 1)))
    np.testing.assert_allclose(block(x).detach().numpy(), g_lcn * x_lcn.numpy() + g_id * HAND_BUILT, atol=1e-4)


@pytest.mark.parametrize("dim", [2, 3])
def test_lcn_gives_local_zero_mean_and_unit_std_and_removes_gain(dim):
    torch.manual_seed(0)
    size = (48, 48) if dim == 2 else (24, 24, 24)
    coords = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij")  # voxels
    gain = 0.5 + 0.02 * coords[0]           # slowly varying gain (depth attenuation / TGC)
    offset = 0.05 * coords[-1]              # slowly varying brightness
    field = (3.0 * (gain * torch.randn(size) + offset) + 2.0)[None, None]
    window = 9
    out = local_contrast_normalization(field, (window,), EPS)[0, 0].double().numpy()
    r = window // 2
    inner = tuple(slice(r, s - r) for s in size)
    local_mean = uniform_filter(out, window)[inner]
    local_std = np.sqrt(uniform_filter(out ** 2, window)[inner] - local_mean ** 2)
    assert np.abs(local_mean).mean() < 0.1
    assert np.abs(local_std - 1).mean() < 0.1
    # the raw field is far from it
    raw = field[0, 0].double().numpy()
    raw_std = np.sqrt(uniform_filter(raw ** 2, window) - uniform_filter(raw, window) ** 2)[inner]
    assert np.abs(uniform_filter(raw, window)[inner]).mean() > 2 and np.abs(raw_std - 1).mean() > 0.5
    # a global brightness/contrast change does not change LCN (up to eps)
    np.testing.assert_allclose(local_contrast_normalization(3.7 * field - 2.0, (window,), EPS)[0, 0].numpy(), out,
                               atol=1e-3)


def test_lcn_refuses_bad_windows_and_shapes():
    with pytest.raises(ValueError, match="odd"):
        local_contrast_normalization(torch.zeros(1, 1, 8, 8), (4,))
    with pytest.raises(ValueError, match="2D or 3D"):
        local_contrast_normalization(torch.zeros(8, 8), (3,))


@pytest.mark.parametrize("dim", [2, 3])
def test_spa_keeps_shape_and_is_x_times_attention(dim):
    torch.manual_seed(0)
    spa = SpatialPyramidAttention(12, CONV[dim], dilations=(1, 2, 4)).eval()
    x = torch.randn(2, 12, *([10] * dim))
    out = spa(x)
    assert out.shape == x.shape
    attention = spa.attention(x)
    assert attention.shape == x.shape and torch.all((attention > 0) & (attention < 1))
    torch.testing.assert_close(out, x * attention)
    assert [b[0].dilation for b in spa.branches] == [(d,) * dim for d in (1, 2, 4)]
    assert all(b[0].out_channels == 8 for b in spa.branches)  # max(12 // 4, 8)


def block_parameters_by_hand(c_in: int, c_out: int, dim: int) -> int:
    k = 3 ** dim
    c_b = max(c_in // 4, 8)
    gates = 2 * (c_in * c_in + c_in)
    spa = 3 * (k * c_in * c_b + 2 * c_b) + 3 * c_b * c_in + c_in
    dcn = k * c_in * c_out + (k * c_in + 1) * (dim + 1) * k  # kernel (no bias) + offset/mask conv
    return gates + spa + dcn + 2 * c_out


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("lcn_mode", LCN_MODES)
def test_block_shapes_parameters_and_modes(dim, lcn_mode):
    torch.manual_seed(0)
    block = EnhancedDeformConvBlock(16, 6, CONV[dim], lcn_mode=lcn_mode, lcn_windows=(3, 5))
    x = torch.randn(2, 16, *([8] * dim))
    assert block(x).shape == (2, 6, *([8] * dim))
    gate_parameters = 2 * (16 * 16 + 16) if lcn_mode == "gated" else 0
    expected = block_parameters_by_hand(16, 6, dim) - 2 * (16 * 16 + 16) + gate_parameters
    assert sum(p.numel() for p in block.parameters()) == expected
    block.eval()
    with torch.no_grad():
        guide = {"gated": lambda: block.spa(block.lcn(x)),
                 "before_spa": lambda: block.spa(local_contrast_normalization(x, (3, 5))),
                 "after_spa": lambda: local_contrast_normalization(block.spa(x), (3, 5)),
                 "none": lambda: block.spa(x)}[lcn_mode]()
        torch.testing.assert_close(block.guide(x), guide)
    assert (block.lcn is None) == (lcn_mode == "none")


def pre_norm_output(block: EnhancedDeformConvBlock, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = block.norm.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    block(x)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("dim,backend", [(2, "auto"), (2, "cpp"), (2, "generic"), (2, "torchvision"), (3, "auto"),
                                         (3, "generic")])
def test_zero_offsets_dcn_equals_plain_conv_with_the_same_kernel(dim, backend):
    torch.manual_seed(0)
    block = EnhancedDeformConvBlock(5, 4, CONV[dim], dcn_backend=backend).eval()
    x = torch.randn(2, 5, *([7] * dim))
    conv = F.conv2d if dim == 2 else F.conv3d
    plain = conv(x, block.dcn.dcn.weight, padding=1)
    with torch.no_grad():
        # at initialisation: offsets 0 and mask sigmoid(0) = 0.5 -> half the plain conv
        torch.testing.assert_close(pre_norm_output(block, x), 0.5 * plain, atol=1e-5, rtol=1e-5)
        # mask logits +30 (mask 1), offsets still 0: exactly the plain conv
        block.dcn.offset_conv.bias[block.dcn.n_offset_channels:] = 30.0
        torch.testing.assert_close(pre_norm_output(block, x), plain, atol=1e-5, rtol=1e-5)
        # an integer offset of +1 along the last axis for every kernel point = the plain conv of the shifted input
        block.dcn.offset_conv.bias[dim - 1:block.dcn.n_offset_channels:dim] = 1.0
        # (kernel point t samples x[j + t + 1]: an unpadded conv over x padded by 0 before and 2 after that axis)
        padded = F.pad(x, (0, 2) + (1, 1) * (dim - 1))
        torch.testing.assert_close(pre_norm_output(block, x), conv(padded, block.dcn.dcn.weight),
                                   atol=1e-5, rtol=1e-5)


def test_every_parameter_gets_a_gradient_and_lcn_spa_learn_after_one_step():
    torch.manual_seed(0)
    block = EnhancedDeformConvBlock(8, 8, nn.Conv2d)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    x, target = torch.randn(2, 8, 12, 12), torch.randn(2, 8, 12, 12)
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(block(x), target).backward()
        assert all(p.grad is not None for p in block.parameters())
        upstream = [p.grad for n, p in block.named_parameters() if n.startswith(("lcn.", "spa."))]
        if step == 0:  # they reach the output only through the zero-initialised offset/mask conv
            assert all(torch.all(g == 0) for g in upstream)
            assert block.dcn.offset_conv.weight.grad.abs().sum() > 0
        else:
            assert all(g.abs().sum() > 0 for g in upstream)
        optimizer.step()


def test_block_refuses_bad_options():
    with pytest.raises(ValueError, match="lcn_mode"):
        EnhancedDeformConvBlock(4, 4, lcn_mode="gated_after")
    with pytest.raises(ValueError, match="torchvision only has a 2D"):
        EnhancedDeformConvBlock(4, 4, nn.Conv3d, dcn_backend="torchvision")
