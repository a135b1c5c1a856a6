// The depth-wise half of a ConvMixer block on contiguous NCHW CPU tensors, as one pass per (sample, channel) plane:
//
//     n = p + GN(GELU(DWConv(p)))       (DWConv: depthwise, stride 1, odd k x k, dilation d, "same" padding;
//                                        GN: instance normalisation with a per-channel affine map gamma, beta)
//
// Forward: one thread computes a plane's depthwise conv into the output plane, then the GELU, the statistics, the
// normalisation and the residual while the plane and its input are in cache (depthwise_plane.h, gelu_norm_plane.h);
// only p is kept for backward. Backward per plane: the depthwise conv is recomputed into a thread buffer, the GELU +
// norm backward gives dL/dDWConv (a second buffer), and from it dL/dp (the conv with the rotated kernel, plus the
// residual's dL/dn) and the plane's weight, bias, gamma and beta gradients; the parameter gradients are summed over
// the samples in sample order, so every result is the same for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <cstdint>

#include "depthwise_plane.h"
#include "gelu_norm_plane.h"

namespace {

using nnunet_ext_depthwise::correlate;
using nnunet_ext_depthwise::plane_sum;
using nnunet_ext_depthwise::weight_grad_plane;
using nnunet_ext_gelu_norm::backward_plane;
using nnunet_ext_gelu_norm::gelu_and_stats;

// y = p + GN(GELU(DWConv(p))) for one plane (p and y: n = H W elements).
template <typename scalar_t>
void forward_plane(const scalar_t* __restrict__ p, const scalar_t* w, scalar_t bias, scalar_t gamma, scalar_t beta,
                   int64_t H, int64_t W, int64_t k, int64_t dilation, double eps, const at::TensorOptions& options,
                   scalar_t* __restrict__ y) {
  const int64_t n = H * W;
  correlate(p, w, bias, H, W, k, dilation, y);
  const auto [mean, rstd] = gelu_and_stats(y, y, n, eps, options);
  const scalar_t scale = scalar_t(rstd) * gamma, shift = beta - scalar_t(mean) * scale;
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) y[t] = y[t] * scale + shift + p[t];
}

template <typename scalar_t>
void add_into(scalar_t* __restrict__ out, const scalar_t* __restrict__ g, int64_t n) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) out[t] += g[t];
}

void check(const at::Tensor& p, const at::Tensor& w, const at::Tensor& gamma, const at::Tensor& beta,
           int64_t dilation) {
  nnunet_ext_depthwise::check_input_and_weight(p, w, dilation, "convmixer_depthwise_cpu");
  const int64_t C = p.size(1);
  TORCH_CHECK(gamma.numel() == C && beta.numel() == C && gamma.scalar_type() == p.scalar_type() &&
                  beta.scalar_type() == p.scalar_type(),
              "convmixer_depthwise_cpu: one gamma and beta per channel, in the input's dtype");
}

at::Tensor forward(const at::Tensor& p_in, const at::Tensor& w_in, const at::Tensor& bias_in,
                   const at::Tensor& gamma_in, const at::Tensor& beta_in, int64_t dilation, double eps) {
  const auto p = p_in.contiguous(), w = w_in.contiguous(), bias = bias_in.contiguous();
  const auto gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  check(p, w, gamma, beta, dilation);
  const int64_t B = p.size(0), C = p.size(1), H = p.size(2), W = p.size(3), n = H * W, k = w.size(2);
  at::Tensor out = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "convmixer_depthwise_forward", [&] {
    const at::ThreadLocalState tls;
    at::parallel_for(0, B * C, 1, [&](int64_t q0, int64_t q1) {
      const at::ThreadLocalStateGuard tls_guard(tls);  // the caller's grad / inference mode in worker threads
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t c = q % C;
        forward_plane<scalar_t>(p.data_ptr<scalar_t>() + q * n, w.data_ptr<scalar_t>() + c * k * k,
                                bias.data_ptr<scalar_t>()[c], gamma.data_ptr<scalar_t>()[c],
                                beta.data_ptr<scalar_t>()[c], H, W, k, dilation, eps, p.options(),
                                out.data_ptr<scalar_t>() + q * n);
      }
    });
  });
  return out;
}

// (dL/dp, dL/dweight, dL/dbias, dL/dgamma, dL/dbeta)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_in, const at::Tensor& p_in, const at::Tensor& w_in, const at::Tensor& bias_in,
    const at::Tensor& gamma_in, const at::Tensor& beta_in, int64_t dilation, double eps) {
  const auto g = grad_in.contiguous(), p = p_in.contiguous(), w = w_in.contiguous(), bias = bias_in.contiguous();
  const auto gamma = gamma_in.contiguous();
  check(p, w, gamma, beta_in, dilation);
  const int64_t B = p.size(0), C = p.size(1), H = p.size(2), W = p.size(3), n = H * W, k = w.size(2), kk = k * k;
  at::Tensor gp = at::empty_like(p);
  at::Tensor gw_planes = at::zeros({B, C, kk}, p.options());
  at::Tensor planes = at::empty({3, B, C}, p.options());  // per plane: dL/dbias, dL/dgamma, dL/dbeta
  const auto w_rot = w.flip({2, 3}).contiguous();  // the input gradient correlates with the rotated kernel
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "convmixer_depthwise_backward", [&] {
    const at::ThreadLocalState tls;
    at::parallel_for(0, B * C, 1, [&](int64_t q0, int64_t q1) {
      const at::ThreadLocalStateGuard tls_guard(tls);
      at::Tensor buffers = at::empty({2, n}, p.options());  // the recomputed conv output and its gradient
      scalar_t* conv = buffers.data_ptr<scalar_t>();
      scalar_t* g_conv = conv + n;
      scalar_t* sums = planes.data_ptr<scalar_t>();
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t c = q % C;
        const scalar_t* x = p.data_ptr<scalar_t>() + q * n;
        const scalar_t* gq = g.data_ptr<scalar_t>() + q * n;
        scalar_t* gx = gp.data_ptr<scalar_t>() + q * n;
        correlate(x, w.data_ptr<scalar_t>() + c * kk, bias.data_ptr<scalar_t>()[c], H, W, k, dilation, conv);
        const auto [s_gamma, s_beta] =
            backward_plane<scalar_t>(gq, conv, gamma.data_ptr<scalar_t>()[c], n, eps, p.options(), g_conv);
        correlate(g_conv, w_rot.data_ptr<scalar_t>() + c * kk, scalar_t(0), H, W, k, dilation, gx);
        add_into(gx, gq, n);  // the residual
        weight_grad_plane<scalar_t>(x, g_conv, H, W, k, dilation, gw_planes.data_ptr<scalar_t>() + q * kk);
        sums[q] = plane_sum(g_conv, n);
        sums[B * C + q] = s_gamma;
        sums[2 * B * C + q] = s_beta;
      }
    });
  });
  // over the samples in sample order (not by the threads' split)
  const auto per_channel = planes.sum(1);
  return {gp, gw_planes.sum(0).view_as(w), per_channel[0], per_channel[1], per_channel[2]};
}

}  // namespace

TORCH_LIBRARY(nnunet_ext_convmixer_depthwise_cpu, m) {
  m.def("forward(Tensor input, Tensor weight, Tensor bias, Tensor gamma, Tensor beta, int dilation, float eps) "
        "-> Tensor");
  m.def("backward(Tensor grad_out, Tensor input, Tensor weight, Tensor bias, Tensor gamma, Tensor beta, "
        "int dilation, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.impl("forward", c10::DispatchKey::CPU, &forward);
  m.impl("backward", c10::DispatchKey::CPU, &backward);
}
