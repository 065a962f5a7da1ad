// Per-sample Fisher on CUDA (3-D linear, conv2d) without materializing per-sample
// gradients: each block owns a (64 out x 64 K) tile of the weight and a slice of the
// samples. For each sample it computes that tile of the sample's gradient
// g[o, k] = sum_p co[o, p] * col[k, p] in registers (shared-memory tiles over the
// positions p; conv columns come from an implicit im2col), squares it and adds it to
// a register accumulator. Extra memory: none beyond shared memory.
#include "common.cuh"

namespace blip::cuda {
namespace {

constexpr int kTO = 64;  // output channels per tile
constexpr int kTK = 64;  // reduction-free K (= C_in/groups * kh * kw or in_features) per tile
constexpr int kTP = 16;  // positions per shared-memory stage
constexpr int kPad = 4;  // keeps rows 16-byte aligned and spreads banks

struct Geom {
  int64_t n;
  int64_t C, H, W;             // conv input (linear: unused)
  int64_t kh, kw;              // conv kernel
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t out_ch, cout_g, kg;  // total outputs, outputs per group, K per group
  int64_t cin_g;
  int64_t P, Wo;               // positions per sample (conv: Ho*Wo; linear: L)
  int64_t samples_per_block;
};

// grad_out element (o within the group, position p) of sample s.
template <typename T, bool kConv>
__device__ __forceinline__ float load_co(const T* c, const Geom& g, int64_t s, int64_t grp,
                                         int64_t o, int64_t p) {
  if (kConv) return ld(c[((s * g.out_ch) + grp * g.cout_g + o) * g.P + p]);
  return ld(c[(s * g.P + p) * g.out_ch + o]);
}

// Column element (k, p) of sample s: the implicit im2col for conv, x itself for linear.
template <typename T, bool kConv>
__device__ __forceinline__ float load_col(const T* x, const Geom& g, int64_t s, int64_t grp,
                                          int64_t k, int64_t p) {
  if (!kConv) return ld(x[(s * g.P + p) * g.kg + k]);
  const int64_t kx = k % g.kw;
  const int64_t ky = (k / g.kw) % g.kh;
  const int64_t ci = k / (g.kw * g.kh);
  const int64_t oy = p / g.Wo, ox = p % g.Wo;
  const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
  const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
  if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) return 0.0f;
  return ld(x[((s * g.C + grp * g.cin_g + ci) * g.H + iy) * g.W + ix]);
}

// grid: (K tiles, out tiles, groups * sample slices); block: 256 threads, 4x4 each.
template <typename T, bool kConv>
__global__ void __launch_bounds__(kThreads)
    persample_fisher_kernel(float* __restrict__ fisher, const T* __restrict__ x,
                            const T* __restrict__ c, Geom g, int64_t slices, float scale) {
  __shared__ __align__(16) float As[kTP][kTO + kPad];  // co tile, [p][o]
  __shared__ __align__(16) float Bs[kTP][kTK + kPad];  // col tile, [p][k]
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTK;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTO;
  const int64_t grp = blockIdx.z / slices;
  const int64_t s_begin = (blockIdx.z % slices) * g.samples_per_block;
  const int64_t s_end = min(g.n, s_begin + g.samples_per_block);

  float fish[4][4] = {};
  for (int64_t s = s_begin; s < s_end; ++s) {
    float acc[4][4] = {};
    for (int64_t p0 = 0; p0 < g.P; p0 += kTP) {
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

  for (int i = 0; i < 4; ++i) {
    const int64_t o = o0 + ty * 4 + i;
    if (o >= g.cout_g) continue;
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + tx * 4 + j;
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

template <bool kConv>
int launch(float* fisher, const void* x, const void* c, int dtype, Geom g, int64_t groups,
           float scale, cudaStream_t stream) {
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
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    persample_fisher_kernel<T, kConv><<<grid, kThreads, 0, stream>>>(
        fisher, static_cast<const T*>(x), static_cast<const T*>(c), g, slices, scale);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace
}  // namespace blip::cuda

extern "C" int blip_cuda_fisher_linear_seq(float* fisher_w, const void* x, const void* grad_out,
                                           int dtype, int64_t n, int64_t L, int64_t in_f,
                                           int64_t out_f, float scale, cudaStream_t stream) {
  blip::cuda::Geom g{};
  g.n = n;
  g.out_ch = out_f;
  g.cout_g = out_f;
  g.kg = in_f;
  g.P = L;
  return blip::cuda::launch<false>(fisher_w, x, grad_out, dtype, g, 1, scale, stream);
}

extern "C" int blip_cuda_fisher_conv2d(float* fisher_w, const void* x, const void* grad_out,
                                       int dtype, int64_t n, int64_t C, int64_t H, int64_t W,
                                       int64_t out_ch, int64_t kh, int64_t kw, int64_t Ho,
                                       int64_t Wo, int64_t stride_h, int64_t stride_w,
                                       int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                       int64_t dil_w, int64_t groups, float scale,
                                       cudaStream_t stream) {
  blip::cuda::Geom g{};
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
  return blip::cuda::launch<true>(fisher_w, x, grad_out, dtype, g, groups, scale, stream);
}
