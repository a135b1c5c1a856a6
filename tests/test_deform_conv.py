"""Tests of nnunet_ext.building_blocks.deform_conv (DCNv2, 2D and 3D)."""
import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision

from nnunet_ext.building_blocks.deform_conv import (DeformConv, ModulatedDeformConvBlock, deform_conv_nd,
                                                    deform_conv_reference, resolve_backend)
from nnunet_ext.building_blocks.deform_conv_cpu import deform_conv_cpu

# the two implementations that keep only their inputs for backward: the pure-PyTorch lean Function ("generic") and
# the compiled CPU kernel ("cpp"); both are compared against the autograd reference and the dense conv
LEAN = {"generic": deform_conv_nd, "cpp": deform_conv_cpu}

CONV = {2: F.conv2d, 3: F.conv3d}

# (in_size, kernel, stride, padding, dilation, groups)
CASES = {
    2: [
        ((7, 9), (3, 3), 1, 1, 1, 1),
        ((7, 9), (3, 3), 2, 1, 1, 1),
        ((7, 9), (3, 2), (2, 1), (0, 2), 1, 1),
        ((8, 9), (3, 3), 1, 2, 2, 1),
        ((7, 9), (3, 3), 1, 1, (1, 2), 2),
        ((7, 9), (1, 3), 1, (0, 1), 1, 4),
    ],
    3: [
        ((5, 6, 7), (3, 3, 3), 1, 1, 1, 1),
        ((5, 6, 7), (3, 3, 3), 2, 1, 1, 1),
        ((6, 5, 7), (1, 3, 3), (1, 2, 1), (0, 1, 1), 1, 1),
        ((6, 6, 7), (3, 2, 3), 1, (2, 0, 1), (2, 1, 1), 1),
        ((5, 6, 7), (3, 3, 3), 1, 1, 1, 2),
        ((5, 6, 7), (3, 3, 3), 1, 1, 1, 4),
    ],
}


def _out_size(in_size, k, s, p, d):
    n = len(in_size)

    def t(v):
        return (v,) * n if isinstance(v, int) else tuple(v)
    return tuple((i + 2 * pp - dd * (kk - 1) - 1) // ss + 1
                 for i, kk, ss, pp, dd in zip(in_size, t(k), t(s), t(p), t(d)))


@pytest.mark.parametrize("lean", LEAN)
@pytest.mark.parametrize("dim,case", [(d, c) for d in (2, 3) for c in CASES[d]])
def test_zero_offset_unit_mask_equals_dense_conv(dim, case, lean):
    in_size, k, s, p, d, g = case
    torch.manual_seed(0)
    x = torch.randn(2, 4, *in_size, dtype=torch.float64)
    w = torch.randn(6 if g != 4 else 8, 4 // g, *k, dtype=torch.float64)
    b = torch.randn(w.shape[0], dtype=torch.float64)
    out_size = _out_size(in_size, k, s, p, d)
    K = w[0, 0].numel()
    off = torch.zeros(2, dim * K, *out_size, dtype=torch.float64)
    mask = torch.ones(2, K, *out_size, dtype=torch.float64)
    ref = CONV[dim](x, w, b, s, p, d, g)
    for fn in (LEAN[lean], deform_conv_reference):  # lean implementation and autograd reference
        out = fn(x, off, w, b, s, p, d, mask)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        # mask=None means unit modulation (DCNv1); fp32 path
        out32 = fn(x.float(), off.float(), w.float(), b.float(), s, p, d, None)
        torch.testing.assert_close(out32, ref.float(), atol=1e-4, rtol=1e-4)
    # the lean implementation's input and weight gradients equal the dense conv's (offsets 0, mask 1)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    gout = torch.randn(ref.shape, dtype=torch.float64)
    g_lean = torch.autograd.grad((LEAN[lean](xr, off, wr, b, s, p, d, mask) * gout).sum(), [xr, wr])
    g_conv = torch.autograd.grad((CONV[dim](xr, wr, b, s, p, d, g) * gout).sum(), [xr, wr])
    for u, v in zip(g_lean, g_conv):
        torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shift", [-1, 1, 2])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_3d_integer_offset_equals_shifted_conv(axis, shift):
    """All kernel points displaced by `shift` voxels along one axis == conv output shifted along that
    axis. Non-cubic input (D != H != W) so that swapped axes or a wrong normalisation size fail."""
    torch.manual_seed(1)
    in_size = (5, 6, 7)
    x = torch.randn(1, 3, *in_size, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64)
    K = 27
    off = torch.zeros(1, K, 3, *in_size, dtype=torch.float64)
    off[:, :, axis] = shift
    off = off.reshape(1, 3 * K, *in_size)
    out = deform_conv_nd(x, off, w, None, 1, 1, 1, None)
    ref = F.conv3d(x, w, None, 1, 1)
    n = in_size[axis]
    # out[o] == ref[o + shift] wherever o + shift is inside the output; interior voxels only
    src = [slice(1, -1)] * 3
    dst = [slice(1, -1)] * 3
    lo, hi = max(1, 1 - shift), min(n - 1, n - 1 - shift)
    dst[axis] = slice(lo, hi)
    src[axis] = slice(lo + shift, hi + shift)
    a = out[(slice(None), slice(None), *dst)]
    r = ref[(slice(None), slice(None), *src)]
    assert a.numel() > 0
    torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-9)
    # and it is not the unshifted conv (the test would be vacuous otherwise)
    assert (out - ref).abs().max() > 1e-2


def test_3d_per_axis_offsets_are_not_swapped():
    """Different integer shifts per axis at once: (dz, dy, dx) = (1, -1, 2)."""
    torch.manual_seed(2)
    x = torch.randn(1, 2, 6, 7, 9, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, 3, dtype=torch.float64)
    off = torch.zeros(1, 27, 3, 6, 7, 9, dtype=torch.float64)
    off[:, :, 0], off[:, :, 1], off[:, :, 2] = 1, -1, 2
    out = deform_conv_nd(x, off.reshape(1, 81, 6, 7, 9), w, None, 1, 1)
    ref = F.conv3d(x, w, None, 1, 1)
    # out[z, y, x] == ref[z + 1, y - 1, x + 2]
    torch.testing.assert_close(out[:, :, 1:4, 2:6, 1:6], ref[:, :, 2:5, 1:5, 3:8], atol=1e-9, rtol=1e-9)


def _random_fractional_offsets(shape, dtype=torch.float64, gen=None):
    """Offsets = random integer in [-1, 1] + fraction in [0.2, 0.8]: never on the integer grid."""
    ints = torch.randint(-1, 2, shape, generator=gen).to(dtype)
    frac = torch.rand(shape, generator=gen, dtype=dtype) * 0.6 + 0.2
    return ints + frac


@pytest.mark.parametrize("case", [
    # (in_size, kernel, stride, padding, dilation, groups, offset_groups)
    ((7, 9), (3, 3), 1, 1, 1, 1, 1),
    ((8, 9), (3, 2), (2, 1), (1, 0), (1, 2), 2, 1),
    ((7, 9), (3, 3), 1, 1, 1, 1, 2),
    ((7, 9), (3, 3), 2, 2, 2, 2, 4),
])
def test_generic_2d_matches_torchvision(case):
    in_size, k, s, p, d, g, og = case
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, *in_size, dtype=torch.float64, generator=gen)
    w = torch.randn(6, 4 // g, *k, dtype=torch.float64, generator=gen)
    b = torch.randn(6, dtype=torch.float64, generator=gen)
    out_size = _out_size(in_size, k, s, p, d)
    K = k[0] * k[1]
    off = torch.randn(2, 2 * og * K, *out_size, dtype=torch.float64, generator=gen) * 2.5
    mask = torch.rand(2, og * K, *out_size, dtype=torch.float64, generator=gen)
    ref = torchvision.ops.deform_conv2d(x, off, w, b, stride=s, padding=p, dilation=d, mask=mask)
    out = deform_conv_nd(x, off, w, b, s, p, d, mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    out32 = deform_conv_nd(x.float(), off.float(), w.float(), b.float(), s, p, d, mask.float())
    torch.testing.assert_close(out32, ref.float(), atol=1e-5, rtol=1e-5)
    # gradients agree with torchvision's too
    leaves = [t.clone().requires_grad_() for t in (x, off, w, mask)]
    leaves_tv = [t.clone().requires_grad_() for t in (x, off, w, mask)]
    gout = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    (deform_conv_nd(leaves[0], leaves[1], leaves[2], b, s, p, d, leaves[3]) * gout).sum().backward()
    (torchvision.ops.deform_conv2d(leaves_tv[0], leaves_tv[1], leaves_tv[2], b, s, p, d, leaves_tv[3])
     * gout).sum().backward()
    for a, r in zip(leaves, leaves_tv):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-9, rtol=1e-9)


def _naive_trilinear_deform_conv3d(x, off, w, mask, pad):
    """Direct DCNv2 3D reference (stride 1, dilation 1): explicit trilinear interpolation with zeros
    outside, independent of grid_sample."""
    B, C, D, H, W = x.shape
    kd, kh, kw = w.shape[2:]
    K = kd * kh * kw
    Do, Ho, Wo = off.shape[2:]
    off = off.view(B, K, 3, Do, Ho, Wo)
    out = torch.zeros(B, w.shape[0], Do, Ho, Wo, dtype=x.dtype)
    zz, yy, xx = torch.meshgrid(torch.arange(Do), torch.arange(Ho), torch.arange(Wo), indexing="ij")
    for k, (a, b_, c) in enumerate(itertools.product(range(kd), range(kh), range(kw))):
        pz = zz - pad + a + off[:, k, 0]
        py = yy - pad + b_ + off[:, k, 1]
        px = xx - pad + c + off[:, k, 2]
        z0, y0, x0 = pz.floor(), py.floor(), px.floor()
        val = torch.zeros(B, C, Do, Ho, Wo, dtype=x.dtype)
        for dz, dy, dx in itertools.product((0, 1), repeat=3):
            zi, yi, xi = z0 + dz, y0 + dy, x0 + dx
            wgt = (1 - (pz - zi).abs()) * (1 - (py - yi).abs()) * (1 - (px - xi).abs())
            inside = (zi >= 0) & (zi < D) & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
            idx = (zi.clamp(0, D - 1) * H * W + yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).long()
            g = torch.gather(x.reshape(B, C, -1), 2, idx.reshape(B, 1, -1).expand(B, C, -1)).view_as(val)
            val = val + g * (wgt * inside).unsqueeze(1)
        val = val * mask[:, k].unsqueeze(1)
        out = out + torch.einsum("oc,bczyx->bozyx", w[:, :, a, b_, c], val)
    return out


def test_3d_fractional_offsets_match_direct_trilinear_reference():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64, generator=gen)
    w = torch.randn(2, 3, 3, 3, 3, dtype=torch.float64, generator=gen)
    off = torch.randn(2, 81, 4, 5, 6, dtype=torch.float64, generator=gen) * 1.5
    mask = torch.rand(2, 27, 4, 5, 6, dtype=torch.float64, generator=gen)
    ref = _naive_trilinear_deform_conv3d(x, off, w, mask, pad=1)
    out = deform_conv_nd(x, off, w, None, 1, 1, 1, mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_3d_with_depth_one_equals_torchvision_2d():
    """An axis of size 1 (padded internally): a (1, kh, kw) 3D DCN on a D=1 volume with dz=0 equals the
    2D DCN on the slice; with dz=c (|c|<1) the samples are scaled by (1-|c|) (zeros beyond the slice)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 1, 6, 7, dtype=torch.float64, generator=gen)
    w = torch.randn(4, 3, 1, 3, 3, dtype=torch.float64, generator=gen)
    off2d = torch.randn(2, 18, 6, 7, dtype=torch.float64, generator=gen)
    mask = torch.rand(2, 9, 1, 6, 7, dtype=torch.float64, generator=gen)
    ref = torchvision.ops.deform_conv2d(x[:, :, 0], off2d, w[:, :, 0], None, padding=1, mask=mask[:, :, 0])
    for dz in (0.0, 0.3, -0.6):
        off3d = torch.cat([torch.full((2, 9, 1, 6, 7), dz, dtype=torch.float64),
                           off2d.view(2, 9, 2, 6, 7)], dim=2).reshape(2, 27, 1, 6, 7)
        out = deform_conv_nd(x, off3d, w, None, 1, (0, 1, 1), 1, mask)
        torch.testing.assert_close(out[:, :, 0], ref * (1 - abs(dz)), atol=1e-10, rtol=1e-10)


def test_gradcheck_3d():
    """Double-precision gradcheck w.r.t. input, offsets, mask, weight and bias (conv groups 2, offset
    groups 2, non-cubic kernel, padding on one axis); offsets kept off the integer grid (kinks)."""
    gen = torch.Generator().manual_seed(6)
    in_size, ksize, pad = (2, 3, 4), (2, 1, 2), (0, 0, 1)
    x = torch.randn(1, 2, *in_size, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, 1, *ksize, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)
    out_size = _out_size(in_size, ksize, 1, pad, 1)
    K = 4
    off = _random_fractional_offsets((1, 3 * 2 * K, *out_size), gen=gen).requires_grad_()
    mask = (torch.rand(1, 2 * K, *out_size, dtype=torch.float64, generator=gen) + 0.1).requires_grad_()
    def fn(x_, o_, w_, b_, m_):
        return deform_conv_nd(x_, o_, w_, b_, 1, pad, 1, m_)
    assert torch.autograd.gradcheck(fn, (x, off, w, b, mask), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dim", [2, 3])
def test_block_gradients_reach_offsets_and_mask(dim):
    torch.manual_seed(7)
    blk = ModulatedDeformConvBlock(4, 5, 3, dim, offset_groups=2)
    # zero-initialised predictor: regular grid and mask 0.5 -> conv with half the kernel
    x = torch.randn(2, 4, *([6] * dim))
    conv = CONV[dim](x, blk.dcn.weight, blk.dcn.bias * 2, 1, 1) / 2
    torch.testing.assert_close(blk(x), conv, atol=1e-5, rtol=1e-5)
    offset, mask = blk.predict_offset_and_mask(x)
    assert offset.abs().max() == 0 and torch.all(mask == 0.5)
    # random (non-zero) offsets: every parameter and the input get a non-zero gradient
    with torch.no_grad():
        blk.offset_conv.weight.normal_(0, 0.3)
        blk.offset_conv.bias.normal_(0, 0.3)
    x.requires_grad_()
    offset, mask = blk.predict_offset_and_mask(x)
    offset.retain_grad()
    mask.retain_grad()
    out = blk.dcn(x, offset, mask)
    (out ** 2).sum().backward()
    assert offset.grad.abs().sum() > 0 and mask.grad.abs().sum() > 0
    for name, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("dim", [2, 3])
def test_block_with_guide_tensor(dim):
    """Offsets predicted from a different tensor (SPA-DCN-Net style): the guide changes the output,
    the deformed input gets the kernel; guide with other channel count."""
    torch.manual_seed(8)
    blk = ModulatedDeformConvBlock(3, 4, 3, dim, guide_channels=7)
    with torch.no_grad():
        blk.offset_conv.weight.normal_(0, 0.2)
    x = torch.randn(1, 3, *([5] * dim))
    g1, g2 = torch.randn(1, 7, *([5] * dim)), torch.randn(1, 7, *([5] * dim))
    y1, y2 = blk(x, g1), blk(x, g2)
    assert y1.shape == (1, 4, *([5] * dim))
    assert (y1 - y2).abs().max() > 1e-3
    with pytest.raises(RuntimeError):
        blk(x)  # default guide is x, which has 3 channels, not 7


def test_deform_conv_module_backends_agree_2d():
    torch.manual_seed(9)
    tv = DeformConv(4, 6, 3, dim=2, padding=1, groups=2, backend="torchvision")
    x = torch.randn(2, 4, 6, 7)
    off = torch.randn(2, 2 * 2 * 9, 6, 7)  # 2 offset groups
    mask = torch.rand(2, 2 * 9, 6, 7)
    for backend in ("generic", "cpp", "auto"):
        other = DeformConv(4, 6, 3, dim=2, padding=1, groups=2, backend=backend)
        other.load_state_dict(tv.state_dict())
        torch.testing.assert_close(other(x, off, mask), tv(x, off, mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2D"):
        DeformConv(4, 6, 3, dim=3, backend="torchvision")
    with pytest.raises(ValueError, match="unknown backend"):
        DeformConv(4, 6, 3, dim=2, backend="cudnn")


def test_auto_backend_choice():
    """CPU: the compiled CPU kernel in 2D and 3D (measured faster than the lean PyTorch path and torchvision's CPU
    kernels; it builds on this machine and in CI); the Triton kernels are never picked on the CPU unless forced (and
    then refused without the interpreter)."""
    assert resolve_backend("auto", 2, "cpu") == "cpp"
    assert resolve_backend("auto", 3, "cpu") == "cpp"
    assert resolve_backend("generic", 3, "cpu") == "generic"
    assert resolve_backend("torchvision", 2, "cpu") == "torchvision"
    import importlib.util
    import os
    if importlib.util.find_spec("triton") is None or not os.environ.get("TRITON_INTERPRET"):
        with pytest.raises(RuntimeError, match="triton"):
            resolve_backend("triton", 3, "cpu")


# (dim, in_size, kernel, stride, padding, dilation, conv groups, offset groups, with mask)
LEAN_CASES = [
    (2, (7, 9), (3, 3), 1, 1, 1, 1, 1, True),
    (2, (8, 9), (3, 2), (2, 1), (1, 0), (1, 2), 2, 1, True),
    (2, (7, 9), (3, 3), 2, 2, 2, 2, 4, False),
    (3, (5, 6, 7), (3, 3, 3), 1, 1, 1, 1, 1, True),
    (3, (5, 6, 4), (3, 3, 3), 2, 1, 1, 2, 2, True),
    (3, (6, 5, 7), (1, 3, 3), (1, 2, 1), (0, 1, 1), (1, 1, 2), 1, 2, False),
    (3, (1, 6, 7), (3, 3, 3), 1, 1, 1, 1, 1, True),  # an axis of size 1 (padded internally)
]


@pytest.mark.parametrize("case", LEAN_CASES)
@pytest.mark.parametrize("lean", ["generic", "generic, kernel_chunk=2", "cpp", "cpp, 1 KiB chunks"])
def test_lean_function_matches_reference_values_and_gradients(case, lean, monkeypatch):
    """Random fractional offsets and masks: the lean Function (any chunking, uneven last chunk) and the compiled CPU
    kernel (default chunks and chunks of a few output voxels) equal the autograd reference in the output and in the
    gradients of input, offsets, mask, weight and bias."""
    dim, in_size, k, s, p, d, g, og, with_mask = case
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, *in_size, dtype=torch.float64, generator=gen)
    w = torch.randn(6, 4 // g, *k, dtype=torch.float64, generator=gen)
    b = torch.randn(6, dtype=torch.float64, generator=gen)
    out_size = _out_size(in_size, k, s, p, d)
    K = w[0, 0].numel()
    off = _random_fractional_offsets((2, dim * og * K, *out_size), gen=gen)
    mask = torch.rand(2, og * K, *out_size, dtype=torch.float64, generator=gen) if with_mask else None
    leaves = [t for t in (x, off, w, b, mask) if t is not None]
    results = []
    if lean.endswith("KiB chunks"):
        monkeypatch.setattr("nnunet_ext.building_blocks.deform_conv_cpu.CHUNK_BYTES", 1024)
    impl = (lambda *a: deform_conv_nd(*a, kernel_chunk=2)) if lean.endswith("=2") else LEAN[lean.split(",")[0]]
    for fn in (impl, deform_conv_reference):
        ls = [t.clone().requires_grad_() for t in leaves]
        m = ls[4] if with_mask else None
        y = fn(ls[0], ls[1], ls[2], ls[3], s, p, d, m)
        gout = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
        results.append([y] + list(torch.autograd.grad((y * gout).sum(), ls)))
    for u, v in zip(*results):
        torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)
    assert all(t.abs().sum() > 0 for t in results[0])


@pytest.mark.parametrize("dim", [2, 3])
def test_cpu_kernel_forward_same_bits_with_1_and_2_threads_and_under_inference_mode(dim, monkeypatch):
    """The kernel's worker threads run the chunks' GEMMs: under ``torch.inference_mode`` (nnU-Net's prediction) they
    must see the caller's mode, and the output must not depend on the number of threads (each chunk is computed the
    same way by whichever thread takes it), so that prediction in a new process equals the training's validation."""
    monkeypatch.setattr("nnunet_ext.building_blocks.deform_conv_cpu.CHUNK_BYTES", 4096)  # many chunks per thread
    gen = torch.Generator().manual_seed(3)
    size = (9, 10, 11)[-dim:]
    x = torch.randn(2, 8, *size, generator=gen)
    w = torch.randn(8, 8, *(3,) * dim, generator=gen)
    off = torch.randn(2, dim * 3 ** dim, *size, generator=gen)
    mask = torch.rand(2, 3 ** dim, *size, generator=gen)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n, mode in ((1, torch.no_grad), (2, torch.no_grad), (2, torch.inference_mode)):
            torch.set_num_threads(n)
            with mode():
                outputs.append(deform_conv_cpu(x, off, w, None, 1, 1, 1, mask=mask).clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    torch.testing.assert_close(outputs[0], deform_conv_reference(x, off, w, None, 1, 1, 1, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lean", LEAN)
def test_lean_function_keeps_only_its_inputs_for_backward(lean):
    """What autograd keeps for backward (``saved_tensors_hooks``), 3D 16->16, 12^3, k=3: the lean Function and the
    CPU kernel keep at most their inputs (input, offsets, mask, weight) + 10 %; the reference keeps the
    ``C_in * K * voxels`` samples."""
    torch.manual_seed(14)
    x = torch.randn(1, 16, 12, 12, 12, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, 3, requires_grad=True)
    off = torch.randn(1, 81, 12, 12, 12, requires_grad=True)
    mask = torch.rand(1, 27, 12, 12, 12, requires_grad=True)
    inputs_bytes = sum(t.numel() * t.element_size() for t in (x, w, off, mask))

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, off, w, None, 1, 1, 1, mask)
        return sum(seen.values())
    kept, ref = saved_bytes(LEAN[lean]), saved_bytes(deform_conv_reference)
    assert kept <= 1.1 * inputs_bytes, (kept, inputs_bytes)
    assert ref > 2 * 16 * 27 * 12 ** 3 * 4  # plain and modulated samples
    assert kept < ref / 5


@pytest.mark.parametrize("lean", LEAN)
@pytest.mark.parametrize("dim", [2, 3])
def test_gradcheck_lean_function(dim, lean):
    """Double-precision gradcheck of the lean Function and the CPU kernel w.r.t. input, offsets, mask and weight
    (tiny, stride 2 in 2D, two offset groups)."""
    gen = torch.Generator().manual_seed(15)
    in_size = (4, 5) if dim == 2 else (3, 3, 4)
    k = (3, 2) if dim == 2 else (2, 2, 2)
    stride, pad = (2, 1) if dim == 2 else 1, 1 if dim == 2 else (0, 1, 0)
    x = torch.randn(1, 2, *in_size, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 2, *k, dtype=torch.float64, generator=gen, requires_grad=True)
    out_size = _out_size(in_size, k, stride, pad, 1)
    K = w[0, 0].numel()
    off = _random_fractional_offsets((1, dim * 2 * K, *out_size), gen=gen).requires_grad_()
    mask = (torch.rand(1, 2 * K, *out_size, dtype=torch.float64, generator=gen) + 0.1).requires_grad_()
    kwargs = {"kernel_chunk": 3} if lean == "generic" else {}
    assert torch.autograd.gradcheck(lambda *a: LEAN[lean](a[0], a[1], a[2], None, stride, pad, 1, a[3], **kwargs),
                                    (x, off, w, mask), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dim", [2, 3])
def test_separable_predictor(dim):
    """Depthwise k^N + 1x1 predictor: zero offsets and mask 0.5 at initialisation, about K times fewer weights than
    the full predictor, and gradients reach both of its convs once its 1x1 conv is non-zero."""
    torch.manual_seed(16)
    full = ModulatedDeformConvBlock(8, 8, 3, dim, predictor="full")
    sep = ModulatedDeformConvBlock(8, 8, 3, dim, predictor="separable")
    K = 3 ** dim
    assert full.offset_conv.weight.numel() == 8 * (dim + 1) * K * K
    assert sum(p.numel() for p in sep.offset_conv.parameters()) == 8 * K + 8 + 8 * (dim + 1) * K + (dim + 1) * K
    x = torch.randn(2, 8, *([6] * dim))
    offset, mask = sep.predict_offset_and_mask(x)
    assert offset.shape == (2, dim * K, *([6] * dim)) and offset.abs().max() == 0 and torch.all(mask == 0.5)
    sep.dcn.load_state_dict(full.dcn.state_dict())
    torch.testing.assert_close(sep(x), full(x))
    with torch.no_grad():
        sep.offset_conv[1].weight.normal_(0, 0.1)
    sep(x).square().sum().backward()
    for name, p in sep.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="predictor"):
        ModulatedDeformConvBlock(8, 8, 3, dim, predictor="tiny")


def test_shape_errors_are_clear():
    x = torch.randn(1, 4, 5, 6, 7)
    w = torch.randn(4, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="offset must have shape"):
        deform_conv_nd(x, torch.zeros(1, 80, 5, 6, 7), w, None, 1, 1)
    with pytest.raises(ValueError, match="mask must have shape"):
        deform_conv_nd(x, torch.zeros(1, 81, 5, 6, 7), w, None, 1, 1, 1, torch.ones(1, 26, 5, 6, 7))


@pytest.mark.parametrize("lean", LEAN)
def test_low_precision_input_samples_in_fp32_and_returns_input_dtype(lean):
    fn = LEAN[lean]
    torch.manual_seed(11)
    x, w = torch.randn(1, 4, 5, 6, 7), torch.randn(4, 4, 3, 3, 3)
    off, m = torch.randn(1, 81, 5, 6, 7), torch.rand(1, 27, 5, 6, 7)
    ref = fn(x, off, w, None, 1, 1, 1, m)
    out = fn(x.bfloat16(), off.bfloat16(), w.bfloat16(), None, 1, 1, 1, m.bfloat16())
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs().max() / ref.abs().max()) < 2e-2
    # fp16 too, with gradients in the dtype of each input
    leaves = [t.half().requires_grad_() for t in (x, off, w, m)]
    out16 = fn(leaves[0], leaves[1], leaves[2], None, 1, 1, 1, leaves[3])
    assert out16.dtype == torch.float16
    assert ((out16.float() - ref).abs().max() / ref.abs().max()) < 2e-3
    out16.float().square().sum().backward()
    ref_leaves = [t.half().float().requires_grad_() for t in (x, off, w, m)]
    fn(ref_leaves[0], ref_leaves[1], ref_leaves[2], None, 1, 1, 1, ref_leaves[3]).square().sum().backward()
    for a, r in zip(leaves, ref_leaves):
        assert a.grad.dtype == torch.float16
        assert ((a.grad.float() - r.grad).abs().max() / r.grad.abs().max()) < 1e-2
