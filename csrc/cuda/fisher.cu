// Per-sample Fisher on CUDA (3-D linear, conv2d) without materializing per-sample
// gradients: each block owns a (64 out x 64 K) tile of the weight and a slice of the
// samples. For each sample it computes that tile of the sample's gradient
// g[o, k] = sum_p co[o, p] * col[k, p] in registers (shared-memory tiles over the
// positions p; conv columns come from an implicit im2col), squares it and adds it to
// a register accumulator. Extra memory: none beyond shared memory.
#include <stdint.h>

#include <type_traits>

#include "common.cuh"

namespace blip::cuda {
namespace {

constexpr int kTO = 64;  // output channels per tile
constexpr int kTK = 64;  // reduction-free K (= C_in/groups * kh * kw or in_features) per tile
constexpr int kTP = 16;  // positions per shared-memory stage
constexpr int kPad = 4;  // keeps rows 16-byte aligned and spreads banks

// Sizes and strides of one launch. The index type I is int32_t whenever every
// tensor the kernel addresses has fewer than 2^31 elements (checked on the host):
// 64-bit `/` and `%` are software subroutines on the GPU that also cost the
// registers that made this kernel spill; 32-bit ones are a few inline instructions.
template <typename I>
struct Geom {
  I n;
  I C, H, W;             // conv input (linear: unused)
  I kh, kw;              // conv kernel
  I sh, sw, ph, pw, dh, dw;
  I out_ch, cout_g, kg;  // total outputs, outputs per group, K per group
  I cin_g;
  I P, Wo;               // positions per sample (conv: Ho*Wo; linear: L)
  I samples_per_block;
};

// grad_out element (o within the group, position p) of sample s.
template <typename T, bool kConv, typename I>
__device__ __forceinline__ float load_co(const T* c, const Geom<I>& g, I s, I grp, I o, I p) {
  if (kConv) return ld(c[((s * g.out_ch) + grp * g.cout_g + o) * g.P + p]);
  return ld(c[(s * g.P + p) * g.out_ch + o]);
}

// Column element (k, p) of sample s: the implicit im2col for conv, x itself for linear.
// k and p are never negative, so the decode divides unsigned (cheaper than signed).
template <typename T, bool kConv, typename I>
__device__ __forceinline__ float load_col(const T* x, const Geom<I>& g, I s, I grp, I k, I p) {
  if (!kConv) return ld(x[(s * g.P + p) * g.kg + k]);
  using U = typename std::make_unsigned<I>::type;
  const U uk = static_cast<U>(k), up = static_cast<U>(p);
  const U kyx = uk / static_cast<U>(g.kw);
  const I kx = static_cast<I>(uk - kyx * static_cast<U>(g.kw));
  const U ci = kyx / static_cast<U>(g.kh);
  const I ky = static_cast<I>(kyx - ci * static_cast<U>(g.kh));
  const U oy = up / static_cast<U>(g.Wo);
  const I ox = static_cast<I>(up - oy * static_cast<U>(g.Wo));
  const I iy = static_cast<I>(oy) * g.sh - g.ph + ky * g.dh;
  const I ix = ox * g.sw - g.pw + kx * g.dw;
  if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) return 0.0f;
  return ld(x[((s * g.C + grp * g.cin_g + static_cast<I>(ci)) * g.H + iy) * g.W + ix]);
}

// grid: (K tiles, out tiles, groups * sample slices); block: 256 threads, 4x4 each.
// Minimum resident blocks per SM: without it ptxas caps the kernel at 64 registers and
// spills; 3 blocks (<= 85 registers) fit the 32-bit path with no spills, while the 64-bit
// path's wider indices need 2 (<= 128 registers) to stay spill-free (ptxas -v, sm_80/sm_90;
// see benchmarks/gpu/README.md).
template <typename I>
constexpr int kMinBlocks = sizeof(I) == 4 ? 3 : 2;

template <typename T, bool kConv, typename I>
__global__ void __launch_bounds__(kThreads, kMinBlocks<I>)
    persample_fisher_kernel(float* __restrict__ fisher, const T* __restrict__ x,
                            const T* __restrict__ c, Geom<I> g, I slices, float scale) {
  __shared__ __align__(16) float As[kTP][kTO + kPad];  // co tile, [p][o]
  __shared__ __align__(16) float Bs[kTP][kTK + kPad];  // col tile, [p][k]
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const I k0 = static_cast<I>(blockIdx.x) * kTK;
  const I o0 = static_cast<I>(blockIdx.y) * kTO;
  const I grp = static_cast<I>(blockIdx.z / static_cast<unsigned>(slices));
  const I s_begin =
      static_cast<I>(blockIdx.z % static_cast<unsigned>(slices)) * g.samples_per_block;
  const I s_end = min(g.n, s_begin + g.samples_per_block);

  float fish[4][4] = {};
  for (I s = s_begin; s < s_end; ++s) {
    float acc[4][4] = {};
    for (I p0 = 0; p0 < g.P; p0 += kTP) {
      // Conv: positions are contiguous in memory, so consecutive threads take
      // consecutive p; linear: channels are, so they take consecutive o / k.
      for (int e = tid; e < kTO * kTP; e += kThreads) {
        const int o = kConv ? e / kTP : e % kTO;
        const int p = kConv ? e % kTP : e / kTO;
        float v = 0.0f;
        if (o0 + o < g.cout_g && p0 + p < g.P) v = load_co<T, kConv>(c, g, s, grp, o0 + o, p0 + p);
        As[p][o] = v;
      }
      for (int e = tid; e < kTK * kTP; e += kThreads) {
        const int k = kConv ? e / kTP : e % kTK;
        const int p = kConv ? e % kTP : e / kTK;
        float v = 0.0f;
        if (k0 + k < g.kg && p0 + p < g.P) v = load_col<T, kConv>(x, g, s, grp, k0 + k, p0 + p);
        Bs[p][k] = v;
      }
      __syncthreads();
#pragma unroll
      for (int pp = 0; pp < kTP; ++pp) {
        const float4 a = *reinterpret_cast<const float4*>(&As[pp][ty * 4]);
        const float4 b = *reinterpret_cast<const float4*>(&Bs[pp][tx * 4]);
        const float av[4] = {a.x, a.y, a.z, a.w};
        const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) fish[i][j] += acc[i][j] * acc[i][j];
    }
  }

  // Unrolled, so fish[][] stays in registers (a run-time index would put it in local memory).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const I o = o0 + ty * 4 + i;
    if (o >= g.cout_g) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const I k = k0 + tx * 4 + j;
      if (k >= g.kg) continue;
      float* dst = fisher + (grp * g.cout_g + o) * g.kg + k;
      // One slice owns its tile outright; several slices add their partial sums.
      if (slices == 1) {
        *dst += scale * fish[i][j];
      } else {
        atomicAdd(dst, scale * fish[i][j]);
      }
    }
  }
}

// True when every index the kernel forms fits in int32. Tiles overhang the tensors by
// less than one tile (bounds are checked before each load), hence the slack.
bool fits_int32(const Geom<int64_t>& g, int64_t x_numel, int64_t c_numel) {
  constexpr int64_t kLimit = INT32_MAX - 4 * (kTO + kTK + kTP);
  const int64_t widest[] = {
      x_numel, c_numel, g.out_ch * g.kg,  // the three tensors
      g.H + 2 * g.ph, g.W + 2 * g.pw,     // input coordinates, padding included
      g.kh * g.dh, g.kw * g.dw, g.Wo * g.sw,
      g.Wo > 0 ? (g.P / g.Wo) * g.sh : 0,  // Ho * stride (conv only; linear has no Wo)
      g.n + g.samples_per_block,
  };
  for (const int64_t v : widest) {
    if (v < 0 || v > kLimit) return false;
  }
  return true;
}

template <typename I>
Geom<I> narrow(const Geom<int64_t>& g) {
  return Geom<I>{static_cast<I>(g.n),      static_cast<I>(g.C),      static_cast<I>(g.H),
                 static_cast<I>(g.W),      static_cast<I>(g.kh),     static_cast<I>(g.kw),
                 static_cast<I>(g.sh),     static_cast<I>(g.sw),     static_cast<I>(g.ph),
                 static_cast<I>(g.pw),     static_cast<I>(g.dh),     static_cast<I>(g.dw),
                 static_cast<I>(g.out_ch), static_cast<I>(g.cout_g), static_cast<I>(g.kg),
                 static_cast<I>(g.cin_g),  static_cast<I>(g.P),      static_cast<I>(g.Wo),
                 static_cast<I>(g.samples_per_block)};
}

template <bool kConv>
int launch(float* fisher, const void* x, const void* c, int dtype, Geom<int64_t> g,
           int64_t groups, int64_t x_numel, float scale, cudaStream_t stream) {
  if (g.n == 0 || g.kg == 0 || g.cout_g == 0) return 0;
  const int64_t ktiles = (g.kg + kTK - 1) / kTK;
  const int64_t otiles = (g.cout_g + kTO - 1) / kTO;
  // Split the samples over enough blocks to occupy every SM a few times over.
  const int64_t sms = sm_count();
  const int64_t tiles = ktiles * otiles * groups;
  int64_t slices = (4 * sms + tiles - 1) / tiles;
  slices = slices < 1 ? 1 : (slices > g.n ? g.n : slices);
  g.samples_per_block = (g.n + slices - 1) / slices;
  slices = (g.n + g.samples_per_block - 1) / g.samples_per_block;
  if (groups * slices > 65535 || otiles > 65535) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>(ktiles), static_cast<unsigned>(otiles),
                  static_cast<unsigned>(groups * slices));
  const bool narrow_ok = fits_int32(g, x_numel, g.n * g.out_ch * g.P);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    const T* ct = static_cast<const T*>(c);
    if (narrow_ok) {
      persample_fisher_kernel<T, kConv, int32_t><<<grid, kThreads, 0, stream>>>(
          fisher, xt, ct, narrow<int32_t>(g), static_cast<int32_t>(slices), scale);
    } else {
      persample_fisher_kernel<T, kConv, int64_t><<<grid, kThreads, 0, stream>>>(
          fisher, xt, ct, g, slices, scale);
    }
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace
}  // namespace blip::cuda

extern "C" int blip_cuda_fisher_linear_seq(float* fisher_w, const void* x, const void* grad_out,
                                           int dtype, int64_t n, int64_t L, int64_t in_f,
                                           int64_t out_f, float scale, cudaStream_t stream) {
  blip::cuda::Geom<int64_t> g{};
  g.n = n;
  g.out_ch = out_f;
  g.cout_g = out_f;
  g.kg = in_f;
  g.P = L;
  return blip::cuda::launch<false>(fisher_w, x, grad_out, dtype, g, 1, n * L * in_f, scale,
                                          stream);
}

extern "C" int blip_cuda_fisher_conv2d(float* fisher_w, const void* x, const void* grad_out,
                                       int dtype, int64_t n, int64_t C, int64_t H, int64_t W,
                                       int64_t out_ch, int64_t kh, int64_t kw, int64_t Ho,
                                       int64_t Wo, int64_t stride_h, int64_t stride_w,
                                       int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                       int64_t dil_w, int64_t groups, float scale,
                                       cudaStream_t stream) {
  blip::cuda::Geom<int64_t> g{};
  g.n = n;
  g.C = C;
  g.H = H;
  g.W = W;
  g.kh = kh;
  g.kw = kw;
  g.sh = stride_h;
  g.sw = stride_w;
  g.ph = pad_h;
  g.pw = pad_w;
  g.dh = dil_h;
  g.dw = dil_w;
  g.out_ch = out_ch;
  g.cout_g = out_ch / groups;
  g.cin_g = C / groups;
  g.kg = g.cin_g * kh * kw;
  g.P = Ho * Wo;
  g.Wo = Wo;
  return blip::cuda::launch<true>(fisher_w, x, grad_out, dtype, g, groups, n * C * H * W,
                                         scale, stream);
}
