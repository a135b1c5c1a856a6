// Per-plane routines of GELU followed by instance normalisation with a per-channel affine map, on one contiguous
// (sample, channel) plane of n elements, computed by one thread while the plane is in cache; shared by
// gelu_instance_norm_cpu.cpp and convmixer_depthwise_cpu.cpp:
//
//     a = GELU(z),   y = (a - mean(a)) / sqrt(var(a) + eps) * gamma + beta
//
// The GELU is PyTorch's own (at::gelu_out / at::gelu_backward_out on the plane), the statistics are accumulated in
// double (two passes over the plane), the backward recomputes a and the statistics from z.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <utility>

namespace nnunet_ext_gelu_norm {

// a = GELU(z) of one plane into `a`; returns (mean, 1 / sqrt(var + eps)) of a, accumulated in double.
template <typename scalar_t>
std::pair<double, double> gelu_and_stats(const scalar_t* z, scalar_t* a, int64_t n, double eps,
                                         const at::TensorOptions& options) {
  at::Tensor out = at::from_blob(a, {n}, options);
  at::gelu_out(out, at::from_blob(const_cast<scalar_t*>(z), {n}, options));
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) sum += a[t];
  const double mean = sum / n;
  double sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t t = 0; t < n; ++t) sq += (a[t] - mean) * (a[t] - mean);
  return {mean, 1.0 / std::sqrt(sq / n + eps)};
}

// y = (GELU(z) - mean) rstd gamma + beta for one plane of n elements.
template <typename scalar_t>
void forward_plane(const scalar_t* z, scalar_t gamma, scalar_t beta, int64_t n, double eps,
                   const at::TensorOptions& options, scalar_t* __restrict__ y) {
  const auto [mean, rstd] = gelu_and_stats(z, y, n, eps, options);
  const scalar_t scale = scalar_t(rstd) * gamma, shift = beta - scalar_t(mean) * scale;
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) y[t] = y[t] * scale + shift;
}

// dL/dz of one plane into gz, and the plane's sums of dL/dy * xh and dL/dy (for gamma and beta). With
// xh = (a - mean) rstd and a = GELU(z): dL/da = gamma rstd (g - sum(g) / n - xh sum(g xh) / n), then
// dL/dz = GELU'(z) dL/da (at::gelu_backward).
template <typename scalar_t>
std::pair<scalar_t, scalar_t> backward_plane(const scalar_t* __restrict__ g, const scalar_t* z, scalar_t gamma,
                                             int64_t n, double eps, const at::TensorOptions& options,
                                             scalar_t* __restrict__ gz) {
  const auto [mean, rstd] = gelu_and_stats(z, gz, n, eps, options);  // a, recomputed
  double sum_g = 0, sum_g_xh = 0;
#pragma omp simd reduction(+ : sum_g, sum_g_xh)
  for (int64_t t = 0; t < n; ++t) {
    sum_g += g[t];
    sum_g_xh += g[t] * ((gz[t] - mean) * rstd);
  }
  const scalar_t k_g = scalar_t(gamma * rstd), k_a = scalar_t(-gamma * rstd * rstd * sum_g_xh / n),
                 k_0 = scalar_t(-gamma * rstd * sum_g / n), m = scalar_t(mean);
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) gz[t] = k_g * g[t] + k_a * (gz[t] - m) + k_0;
  at::Tensor ga = at::from_blob(gz, {n}, options);
  at::gelu_backward_out(ga, ga, at::from_blob(const_cast<scalar_t*>(z), {n}, options));
  return {scalar_t(sum_g_xh), scalar_t(sum_g)};
}

}  // namespace nnunet_ext_gelu_norm
