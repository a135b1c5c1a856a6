// Per-plane routines of the depthwise 2D convolution (one (sample, channel) H x W plane, computed by one thread),
// shared by depthwise_conv_cpu.cpp and convmixer_depthwise_cpu.cpp:
//
//     out[y, x] = bias + sum_{i, j} w[i, j] in[y + (i - r) d, x + (j - r) d]      (r = k / 2, zeros outside the plane)
//
// Per output row, the taps' source rows are accumulated into a block of 64 outputs (a loop over x the compiler
// vectorises), the columns whose taps reach outside the row in a separate, checked loop; 3x3, 5x5 and 7x7 kernels
// have their tap loops unrolled. The input gradient is the same correlation with the kernel rotated by 180 degrees;
// the weight gradient per plane is k^2 dot products of grad_out with shifted rows.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace nnunet_ext_depthwise {

// The arguments of a depthwise op named `op`: a contiguous NCHW CPU input x, a (C, 1, k, k) weight with odd k in
// x's dtype, dilation >= 1.
inline void check_input_and_weight(const at::Tensor& x, const at::Tensor& w, int64_t dilation, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(), op, ": contiguous NCHW CPU input");
  TORCH_CHECK(w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1 && w.size(2) == w.size(3) && w.size(2) % 2 == 1,
              op, ": weight must be (C, 1, k, k) with odd k");
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && dilation >= 1, op, ": dtype / dilation");
}

constexpr int kBlock = 64;  // output columns accumulated in registers

// out (H x W plane) = bias + sum over taps of w[i][j] * in shifted by ((i - r) d, (j - r) d).
template <typename scalar_t, int K>
void correlate_plane(const scalar_t* __restrict__ in, const scalar_t* __restrict__ w, scalar_t bias, int64_t H,
                     int64_t W, int64_t k_runtime, int64_t d, scalar_t* __restrict__ out) {
  const int64_t k = K ? K : k_runtime;
  const int64_t r = k / 2, reach = r * d;
  const int64_t x_lo = std::min(reach, W), x_hi = std::max(x_lo, W - reach);  // [x_lo, x_hi): every tap inside
  for (int64_t y = 0; y < H; ++y) {
    scalar_t* __restrict__ o = out + y * W;
    // the kernel rows whose source row y + (i - r) d lies inside the input
    const int64_t i0 = std::max<int64_t>(0, (reach - y + d - 1) / d);
    const int64_t i1 = std::min<int64_t>(k, (H - 1 - y + reach) / d + 1);
    for (int64_t x0 = x_lo; x0 < x_hi; x0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, x_hi - x0));
      scalar_t acc[kBlock];
#pragma omp simd
      for (int u = 0; u < kBlock; ++u) acc[u] = bias;
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* row = in + (y + (i - r) * d) * W + x0 - reach;
#pragma GCC unroll 7
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t wv = w[i * k + j];
          const scalar_t* s = row + j * d;
          if (n == kBlock) {
#pragma omp simd
            for (int u = 0; u < kBlock; ++u) acc[u] += wv * s[u];
          } else {
#pragma omp simd
            for (int u = 0; u < n; ++u) acc[u] += wv * s[u];
          }
        }
      }
#pragma omp simd
      for (int u = 0; u < n; ++u) o[x0 + u] = acc[u];
    }
    // the border columns, whose taps reach outside the row: those taps are skipped
    const auto border = [&](int64_t x) {
      scalar_t v = bias;
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* row = in + (y + (i - r) * d) * W;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t sx = x + (j - r) * d;
          if (sx >= 0 && sx < W) v += w[i * k + j] * row[sx];
        }
      }
      o[x] = v;
    };
    for (int64_t x = 0; x < x_lo; ++x) border(x);
    for (int64_t x = x_hi; x < W; ++x) border(x);
  }
}

// gw[i][j] += sum over the plane of go[y, x] * in[y + (i - r) d, x + (j - r) d]
template <typename scalar_t>
void weight_grad_plane(const scalar_t* __restrict__ in, const scalar_t* __restrict__ go, int64_t H, int64_t W,
                       int64_t k, int64_t d, scalar_t* __restrict__ gw) {
  const int64_t r = k / 2;
  for (int64_t y = 0; y < H; ++y) {
    const scalar_t* g = go + y * W;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t sy = y + (i - r) * d;
      if (sy < 0 || sy >= H) continue;
      const scalar_t* row = in + sy * W;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = (j - r) * d, x0 = std::max<int64_t>(0, -s), x1 = std::min<int64_t>(W, W - s);
        scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t x = x0; x < x1; ++x) acc += g[x] * row[x + s];
        gw[i * k + j] += acc;
      }
    }
  }
}

template <typename scalar_t>
void correlate(const scalar_t* in, const scalar_t* w, scalar_t bias, int64_t H, int64_t W, int64_t k, int64_t d,
               scalar_t* out) {
  if (k == 3) correlate_plane<scalar_t, 3>(in, w, bias, H, W, k, d, out);
  else if (k == 5) correlate_plane<scalar_t, 5>(in, w, bias, H, W, k, d, out);
  else if (k == 7) correlate_plane<scalar_t, 7>(in, w, bias, H, W, k, d, out);
  else correlate_plane<scalar_t, 0>(in, w, bias, H, W, k, d, out);
}

template <typename scalar_t>
scalar_t plane_sum(const scalar_t* __restrict__ g, int64_t n) {
  scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t t = 0; t < n; ++t) acc += g[t];
  return acc;
}

}  // namespace nnunet_ext_depthwise
