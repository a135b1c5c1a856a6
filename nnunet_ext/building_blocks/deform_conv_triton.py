"""Modulated deformable convolution (DCNv2) as Triton kernels, 2D and 3D, forward and backward.

Reference: X. Zhu, H. Hu, S. Lin, J. Dai, "Deformable ConvNets v2", CVPR 2019, Eq. 3:

    y(p0) = sum_k  w_k * x(p0 * stride - padding + dilation * p_k + dp_k) * dm_k

with x(.) bi/trilinear interpolation and zeros outside the input. ``deform_conv_triton`` has the semantics,
arguments and offset/mask layout of ``nnunet_ext.building_blocks.deform_conv.deform_conv_nd`` (the PyTorch
reference; see that module's docstring for the layout), runs on CUDA tensors, and on CPU tensors only under
Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is first imported; that is how the tests run it).

Algorithm (one notation for 2D and 3D: a 2D problem is the 3D one with depth 1, kernel depth 1 and no z offset;
the kernels take ``NZ = 1`` and visit 4 instead of 8 interpolation corners)
-----------------------------------------------------------------------------------------------------------------
Rows ``m`` are output positions flattened over (batch, output voxels), ``M = B * prod(out)``. Input channels are
walked in *segments* of ``S = gcd(C_in / groups, C_in / G)`` channels: a segment lies inside one conv group and
one offset group, so one set of sampling positions serves all its channels. Gathered tiles are laid out
``(BLOCK_K channels) x (BLOCK_M rows)`` (rows across the threads of a warp), so a thread keeps few rows of the
per-row positions, weights and 64-bit indices.

* Forward, ``_dcn_forward_kernel`` (implicit GEMM): a program owns ``BLOCK_N`` output channels of one conv group x
  ``BLOCK_M`` rows. It loops over kernel points k, segments and blocks of ``BLOCK_K`` input channels; for each it
  computes the ``BLOCK_M`` fractional positions of kernel point k (offsets added to ``o * stride - padding +
  dilation * k``) and the modulation, gathers the bi/trilinear samples corner by corner (masked loads: corners
  outside the input read 0), multiplies them by the modulation and accumulates ``W[group, block, k] @ samples``
  with ``tl.dot`` in fp32. The ``C_in * K * voxels`` column matrix never exists in memory. Bias in the epilogue.
* Backward, data part, ``_dcn_backward_data_kernel``: a program owns ``BLOCK_M`` rows of one conv group. Per
  (k, segment, channel block) it forms ``dcol = W[group, block, k]^T @ grad_out[group, rows]`` with ``tl.dot``
  (fp32) and walks the corners again:
  - grad_input: ``dcol * mask * w_corner`` is added at each in-bounds corner with ``tl.atomic_add`` (different
    rows, kernel points and programs hit the same input voxel);
  - with ``r = sum_c dcol[c] * x[corner, c]`` (one channel reduction per corner): grad of the mask
    ``sum_corners w_corner * r``, grad of the offset along axis a ``mask * sum_corners dw_corner/dp_a * r``. The
    spatial derivative of the interpolation replaces the weight factor of axis a by -1 / +1 for the lower / upper
    corner, the convention of ``grid_sample``'s backward (also at integer positions). Both are added with
    ``tl.atomic_add`` (an offset group can span several conv groups and segments).
* Backward, weight part, ``_dcn_backward_weight_kernel``: ``grad_W[o, c, k] = sum_m grad_out[m, o] *
  mask * sample[m, c, k]``, a GEMM over the rows. A program owns (k, segment, channel block) x ``BLOCK_N`` output
  channels x one conv group x one of ``split`` slices of the row blocks (split-K over M, ``split`` chosen so that
  about ``4 x SMs`` programs run); it recomputes the samples per ``BLOCK_M`` rows, accumulates
  ``samples @ grad_out`` with ``tl.dot`` and adds its partial sum with ``tl.atomic_add``.
* grad of the bias: ``grad_out.sum`` (a torch reduction).

Only the inputs (input, offset, weight, mask) are saved for backward; everything else is recomputed.

Launch configuration: ``BLOCK_M = 64``, ``BLOCK_N = clamp(next_pow2(C_out / groups), 16, 64)``,
``BLOCK_K = clamp(next_pow2(S), 16, MAX_BLOCK_K)``, ``NUM_WARPS``, ``NUM_STAGES`` below. No GPU was available to
tune them by timing; they were chosen by compiling ahead of time for sm_80 (``python -m benchmarks.deform_conv_triton
--compile-for 80``) and keeping the register use low (see that benchmark for the table). The corner walk is a
runtime loop on purpose: unrolled, every corner's address tile is live at once and the kernels spill.

Numerics: sampling positions, interpolation weights and the interpolated samples are fp32 whatever the input dtype.
For fp16/bf16 input the modulated samples, grad_out tile and the weights are rounded to the input dtype before each
``tl.dot`` (tensor-core operands), products are accumulated in fp32, and the result is returned in the input dtype;
so compared with the fp32 reference, fp16/bf16 results carry the operand rounding (about 1e-3 / 1e-2 relative).
fp32 input uses TF32 tensor cores in ``tl.dot`` when ``torch.backends.cudnn.allow_tf32`` is set (torch's switch for
convolutions, on by default: the dense ``conv3d`` this replaces computes in TF32 too), else IEEE fp32. Triton 3.8's
interpreter multiplies the raw bit patterns of bf16 ``tl.dot`` operands, so under the interpreter bf16 operands
(already rounded to bf16) are multiplied as fp32, which gives the same products. All atomics accumulate in fp32
buffers that are cast to the gradient's dtype at the end; their order is not deterministic, so gradients can differ
in the last bits between runs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from nnunet_ext.building_blocks.deform_conv import _ntuple, deform_conv_output_size

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels come without triton
    triton = None

IntOrSeq = Union[int, Sequence[int]]

__all__ = ["deform_conv_triton", "triton_deform_conv_available"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# launch configuration (see block_sizes)
BLOCK_M, MAX_BLOCK_K, NUM_WARPS, NUM_STAGES = 64, 16, 8, 1


def _interpreting() -> bool:
    """True when triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` was set before it was imported)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_dcn_forward_kernel, InterpretedFunction)


def triton_deform_conv_available(device: Union[str, torch.device]) -> bool:
    """Whether ``deform_conv_triton`` can run on tensors of ``device``: triton importable and either a CUDA device
    or the triton interpreter active."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or _interpreting()


if triton is not None:
    @triton.jit
    def _rows(pid_m, M, L, OH, OW, SD, SH, SW, PD, PH, PW, BLOCK_M: tl.constexpr):
        """Rows ``pid_m * BLOCK_M + [0, BLOCK_M)``: batch index, flat output voxel, in-range flag and the fp32 input
        position ``o * stride - padding`` of the kernel's first point along z, y, x."""
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        b = rm // L
        p = rm % L
        bz = ((p // (OH * OW)) * SD - PD).to(tl.float32)
        by = (((p // OW) % OH) * SH - PH).to(tl.float32)
        bx = ((p % OW) * SW - PW).to(tl.float32)
        return b, p, m_ok, bz, by, bx

    @triton.jit
    def _sample_position(off_ptr, msk_ptr, b, p, m_ok, bz, by, bx, k, g, K, L, G, KH, KW, DD, DH, DW,
                         NZ: tl.constexpr, HAS_MASK: tl.constexpr):
        """Fractional input position (z, y, x) of kernel point k of offset group g for each row, and its
        modulation (1 without mask). Offset channel ``(g * K + k) * N + a``, mask channel ``g * K + k``."""
        kz = k // (KH * KW)
        ky = (k // KW) % KH
        kx = k % KW
        if NZ == 2:
            obase = off_ptr + (b.to(tl.int64) * (3 * G * K) + (g * K + k) * 3) * L + p
            pz = bz + (kz * DD).to(tl.float32) + tl.load(obase, mask=m_ok, other=0.0).to(tl.float32)
            obase = obase + L
        else:
            obase = off_ptr + (b.to(tl.int64) * (2 * G * K) + (g * K + k) * 2) * L + p
            pz = tl.zeros(p.shape, tl.float32)
        py = by + (ky * DH).to(tl.float32) + tl.load(obase, mask=m_ok, other=0.0).to(tl.float32)
        px = bx + (kx * DW).to(tl.float32) + tl.load(obase + L, mask=m_ok, other=0.0).to(tl.float32)
        if HAS_MASK:
            mod = tl.load(msk_ptr + (b.to(tl.int64) * (G * K) + g * K + k) * L + p, mask=m_ok, other=0.0)
            mod = mod.to(tl.float32)
        else:
            mod = tl.full(p.shape, 1.0, tl.float32)
        return pz, py, px, mod

    @triton.jit
    def _walk_cell(x_ptr, row_base, col_off, c_ok, m_ok, pz, py, px, D, H, W, gx_ptr, dcol, mod, NZ: tl.constexpr,
                   SAMPLE: tl.constexpr, REDUCE: tl.constexpr, SCATTER: tl.constexpr):
        """Walks the 2^N corners of each row's interpolation cell for a block of channels (zeros outside the input).

        Corner (z0 + cz, y0 + cy, x0 + cx), with (z0, y0, x0) = floor(p) and f = p - floor(p), has the weight
        w = prod_a (f_a if c_a else 1 - f_a); its derivative along axis a, dw_a, replaces that axis' factor by +1
        (upper corner) or -1 (lower corner), as in ``grid_sample``'s backward (also at integer positions).
        Tiles are ``(BLOCK_K channels, BLOCK_M rows)``: rows along the threads of a warp, so that each thread holds
        few rows of the per-row vectors (positions, weights, 64-bit indices).

        SAMPLE: returns the samples ``sum_corners w * x[corner]`` (tile, fp32).
        SCATTER: adds ``dcol * mod * w`` at every in-bounds corner of ``gx_ptr`` (``tl.atomic_add``).
        REDUCE: returns, per row, ``sum_corners w * r`` and ``sum_corners dw_a * r`` (a = z, y, x) with
        ``r = sum_c dcol[c] * x[corner, c]``: the gradients of the mask and (times the mask) of the position.
        Unrequested results are zeros."""
        z0f = tl.floor(pz)
        y0f = tl.floor(py)
        x0f = tl.floor(px)
        fz = pz - z0f
        fy = py - y0f
        fx = px - x0f
        z0 = z0f.to(tl.int64)  # int64 index arithmetic: no int32 overflow (and no overflow checks in the interpreter)
        y0 = y0f.to(tl.int64)
        x0 = x0f.to(tl.int64)
        c_ok2 = c_ok[:, None]
        col2 = col_off[:, None]
        val = tl.zeros((col_off.shape[0], row_base.shape[0]), tl.float32)
        g_w = tl.zeros(pz.shape, tl.float32)
        g_z = tl.zeros(pz.shape, tl.float32)
        g_y = tl.zeros(pz.shape, tl.float32)
        g_x = tl.zeros(pz.shape, tl.float32)
        if SCATTER:
            gs = dcol * mod[None, :]
        # a runtime loop, not tl.static_range: unrolled, all corners' 64-bit address tiles are live at once and the
        # kernels spill registers (measured with --compile-for in benchmarks/deform_conv_triton.py)
        for corner in range(4 * NZ):
            cz = corner // 4
            cy = (corner // 2) % 2
            cx = corner % 2
            zi = z0 + cz
            yi = y0 + cy
            xi = x0 + cx
            wz = tl.where(cz == 1, fz, 1.0 - fz)
            wy = tl.where(cy == 1, fy, 1.0 - fy)
            wx = tl.where(cx == 1, fx, 1.0 - fx)
            ok = (m_ok & (zi >= 0) & (zi < D) & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W))[None, :] & c_ok2
            addr = (row_base + (zi * H + yi) * W + xi)[None, :] + col2
            if SCATTER:
                tl.atomic_add(gx_ptr + addr, gs * (wz * wy * wx)[None, :], mask=ok)
            if SAMPLE or REDUCE:
                v = tl.load(x_ptr + addr, mask=ok, other=0.0).to(tl.float32)
                if SAMPLE:
                    val += (wz * wy * wx)[None, :] * v
                if REDUCE:
                    r = tl.sum(dcol * v, axis=0)
                    g_w += wz * wy * wx * r
                    g_z += (2 * cz - 1) * wy * wx * r
                    g_y += (2 * cy - 1) * wz * wx * r
                    g_x += (2 * cx - 1) * wz * wy * r
        return val, g_w, g_z, g_y, g_x

    @triton.jit
    def _mma(a, b, acc, IEEE: tl.constexpr, DOT_FP32: tl.constexpr):
        """``acc + a @ b`` accumulated in fp32; ``a``, ``b`` are already rounded to the operand dtype. With
        ``DOT_FP32`` they are multiplied as fp32 (products of bf16 values are exact in fp32, so this is the same
        function): triton 3.8's interpreter multiplies the raw bit patterns of bf16 operands in ``tl.dot``."""
        if DOT_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _dcn_forward_kernel(x_ptr, off_ptr, msk_ptr, w_ptr, bias_ptr, out_ptr,
                            M, L, C_in, D, H, W, OH, OW, K, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
                            G, CG_IN, CG_OUT, C_PER_OG, SEG, C_OUT,
                            NZ: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                            IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Grid ``(cdiv(M, BLOCK_M), cdiv(CG_OUT, BLOCK_N), groups)``: implicit GEMM over the deformed samples."""
        grp = tl.program_id(2)
        b, p, m_ok, bz, by, bx = _rows(tl.program_id(0), M, L, OH, OW, SD, SH, SW, PD, PH, PW, BLOCK_M)
        S = D * H * W
        row_base = b.to(tl.int64) * C_in * S
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < CG_OUT
        o = grp * CG_OUT + rn
        DT = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)  # output tile, transposed
        for k in range(K):
            for seg in range(CG_IN // SEG):
                c_start = grp * CG_IN + seg * SEG
                pz, py, px, mod = _sample_position(off_ptr, msk_ptr, b, p, m_ok, bz, by, bx, k, c_start // C_PER_OG,
                                                   K, L, G, KH, KW, DD, DH, DW, NZ, HAS_MASK)
                for c0 in range(0, SEG, BLOCK_K):
                    rc = c0 + tl.arange(0, BLOCK_K)
                    c_ok = rc < SEG
                    val, _, _, _, _ = _walk_cell(x_ptr, row_base, (c_start + rc).to(tl.int64) * S, c_ok, m_ok,
                                                 pz, py, px, D, H, W, x_ptr, None, None, NZ, True, False, False)
                    wt = tl.load(w_ptr + o[:, None] * (CG_IN * K) + (seg * SEG + rc)[None, :] * K + k,
                                 mask=n_ok[:, None] & c_ok[None, :], other=0.0)
                    acc = _mma(wt.to(DT), (val * mod[None, :]).to(DT), acc, IEEE, DOT_FP32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + o, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        out_addr = o[:, None].to(tl.int64) * L + (b.to(tl.int64) * C_OUT * L + p)[None, :]
        tl.store(out_ptr + out_addr, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])

    @triton.jit
    def _dcn_backward_data_kernel(x_ptr, off_ptr, msk_ptr, w_ptr, gout_ptr, gx_ptr, goff_ptr, gmsk_ptr,
                                  M, L, C_in, D, H, W, OH, OW, K, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
                                  G, CG_IN, CG_OUT, C_PER_OG, SEG, C_OUT,
                                  NZ: tl.constexpr, HAS_MASK: tl.constexpr, NEED_GX: tl.constexpr,
                                  NEED_GOFF: tl.constexpr, IEEE: tl.constexpr,
                                  DOT_FP32: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Grid ``(cdiv(M, BLOCK_M), groups)``: grad of input (atomic scatter), offsets and mask (atomic)."""
        grp = tl.program_id(1)
        b, p, m_ok, bz, by, bx = _rows(tl.program_id(0), M, L, OH, OW, SD, SH, SW, PD, PH, PW, BLOCK_M)
        S = D * H * W
        row_base = b.to(tl.int64) * C_in * S
        gout_row = b.to(tl.int64) * C_OUT * L + p
        DT = x_ptr.dtype.element_ty
        for k in range(K):
            for seg in range(CG_IN // SEG):
                c_start = grp * CG_IN + seg * SEG
                g = c_start // C_PER_OG
                pz, py, px, mod = _sample_position(off_ptr, msk_ptr, b, p, m_ok, bz, by, bx, k, g,
                                                   K, L, G, KH, KW, DD, DH, DW, NZ, HAS_MASK)
                g_mod = tl.zeros((BLOCK_M,), tl.float32)
                g_pz = tl.zeros((BLOCK_M,), tl.float32)
                g_py = tl.zeros((BLOCK_M,), tl.float32)
                g_px = tl.zeros((BLOCK_M,), tl.float32)
                for c0 in range(0, SEG, BLOCK_K):
                    rc = c0 + tl.arange(0, BLOCK_K)
                    c_ok = rc < SEG
                    col_off = (c_start + rc).to(tl.int64) * S
                    # dcol[c, m] = d loss / d (mask * sample)[m, c, k] = sum_o W[o, c, k] * grad_out[m, o]
                    dcol = tl.zeros((BLOCK_K, BLOCK_M), tl.float32)
                    for n0 in range(0, CG_OUT, BLOCK_N):
                        rn = n0 + tl.arange(0, BLOCK_N)
                        n_ok = rn < CG_OUT
                        o = grp * CG_OUT + rn
                        go = tl.load(gout_ptr + o[:, None].to(tl.int64) * L + gout_row[None, :],
                                     mask=n_ok[:, None] & m_ok[None, :], other=0.0)
                        wt = tl.load(w_ptr + o[None, :] * (CG_IN * K) + (seg * SEG + rc)[:, None] * K + k,
                                     mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                        dcol = _mma(wt.to(DT), go.to(DT), dcol, IEEE, DOT_FP32)
                    _, r_w, r_z, r_y, r_x = _walk_cell(x_ptr, row_base, col_off, c_ok, m_ok, pz, py, px, D, H, W,
                                                       gx_ptr, dcol, mod, NZ, False, NEED_GOFF, NEED_GX)
                    g_mod += r_w
                    g_pz += r_z
                    g_py += r_y
                    g_px += r_x
                if NEED_GOFF:
                    if NZ == 2:
                        oaddr = goff_ptr + (b.to(tl.int64) * (3 * G * K) + (g * K + k) * 3) * L + p
                        tl.atomic_add(oaddr, g_pz * mod, mask=m_ok)
                        oaddr = oaddr + L
                    else:
                        oaddr = goff_ptr + (b.to(tl.int64) * (2 * G * K) + (g * K + k) * 2) * L + p
                    tl.atomic_add(oaddr, g_py * mod, mask=m_ok)
                    tl.atomic_add(oaddr + L, g_px * mod, mask=m_ok)
                    if HAS_MASK:
                        tl.atomic_add(gmsk_ptr + (b.to(tl.int64) * (G * K) + g * K + k) * L + p, g_mod, mask=m_ok)

    @triton.jit
    def _dcn_backward_weight_kernel(x_ptr, off_ptr, msk_ptr, gout_ptr, gw_ptr,
                                    M, L, C_in, D, H, W, OH, OW, K, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
                                    G, CG_IN, CG_OUT, C_PER_OG, SEG, C_OUT, SPLIT,
                                    NZ: tl.constexpr, HAS_MASK: tl.constexpr,
                                    IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Grid ``(K * segments * cdiv(SEG, BLOCK_K), cdiv(CG_OUT, BLOCK_N), groups * SPLIT)``: split-K GEMM
        ``grad_W[o, c, k] += sum_m grad_out[m, o] * (mask * sample)[m, c, k]`` over this program's row blocks."""
        n_cb = tl.cdiv(SEG, BLOCK_K)
        pid0 = tl.program_id(0)
        cb = pid0 % n_cb
        seg = (pid0 // n_cb) % (CG_IN // SEG)
        k = pid0 // (n_cb * (CG_IN // SEG))
        grp = tl.program_id(2) // SPLIT
        split = tl.program_id(2) % SPLIT
        c_start = grp * CG_IN + seg * SEG
        g = c_start // C_PER_OG
        rc = cb * BLOCK_K + tl.arange(0, BLOCK_K)
        c_ok = rc < SEG
        S = D * H * W
        col_off = (c_start + rc).to(tl.int64) * S
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < CG_OUT
        o = grp * CG_OUT + rn
        DT = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
        for mb in range(split, tl.cdiv(M, BLOCK_M), SPLIT):
            b, p, m_ok, bz, by, bx = _rows(mb, M, L, OH, OW, SD, SH, SW, PD, PH, PW, BLOCK_M)
            pz, py, px, mod = _sample_position(off_ptr, msk_ptr, b, p, m_ok, bz, by, bx, k, g,
                                               K, L, G, KH, KW, DD, DH, DW, NZ, HAS_MASK)
            val, _, _, _, _ = _walk_cell(x_ptr, b.to(tl.int64) * C_in * S, col_off, c_ok, m_ok, pz, py, px, D, H, W,
                                         x_ptr, None, None, NZ, True, False, False)
            go = tl.load(gout_ptr + (b.to(tl.int64) * C_OUT * L + p)[:, None] + o[None, :].to(tl.int64) * L,
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma((val * mod[None, :]).to(DT), go.to(DT), acc, IEEE, DOT_FP32)
        tl.atomic_add(gw_ptr + o[None, :] * (CG_IN * K) + (seg * SEG + rc)[:, None] * K + k, acc,
                      mask=c_ok[:, None] & n_ok[None, :])


class _Geometry:
    """Validated shapes of one call, in the 3D notation the kernels use (2D: depth 1, kernel depth 1)."""

    def __init__(self, input, offset, weight, bias, stride, padding, dilation, mask):
        n = input.dim() - 2
        if n not in (2, 3):
            raise ValueError(f"deform_conv_triton supports 2 or 3 spatial dims, got input {tuple(input.shape)}")
        if weight.dim() != n + 2:
            raise ValueError(f"weight must have {n + 2} dims for {n}D input, got {tuple(weight.shape)}")
        stride, padding, dilation = (_ntuple(v, n, name) for v, name in
                                     ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
        B, c_in = input.shape[:2]
        c_out, cg_in = weight.shape[:2]
        ksize = tuple(weight.shape[2:])
        K = math.prod(ksize)
        if cg_in == 0 or c_in % cg_in:
            raise ValueError(f"input channels {c_in} not divisible by weight.shape[1] = {cg_in}")
        groups = c_in // cg_in
        if c_out % groups:
            raise ValueError(f"output channels {c_out} not divisible by groups {groups}")
        out_size = deform_conv_output_size(input.shape[2:], ksize, stride, padding, dilation)
        if any(o <= 0 for o in out_size):
            raise ValueError(f"non-positive output size {out_size} for input {tuple(input.shape[2:])}, kernel {ksize}")
        if offset.dim() != n + 2 or offset.shape[0] != B or tuple(offset.shape[2:]) != out_size \
                or offset.shape[1] == 0 or offset.shape[1] % (n * K):
            raise ValueError(f"offset must have shape (B={B}, {n}*G*K with K={K}, *{out_size}), "
                             f"got {tuple(offset.shape)}")
        G = offset.shape[1] // (n * K)
        if c_in % G:
            raise ValueError(f"input channels {c_in} not divisible by offset groups {G}")
        if mask is not None and tuple(mask.shape) != (B, G * K, *out_size):
            raise ValueError(f"mask must have shape {(B, G * K, *out_size)}, got {tuple(mask.shape)}")
        if bias is not None and tuple(bias.shape) != (c_out,):
            raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
        if input.dtype not in _DTYPES:
            raise TypeError(f"deform_conv_triton supports float32, float16 and bfloat16 input, got {input.dtype}")
        for name, t in (("offset", offset), ("weight", weight), ("bias", bias), ("mask", mask)):
            if t is None:
                continue
            if t.dtype not in _DTYPES:
                raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
            if t.device != input.device:
                raise ValueError(f"{name} is on {t.device}, input on {input.device}")
        if triton is None:
            raise RuntimeError("deform_conv_triton needs triton (shipped with the CUDA builds of torch); "
                               "use nnunet_ext.building_blocks.deform_conv.deform_conv_nd instead")
        if input.device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"deform_conv_triton runs on CUDA tensors, got a {input.device.type} tensor; on CPU "
                               "use deform_conv_nd, or set TRITON_INTERPRET=1 before triton is imported to run the "
                               "kernels in triton's (slow) interpreter")
        pad3 = lambda t, fill: (fill,) * (3 - n) + tuple(t)  # noqa: E731
        self.n, self.B, self.c_in, self.c_out, self.K = n, B, c_in, c_out, K
        self.in_size, self.out_size = tuple(input.shape[2:]), out_size
        self.in3, self.out3, self.k3 = pad3(self.in_size, 1), pad3(out_size, 1), pad3(ksize, 1)
        self.stride3, self.padding3, self.dilation3 = pad3(stride, 1), pad3(padding, 0), pad3(dilation, 1)
        self.G, self.groups, self.cg_in, self.cg_out = G, groups, cg_in, c_out // groups
        self.seg = math.gcd(cg_in, c_in // G)
        self.M, self.L = B * math.prod(out_size), math.prod(out_size)

    def scalars(self):
        """The scalar arguments every kernel takes after its pointers, in order."""
        return (self.M, self.L, self.c_in, *self.in3, *self.out3[1:], self.K, *self.k3[1:], *self.stride3,
                *self.padding3, *self.dilation3, self.G, self.cg_in, self.cg_out, self.c_in // self.G, self.seg,
                self.c_out)

    def blocks(self):
        return block_sizes(self.cg_out, self.seg)


def block_sizes(cg_out: int, seg: int) -> Tuple[int, int, int]:
    """``BLOCK_M, BLOCK_N, BLOCK_K`` for ``cg_out`` output channels per conv group and channel segments of ``seg``
    (``tl.dot`` needs every side >= 16; untuned: chosen so that no kernel spills registers, see the module doc)."""
    pow2 = triton.next_power_of_2
    return BLOCK_M, min(64, max(16, pow2(cg_out))), min(MAX_BLOCK_K, max(16, pow2(seg)))


def launch_flags(dtype: torch.dtype) -> dict:
    """``tl.dot`` precision: IEEE fp32 for float32 input unless ``torch.backends.cudnn.allow_tf32`` (then TF32);
    bf16 operands multiplied as fp32 in the interpreter (see ``_mma``)."""
    return dict(IEEE=dtype == torch.float32 and not torch.backends.cudnn.allow_tf32,
                DOT_FP32=dtype == torch.bfloat16 and _interpreting())


def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 8 under the interpreter (only sets the split-K factor)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


class _DeformConvTriton(torch.autograd.Function):
    """DCNv2 with Triton kernels for forward and backward; saves only (input, offset, weight, mask)."""

    @staticmethod
    def forward(ctx, input, offset, weight, bias, mask, geo: _Geometry):
        input, offset, weight = input.contiguous(), offset.contiguous(), weight.contiguous()
        mask = None if mask is None else mask.contiguous()
        out = torch.empty(geo.B, geo.c_out, *geo.out_size, dtype=input.dtype, device=input.device)
        bm, bn, bk = geo.blocks()
        grid = (triton.cdiv(geo.M, bm), triton.cdiv(geo.cg_out, bn), geo.groups)
        _dcn_forward_kernel[grid](input, offset, offset if mask is None else mask, weight,
                                  weight if bias is None else bias.contiguous(), out, *geo.scalars(),
                                  NZ=2 if geo.n == 3 else 1, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
                                  **launch_flags(input.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        ctx.save_for_backward(input, offset, weight, mask)
        ctx.geo = geo
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, offset, weight, mask = ctx.saved_tensors
        geo = ctx.geo
        need_x, need_off, need_w, need_b, need_m = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        bm, bn, bk = geo.blocks()
        nz = 2 if geo.n == 3 else 1
        has_mask = mask is not None
        flags = launch_flags(input.dtype)
        gx = goff = gw = gb = gm = None
        if need_x or need_off or need_m:
            f32 = dict(dtype=torch.float32, device=input.device)
            gx = torch.zeros(input.shape, **f32) if need_x else None
            goff = torch.zeros(offset.shape, **f32) if need_off or need_m else None
            gm = torch.zeros(mask.shape, **f32) if has_mask and (need_off or need_m) else None
            _dcn_backward_data_kernel[(triton.cdiv(geo.M, bm), geo.groups)](
                input, offset, mask if has_mask else offset, weight, grad_out,
                input if gx is None else gx, offset if goff is None else goff, offset if gm is None else gm,
                *geo.scalars(), NZ=nz, HAS_MASK=has_mask, NEED_GX=gx is not None, NEED_GOFF=goff is not None,
                **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=NUM_WARPS, num_stages=NUM_STAGES)
            gx = gx.to(input.dtype) if need_x else None
            gm = gm.to(mask.dtype) if need_m else None
            goff = goff.to(offset.dtype) if need_off else None
        if need_w:
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            programs = geo.K * (geo.cg_in // geo.seg) * triton.cdiv(geo.seg, bk) * triton.cdiv(geo.cg_out, bn) \
                * geo.groups
            split = max(1, min(triton.cdiv(geo.M, bm), 4 * _multiprocessors(input.device) // programs))
            grid = (geo.K * (geo.cg_in // geo.seg) * triton.cdiv(geo.seg, bk), triton.cdiv(geo.cg_out, bn),
                    geo.groups * split)
            _dcn_backward_weight_kernel[grid](input, offset, mask if has_mask else offset, grad_out, gw,
                                              *geo.scalars(), split, NZ=nz, HAS_MASK=has_mask, **flags,
                                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=NUM_WARPS, num_stages=NUM_STAGES)
            gw = gw.to(weight.dtype)
        if need_b:
            gb = grad_out.sum(dim=(0, *range(2, grad_out.dim())), dtype=torch.float32).to(ctx.bias_dtype)
        return gx, goff, gw, gb, gm, None


def deform_conv_triton(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, stride: IntOrSeq = 1, padding: IntOrSeq = 0,
                       dilation: IntOrSeq = 1, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2, Eq. 3) with Triton kernels, 2D or 3D, differentiable w.r.t. input,
    offset, weight, bias and mask.

    Same arguments, layout and result as ``deform_conv_nd`` (conv groups = ``C_in // weight.shape[1]``, offset
    groups = ``offset.shape[1] // (N * K)``, ``mask=None`` = DCNv1); input float32, float16 or bfloat16, result in
    the input's dtype. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; anything else raises a
    RuntimeError naming the problem.
    """
    geo = _Geometry(input, offset, weight, bias, stride, padding, dilation, mask)
    return _DeformConvTriton.apply(input, offset, weight, bias, mask, geo)
