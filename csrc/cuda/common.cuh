// Shared helpers of the .cu files: dtype load/store and a grid size rule.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../blip_math.h"
#include "blip_cuda.h"

namespace blip::cuda {

__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ float ld(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ld(__half v) { return __half2float(v); }

// Stores round to nearest even, as the reference's tensor.copy_ does.
template <typename T>
__device__ __forceinline__ T st(float f);
template <>
__device__ __forceinline__ float st<float>(float f) {
  return f;
}
template <>
__device__ __forceinline__ __nv_bfloat16 st<__nv_bfloat16>(float f) {
  return __float2bfloat16_rn(f);
}
template <>
__device__ __forceinline__ __half st<__half>(float f) {
  return __float2half_rn(f);
}

constexpr int kThreads = 256;

// Streaming multiprocessors of the current device, queried once per device.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};  // 0 = not queried yet; benign race: same value
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return 132;
  if (cache[dev] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        sms <= 0) {
      sms = 132;
    }
    cache[dev] = sms;
  }
  return cache[dev];
}

// Enough blocks to fill the GPU with a grid-stride loop, never more than needed.
inline unsigned grid_for(int64_t n) {
  const int sms = sm_count();
  const int64_t need = (n + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  return static_cast<unsigned>(need < 1 ? 1 : (need < cap ? need : cap));
}

// Dispatches a functor templated on the element type over the dtype code.
template <typename Fn>
int dispatch_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case BLIP_F32:
      return fn(float{});
    case BLIP_BF16:
      return fn(__nv_bfloat16{});
    case BLIP_F16:
      return fn(__half{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace blip::cuda
