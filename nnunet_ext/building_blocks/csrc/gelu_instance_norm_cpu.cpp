// GELU followed by instance normalisation with a per-channel affine map (nn.GroupNorm with one channel per group) on
// contiguous (B, C, spatial...) CPU tensors:
//
//     a = GELU(z),   y = (a - mean(a)) / sqrt(var(a) + eps) * gamma[c] + beta[c]     (per sample and channel plane)
//
// One thread computes a whole (sample, channel) plane while it is in cache (gelu_norm_plane.h). The backward
// recomputes a and the statistics from z (nothing but z is kept) and gives dL/dz in one pass per plane; the affine
// gradients are reduced per plane and summed over the samples in sample order, so every result is the same for any
// number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <cstdint>

#include "gelu_norm_plane.h"

namespace {

using nnunet_ext_gelu_norm::backward_plane;
using nnunet_ext_gelu_norm::forward_plane;

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
