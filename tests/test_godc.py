"""Tests for the GODC Dice loss (nnunet_ext.losses.godc). Expected numbers are computed by hand."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1

from nnunet_ext.losses import GODCDiceLoss, deep_supervision_weights
from nnunet_ext.losses import godc as godc_module

SPATIAL_16 = {'2d': (4, 4), '3d': (2, 2, 4)}  # 16 voxels
SPATIAL_4 = {'2d': (2, 2), '3d': (1, 2, 2)}   # 4 voxels


def godc(do_bg=True, smooth=0., apply_nonlin=None, ddp=False):
    return GODCDiceLoss(apply_nonlin=apply_nonlin, batch_dice=False, do_bg=do_bg, smooth=smooth, ddp=ddp)


def flat_map(n, values):
    """Length-n vector with the given {index_range: value} entries, rest 0."""
    v = torch.zeros(n, dtype=torch.float64)
    for (a, b), val in values.items():
        v[a:b] = val
    return v


# --------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dim', ['2d', '3d'])
def test_equal_unions_reduce_to_plain_per_sample_dice(dim):
    sp = SPATIAL_16[dim]
    # class 0: a: G on 0-3, P=.5 there            -> I=2, SP=2, SG=4, U=4, DC=4/6
    #          b: G on 0-2, P=1 on 0-3            -> I=3, SP=4, SG=3, U=4, DC=6/7
    # class 1: a: G on 8-15, P=.75 there          -> I=6, SP=6, SG=8, U=8, DC=12/14
    #          b: G on 4-7, P=1 on 4-11           -> I=4, SP=8, SG=4, U=8, DC=8/12
    P = torch.stack([
        torch.stack([flat_map(16, {(0, 4): .5}), flat_map(16, {(8, 16): .75})]),
        torch.stack([flat_map(16, {(0, 4): 1.}), flat_map(16, {(4, 12): 1.})]),
    ]).reshape(2, 2, *sp).float().requires_grad_(True)
    G = torch.stack([
        torch.stack([flat_map(16, {(0, 4): 1.}), flat_map(16, {(8, 16): 1.})]),
        torch.stack([flat_map(16, {(0, 3): 1.}), flat_map(16, {(4, 8): 1.})]),
    ]).reshape(2, 2, *sp).float()

    loss_fn = godc(do_bg=True)
    dc, w, u = loss_fn.compute_terms(P, G)
    torch.testing.assert_close(u, torch.tensor([[4., 8.], [4., 8.]]))
    torch.testing.assert_close(w, torch.ones(2, 2))
    torch.testing.assert_close(dc, torch.tensor([[4 / 6, 12 / 14], [6 / 7, 8 / 12]]))

    expected_plain = 1 - (4 / 6 + 12 / 14 + 6 / 7 + 8 / 12) / 4  # = 5/21
    val = loss_fn(P, G)
    assert abs(val.item() - (expected_plain - 1)) < 1e-6
    assert abs(expected_plain - 5 / 21) < 1e-12

    # same value and gradient as nnU-Net's per-sample soft Dice
    g_godc, = torch.autograd.grad(val, P)
    plain = MemoryEfficientSoftDiceLoss(apply_nonlin=None, batch_dice=False, do_bg=True, smooth=0., ddp=False)
    val_plain = plain(P, G)
    g_plain, = torch.autograd.grad(val_plain, P)
    torch.testing.assert_close(val, val_plain)
    torch.testing.assert_close(g_godc, g_plain)


def tiny_case(dim):
    """2 samples, 4 voxels, 2 channels (bg, fg) as probabilities + label map."""
    sp = SPATIAL_4[dim]
    fg = torch.tensor([[0.5, 0.5, 0., 0.], [1., 1., 0.5, 0.]])
    lab = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    P = torch.stack([1 - fg, fg], 1).reshape(2, 2, *sp).requires_grad_(True)
    y = lab.reshape(2, 1, *sp)
    return P, y


@pytest.mark.parametrize('dim', ['2d', '3d'])
def test_hand_computed_tiny_case_do_bg_false(dim):
    P, y = tiny_case(dim)
    # fg, sample 0: I=.5, SP=1, SG=1, U=1.5, DC=1/(2)=.5
    # fg, sample 1: I=2.5, SP=2.5, SG=3, U=3, DC=5/5.5=10/11
    # mean U = 2.25 -> w = [2/3, 4/3]
    loss_fn = godc(do_bg=False)
    dc, w, u = loss_fn.compute_terms(P, y)
    torch.testing.assert_close(u, torch.tensor([[1.5], [3.]]))
    torch.testing.assert_close(dc, torch.tensor([[0.5], [10 / 11]]))
    torch.testing.assert_close(w, torch.tensor([[2 / 3], [4 / 3]]))
    expected = (2 / 3 * 0.5 + 4 / 3 * (1 / 11)) / 2  # = 5/22
    assert abs(expected - 5 / 22) < 1e-12
    assert abs(loss_fn(P, y).item() - (expected - 1)) < 1e-6
    # plain per-sample Dice differs here (weights are not 1)
    plain = 1 - (0.5 + 10 / 11) / 2
    assert abs(plain - expected) > 0.05


@pytest.mark.parametrize('dim', ['2d', '3d'])
def test_hand_computed_tiny_case_do_bg_true(dim):
    P, y = tiny_case(dim)
    # bg, sample 0: Pbg=[.5,.5,1,1], Gbg=[0,1,1,1]: I=2.5, SP=3, SG=3, U=3.5, DC=5/6
    # bg, sample 1: Pbg=[0,0,.5,1],  Gbg=[0,0,0,1]: I=1,   SP=1.5, SG=1, U=1.5, DC=2/2.5=.8
    # mean U = 2.5 -> w_bg = [1.4, .6]; fg as in the do_bg=False case
    loss_fn = godc(do_bg=True)
    dc, w, u = loss_fn.compute_terms(P, y)
    torch.testing.assert_close(u, torch.tensor([[3.5, 1.5], [1.5, 3.]]))
    torch.testing.assert_close(w, torch.tensor([[1.4, 2 / 3], [0.6, 4 / 3]]))
    torch.testing.assert_close(dc, torch.tensor([[5 / 6, 0.5], [0.8, 10 / 11]]))
    expected = (1.4 * (1 / 6) + 0.6 * 0.2 + 2 / 3 * 0.5 + 4 / 3 * (1 / 11)) / 4
    assert abs(loss_fn(P, y).item() - (expected - 1)) < 1e-6
    # do_bg=False gives a different number
    assert abs(godc(do_bg=False)(P, y).item() - (expected - 1)) > 0.01


def test_smoothing_follows_nnunet_form():
    P, y = tiny_case('2d')
    s = 0.5
    dc, _, _ = godc(do_bg=False, smooth=s).compute_terms(P, y)
    torch.testing.assert_close(dc, torch.tensor([[(1 + s) / (2 + s)], [(5 + s) / (5.5 + s)]]))


def test_batch_dice_true_raises():
    with pytest.raises(ValueError, match='batch_dice'):
        GODCDiceLoss(apply_nonlin=None, batch_dice=True, do_bg=False, smooth=1e-5, ddp=False)


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------
def size_pair(dim):
    """Sample 0: 8-voxel object, sample 1: 512-voxel object, 4096 voxels each.
    P = .8 inside the object and .1 on as many voxels outside it, 0 elsewhere."""
    if dim == '2d':
        shape, small, large = (64, 64), (slice(0, 2), slice(0, 4)), (slice(0, 16), slice(0, 32))
        small_fp, large_fp = (slice(40, 42), slice(40, 44)), (slice(32, 48), slice(32, 64))
    else:
        shape, small, large = (16, 16, 16), (slice(0, 2),) * 3, (slice(0, 8),) * 3
        small_fp, large_fp = (slice(10, 12),) * 3, (slice(8, 16),) * 3
    fg = torch.zeros(2, *shape)
    lab = torch.zeros(2, *shape, dtype=torch.long)
    for b, (obj, fp) in enumerate([(small, small_fp), (large, large_fp)]):
        lab[b][obj] = 1
        fg[b][obj] = 0.8
        fg[b][fp] = 0.1
    assert lab[0].sum() == 8 and lab[1].sum() == 512
    assert (fg[0] == 0.1).sum() == 8 and (fg[1] == 0.1).sum() == 512
    P = torch.stack([1 - fg, fg], 1).requires_grad_(True)
    return P, lab[:, None], small, large


@pytest.mark.parametrize('dim', ['2d', '3d'])
def test_gradient_is_size_invariant_under_godc(dim):
    P, y, small, large = size_pair(dim)
    n = torch.tensor([8., 512.])
    # hand: for an object of n voxels, I = .8n, S = SP + SG = .9n + n = 1.9n, U = 1.1n
    # d(1 - DC)/dP_v (v inside) = -(2S - 2I)/S^2 = -(3.8n - 1.6n)/(3.61 n^2) = -2.2 / (3.61 n);
    # the loss averages over B=2 samples x 1 class
    plain_expected = -2.2 / (3.61 * n) / 2
    # GODC: w_b = U_b / mean U = n_b / mean(n)  ->  -2.2 / (3.61 mean(n)) / 2 for both samples
    godc_expected = -2.2 / (3.61 * n.mean()) / 2

    plain = MemoryEfficientSoftDiceLoss(apply_nonlin=None, batch_dice=False, do_bg=False, smooth=1e-5, ddp=False)
    g_plain, = torch.autograd.grad(plain(P, y), P)
    g_godc, = torch.autograd.grad(godc(do_bg=False, smooth=1e-5)(P, y), P)

    gp_small, gp_large = g_plain[0, 1][small], g_plain[1, 1][large]
    gg_small, gg_large = g_godc[0, 1][small], g_godc[1, 1][large]
    # uniform inside each object
    for g in (gp_small, gp_large, gg_small, gg_large):
        assert torch.allclose(g, g.flatten()[0].expand_as(g), rtol=1e-4)
    torch.testing.assert_close(gp_small.flatten()[0], plain_expected[0], rtol=1e-3, atol=0)
    torch.testing.assert_close(gp_large.flatten()[0], plain_expected[1], rtol=1e-3, atol=0)
    torch.testing.assert_close(gg_small.flatten()[0], godc_expected, rtol=1e-3, atol=0)
    torch.testing.assert_close(gg_large.flatten()[0], godc_expected, rtol=1e-3, atol=0)

    ratio_plain = (gp_small.abs().mean() / gp_large.abs().mean()).item()
    ratio_godc = (gg_small.abs().mean() / gg_large.abs().mean()).item()
    assert abs(ratio_plain - 64) < 0.64          # size ratio 512 / 8
    assert abs(ratio_godc - 1) < 0.03            # within a few percent


def test_weight_is_detached():
    torch.manual_seed(0)
    P = torch.rand(3, 3, 5, 6).requires_grad_(True)
    y = torch.randint(0, 3, (3, 1, 5, 6))
    y[0] = 0  # class absent in sample 0 -> very different unions
    smooth = 1e-5
    g_godc, = torch.autograd.grad(godc(do_bg=True, smooth=smooth)(P, y), P)

    G = F.one_hot(y[:, 0], 3).permute(0, 3, 1, 2).float()
    I = (P * G).sum((2, 3))
    SP, SG = P.sum((2, 3)), G.sum((2, 3))
    U = SP + SG - I
    dc = (2 * I + smooth) / (SP + SG + smooth)
    w = U / U.mean(0, keepdim=True)
    g_detached, = torch.autograd.grad((w.detach() * (1 - dc)).mean(), P, retain_graph=True)
    g_attached, = torch.autograd.grad((w * (1 - dc)).mean(), P)
    torch.testing.assert_close(g_godc, g_detached)
    assert (g_attached - g_detached).abs().max() > 1e-3  # the distinction is visible


# --------------------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------------------
def finite_loss_and_grad(loss_fn, logits, y, **kw):
    logits = logits.detach().requires_grad_(True)
    val = loss_fn(logits, y, **kw)
    g, = torch.autograd.grad(val, logits)
    assert torch.isfinite(val).all() and torch.isfinite(g).all()
    return val, g


@pytest.mark.parametrize('dim', ['2d', '3d'])
def test_finite_empty_foreground_and_all_foreground(dim):
    sp = (8, 8) if dim == '2d' else (4, 4, 4)
    torch.manual_seed(0)
    logits = torch.randn(2, 3, *sp)
    loss_fn = godc(do_bg=False, smooth=1e-5, apply_nonlin=softmax_helper_dim1)
    # class 1 and 2 absent everywhere
    val, _ = finite_loss_and_grad(loss_fn, logits, torch.zeros(2, 1, *sp))
    _, w, _ = loss_fn.compute_terms(logits, torch.zeros(2, 1, *sp))
    torch.testing.assert_close(w.mean(0), torch.ones(2))
    # everything class 2
    val, _ = finite_loss_and_grad(loss_fn, logits, torch.full((2, 1, *sp), 2))
    # everything foreground in one sample, background in the other
    y = torch.zeros(2, 1, *sp)
    y[1] = 1
    finite_loss_and_grad(loss_fn, logits, y)
    # perfect prediction of an all-foreground one-hot target: DC = 1 -> loss value -1
    G = torch.ones(2, 1, *sp)
    val, _ = finite_loss_and_grad(godc(do_bg=True, smooth=1e-5), G.clone(), G)
    assert abs(val.item() + 1) < 1e-6


def test_degenerate_all_zero_union_and_empty_batch():
    # P exactly 0 and G empty in every sample: mean U = 0 -> weights 1, DC = smooth/smooth = 1
    P = torch.zeros(2, 1, 4, 4)
    G = torch.zeros(2, 1, 4, 4)
    loss_fn = godc(do_bg=True, smooth=1e-5)
    _, w, _ = loss_fn.compute_terms(P, G)
    torch.testing.assert_close(w, torch.ones(2, 1))
    val, _ = finite_loss_and_grad(loss_fn, P, G)
    assert abs(val.item() + 1) < 1e-6
    # one sample with U = 0, the other not: weight 0 and 2
    P2 = P.clone()
    P2[1, 0, 0, 0] = 0.5
    _, w, _ = loss_fn.compute_terms(P2, G)
    torch.testing.assert_close(w, torch.tensor([[0.], [2.]]))
    finite_loss_and_grad(loss_fn, P2, G)
    # empty batch: no terms, L = 0
    val, g = finite_loss_and_grad(godc(do_bg=False, smooth=1e-5, apply_nonlin=softmax_helper_dim1),
                                  torch.zeros(0, 3, 4, 4), torch.zeros(0, 1, 4, 4))
    assert val.item() == -1 and g.shape == (0, 3, 4, 4)


def test_fp16_input_computed_in_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8) * 5
    y = torch.randint(0, 3, (2, 1, 8, 8))
    y[0][y[0] == 2] = 0  # class 2 absent in sample 0
    loss_fn = godc(do_bg=False, smooth=1e-5, apply_nonlin=softmax_helper_dim1)
    ref = loss_fn(logits.half().float(), y)
    val, g = finite_loss_and_grad(loss_fn, logits.half(), y)
    assert val.dtype == torch.float32 and g.dtype == torch.float16
    torch.testing.assert_close(val, ref)  # no fp16 rounding inside


def test_bf16_autocast_cpu():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    conv = torch.nn.Conv2d(4, 3, 1)
    y = torch.randint(0, 3, (2, 1, 8, 8))
    loss_fn = godc(do_bg=False, smooth=1e-5, apply_nonlin=softmax_helper_dim1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        val = loss_fn(logits, y)
    assert val.dtype == torch.float32
    val.backward()
    assert torch.isfinite(val) and torch.isfinite(conv.weight.grad).all()
    torch.testing.assert_close(val, loss_fn(logits.detach().float(), y))


# --------------------------------------------------------------------------------------------------
# nnU-Net integration
# --------------------------------------------------------------------------------------------------
def hand_godc(P, G, mask, smooth):
    """Per-(sample, class) GODC loss from probabilities P, one-hot G, mask (b,1,...)."""
    axes = tuple(range(2, P.ndim))
    I = (P * G * mask).sum(axes)
    SP, SG = (P * mask).sum(axes), (G * mask).sum(axes)
    U = SP + SG - I
    dc = (2 * I + smooth) / (SP + SG + smooth)
    w = U / U.mean(0, keepdim=True)
    return (w * (1 - dc)).mean()


@pytest.mark.parametrize('dim', ['2d', '3d'])
def test_ignore_label_in_dc_and_ce(dim):
    sp = (6, 6) if dim == '2d' else (3, 3, 4)
    torch.manual_seed(1)
    logits = torch.randn(2, 3, *sp)
    y = torch.randint(0, 4, (2, 1, *sp))  # 3 = ignore
    assert (y == 3).any()
    loss_fn = DC_and_CE_loss({'batch_dice': False, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {},
                             weight_ce=1, weight_dice=1, ignore_label=3, dice_class=GODCDiceLoss)
    logits.requires_grad_(True)
    val = loss_fn(logits, y)
    g, = torch.autograd.grad(val, logits)
    ign = (y == 3).expand_as(logits)
    assert (g[ign] == 0).all()
    # changing the logits under the ignore label changes nothing
    logits2 = torch.where(ign, torch.randn_like(logits) * 10, logits.detach())
    torch.testing.assert_close(loss_fn(logits2, y), val)

    mask = (y != 3).float()
    P = torch.softmax(logits.detach(), 1)
    G = F.one_hot(torch.where(y[:, 0] == 3, 0, y[:, 0]), 3).movedim(-1, 1).float()
    dice = hand_godc(P[:, 1:], G[:, 1:], mask, 1e-5) - 1
    valid = y[:, 0] != 3
    logp = torch.log_softmax(logits.detach(), 1).movedim(1, -1)[valid]
    ce = -logp.gather(1, y[:, 0][valid][:, None]).mean()
    torch.testing.assert_close(val.detach(), dice + ce)


@pytest.mark.parametrize('dim', ['2d', '3d'])
def test_regions_with_ignore_in_dc_and_bce(dim):
    sp = (6, 6) if dim == '2d' else (3, 3, 4)
    torch.manual_seed(2)
    logits = torch.randn(2, 2, *sp)
    lab = torch.randint(0, 4, (2, *sp))  # 3 = ignore; regions (1,2) and (2,)
    target = torch.stack([(lab == 1) | (lab == 2), lab == 2, lab == 3], 1)  # bool, last = ignore
    loss_fn = DC_and_BCE_loss({}, {'batch_dice': False, 'do_bg': True, 'smooth': 1e-5, 'ddp': False},
                              use_ignore_label=True, dice_class=GODCDiceLoss)
    logits.requires_grad_(True)
    val = loss_fn(logits, target)
    g, = torch.autograd.grad(val, logits)
    ign = (lab == 3)[:, None].expand_as(logits)
    assert (g[ign] == 0).all()
    logits2 = torch.where(ign, torch.randn_like(logits) * 10, logits.detach())
    torch.testing.assert_close(loss_fn(logits2, target), val)

    mask = (lab != 3)[:, None].float()
    G = target[:, :2].float()
    dice = hand_godc(torch.sigmoid(logits.detach()), G, mask, 1e-5) - 1
    bce = F.binary_cross_entropy_with_logits(logits.detach(), G, reduction='none')
    bce = (bce * mask).sum() / mask.sum()
    torch.testing.assert_close(val.detach(), dice + bce)


def test_deep_supervision_wrapper_three_levels():
    torch.manual_seed(3)
    shapes = [(16, 16), (8, 8), (4, 4)]
    outs = [torch.randn(2, 3, *s, requires_grad=True) for s in shapes]
    lab = torch.randint(0, 3, (2, 1, 16, 16))
    targets = [lab, lab[:, :, ::2, ::2], lab[:, :, ::4, ::4]]
    base = DC_and_CE_loss({'batch_dice': False, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=GODCDiceLoss)
    weights = deep_supervision_weights(3)  # [1, .5, 0] / 1.5
    np_w = [2 / 3, 1 / 3, 0.]
    assert all(abs(a - b) < 1e-12 for a, b in zip(weights, np_w))
    ds = DeepSupervisionWrapper(base, weights)
    val = ds(outs, targets)

    def level(i):
        P = torch.softmax(outs[i].detach(), 1)
        G = F.one_hot(targets[i][:, 0], 3).movedim(-1, 1).float()
        ce = F.cross_entropy(outs[i].detach(), targets[i][:, 0])
        return hand_godc(P[:, 1:], G[:, 1:], torch.ones_like(G[:, :1]), 1e-5) - 1 + ce

    torch.testing.assert_close(val.detach(), 2 / 3 * level(0) + 1 / 3 * level(1))
    val.backward()
    assert outs[2].grad is None  # weight 0 level is skipped
    assert outs[0].grad.abs().sum() > 0 and outs[1].grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# DDP (gloo, 2 processes on CPU): weights use the GLOBAL batch mean union
# --------------------------------------------------------------------------------------------------
_DDP_RANK = textwrap.dedent('''
    import torch, torch.distributed as dist

    def run_rank(rank, port, GODCDiceLoss):
        dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
        try:
            fg = torch.tensor([[0.5, 0.5, 0., 0.], [1., 1., 0.5, 0.]])[rank:rank + 1]
            lab = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])[rank:rank + 1]
            P = torch.stack([1 - fg, fg], 1).reshape(1, 2, 2, 2).requires_grad_(True)
            y = lab.reshape(1, 1, 2, 2)
            res = {}
            for ddp in (True, False):
                loss_fn = GODCDiceLoss(None, False, False, 0., ddp)
                _, w, _ = loss_fn.compute_terms(P, y)
                val = loss_fn(P, y)
                g, = torch.autograd.grad(val, P)
                res[ddp] = (w, val.detach(), g)
            dist.barrier()
            return res
        finally:
            dist.destroy_process_group()
''')

_DDP_CHILD = _DDP_RANK + textwrap.dedent('''
    import importlib.util, sys
    port, out, src = sys.argv[1], sys.argv[2], sys.argv[3]
    spec = importlib.util.spec_from_file_location('godc_under_test', src)  # skip the heavier package imports
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(run_rank(1, port, mod.GODCDiceLoss), out)
''')


def test_ddp_weights_use_global_batch(tmp_path):
    """Rank 0 runs in this process, rank 1 in a subprocess (gloo, CPU)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    out1 = tmp_path / 'r1.pt'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    child = subprocess.Popen([sys.executable, '-c', _DDP_CHILD, str(port), str(out1), godc_module.__file__],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ns = {}
    exec(_DDP_RANK, ns)
    try:
        r0 = ns['run_rank'](0, port, GODCDiceLoss)
    finally:
        out, _ = child.communicate(timeout=120)
    assert child.returncode == 0, out.decode()
    assert not torch.distributed.is_initialized()
    res = [r0, torch.load(out1)]
    # tiny case split over 2 ranks: U = 1.5 (rank 0), 3 (rank 1); global mean 2.25 -> w = 2/3, 4/3
    torch.testing.assert_close(res[0][True][0], torch.tensor([[2 / 3]]))
    torch.testing.assert_close(res[1][True][0], torch.tensor([[4 / 3]]))
    # rank-local values: w * (1 - DC) - 1 with DC = .5 and 10/11; their mean is the 1-process value 5/22 - 1
    torch.testing.assert_close(res[0][True][1], torch.tensor(2 / 3 * 0.5 - 1))
    torch.testing.assert_close(res[1][True][1], torch.tensor(4 / 3 / 11 - 1))
    # DDP averages gradients over the 2 ranks: rank gradient / 2 == single-process gradient of that sample
    P, y = tiny_case('3d')
    P = P.reshape(2, 2, 2, 2).detach().requires_grad_(True)
    g_single, = torch.autograd.grad(godc(do_bg=False)(P, y.reshape(2, 1, 2, 2)), P)
    for r in range(2):
        torch.testing.assert_close(res[r][True][2][0] / 2, g_single[r])
    # ddp=False: per-rank normalisation, w = 1
    torch.testing.assert_close(res[0][False][0], torch.ones(1, 1))
    torch.testing.assert_close(res[1][False][0], torch.ones(1, 1))
