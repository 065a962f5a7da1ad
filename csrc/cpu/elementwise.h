// CPU (OpenMP) elementwise kernels on raw contiguous buffers; the same shape of API
// as the CUDA launchers in csrc/cuda/blip_cuda.h. No torch headers.
#pragma once

#include <stdint.h>

#include "../blip_math.h"

namespace blip::cpu {

enum class Dtype { kF32, kBF16, kF16 };

void quantize(const void* w, const uint8_t* bits, void* out, int64_t n, Dtype dtype, float bound);
// Returns the number of non-finite weights (reset to prev).
int64_t project(void* w, const float* prev, const uint8_t* bits, int64_t n, Dtype dtype,
                float bound, float lim);
// buf may be null (no momentum). Returns the number of elements skipped for a
// non-finite gradient.
int64_t sgd_step(void* w, const void* grad, const float* prev, const uint8_t* bits, float* buf,
                 int64_t n, Dtype dtype, float bound, float lim, const SgdParams& p);
void update_bits(uint8_t* bits, float* fisher, float* fisher_old, int64_t n, float t1, float t2,
                 int max_bit);
void sync(void* w, float* prev, const uint8_t* bits, int64_t n, Dtype dtype, float bound);

}  // namespace blip::cpu
