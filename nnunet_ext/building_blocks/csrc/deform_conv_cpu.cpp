// Modulated deformable convolution (DCNv2, Zhu et al. 2019, Eq. 3) for 2D and 3D on the CPU.
//
//     y(p0) = sum_k  w_k * x(p0 * stride - padding + dilation * p_k + dp_k) * dm_k
//
// x(.) is N-linear interpolation with zeros outside the input (the same as grid_sample with align_corners=True and
// padding_mode='zeros'). Layouts: see nnunet_ext/building_blocks/deform_conv.py (offset channel
// g * N * K + k * N + a, mask channel g * K + k, offset group g covering input channels [g * C / G, (g + 1) * C / G)).
//
// Design (im2col + GEMM, the input kept channels-last so that every interpolation corner is a contiguous run of
// channels the compiler vectorises):
//   forward, per chunk of output voxels: columns[l, conv group, k, c] = dm_k * x(p_lk)[c] (the sampling, here), then
//     out[:, l] = W @ columns[l, :]^T (at::mm, written into the output's final layout);
//   backward, per chunk: dcols = grad_out^T @ W (at::mm); ONE sampling pass computes, per voxel and kernel point,
//     the corner products e_j = <dcols, x[corner j]> and (per channel in registers) the sample S = sum_j w_j
//     x[corner j]; then grad_mask = <dcols, S> = sum_j w_j e_j and grad_offset_a = dm * sum_j dw_j/dp_a e_j in a
//     vectorised pass over the block's voxels, it scatters dm * w_j * dcols into grad_input and writes the column
//     dm * S once for grad_W = grad_out @ columns (at::mm). (The corner products take 2^N multiply-adds per channel;
//     forming S and its N derivatives D_a = sum_j dw_j/dp_a x[corner j] per channel took (N + 1) 2^N: the single-
//     thread fwd+bwd of the 16-channel layers was 3-4 % slower that way, in 2D and 3D.)
// The sampling runs on blocks of 64 output voxels: positions, corner indices, weights and weight derivatives of a
// block are computed lane-wise in vectorised loops (structure of arrays), then each voxel's channels are
// interpolated. All 2^N corner slots are processed (a corner outside the input has weight 0 and an index clamped into
// the input), so every loop is straight-line code.
// Each thread runs whole chunks (sampling and its GEMMs, single-threaded inside the parallel region) on its own
// column buffers of CHUNK_BYTES (deform_conv_cpu.py), small enough to stay in its L2 cache between the sampling and
// the GEMM: measured 2x faster than 8 MiB chunks shared by all threads. The buffers are kept by the thread between
// calls (thread_buffer).
// Nothing of size C * K * voxels is kept between forward and backward. In backward the output voxels of a sample are
// split into contiguous parts, each with its own grad_input and grad_W accumulators (part 0 writes grad_input
// directly) summed in part order, so no atomics are needed and the result does not depend on which thread runs which
// part.
// A channel run of exactly one vector (16 float channels, one offset group) takes a path with loops of constant
// length (straight-line vector code): forward + backward 7-9 % faster on the 2D layer, 13 % on the 3D one.
// Build with -fno-trapping-math: otherwise GCC does not vectorise the float -> int conversions of the corner loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <cstdint>
#include <vector>

namespace {

template <int N>
struct Geometry {
  int64_t in[N], out[N], ksize[N], stride[N], pad[N], dil[N];
  int64_t C, G, groups, K, L, V, cpg, cpo;  // channels, offset groups, conv groups, kernel points, output voxels,
                                            // input voxels, channels per conv group, channels per offset group
  int64_t row() const { return groups * K * cpg; }  // one output voxel's columns: [conv group][k][channel]
};

template <int N>
Geometry<N> make_geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef out_size,
                          at::IntArrayRef stride, at::IntArrayRef pad, at::IntArrayRef dil, int64_t G,
                          int64_t groups) {
  Geometry<N> g;
  g.C = x.size(1);
  g.G = G;
  g.groups = groups;
  g.K = 1;
  g.L = 1;
  g.V = 1;
  for (int a = 0; a < N; ++a) {
    g.in[a] = x.size(2 + a);
    g.out[a] = out_size[a];
    g.ksize[a] = weight.size(2 + a);
    g.stride[a] = stride[a];
    g.pad[a] = pad[a];
    g.dil[a] = dil[a];
    g.K *= g.ksize[a];
    g.L *= g.out[a];
    g.V *= g.in[a];
  }
  g.cpg = g.C / groups;
  g.cpo = g.C / G;
  TORCH_CHECK(g.V < (int64_t(1) << 31), "deform_conv_cpu: more than 2^31 input voxels per sample");
  return g;
}

// Output voxels sampled together: the positions, corners and weights of a block are computed across its voxels in
// vectorised loops (structure of arrays), then each voxel's channel runs are interpolated. 64 voxels: 12 % faster than
// 16 on the 2D layer (longer runs of each offset channel), 128 no faster in 2D.
constexpr int kBlock = 64;

// The 2^N interpolation corners of one kernel point for the output voxels of a block. Corner j is the upper neighbour
// along axis a when bit (N - 1 - a) of j is set. A corner outside the input (or every corner of a position outside
// (-1, size) or NaN) has weight 0 and derivative 0, and its index is clamped into the input, so it reads a real row
// and contributes nothing: the channel loops are straight-line code.
template <typename scalar_t, int N, bool kGrad>
struct BlockCorners {
  static constexpr int M = 1 << N;
  int32_t idx[M][kBlock];                 // voxel index (row-major over the input's spatial axes)
  scalar_t w[M][kBlock];                  // interpolation weight
  scalar_t dw[kGrad ? M : 1][N][kBlock];  // d w / d position_a (backward only)
};

// origin[a][i]: output voxel i's o_a * stride_a; kd: the kernel point's displacement dilation * k - padding per
// axis; off: the block's offsets of axis 0 (axis a at + a * L).
template <typename scalar_t, int N, bool kGrad>
inline void block_corners(const Geometry<N>& g, const scalar_t (*origin)[kBlock], const int64_t* kd,
                          const scalar_t* __restrict__ off, int n, BlockCorners<scalar_t, N, kGrad>& c) {
  constexpr int M = 1 << N;
  // every loop below runs over the block's voxels only (the axis and corner loops are outside), so each one is a
  // plain vectorised loop (checked with -fopt-info-vec; the float -> int conversion needs -fno-trapping-math)
  scalar_t p[N][kBlock], fac[N][2][kBlock], dfac[N][2][kBlock];  // per axis: lower/upper factor and its derivative
  int32_t ok[kBlock], corner[N][2][kBlock];                          // position inside; lower/upper index * stride
#pragma omp simd
  for (int i = 0; i < n; ++i) ok[i] = 1;
  for (int a = 0; a < N; ++a) {
    const scalar_t shift = scalar_t(kd[a]), end = scalar_t(g.in[a]);
    const scalar_t* __restrict__ o = origin[a];
    const scalar_t* __restrict__ d = off + a * g.L;
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      p[a][i] = o[i] + shift + d[i];
      ok[i] &= (p[a][i] > scalar_t(-1)) & (p[a][i] < end);  // false for NaN
    }
  }
  int32_t stride = 1;
  for (int a = N - 1; a >= 0; --a) {
    const int32_t size = static_cast<int32_t>(g.in[a]);
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      // 0/1 integers instead of bools: their selects defeat the vectoriser
      const int32_t inside = ok[i];
      const scalar_t q = inside ? p[a][i] : scalar_t(0);
      const int32_t t = static_cast<int32_t>(q);
      const int32_t f0 = t - int32_t(q < scalar_t(t));  // floor(q), q in (-1, size)
      const scalar_t f = q - scalar_t(f0);
      const int32_t has_lo = inside & int32_t(f0 >= 0), has_hi = inside & int32_t(f0 + 1 < size);
      fac[a][0][i] = scalar_t(has_lo) * (scalar_t(1) - f);
      fac[a][1][i] = scalar_t(has_hi) * f;
      dfac[a][0][i] = -scalar_t(has_lo);
      dfac[a][1][i] = scalar_t(has_hi);
      corner[a][0][i] = (f0 + int32_t(f0 < 0)) * stride;  // clamped into the input: weight 0 there
      corner[a][1][i] = (f0 + has_hi) * stride;
    }
    stride *= size;
  }
  for (int j = 0; j < M; ++j) {
    // corner j's per-axis factors, their derivatives and index terms (the last axis repeated with neutral values
    // when N = 2, so that the lane loop is the same straight-line code for 2D and 3D)
    const scalar_t *F[3], *D[3];
    const int32_t* I[3];
    for (int a = 0; a < N; ++a) {
      const int up = (j >> (N - 1 - a)) & 1;
      F[a] = fac[a][up];
      D[a] = dfac[a][up];
      I[a] = corner[a][up];
    }
    int32_t* __restrict__ idx = c.idx[j];
    scalar_t* __restrict__ w = c.w[j];
    scalar_t* __restrict__ dw0 = c.dw[kGrad ? j : 0][0];
    scalar_t* __restrict__ dw1 = c.dw[kGrad ? j : 0][N > 1 ? 1 : 0];
    scalar_t* __restrict__ dw2 = c.dw[kGrad ? j : 0][N > 2 ? 2 : 0];
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const scalar_t f0 = F[0][i], f1 = F[1][i], f2 = N > 2 ? F[N - 1][i] : scalar_t(1);
      idx[i] = I[0][i] + I[1][i] + (N > 2 ? I[N - 1][i] : 0);
      w[i] = f0 * f1 * f2;
      if (kGrad) {
        dw0[i] = D[0][i] * f1 * f2;
        dw1[i] = f0 * D[1][i] * f2;
        if (N > 2) dw2[i] = f0 * f1 * D[N - 1][i];
      }
    }
  }
}

// Regular sampling grid: kernel point k's displacement dilation * k - padding per axis (no divisions in the loops).
template <int N>
std::vector<int64_t> kernel_displacements(const Geometry<N>& g) {
  std::vector<int64_t> kd(g.K * N);
  for (int64_t k = 0; k < g.K; ++k) {
    int64_t rest = k;
    for (int a = N - 1; a >= 0; --a) {
      kd[k * N + a] = g.dil[a] * (rest % g.ksize[a]) - g.pad[a];
      rest /= g.ksize[a];
    }
  }
  return kd;
}

// origin[a][i] = o_a * stride_a of output voxels l0 + i, i < n.
template <typename scalar_t, int N>
inline void block_origin(const Geometry<N>& g, int64_t l0, int n, scalar_t (*origin)[kBlock]) {
  for (int i = 0; i < n; ++i) {
    int64_t l = l0 + i;
    for (int a = N - 1; a >= 0; --a) {
      origin[a][i] = scalar_t((l % g.out[a]) * g.stride[a]);
      l /= g.out[a];
    }
  }
}

// A run of channels [c0, c0 + len) of one offset group that lies in one conv group: contiguous both in x's channels
// and in a column row, where it starts at dst + k * cpg for kernel point k.
struct ChannelRun {
  int64_t dst, c0, len;
};

// The runs of each offset group (usually one: offset groups and conv groups nest).
template <int N>
std::vector<std::vector<ChannelRun>> channel_runs(const Geometry<N>& g) {
  std::vector<std::vector<ChannelRun>> runs(g.G);
  for (int64_t og = 0; og < g.G; ++og) {
    const int64_t end = (og + 1) * g.cpo;
    for (int64_t c0 = og * g.cpo; c0 < end;) {
      const int64_t gi = c0 / g.cpg, c1 = std::min(end, (gi + 1) * g.cpg);
      runs[og].push_back({gi * g.K * g.cpg + (c0 - gi * g.cpg), c0, c1 - c0});
      c0 = c1;
    }
  }
  return runs;
}

// Visits every block of output voxels in [s, e) of sample b and every (offset group, kernel point) of it:
// f(first voxel, n (voxels), og, k, index of (b, og, k, first voxel) in the mask layout, and of axis 0 in the
// offset layout (axis a at + a * L), corners).
template <typename scalar_t, int N, bool kGrad, typename F>
inline void for_each_block(const Geometry<N>& g, const std::vector<int64_t>& kd, const scalar_t* offset, int64_t b,
                           int64_t s, int64_t e, F&& f) {
  scalar_t origin[N][kBlock];
  BlockCorners<scalar_t, N, kGrad> c;
  for (int64_t l = s; l < e; l += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, e - l));
    block_origin<scalar_t, N>(g, l, n, origin);
    for (int64_t og = 0; og < g.G; ++og) {
      for (int64_t k = 0; k < g.K; ++k) {
        const int64_t bk = (b * g.G + og) * g.K + k;
        block_corners<scalar_t, N, kGrad>(g, origin, &kd[k * N], offset + bk * N * g.L + l, n, c);
        f(l, n, og, k, bk * g.L + l, bk * N * g.L + l, c);
      }
    }
  }
}

// columns[l - l0, :] for output voxels [l0, l1) of sample b.
template <typename scalar_t, int N>
void sample_columns(const Geometry<N>& g, const std::vector<int64_t>& kd,
                    const std::vector<std::vector<ChannelRun>>& runs, const scalar_t* x, const scalar_t* offset,
                    const scalar_t* mask, int64_t b, int64_t l0, int64_t l1, scalar_t* cols) {
  constexpr int M = 1 << N;
  constexpr int W = 64 / sizeof(scalar_t);  // lanes of one 512-bit vector
  const scalar_t* xb = x + b * g.V * g.C;
  for_each_block<scalar_t, N, false>(g, kd, offset, b, l0, l1, [&](int64_t lb, int n, int64_t og, int64_t k,
                                                                    int64_t mk, int64_t,
                                                                    BlockCorners<scalar_t, N, false>& c) {
    if (mask) {
      for (int j = 0; j < M; ++j)
#pragma omp simd
        for (int i = 0; i < n; ++i) c.w[j][i] *= mask[mk + i];
    }
    for (int i = 0; i < n; ++i) {
      scalar_t* row = cols + (lb + i - l0) * g.row();
      for (const ChannelRun& r : runs[og]) {
        const int64_t c0 = r.c0, len = r.len;
        scalar_t* __restrict__ d = row + r.dst + k * g.cpg;
        const scalar_t* src[M];
        scalar_t a[M];
        for (int j = 0; j < M; ++j) {
          src[j] = xb + int64_t(c.idx[j][i]) * g.C + c0;
          a[j] = c.w[j][i];
        }
        const auto sample = [&](int64_t t) {
          scalar_t v = 0;
#pragma GCC unroll 8
          for (int j = 0; j < M; ++j) v += a[j] * src[j][t];
          d[t] = v;
        };
        if (len == W) {  // one vector per row (16 float channels): a loop of constant length, straight-line code
#pragma omp simd
          for (int t = 0; t < W; ++t) sample(t);
          continue;
        }
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) sample(t);
      }
    }
  });
}

// The sum of W lanes by halving (a tree of vector additions).
template <typename scalar_t, int W>
inline scalar_t lane_sum(scalar_t (&v)[W]) {
#pragma GCC unroll 8
  for (int h = W / 2; h > 0; h /= 2)
#pragma omp simd
    for (int u = 0; u < h; ++u) v[u] += v[u + h];
  return v[0];
}

// The backward sampling pass over output voxels [l0, l1) of sample b, whose rows in dcols and cols start at l0 (see
// the file comment). grad_x: channels-last accumulation buffer of this part (used when kNeedX); cols: rebuilt columns
// (when kNeedW); grad_offset/grad_mask: written (or nullptr).
template <typename scalar_t, int N, bool kNeedX, bool kNeedW>
void backward_pass(const Geometry<N>& g, const std::vector<int64_t>& kd,
                   const std::vector<std::vector<ChannelRun>>& runs, const scalar_t* x, const scalar_t* offset,
                   const scalar_t* mask, const scalar_t* dcols, int64_t b, int64_t l0, int64_t l1, scalar_t* grad_x,
                   scalar_t* cols, scalar_t* grad_offset, scalar_t* grad_mask) {
  constexpr int M = 1 << N;
  constexpr int W = 64 / sizeof(scalar_t);  // lanes of the channel sums: one 512-bit vector
  const scalar_t* xb = x + b * g.V * g.C;
  for_each_block<scalar_t, N, true>(g, kd, offset, b, l0, l1, [&](int64_t lb, int n, int64_t og, int64_t k,
                                                                   int64_t mk, int64_t ok,
                                                                   BlockCorners<scalar_t, N, true>& c) {
    scalar_t m[kBlock], e[M][kBlock];  // e[j][i] = <dcols row, x[corner j]> of voxel i
    for (int i = 0; i < n; ++i) m[i] = mask ? mask[mk + i] : scalar_t(1);
    for (int i = 0; i < n; ++i) {
      const scalar_t* drow = dcols + (lb + i - l0) * g.row();
      scalar_t* crow = kNeedW ? cols + (lb + i - l0) * g.row() : nullptr;
      // per channel, in W lanes: e_j += dcols * x_j for every corner j (summed by halving at the end), and the
      // sample S = sum_j w_j x_j for the column dm * S (written once)
      scalar_t acc[M][W] = {};
      for (const ChannelRun& r : runs[og]) {
        const int64_t c0 = r.c0, len = r.len, dst = r.dst + k * g.cpg;
        const scalar_t* __restrict__ dr = drow + dst;
        const scalar_t* src[M];
        scalar_t w[M];
        for (int j = 0; j < M; ++j) {
          src[j] = xb + int64_t(c.idx[j][i]) * g.C + c0;
          w[j] = c.w[j][i];
        }
        scalar_t* __restrict__ cr = kNeedW ? crow + dst : nullptr;
        const auto body = [&](int64_t t, int u) {
          const scalar_t dv = dr[t];
          scalar_t sv = 0;
#pragma GCC unroll 8
          for (int j = 0; j < M; ++j) {
            const scalar_t xv = src[j][t];
            if (kNeedW) sv += w[j] * xv;
            acc[j][u] += dv * xv;
          }
          if (kNeedW) cr[t] = m[i] * sv;
        };
        // the corners of one position are distinct rows, except clamped ones of weight 0: scattered one by one
        if (len == W) {  // one vector per row (16 float channels): loops of constant length, straight-line code
#pragma omp simd
          for (int u = 0; u < W; ++u) body(u, u);
          if (kNeedX)
            for (int j = 0; j < M; ++j) {
              scalar_t* __restrict__ gj = grad_x + int64_t(c.idx[j][i]) * g.C + c0;
              const scalar_t mw = m[i] * w[j];
#pragma omp simd
              for (int t = 0; t < W; ++t) gj[t] += mw * dr[t];
            }
          continue;
        }
        int64_t t0 = 0;
        for (; t0 + W <= len; t0 += W) {  // whole vectors: the lane sums stay in registers
#pragma omp simd
          for (int u = 0; u < W; ++u) body(t0 + u, u);
        }
#pragma omp simd
        for (int u = 0; u < len - t0; ++u) body(t0 + u, u);
        if (kNeedX) {
          for (int j = 0; j < M; ++j) {
            scalar_t* __restrict__ gj = grad_x + int64_t(c.idx[j][i]) * g.C + c0;
            const scalar_t mw = m[i] * w[j];
#pragma omp simd
            for (int64_t t = 0; t < len; ++t) gj[t] += mw * dr[t];
          }
        }
      }
#pragma GCC unroll 8
      for (int j = 0; j < M; ++j) e[j][i] = lane_sum<scalar_t, W>(acc[j]);
    }
    // grad_mask = <dcols, S> = sum_j w_j e_j, grad_p_a = dm <dcols, dS/dp_a> = dm sum_j dw_j/dp_a e_j
    if (grad_mask) {
      scalar_t* __restrict__ gm = grad_mask + mk;
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        scalar_t v = 0;
        for (int j = 0; j < M; ++j) v += c.w[j][i] * e[j][i];
        gm[i] = v;
      }
    }
    if (grad_offset)
      for (int a = 0; a < N; ++a) {
        scalar_t* __restrict__ gp = grad_offset + ok + a * g.L;
#pragma omp simd
        for (int i = 0; i < n; ++i) {
          scalar_t v = 0;
          for (int j = 0; j < M; ++j) v += c.dw[j][a][i] * e[j][i];
          gp[i] = m[i] * v;
        }
      }
  });
}

// A [rows, cols] tensor on this thread's buffer `slot`, kept between calls and grown when needed: column buffers
// allocated per call were returned to the system by the allocator when freed and page-faulted in again on every call.
at::Tensor thread_buffer(int slot, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  struct Buffer {
    std::unique_ptr<char, decltype(&std::free)> data{nullptr, &std::free};
    size_t bytes = 0;
  };
  thread_local Buffer buffers[2];
  Buffer& buffer = buffers[slot];
  const size_t bytes = (rows * cols * options.dtype().itemsize() + 63) / 64 * 64;
  if (buffer.bytes < bytes) {
    buffer.data.reset(static_cast<char*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(buffer.data, "deform_conv_cpu: out of memory for ", bytes, " bytes of columns");
    buffer.bytes = bytes;
  }
  return at::from_blob(buffer.data.get(), {rows, cols}, options);
}

int64_t chunk_voxels(int64_t row_elems, int64_t elem_size, int64_t chunk_bytes, int64_t L) {
  return std::max<int64_t>(1, std::min<int64_t>(L, chunk_bytes / std::max<int64_t>(1, row_elems * elem_size)));
}

// The kernel reordered to [conv group, C_out / groups, K * C_in / groups] (k-major, channel-minor like the columns).
at::Tensor reorder_weight(const at::Tensor& weight, int64_t groups, int64_t K) {
  const int64_t cout = weight.size(0), cpg = weight.size(1);
  return weight.reshape({groups, cout / groups, cpg, K}).permute({0, 1, 3, 2}).reshape({groups, cout / groups, K * cpg})
      .contiguous();
}

template <int N>
at::Tensor forward_impl(const at::Tensor& input, const at::Tensor& offset_in, const c10::optional<at::Tensor>& mask_in,
                        const at::Tensor& weight_in, at::IntArrayRef out_size, at::IntArrayRef stride,
                        at::IntArrayRef pad, at::IntArrayRef dil, int64_t G, int64_t groups, int64_t chunk_bytes) {
  const auto x = input.movedim(1, -1).contiguous();  // channels-last
  const auto offset = offset_in.contiguous();
  const auto mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  auto g = make_geometry<N>(input, weight_in, out_size, stride, pad, dil, G, groups);
  const int64_t B = input.size(0), cout = weight_in.size(0), cog = cout / groups;
  const auto w = reorder_weight(weight_in, groups, g.K);
  const auto kd = kernel_displacements<N>(g);
  const auto runs = channel_runs<N>(g);
  // the output in its final layout [B, C_out, voxels]: each chunk's GEMM writes a column block of it directly
  std::vector<int64_t> shape{B, cout};
  for (int a = 0; a < N; ++a) shape.push_back(out_size[a]);
  at::Tensor out = at::empty(shape, input.options());
  const auto out3 = out.view({B, cout, g.L});
  const int64_t Lc = chunk_voxels(g.row(), input.element_size(), chunk_bytes, g.L), chunks = (g.L + Lc - 1) / Lc;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv_forward", [&] {
    // one parallel region: each thread samples a chunk into its own columns (small enough to stay in its L2 cache)
    // and multiplies them right away (a single-threaded at::mm inside the region)
    const at::ThreadLocalState tls;
    at::parallel_for(0, B * chunks, 1, [&](int64_t c0, int64_t c1) {
      const at::ThreadLocalStateGuard tls_guard(tls);  // the caller's grad / inference mode in worker threads
      at::Tensor cols = thread_buffer(0, Lc, g.row(), input.options());
      for (int64_t ci = c0; ci < c1; ++ci) {
        const int64_t b = ci / chunks, l0 = (ci % chunks) * Lc, l1 = std::min(g.L, l0 + Lc), n = l1 - l0;
        sample_columns<scalar_t, N>(g, kd, runs, x.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                                    mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, b, l0, l1,
                                    cols.data_ptr<scalar_t>());
        const auto c = cols.narrow(0, 0, n).view({n, groups, g.K * g.cpg});
        auto o = out3[b].narrow(1, l0, n);  // [C_out, n], rows L apart
        for (int64_t gi = 0; gi < groups; ++gi) {
          auto og = o.narrow(0, gi * cog, cog);
          at::mm_out(og, w[gi], c.select(1, gi).t());
        }
      }
    });
  });
  return out;
}

template <int N>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& offset_in,
    const c10::optional<at::Tensor>& mask_in, const at::Tensor& weight_in, at::IntArrayRef stride, at::IntArrayRef pad,
    at::IntArrayRef dil, int64_t G, int64_t groups, bool need_x, bool need_offset, bool need_mask, bool need_w,
    int64_t chunk_bytes) {
  const auto x = input.movedim(1, -1).contiguous();
  const auto offset = offset_in.contiguous();
  const auto mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  need_mask = need_mask && mask.defined();
  std::vector<int64_t> out_size(grad_out.sizes().begin() + 2, grad_out.sizes().end());
  auto g = make_geometry<N>(input, weight_in, out_size, stride, pad, dil, G, groups);
  const int64_t B = input.size(0), cout = weight_in.size(0), cog = cout / groups;
  const auto w = reorder_weight(weight_in, groups, g.K);
  const auto gout = grad_out.reshape({B, cout, g.L}).transpose(1, 2);  // [B, L, C_out] view: at::mm reads it transposed
  at::Tensor grad_x = need_x ? at::zeros_like(x) : at::Tensor();
  at::Tensor grad_offset = need_offset ? at::empty_like(offset) : at::Tensor();
  at::Tensor grad_mask = need_mask ? at::empty_like(mask) : at::Tensor();
  if (!(need_x || need_offset || need_mask || need_w))
    return {grad_x, grad_offset, grad_mask, at::Tensor()};
  const int64_t Lc = chunk_voxels(g.row(), input.element_size(), chunk_bytes, g.L);
  // the voxels of a sample are split into contiguous parts, each run by one thread from start to end (its chunks'
  // GEMMs, sampling pass and weight-gradient GEMMs) with its own grad_input and grad_W accumulators, summed in part
  // order at the end: no atomics, and the result does not depend on which thread runs which part
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), int64_t(8), (g.L + Lc - 1) / Lc}));
  std::vector<at::Tensor> gx_parts(need_x ? parts : 0), gw_parts(need_w ? parts : 0);
  for (int64_t p = 1; p < static_cast<int64_t>(gx_parts.size()); ++p) gx_parts[p] = at::empty_like(x[0]);
  for (auto& t : gw_parts) t = at::zeros_like(w);
  const auto kd = kernel_displacements<N>(g);
  const auto runs = channel_runs<N>(g);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv_backward", [&] {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t p = 1; p < static_cast<int64_t>(gx_parts.size()); ++p) gx_parts[p].zero_();
      const at::ThreadLocalState tls;
      at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
        const at::ThreadLocalStateGuard tls_guard(tls);  // the caller's grad / inference mode in worker threads
        at::Tensor dcols = thread_buffer(0, Lc, g.row(), input.options());
        at::Tensor cols = need_w ? thread_buffer(1, Lc, g.row(), input.options()) : at::Tensor();
        for (int64_t p = p0; p < p1; ++p) {
          scalar_t* gx = nullptr;
          if (need_x) gx = p == 0 ? grad_x[b].data_ptr<scalar_t>() : gx_parts[p].data_ptr<scalar_t>();
          const int64_t s = g.L * p / parts, e = g.L * (p + 1) / parts;
          for (int64_t l0 = s; l0 < e; l0 += Lc) {
            const int64_t l1 = std::min(e, l0 + Lc), n = l1 - l0;
            auto dc = dcols.narrow(0, 0, n).view({n, groups, g.K * g.cpg});
            const auto go = gout[b].narrow(0, l0, n);
            for (int64_t gi = 0; gi < groups; ++gi) {
              at::Tensor d = dc.select(1, gi);
              at::mm_out(d, go.narrow(1, gi * cog, cog), w[gi]);
            }
            const auto run = [&](auto pass) {
              pass(g, kd, runs, x.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                   mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, dcols.data_ptr<scalar_t>(), b, l0, l1,
                   gx, need_w ? cols.data_ptr<scalar_t>() : nullptr,
                   need_offset ? grad_offset.data_ptr<scalar_t>() : nullptr,
                   need_mask ? grad_mask.data_ptr<scalar_t>() : nullptr);
            };
            if (need_x && need_w) run(backward_pass<scalar_t, N, true, true>);
            else if (need_x) run(backward_pass<scalar_t, N, true, false>);
            else if (need_w) run(backward_pass<scalar_t, N, false, true>);
            else run(backward_pass<scalar_t, N, false, false>);
            if (need_w) {
              const auto c = cols.narrow(0, 0, n).view({n, groups, g.K * g.cpg});
              for (int64_t gi = 0; gi < groups; ++gi)
                gw_parts[p][gi].addmm_(go.narrow(1, gi * cog, cog).t(), c.select(1, gi));
            }
          }
        }
      });
      for (int64_t p = 1; p < static_cast<int64_t>(gx_parts.size()); ++p) grad_x[b].add_(gx_parts[p]);
    }
  });
  if (need_x) grad_x = grad_x.movedim(-1, 1).contiguous();
  at::Tensor grad_w;
  if (need_w) {
    grad_w = gw_parts[0];
    for (int64_t p = 1; p < parts; ++p) grad_w.add_(gw_parts[p]);
    grad_w = grad_w.view({groups, cog, g.K, g.cpg}).permute({0, 1, 3, 2}).reshape(weight_in.sizes()).contiguous();
  }
  return {grad_x, grad_offset, grad_mask, grad_w};
}

void check_inputs(const at::Tensor& input, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                  const at::Tensor& weight) {
  TORCH_CHECK(input.device().is_cpu(), "deform_conv_cpu: input must be a CPU tensor");
  TORCH_CHECK(input.dim() == 4 || input.dim() == 5, "deform_conv_cpu: input must be 4D or 5D");
  TORCH_CHECK(offset.scalar_type() == input.scalar_type() && weight.scalar_type() == input.scalar_type() &&
                  (!mask.has_value() || mask->scalar_type() == input.scalar_type()),
              "deform_conv_cpu: input, offset, mask and weight must have the same dtype");
}

at::Tensor deform_conv_forward(const at::Tensor& input, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                               const at::Tensor& weight, at::IntArrayRef out_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t offset_groups,
                               int64_t groups, int64_t chunk_bytes) {
  check_inputs(input, offset, mask, weight);
  if (input.dim() == 4)
    return forward_impl<2>(input, offset, mask, weight, out_size, stride, padding, dilation, offset_groups, groups,
                           chunk_bytes);
  return forward_impl<3>(input, offset, mask, weight, out_size, stride, padding, dilation, offset_groups, groups,
                         chunk_bytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& offset,
    const c10::optional<at::Tensor>& mask, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t offset_groups, int64_t groups, bool need_input, bool need_offset,
    bool need_mask, bool need_weight, int64_t chunk_bytes) {
  check_inputs(input, offset, mask, weight);
  if (input.dim() == 4)
    return backward_impl<2>(grad_out.contiguous(), input, offset, mask, weight, stride, padding, dilation,
                            offset_groups, groups, need_input, need_offset, need_mask, need_weight, chunk_bytes);
  return backward_impl<3>(grad_out.contiguous(), input, offset, mask, weight, stride, padding, dilation,
                          offset_groups, groups, need_input, need_offset, need_mask, need_weight, chunk_bytes);
}

}  // namespace

TORCH_LIBRARY(nnunet_ext_deform_conv_cpu, m) {
  m.def("forward(Tensor input, Tensor offset, Tensor? mask, Tensor weight, int[] out_size, int[] stride, "
        "int[] padding, int[] dilation, int offset_groups, int groups, int chunk_bytes) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor input, Tensor offset, Tensor? mask, Tensor weight, int[] stride, "
        "int[] padding, int[] dilation, int offset_groups, int groups, bool need_input, bool need_offset, "
        "bool need_mask, bool need_weight, int chunk_bytes) -> (Tensor, Tensor, Tensor, Tensor)");
  m.impl("forward", c10::DispatchKey::CPU, &deform_conv_forward);
  m.impl("backward", c10::DispatchKey::CPU, &deform_conv_backward);
}
