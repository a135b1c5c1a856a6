// Depthwise 2D convolution (groups == channels, stride 1, odd k x k kernel, dilation d, "same" padding d * (k / 2))
// on contiguous NCHW CPU tensors: forward, input gradient and weight/bias gradients.
//
//     y[b, c, y, x] = bias[c] + sum_{i, j} w[c, i, j] x[b, c, y + (i - r) d, x + (j - r) d]      (r = k / 2, zeros
//                                                                                                 outside the input)
// Each (sample, channel) plane is computed by one thread: per output row, the taps' source rows are accumulated
// into a block of 64 outputs (a loop over x the compiler vectorises), the columns whose taps reach outside the row
// in a separate, checked loop; 3x3, 5x5 and 7x7 kernels have their tap loops unrolled. The input gradient is the
// same loop with the kernel rotated by 180 degrees; the weight gradient per plane is k^2 dot products of grad_out
// with shifted rows, summed over the samples in sample order, so every result is the same for any number of
// threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

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

void check(const at::Tensor& x, const at::Tensor& w, int64_t dilation) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(), "depthwise_conv_cpu: contiguous NCHW CPU input");
  TORCH_CHECK(w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1 && w.size(2) == w.size(3) && w.size(2) % 2 == 1,
              "depthwise_conv_cpu: weight must be (C, 1, k, k) with odd k");
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && dilation >= 1, "depthwise_conv_cpu: dtype / dilation");
}

at::Tensor forward(const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& bias_in,
                   int64_t dilation) {
  const auto x = x_in.contiguous();
  const auto w = w_in.contiguous();
  check(x, w, dilation);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), k = w.size(2);
  at::Tensor out = at::empty_like(x);
  const auto bias_t = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv_forward", [&] {
    const scalar_t* bias = bias_t.defined() ? bias_t.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B * C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % C;
        correlate(x.data_ptr<scalar_t>() + p * H * W, w.data_ptr<scalar_t>() + c * k * k,
                  bias ? bias[c] : scalar_t(0), H, W, k, dilation, out.data_ptr<scalar_t>() + p * H * W);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                        const at::Tensor& w_in, int64_t dilation, bool need_x,
                                                        bool need_w, bool need_bias) {
  const auto go = grad_in.contiguous();
  const auto x = x_in.contiguous();
  const auto w = w_in.contiguous();
  check(x, w, dilation);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), k = w.size(2), kk = k * k;
  at::Tensor gx = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor gw_planes = need_w ? at::zeros({B, C, kk}, x.options()) : at::Tensor();
  at::Tensor gb_planes = need_bias ? at::empty({B, C}, x.options()) : at::Tensor();
  const auto w_rot = w.flip({2, 3}).contiguous();  // the input gradient correlates with the rotated kernel
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv_backward", [&] {
    at::parallel_for(0, B * C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % C;
        const scalar_t* g = go.data_ptr<scalar_t>() + p * H * W;
        if (need_x)
          correlate(g, w_rot.data_ptr<scalar_t>() + c * kk, scalar_t(0), H, W, k, dilation,
                    gx.data_ptr<scalar_t>() + p * H * W);
        if (need_w)
          weight_grad_plane<scalar_t>(x.data_ptr<scalar_t>() + p * H * W, g, H, W, k, dilation,
                                      gw_planes.data_ptr<scalar_t>() + p * kk);
        if (need_bias) gb_planes.data_ptr<scalar_t>()[p] = plane_sum(g, H * W);
      }
    });
  });
  // over the samples in sample order (not by the threads' split)
  at::Tensor gw = need_w ? gw_planes.sum(0).view_as(w) : at::Tensor();
  at::Tensor gb = need_bias ? gb_planes.sum(0) : at::Tensor();
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY(nnunet_ext_depthwise_conv_cpu, m) {
  m.def("forward(Tensor input, Tensor weight, Tensor? bias, int dilation) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor input, Tensor weight, int dilation, bool need_input, bool need_weight, "
        "bool need_bias) -> (Tensor, Tensor, Tensor)");
  m.impl("forward", c10::DispatchKey::CPU, &forward);
  m.impl("backward", c10::DispatchKey::CPU, &backward);
}
