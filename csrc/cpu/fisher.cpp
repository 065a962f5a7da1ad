// Per-sample Fisher accumulation on CPU for layers whose per-sample gradient does not
// factor (3-D linear, conv2d): fisher_w += scale * sum_n g_n^2.
//
// Samples are processed a few at a time: im2col of the chunk (conv), one batched
// GEMM for the chunk's per-sample gradients (ATen -> MKL/oneDNN), then one fused
// square-and-accumulate pass. Extra memory is bounded by the chunk, never N
// per-sample gradients or the whole batch's unfold.

// Per-operator ATen headers instead of ATen/ATen.h: same code, much faster build.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "fisher.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace blip::cpu {
namespace {

// At most this many samples per chunk: the batched GEMM is already at full speed
// with 2-4 samples on this class of CPU, more only costs memory.
constexpr int64_t kMaxChunk = 8;

// Samples per chunk so that the chunk's buffers stay within N * |W| / 4 floats:
// replication holds at least the N weight copies and their gradients (2 * N * |W|),
// so this keeps the peak under 1/8 of its floor (1/16 of it as measured); at
// least one sample.
int64_t chunk_size(int64_t n, int64_t weight_numel, int64_t per_sample_floats) {
  const int64_t budget = n * weight_numel / 4;
  const int64_t c = budget / std::max<int64_t>(per_sample_floats, 1);
  return std::max<int64_t>(1, std::min({c, n, kMaxChunk}));
}

// fisher[i] += scale * sum_b g[b][i]^2 for the m per-sample gradients in g (m x len).
void accumulate_squares(float* __restrict__ fisher, const float* __restrict__ g, int64_t m,
                        int64_t len, float scale) {
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (len + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t b0 = blk * kBlock;
    const int64_t b1 = std::min(len, b0 + kBlock);
    float acc[kBlock];
    for (int64_t i = b0; i < b1; ++i) acc[i - b0] = 0.0f;
    for (int64_t s = 0; s < m; ++s) {
      const float* gs = g + s * len;
      for (int64_t i = b0; i < b1; ++i) acc[i - b0] += gs[i] * gs[i];
    }
    for (int64_t i = b0; i < b1; ++i) fisher[i] += scale * acc[i - b0];
  }
}

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

// im2col of samples [s0, s0+m) of x (N, C, H, W) into cols (m, C*kh*kw, Ho*Wo), fp32.
template <typename T>
void im2col(const T* __restrict__ x, float* __restrict__ cols, int64_t s0, int64_t m, int64_t C,
            int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t Ho, int64_t Wo,
            std::array<int64_t, 2> st, std::array<int64_t, 2> pad, std::array<int64_t, 2> dil) {
  const int64_t rows = m * C * kh * kw;
  const int64_t P = Ho * Wo;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t kx = r % kw;
    const int64_t ky = (r / kw) % kh;
    const int64_t c = (r / (kw * kh)) % C;
    const int64_t s = r / (kw * kh * C);
    const T* plane = x + ((s0 + s) * C + c) * H * W;
    float* out = cols + r * P;
    const int64_t xoff = kx * dil[1] - pad[1];
    // Output columns whose input column lies inside [0, W): ox in [lo, hi).
    int64_t lo = xoff >= 0 ? 0 : (-xoff + st[1] - 1) / st[1];
    int64_t hi = W - xoff <= 0 ? 0 : (W - xoff + st[1] - 1) / st[1];
    lo = std::min(lo, Wo);
    hi = std::max(lo, std::min(hi, Wo));
    for (int64_t oy = 0; oy < Ho; ++oy) {
      float* o = out + oy * Wo;
      const int64_t iy = oy * st[0] - pad[0] + ky * dil[0];
      if (iy < 0 || iy >= H) {
        for (int64_t ox = 0; ox < Wo; ++ox) o[ox] = 0.0f;
        continue;
      }
      const T* row = plane + iy * W + xoff;
      for (int64_t ox = 0; ox < lo; ++ox) o[ox] = 0.0f;
      if (st[1] == 1) {
        for (int64_t ox = lo; ox < hi; ++ox) o[ox] = to_f(row[ox]);
      } else {
        for (int64_t ox = lo; ox < hi; ++ox) o[ox] = to_f(row[ox * st[1]]);
      }
      for (int64_t ox = hi; ox < Wo; ++ox) o[ox] = 0.0f;
    }
  }
}

}  // namespace

void fisher_linear_seq_(at::Tensor& fisher_w, const at::Tensor& x, const at::Tensor& grad_out, double scale) {
  const int64_t n = x.size(0), L = x.size(1), in_f = x.size(2), out_f = grad_out.size(2);
  const bool cast = x.scalar_type() != at::kFloat || grad_out.scalar_type() != at::kFloat;
  const int64_t per_sample = out_f * in_f + (cast ? L * (in_f + out_f) : 0);
  const int64_t chunk = chunk_size(n, fisher_w.numel(), per_sample);
  at::Tensor g = at::empty({chunk, out_f, in_f}, x.options().dtype(at::kFloat));
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t m = std::min(chunk, n - s);
    const at::Tensor xs = x.narrow(0, s, m).to(at::kFloat);
    const at::Tensor cs = grad_out.narrow(0, s, m).to(at::kFloat);
    at::Tensor gm = g.narrow(0, 0, m);
    at::bmm_out(gm, cs.transpose(1, 2), xs);  // (m, out, in): per-sample gradients
    accumulate_squares(fisher_w.mutable_data_ptr<float>(), gm.const_data_ptr<float>(), m,
                       out_f * in_f, static_cast<float>(scale));
  }
}

void fisher_conv2d_(at::Tensor& fisher_w, const at::Tensor& x, const at::Tensor& grad_out, std::array<int64_t, 2> stride,
                    std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation,
                    int64_t groups, double scale) {
  const int64_t n = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t out_ch = fisher_w.size(0), cin_g = fisher_w.size(1);
  const int64_t kh = fisher_w.size(2), kw = fisher_w.size(3);
  const int64_t Ho = grad_out.size(2), Wo = grad_out.size(3), P = Ho * Wo;
  const int64_t kg = cin_g * kh * kw, cout_g = out_ch / groups;
  const bool cast = grad_out.scalar_type() != at::kFloat;
  const int64_t per_sample = C * kh * kw * P + fisher_w.numel() + (cast ? out_ch * P : 0);
  const int64_t chunk = chunk_size(n, fisher_w.numel(), per_sample);

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor cols = at::empty({chunk * groups, kg, P}, f32);
  at::Tensor g = at::empty({chunk * groups, cout_g, kg}, f32);
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t m = std::min(chunk, n - s);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "blip_im2col", [&] {
      im2col<scalar_t>(x.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<float>(), s, m, C, H,
                       W, kh, kw, Ho, Wo, stride, padding, dilation);
    });
    const at::Tensor co = grad_out.narrow(0, s, m).to(at::kFloat).view({m * groups, cout_g, P});
    at::Tensor gm = g.narrow(0, 0, m * groups);
    // (m*G, Cout_g, P) @ (m*G, P, Kg): each sample's (and group's) weight gradient.
    at::bmm_out(gm, co, cols.narrow(0, 0, m * groups).transpose(1, 2));
    accumulate_squares(fisher_w.mutable_data_ptr<float>(), gm.const_data_ptr<float>(), m,
                       fisher_w.numel(), static_cast<float>(scale));
  }
}

}  // namespace blip::cpu
