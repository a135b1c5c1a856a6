// DPC-Net's attention resampling (pyramid_correlation._AttentionResample) on contiguous CPU tensors: a stencil over
// the replicate-padded coarse feature G (B, C, D, H, W) whose per-voxel weights are T tap maps M (B, T, D, H, W),
//
//     out[b, c, p] = sum_t M[b, t, p] * G[b, c, clamp(p + o_t)]          (o_t in {-1, 0, 1}^3, clamp per axis)
//
// and its gradients
//
//     dL/dM[b, t, p] = sum_c dL/dout[b, c, p] * G[b, c, clamp(p + o_t)]
//     dL/dG[b, c, q] = sum_t sum_{p : clamp(p + o_t) = q} M[b, t, p] * dL/dout[b, c, p].
//
// The forward and dL/dM run one thread per (sample, z, y) row, all channels in turn while the row's T tap maps stay
// in the L1 cache; dL/dG runs one thread per (sample, block of channels), scattering along the rows in a fixed order.
// Every output element is summed by one thread in a fixed order, so the results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kChannelBlock = 8;  // channels per task of dL/dG: the row's tap maps are reused across a block

struct Shape {
  int64_t B, C, T, D, H, W;
};

int64_t clamp(int64_t i, int64_t n) { return std::min(std::max(i, int64_t(0)), n - 1); }

Shape check(const at::Tensor& maps, const at::Tensor& offsets, const at::Tensor& coarse) {
  TORCH_CHECK(maps.device().is_cpu() && coarse.device().is_cpu() && maps.dim() == 5 && coarse.dim() == 5,
              "attention_resample_cpu: (B, T, D, H, W) tap maps and a (B, C, D, H, W) feature on the CPU");
  TORCH_CHECK(maps.size(0) == coarse.size(0) && maps.sizes().slice(2) == coarse.sizes().slice(2),
              "attention_resample_cpu: the tap maps must have the feature's batch and spatial size");
  TORCH_CHECK(maps.scalar_type() == coarse.scalar_type(), "attention_resample_cpu: maps and feature dtypes differ");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 2 && offsets.size(0) == maps.size(1) &&
                  offsets.size(1) == 3 && offsets.min().item<int64_t>() >= -1 && offsets.max().item<int64_t>() <= 1,
              "attention_resample_cpu: offsets must be (T, 3) int64 in {-1, 0, 1}");
  return {coarse.size(0), coarse.size(1), maps.size(1), coarse.size(2), coarse.size(3), coarse.size(4)};
}

// A run of taps sharing their (z, y) offsets: either one tap, or the three x offsets -1, 0, 1 (taps t, t + 1, t + 2),
// computed in one pass over the row (a third of the passes over short rows).
struct Run {
  int64_t first, count, dz, dy, dx;
};

std::vector<Run> runs_of(const int64_t* o, int64_t T) {
  std::vector<Run> runs;
  for (int64_t t = 0; t < T;) {
    const bool triple = t + 2 < T && o[3 * t] == o[3 * t + 3] && o[3 * t] == o[3 * t + 6] &&
                        o[3 * t + 1] == o[3 * t + 4] && o[3 * t + 1] == o[3 * t + 7] && o[3 * t + 2] == -1 &&
                        o[3 * t + 5] == 0 && o[3 * t + 8] == 1;
    runs.push_back({t, triple ? 3 : 1, o[3 * t], o[3 * t + 1], o[3 * t + 2]});
    t += triple ? 3 : 1;
  }
  return runs;
}

// acc[x] += sum over the run's taps of m_t[x] * src[clamp(x + dx_t)], x in [0, W); m points at the run's first map
// row, maps of consecutive taps are `step` apart
template <typename scalar_t>
inline void run_fma(scalar_t* __restrict__ acc, const scalar_t* __restrict__ m, int64_t step,
                    const scalar_t* __restrict__ src, const Run& run, int64_t W) {
  if (run.count == 1) {
    for (int64_t x = 0; x < W; ++x) acc[x] += m[x] * src[clamp(x + run.dx, W)];
    return;
  }
  const scalar_t* __restrict__ m0 = m;
  const scalar_t* __restrict__ m1 = m + step;
  const scalar_t* __restrict__ m2 = m + 2 * step;
  acc[0] += m0[0] * src[0] + m1[0] * src[0] + m2[0] * src[clamp(1, W)];
  for (int64_t x = 1; x < W - 1; ++x) acc[x] += m0[x] * src[x - 1] + m1[x] * src[x] + m2[x] * src[x + 1];
  if (W > 1) acc[W - 1] += m0[W - 1] * src[W - 2] + m1[W - 1] * src[W - 1] + m2[W - 1] * src[W - 1];
}

// the run's map gradients: gm_t[x] += g[x] * src[clamp(x + dx_t)]
template <typename scalar_t>
inline void run_map_grad(scalar_t* __restrict__ gm, int64_t step, const scalar_t* __restrict__ g,
                         const scalar_t* __restrict__ src, const Run& run, int64_t W) {
  if (run.count == 1) {
    for (int64_t x = 0; x < W; ++x) gm[x] += g[x] * src[clamp(x + run.dx, W)];
    return;
  }
  scalar_t* __restrict__ gm0 = gm;
  scalar_t* __restrict__ gm1 = gm + step;
  scalar_t* __restrict__ gm2 = gm + 2 * step;
  gm0[0] += g[0] * src[0];
  gm1[0] += g[0] * src[0];
  gm2[0] += g[0] * src[clamp(1, W)];
  for (int64_t x = 1; x < W - 1; ++x) {
    gm0[x] += g[x] * src[x - 1];
    gm1[x] += g[x] * src[x];
    gm2[x] += g[x] * src[x + 1];
  }
  if (W > 1) {
    gm0[W - 1] += g[W - 1] * src[W - 2];
    gm1[W - 1] += g[W - 1] * src[W - 1];
    gm2[W - 1] += g[W - 1] * src[W - 1];
  }
}

// the transposed stencil: dst[clamp(x + dx_t)] += m_t[x] * g[x] over the run's taps, as a gather per dst element
template <typename scalar_t>
inline void run_scatter(scalar_t* __restrict__ dst, const scalar_t* __restrict__ m, int64_t step,
                        const scalar_t* __restrict__ g, const Run& run, int64_t W) {
  if (run.count == 1) {
    for (int64_t x = 0; x < W; ++x) dst[clamp(x + run.dx, W)] += m[x] * g[x];
    return;
  }
  const scalar_t* __restrict__ m0 = m;  // dx = -1: x sends to x - 1 (x = 0 to itself)
  const scalar_t* __restrict__ m1 = m + step;
  const scalar_t* __restrict__ m2 = m + 2 * step;  // dx = +1: x sends to x + 1 (x = W - 1 to itself)
  if (W == 1) {
    dst[0] += (m0[0] + m1[0] + m2[0]) * g[0];
    return;
  }
  dst[0] += m0[0] * g[0] + m0[1] * g[1] + m1[0] * g[0];
  for (int64_t x = 1; x < W - 1; ++x) dst[x] += m0[x + 1] * g[x + 1] + m1[x] * g[x] + m2[x - 1] * g[x - 1];
  dst[W - 1] += m1[W - 1] * g[W - 1] + m2[W - 2] * g[W - 2] + m2[W - 1] * g[W - 1];
}

at::Tensor forward(const at::Tensor& maps_in, const at::Tensor& offsets_in, const at::Tensor& coarse_in) {
  const auto maps = maps_in.contiguous(), coarse = coarse_in.contiguous(), offsets = offsets_in.contiguous();
  const Shape s = check(maps, offsets, coarse);
  at::Tensor out = at::zeros_like(coarse);
  const auto runs = runs_of(offsets.data_ptr<int64_t>(), s.T);
  AT_DISPATCH_FLOATING_TYPES(coarse.scalar_type(), "attention_resample_forward", [&] {
    const scalar_t* m = maps.data_ptr<scalar_t>();
    const scalar_t* g = coarse.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    const int64_t plane = s.D * s.H * s.W;
    at::parallel_for(0, s.B * s.D * s.H, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (s.D * s.H), z = (r / s.H) % s.D, yy = r % s.H, row = (z * s.H + yy) * s.W;
        for (int64_t c = 0; c < s.C; ++c) {
          const scalar_t* gc = g + (b * s.C + c) * plane;
          for (const Run& run : runs) {
            const scalar_t* src = gc + (clamp(z + run.dz, s.D) * s.H + clamp(yy + run.dy, s.H)) * s.W;
            run_fma(y + (b * s.C + c) * plane + row, m + (b * s.T + run.first) * plane + row, plane, src, run, s.W);
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& maps_in,
                                            const at::Tensor& offsets_in, const at::Tensor& coarse_in) {
  const auto grad = grad_in.contiguous(), maps = maps_in.contiguous(), coarse = coarse_in.contiguous(),
             offsets = offsets_in.contiguous();
  const Shape s = check(maps, offsets, coarse);
  TORCH_CHECK(grad.sizes() == coarse.sizes() && grad.scalar_type() == coarse.scalar_type(),
              "attention_resample_cpu: the output gradient must have the feature's shape and dtype");
  at::Tensor grad_maps = at::zeros_like(maps), grad_coarse = at::zeros_like(coarse);
  const auto runs = runs_of(offsets.data_ptr<int64_t>(), s.T);
  AT_DISPATCH_FLOATING_TYPES(coarse.scalar_type(), "attention_resample_backward", [&] {
    const scalar_t* m = maps.data_ptr<scalar_t>();
    const scalar_t* g = coarse.data_ptr<scalar_t>();
    const scalar_t* go = grad.data_ptr<scalar_t>();
    scalar_t* gm = grad_maps.data_ptr<scalar_t>();
    scalar_t* gg = grad_coarse.data_ptr<scalar_t>();
    const int64_t plane = s.D * s.H * s.W;
    // dL/dM: one thread per row, channels in order
    at::parallel_for(0, s.B * s.D * s.H, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (s.D * s.H), z = (r / s.H) % s.D, yy = r % s.H, row = (z * s.H + yy) * s.W;
        for (int64_t c = 0; c < s.C; ++c) {
          const scalar_t* gc = g + (b * s.C + c) * plane;
          for (const Run& run : runs) {
            const scalar_t* src = gc + (clamp(z + run.dz, s.D) * s.H + clamp(yy + run.dy, s.H)) * s.W;
            run_map_grad(gm + (b * s.T + run.first) * plane + row, plane, go + (b * s.C + c) * plane + row, src, run,
                         s.W);
          }
        }
      }
    });
    // dL/dG: one thread per (sample, channel block), rows and taps in order
    const int64_t blocks = (s.C + kChannelBlock - 1) / kChannelBlock;
    at::parallel_for(0, s.B * blocks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = k / blocks, c0 = (k % blocks) * kChannelBlock, c1 = std::min(s.C, c0 + kChannelBlock);
        for (int64_t z = 0; z < s.D; ++z)
          for (int64_t yy = 0; yy < s.H; ++yy) {
            const int64_t row = (z * s.H + yy) * s.W;
            for (int64_t c = c0; c < c1; ++c) {
              scalar_t* gc = gg + (b * s.C + c) * plane;
              for (const Run& run : runs) {
                scalar_t* dst = gc + (clamp(z + run.dz, s.D) * s.H + clamp(yy + run.dy, s.H)) * s.W;
                run_scatter(dst, m + (b * s.T + run.first) * plane + row, plane, go + (b * s.C + c) * plane + row,
                            run, s.W);
              }
            }
          }
      }
    });
  });
  return {grad_maps, grad_coarse};
}

}  // namespace

TORCH_LIBRARY(nnunet_ext_attention_resample_cpu, m) {
  m.def("forward(Tensor maps, Tensor offsets, Tensor coarse) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor maps, Tensor offsets, Tensor coarse) -> (Tensor, Tensor)");
  m.impl("forward", c10::DispatchKey::CPU, &forward);
  m.impl("backward", c10::DispatchKey::CPU, &backward);
}
