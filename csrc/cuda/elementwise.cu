// Elementwise BLIP ops on CUDA: grid-stride loops over blip_math.h. Counts of
// non-finite/skipped elements: per-thread count, block reduction, one 64-bit
// atomicAdd per block into a device counter (no host sync).
#include "common.cuh"

namespace blip::cuda {
namespace {

// Sums v over the block; the result is valid in thread 0.
__device__ __forceinline__ unsigned block_sum(unsigned v) {
  __shared__ unsigned warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0u;
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

__device__ __forceinline__ void add_count(unsigned local, unsigned long long* count) {
  const unsigned total = block_sum(local);
  if (threadIdx.x == 0 && total != 0) atomicAdd(count, static_cast<unsigned long long>(total));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const T* __restrict__ w, const uint8_t* __restrict__ bits, T* __restrict__ out,
                    int64_t n, float bound) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride) {
    out[i] = st<T>(quantize_elem(ld(w[i]), bits[i], bound));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    project_kernel(T* __restrict__ w, const float* __restrict__ prev,
                   const uint8_t* __restrict__ bits, int64_t n, float bound, float lim,
                   unsigned long long* __restrict__ count) {
  unsigned bad = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride) {
    const float wi = ld(w[i]);
    bad += !is_finite(wi);
    w[i] = st<T>(project_elem(wi, prev[i], bits[i], bound, lim));
  }
  add_count(bad, count);
}

// Rounds as torch's CUDA foreach SGD: the explicit fmaf calls of blip_math.h's sgd_elem
// are fma.rn.f32 even under --fmad=false, which keeps every other a*b+c unfused.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(T* __restrict__ w, const T* __restrict__ grad, const float* __restrict__ prev,
               const uint8_t* __restrict__ bits, float* __restrict__ buf, int64_t n, float bound,
               float lim, SgdParams p, unsigned long long* __restrict__ count) {
  unsigned skipped = 0;
  const bool has_buf = buf != nullptr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride) {
    float wi = ld(w[i]);
    float bi = has_buf ? buf[i] : 0.0f;
    skipped += sgd_elem(wi, ld(grad[i]), prev[i], bits[i], bi, has_buf, bound, lim, p);
    w[i] = st<T>(wi);
    if (has_buf) buf[i] = bi;
  }
  add_count(skipped, count);
}

__global__ void __launch_bounds__(kThreads)
    update_bits_kernel(uint8_t* __restrict__ bits, float* __restrict__ fisher,
                       float* __restrict__ fisher_old, int64_t n, float t1, float t2,
                       int max_bit) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride) {
    update_bits_elem(bits[i], fisher[i], fisher_old[i], t1, t2, max_bit);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sync_kernel(T* __restrict__ w, float* __restrict__ prev, const uint8_t* __restrict__ bits,
                int64_t n, float bound) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride) {
    const T q = st<T>(quantize_elem(ld(w[i]), bits[i], bound));
    w[i] = q;
    prev[i] = ld(q);
  }
}

}  // namespace
}  // namespace blip::cuda

using namespace blip::cuda;

extern "C" int blip_cuda_quantize(const void* w, const uint8_t* bits, void* out, int64_t n,
                                  int dtype, float bound, cudaStream_t stream) {
  if (n == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(w), bits,
                                                             static_cast<T*>(out), n, bound);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int blip_cuda_project(void* w, const float* prev, const uint8_t* bits, int64_t n,
                                 int dtype, float bound, float lim, unsigned long long* count,
                                 cudaStream_t stream) {
  if (n == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    project_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<T*>(w), prev, bits, n,
                                                            bound, lim, count);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int blip_cuda_sgd_step(void* w, const void* grad, const float* prev,
                                  const uint8_t* bits, float* momentum_buf, int64_t n, int dtype,
                                  float bound, float lim, float lr, float momentum,
                                  float one_minus_dampening, float weight_decay,
                                  int use_weight_decay, int nesterov, unsigned long long* count,
                                  cudaStream_t stream) {
  if (n == 0) return 0;
  const blip::SgdParams p{lr,           momentum, one_minus_dampening, weight_decay,
                          use_weight_decay != 0, nesterov != 0};
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sgd_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<T*>(w),
                                                        static_cast<const T*>(grad), prev, bits,
                                                        momentum_buf, n, bound, lim, p, count);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int blip_cuda_update_bits(uint8_t* bits, float* fisher, float* fisher_old, int64_t n,
                                     float t1, float t2, int max_bit, cudaStream_t stream) {
  if (n == 0) return 0;
  update_bits_kernel<<<grid_for(n), kThreads, 0, stream>>>(bits, fisher, fisher_old, n, t1, t2,
                                                           max_bit);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int blip_cuda_sync(void* w, float* prev, const uint8_t* bits, int64_t n, int dtype,
                              float bound, cudaStream_t stream) {
  if (n == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sync_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<T*>(w), prev, bits, n,
                                                         bound);
    return static_cast<int>(cudaGetLastError());
  });
}
