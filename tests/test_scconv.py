"""Spatial Gate and Channel Refinement (SCRNet Eq. 1-5): hand-computed gate values, shapes, gradients (2D/3D)."""
import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ext.building_blocks.scconv import FOLD_MAX_CHANNELS, ChannelRefinement, SpatialGate

CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def hand_built_gate(threshold: float):
    """4 channels x 2 pixels, channel c = [c + 1, -(c + 1)]: GroupNorm with one channel per group normalises every
    channel to [1, -1]; with gamma = [1, 2, 3, 2] (sum 8), beta = 0: W = sigmoid(+-gamma^2 / 8)."""
    gate = SpatialGate(4, group_num=4, gate_threshold=threshold)
    with torch.no_grad():
        gate.gn.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 2.0]))
        gate.gn.bias.zero_()
    x = torch.tensor([[c + 1.0, -(c + 1.0)] for c in range(4)]).view(1, 4, 1, 2)
    gamma = np.array([1.0, 2.0, 3.0, 2.0])
    w = 1 / (1 + np.exp(-(gamma ** 2 / 8)[:, None] * np.array([1.0, -1.0])[None]))  # (4, 2)
    return gate, x, w


@pytest.mark.parametrize("threshold", [0.5, 0.6])
def test_spatial_gate_threshold_and_reconstruction_by_hand(threshold):
    gate, x, w = hand_built_gate(threshold)
    w1_expected = np.where(w > threshold, 1.0, w)
    w2_expected = np.where(w > threshold, 0.0, w)
    w1, w2 = gate.gate_weights(x)
    np.testing.assert_allclose(w1.detach().numpy().reshape(4, 2), w1_expected, atol=1e-5)
    np.testing.assert_allclose(w2.detach().numpy().reshape(4, 2), w2_expected, atol=1e-5)
    # threshold 0.5: every positive pixel is informative (W1 = 1, W2 = 0), every negative one keeps W in both;
    # threshold 0.6: sigmoid(1/8) = 0.531 of channel 0 falls under it
    assert (w1_expected == 1).sum() == (4 if threshold == 0.5 else 3)
    xv = x.numpy().reshape(4, 2)
    xw1, xw2 = w1_expected * xv, w2_expected * xv
    expected = np.concatenate([xw1[:2] + xw2[2:], xw1[2:] + xw2[:2]])  # Eq. 3: cat(X_w1^1 + X_w2^2, X_w1^2 + X_w2^1)
    np.testing.assert_allclose(gate(x).detach().numpy().reshape(4, 2), expected, atol=1e-4)


def test_spatial_gate_values_by_hand():
    """Channel 2, first pixel: W = sigmoid(9/8) > 0.5 -> W1 = 1; output channel 0 = X_w1[0] + X_w2[2]."""
    gate, x, w = hand_built_gate(0.5)
    out = gate(x).detach().numpy().reshape(4, 2)
    assert out[0, 0] == pytest.approx(1.0 * 1 + 0.0 * 3, abs=1e-4)  # both above threshold: W1 = 1, W2 = 0
    assert out[0, 1] == pytest.approx(w[0, 1] * -1 + w[2, 1] * -3, abs=1e-4)  # both below: W1 = W2 = W


def test_spatial_gate_rejects_odd_channels():
    with pytest.raises(ValueError, match="even"):
        SpatialGate(5)


@pytest.mark.parametrize("dim", [2, 3])
def test_spatial_gate_shape_and_gradient(dim):
    torch.manual_seed(0)
    gate = SpatialGate(16)
    x = torch.randn(2, 16, *([8] * dim), requires_grad=True)
    y = gate(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())


@pytest.mark.parametrize("dim, channels", [(2, 32), (3, 16), (2, 4)])
def test_channel_refinement_shapes_split_and_gradient(dim, channels):
    torch.manual_seed(0)
    cr = ChannelRefinement(CONV[dim], channels, 3)
    x = torch.randn(2, channels, *([6] * dim), requires_grad=True)
    x_h, x_l = cr(x)
    assert x_h.shape == x_l.shape == x.shape
    # Eq. 5: X_L starts with X_C2 = 1x1 squeeze of the second half of the channels
    x_c2 = cr.squeeze_low(x[:, channels // 2:])
    torch.testing.assert_close(x_l[:, :x_c2.shape[1]], x_c2)
    assert cr.squeeze_high.out_channels == channels // 4 and cr.gwc.groups == min(2, channels // 4)
    (x_h.sum() + x_l.square().sum()).backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in cr.parameters())


@pytest.mark.parametrize("dim", [2, 3])
def test_projection_of_x_l_from_x_c2_equals_projection_of_x_l(dim):
    """Eq. 5 folded into a following 1x1 conv: P cat(X_C2, PWC(X_C2)) = (P_1 + P_2 W_pwc) X_C2 (+ bias)."""
    torch.manual_seed(0)
    cr = ChannelRefinement(CONV[dim], 16, 3)
    projection = CONV[dim](16, 24, 1)
    x = torch.randn(2, 16, *([5] * dim))
    x_h, x_l = cr(x)
    x_h2, x_c2 = cr.high_and_squeezed_low(x[:, :8], x[:, 8:])
    torch.testing.assert_close(x_h2, x_h)
    assert x_c2.shape[1] == 4
    torch.testing.assert_close(cr.project_low(x_c2, projection), projection(x_l), atol=1e-5, rtol=1e-5)


def test_spatial_gate_halves_are_the_reconstruction():
    torch.manual_seed(0)
    gate = SpatialGate(8)
    x = torch.randn(2, 8, 4, 4)
    w1, w2 = gate.gate_weights(x)
    x_w1, x_w2 = w1 * x, w2 * x
    up, low = gate.halves(x)
    torch.testing.assert_close(up, x_w1[:, :4] + x_w2[:, 4:])
    torch.testing.assert_close(low, x_w1[:, 4:] + x_w2[:, :4])



@pytest.mark.parametrize("dim, channels, kernel", [(2, 32, 3), (2, 80, 3), (3, 16, [1, 3, 3]), (3, 72, 3)])
def test_high_branch_equals_gwc_plus_pwc_in_value_and_gradient(dim, channels, kernel):
    """Eq. 4, ``X_H = GWC(X_C1) + PWC(X_C1)``, against the two literal convs in float64, with the parameters'
    gradients: up to ``FOLD_MAX_CHANNELS`` squeezed channels (8, 4) as one folded dense conv, above (20, 18) as
    two convs."""
    torch.manual_seed(0)
    cr = ChannelRefinement(CONV[dim], channels, kernel).double()
    assert (cr.squeeze_high.out_channels <= FOLD_MAX_CHANNELS) == (channels < 64)
    x = torch.randn(2, channels, *([5] * dim), dtype=torch.float64)
    grad = torch.randn(2, channels, *([5] * dim), dtype=torch.float64)
    params = [cr.squeeze_high.weight, cr.gwc.weight, cr.gwc.bias, cr.pwc_high.weight]
    x_h = cr.high_and_squeezed_low(x[:, :channels // 2], x[:, channels // 2:])[0]
    x_c1 = cr.squeeze_high(x[:, :channels // 2])
    expected = cr.gwc(x_c1) + cr.pwc_high(x_c1)
    torch.testing.assert_close(x_h, expected, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(torch.autograd.grad(x_h, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [2, 3])
def test_spatial_gate_equals_eq1_with_the_group_norm_module_in_value_and_gradient(dim):
    """Eq. 1 literally, ``sigmoid(GN(X) * gamma / sum(gamma))`` with the ``nn.GroupNorm`` module, against the gate's
    folded affine map, in float64 (values away from the threshold, so the masks agree)."""
    torch.manual_seed(0)
    gate = SpatialGate(8).double()
    with torch.no_grad():
        gate.gn.weight.uniform_(0.5, 1.5)
        gate.gn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, *([4] * dim), dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    w = gate._gate(x)[0]
    w_gamma = (gate.gn.weight / gate.gn.weight.sum()).view(1, -1, *([1] * dim))
    expected = torch.sigmoid(gate.gn(x) * w_gamma)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    inputs = [x, gate.gn.weight, gate.gn.bias]
    for g, g_ref in zip(torch.autograd.grad(w, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
