// Depthwise 2D convolution (groups == channels, stride 1, odd k x k kernel, dilation d, "same" padding d * (k / 2))
// on contiguous NCHW CPU tensors: forward, input gradient and weight/bias gradients.
//
//     y[b, c, y, x] = bias[c] + sum_{i, j} w[c, i, j] x[b, c, y + (i - r) d, x + (j - r) d]      (r = k / 2, zeros
//                                                                                                 outside the input)
// Each (sample, channel) plane is computed by one thread (depthwise_plane.h); the weight gradient is summed over the
// samples in sample order, so every result is the same for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "depthwise_plane.h"

namespace {

using nnunet_ext_depthwise::correlate;
using nnunet_ext_depthwise::plane_sum;
using nnunet_ext_depthwise::weight_grad_plane;

void check(const at::Tensor& x, const at::Tensor& w, int64_t dilation) {
  nnunet_ext_depthwise::check_input_and_weight(x, w, dilation, "depthwise_conv_cpu");
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
