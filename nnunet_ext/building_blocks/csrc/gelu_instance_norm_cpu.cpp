// GELU followed by instance normalisation with a per-channel affine map (nn.GroupNorm with one channel per group) on
// contiguous (B, C, spatial...) CPU tensors:
//
//     a = GELU(z),   y = (a - mean(a)) / sqrt(var(a) + eps) * gamma[c] + beta[c]     (per sample and channel plane)
//
// One thread computes a whole (sample, channel) plane while it is in cache: the GELU (at::gelu, PyTorch's own), the
// mean, the biased variance (two passes over the plane), the normalisation. The backward recomputes a and the
// statistics from z (nothing but z is kept) and gives dL/dz in one pass per plane; the affine gradients are reduced
// per plane and summed over the samples in sample order, so every result is the same for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

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

void check(const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& beta) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() >= 3, "gelu_instance_norm_cpu: (B, C, spatial...) CPU input");
  TORCH_CHECK(gamma.numel() == z.size(1) && beta.numel() == z.size(1) && gamma.scalar_type() == z.scalar_type() &&
                  beta.scalar_type() == z.scalar_type(),
              "gelu_instance_norm_cpu: gamma and beta must have one entry per channel, in the input's dtype");
}

at::Tensor forward(const at::Tensor& z_in, const at::Tensor& gamma_in, const at::Tensor& beta_in, double eps) {
  const auto z = z_in.contiguous(), gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  check(z, gamma, beta);
  const int64_t B = z.size(0), C = z.size(1), n = z[0][0].numel();
  at::Tensor y = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gelu_instance_norm_forward", [&] {
    const at::ThreadLocalState tls;
    at::parallel_for(0, B * C, 1, [&](int64_t p0, int64_t p1) {
      const at::ThreadLocalStateGuard tls_guard(tls);  // the caller's grad / inference mode in worker threads
      for (int64_t p = p0; p < p1; ++p)
        forward_plane<scalar_t>(z.data_ptr<scalar_t>() + p * n, gamma.data_ptr<scalar_t>()[p % C],
                                beta.data_ptr<scalar_t>()[p % C], n, eps, z.options(), y.data_ptr<scalar_t>() + p * n);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& z_in,
                                                        const at::Tensor& gamma_in, const at::Tensor& beta_in,
                                                        double eps) {
  const auto g = grad_in.contiguous(), z = z_in.contiguous(), gamma = gamma_in.contiguous();
  check(z, gamma, beta_in);
  const int64_t B = z.size(0), C = z.size(1), n = z[0][0].numel();
  at::Tensor gz = at::empty_like(z);
  at::Tensor g_gamma = at::empty({B, C}, z.options()), g_beta = at::empty({B, C}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gelu_instance_norm_backward", [&] {
    const at::ThreadLocalState tls;
    at::parallel_for(0, B * C, 1, [&](int64_t p0, int64_t p1) {
      const at::ThreadLocalStateGuard tls_guard(tls);
      for (int64_t p = p0; p < p1; ++p) {
        const auto [s_gamma, s_beta] = backward_plane<scalar_t>(
            g.data_ptr<scalar_t>() + p * n, z.data_ptr<scalar_t>() + p * n, gamma.data_ptr<scalar_t>()[p % C], n, eps,
            z.options(), gz.data_ptr<scalar_t>() + p * n);
        g_gamma.data_ptr<scalar_t>()[p] = s_gamma;
        g_beta.data_ptr<scalar_t>()[p] = s_beta;
      }
    });
  });
  // over the samples in sample order (not by the threads' split)
  return {gz, g_gamma.sum(0), g_beta.sum(0)};
}

}  // namespace

TORCH_LIBRARY(nnunet_ext_gelu_instance_norm_cpu, m) {
  m.def("forward(Tensor input, Tensor gamma, Tensor beta, float eps) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor input, Tensor gamma, Tensor beta, float eps) -> (Tensor, Tensor, Tensor)");
  m.impl("forward", c10::DispatchKey::CPU, &forward);
  m.impl("backward", c10::DispatchKey::CPU, &backward);
}
