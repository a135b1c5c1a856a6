// DPC-Net's SpaCor squeeze (pyramid_correlation._UpsampledChannelAvgMax, Eq. 5) on contiguous CPU tensors: with
// up(high) the (tri)linear interpolation (align_corners=False) of high (B, Ch, d, h, w) to low's size (D, H, W),
//
//     out[b, v]    = mean_c [up(high), low][b, c, v] + max_c [up(high), low][b, c, v]
//     argmax[b, v] = the first channel of the concatenation [up(high), low] that holds the maximum
//
// without the concatenation or up(high): one thread per output row (b, z, y) interpolates each channel's row from
// the four coarse rows around it (z and y first, then x) and updates the row's running sum and maximum, channels in
// order, so the results do not depend on the thread count. The interpolation follows PyTorch's rule: source
// coordinate max(0, (j + 0.5) * in / out - 0.5), lower neighbour its floor, upper neighbour clamped to the border.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

template <typename scalar_t>
struct Axis {  // per output index: lower and upper source index, weight of the upper one
  std::vector<int64_t> lower, upper;
  std::vector<scalar_t> frac;
};

template <typename scalar_t>
Axis<scalar_t> axis_taps(int64_t in, int64_t out) {
  Axis<scalar_t> a;
  const double scale = double(in) / double(out);
  for (int64_t j = 0; j < out; ++j) {
    const double src = std::max(0.0, (j + 0.5) * scale - 0.5);
    const int64_t lo = std::min(int64_t(src), in - 1);
    a.lower.push_back(lo);
    a.upper.push_back(lo < in - 1 ? lo + 1 : lo);
    a.frac.push_back(scalar_t(src - double(lo)));
  }
  return a;
}

// out[i] = the z/y interpolation of the four coarse rows around an output row
template <typename scalar_t>
inline void blend_rows(scalar_t* __restrict__ out, const scalar_t* __restrict__ r00, const scalar_t* __restrict__ r01,
                       const scalar_t* __restrict__ r10, const scalar_t* __restrict__ r11, scalar_t fy, scalar_t fz,
                       int64_t w) {
  for (int64_t i = 0; i < w; ++i) {
    const scalar_t near = r00[i] + fy * (r01[i] - r00[i]);
    const scalar_t far = r10[i] + fy * (r11[i] - r10[i]);
    out[i] = near + fz * (far - near);
  }
}

// out[x] = the x interpolation of a coarse row to the output row; for an exact factor 2 (nnU-Net's pooling) the
// weights are 1/4 and 3/4 of the neighbours, the borders replicated
template <typename scalar_t>
inline void interpolate_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ row, const Axis<scalar_t>& a,
                            int64_t w, int64_t W) {
  if (W == 2 * w && w > 1) {
    out[0] = row[0];
    for (int64_t i = 1; i < w; ++i) {
      out[2 * i - 1] = row[i - 1] + scalar_t(0.25) * (row[i] - row[i - 1]);
      out[2 * i] = row[i - 1] + scalar_t(0.75) * (row[i] - row[i - 1]);
    }
    out[W - 1] = row[w - 1];
    return;
  }
  for (int64_t x = 0; x < W; ++x) out[x] = row[a.lower[x]] + a.frac[x] * (row[a.upper[x]] - row[a.lower[x]]);
}

// running channel sum and maximum of a row; a later channel replaces the maximum only when strictly larger
template <typename scalar_t>
inline void update(scalar_t* __restrict__ total, scalar_t* __restrict__ best, int32_t* __restrict__ index,
                   const scalar_t* __restrict__ value, int32_t channel, int64_t W) {
  for (int64_t x = 0; x < W; ++x) {
    total[x] += value[x];
    const bool wins = value[x] > best[x];
    best[x] = wins ? value[x] : best[x];
    index[x] = wins ? channel : index[x];
  }
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& high_in, const at::Tensor& low_in) {
  const auto high = high_in.contiguous(), low = low_in.contiguous();
  TORCH_CHECK(high.device().is_cpu() && low.device().is_cpu() && high.dim() == 5 && low.dim() == 5,
              "upsampled_channel_squeeze_cpu: (B, C, D, H, W) CPU tensors");
  TORCH_CHECK(high.size(0) == low.size(0) && high.scalar_type() == low.scalar_type(),
              "upsampled_channel_squeeze_cpu: high and low must have the same batch size and dtype");
  const int64_t B = high.size(0), Ch = high.size(1), d = high.size(2), h = high.size(3), w = high.size(4);
  const int64_t Cl = low.size(1), D = low.size(2), H = low.size(3), W = low.size(4);
  TORCH_CHECK(Ch > 0 && d > 0 && h > 0 && w > 0 && Ch + Cl < (int64_t(1) << 31),
              "upsampled_channel_squeeze_cpu: high must not be empty");
  at::Tensor out = at::empty({B, 1, D, H, W}, low.options());
  at::Tensor argmax = at::empty({B, 1, D, H, W}, low.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(low.scalar_type(), "upsampled_channel_squeeze_forward", [&] {
    const auto az = axis_taps<scalar_t>(d, D), ay = axis_taps<scalar_t>(h, H), ax = axis_taps<scalar_t>(w, W);
    const scalar_t* hp = high.data_ptr<scalar_t>();
    const scalar_t* lp = low.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    int64_t* ip = argmax.data_ptr<int64_t>();
    const scalar_t inv_channels = scalar_t(1) / scalar_t(Ch + Cl);
    at::parallel_for(0, B * D * H, 1, [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> coarse_row(w), value(W), total(W), best(W);
      std::vector<int32_t> index(W);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (D * H), z = (r / H) % D, y = r % H;
        const int64_t r00 = (az.lower[z] * h + ay.lower[y]) * w, r01 = (az.lower[z] * h + ay.upper[y]) * w,
                      r10 = (az.upper[z] * h + ay.lower[y]) * w, r11 = (az.upper[z] * h + ay.upper[y]) * w;
        for (int64_t c = 0; c < Ch; ++c) {
          const scalar_t* plane = hp + (b * Ch + c) * d * h * w;
          blend_rows(coarse_row.data(), plane + r00, plane + r01, plane + r10, plane + r11, ay.frac[y], az.frac[z], w);
          if (c == 0) {
            interpolate_row(total.data(), coarse_row.data(), ax, w, W);
            std::copy(total.begin(), total.end(), best.begin());
            std::fill(index.begin(), index.end(), 0);
          } else {
            interpolate_row(value.data(), coarse_row.data(), ax, w, W);
            update(total.data(), best.data(), index.data(), value.data(), int32_t(c), W);
          }
        }
        const int64_t row = (z * H + y) * W;
        for (int64_t c = 0; c < Cl; ++c)
          update(total.data(), best.data(), index.data(), lp + (b * Cl + c) * D * H * W + row, int32_t(Ch + c), W);
        scalar_t* o = op + b * D * H * W + row;
        int64_t* a = ip + b * D * H * W + row;
        for (int64_t x = 0; x < W; ++x) {
          o[x] = total[x] * inv_channels + best[x];
          a[x] = index[x];
        }
      }
    });
  });
  return {out, argmax};
}

// Gradients, with g = dL/dout and the saved argmax; mean_part (B, 1, d, h, w) is the adjoint interpolation of
// g / (Ch + Cl) (the average's share of every high channel, computed by the caller):
//
//     dL/dlow[b, c, v]  = g[b, v] / (Ch + Cl) + (argmax[b, v] == Ch + c ? g[b, v] : 0)
//     dL/dhigh[b, c, .] = mean_part[b] + the g[b, v] of the voxels v whose argmax is c, spread onto the 2^3 coarse
//                         voxels of v's interpolation with their weights.
//
// dL/dlow runs one thread per (sample, channel) plane; dL/dhigh one thread per (sample, block of channels), which
// visits the voxels in order and adds those whose argmax is in its block, so the results do not depend on the
// thread count.
constexpr int64_t kChannelBlock = 16;

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& argmax_in,
                                            const at::Tensor& mean_part_in, int64_t Ch, int64_t Cl) {
  const auto grad = grad_in.contiguous(), argmax = argmax_in.contiguous(), mean_part = mean_part_in.contiguous();
  TORCH_CHECK(grad.dim() == 5 && grad.size(1) == 1 && argmax.sizes() == grad.sizes() &&
                  argmax.scalar_type() == at::kLong && mean_part.dim() == 5 && mean_part.size(1) == 1 &&
                  mean_part.size(0) == grad.size(0) && mean_part.scalar_type() == grad.scalar_type() && Ch > 0,
              "upsampled_channel_squeeze_cpu: backward needs (B, 1, D, H, W) gradient and argmax and a (B, 1, d, h, "
              "w) mean part");
  const int64_t B = grad.size(0), D = grad.size(2), H = grad.size(3), W = grad.size(4);
  const int64_t d = mean_part.size(2), h = mean_part.size(3), w = mean_part.size(4);
  const int64_t fine = D * H * W, coarse = d * h * w;
  at::Tensor grad_high = at::empty({B, Ch, d, h, w}, grad.options());
  at::Tensor grad_low = at::empty({B, Cl, D, H, W}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "upsampled_channel_squeeze_backward", [&] {
    const auto az = axis_taps<scalar_t>(d, D), ay = axis_taps<scalar_t>(h, H), ax = axis_taps<scalar_t>(w, W);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t* a = argmax.data_ptr<int64_t>();
    const scalar_t* m = mean_part.data_ptr<scalar_t>();
    scalar_t* gh = grad_high.data_ptr<scalar_t>();
    scalar_t* gl = grad_low.data_ptr<scalar_t>();
    const scalar_t inv_channels = scalar_t(1) / scalar_t(Ch + Cl);
    at::parallel_for(0, B * Cl, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / Cl, channel = Ch + p % Cl;
        const scalar_t* __restrict__ gb = g + b * fine;
        const int64_t* __restrict__ ab = a + b * fine;
        scalar_t* __restrict__ out = gl + p * fine;
        for (int64_t v = 0; v < fine; ++v) out[v] = gb[v] * inv_channels + (ab[v] == channel ? gb[v] : scalar_t(0));
      }
    });
    const int64_t blocks = (Ch + kChannelBlock - 1) / kChannelBlock;
    at::parallel_for(0, B * blocks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = k / blocks, c0 = (k % blocks) * kChannelBlock, c1 = std::min(Ch, c0 + kChannelBlock);
        for (int64_t c = c0; c < c1; ++c) std::copy(m + b * coarse, m + (b + 1) * coarse, gh + (b * Ch + c) * coarse);
        for (int64_t z = 0; z < D; ++z)
          for (int64_t y = 0; y < H; ++y) {
            const int64_t row = (z * H + y) * W;
            for (int64_t x = 0; x < W; ++x) {
              const int64_t c = a[b * fine + row + x];
              if (c < c0 || c >= c1) continue;
              const scalar_t value = g[b * fine + row + x];
              scalar_t* plane = gh + (b * Ch + c) * coarse;
              const int64_t zs[2] = {az.lower[z], az.upper[z]}, ys[2] = {ay.lower[y], ay.upper[y]},
                            xs[2] = {ax.lower[x], ax.upper[x]};
              const scalar_t wz[2] = {1 - az.frac[z], az.frac[z]}, wy[2] = {1 - ay.frac[y], ay.frac[y]},
                             wx[2] = {1 - ax.frac[x], ax.frac[x]};
              for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j)
                  for (int l = 0; l < 2; ++l) plane[(zs[i] * h + ys[j]) * w + xs[l]] += value * wz[i] * wy[j] * wx[l];
            }
          }
      }
    });
  });
  return {grad_high, grad_low};
}

}  // namespace

TORCH_LIBRARY(nnunet_ext_upsampled_channel_squeeze_cpu, m) {
  m.def("forward(Tensor high, Tensor low) -> (Tensor, Tensor)");
  m.def("backward(Tensor grad_out, Tensor argmax, Tensor mean_part, int n_high, int n_low) -> (Tensor, Tensor)");
  m.impl("forward", c10::DispatchKey::CPU, &forward);
  m.impl("backward", c10::DispatchKey::CPU, &backward);
}
