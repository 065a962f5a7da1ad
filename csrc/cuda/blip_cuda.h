// extern "C" launchers of the BLIP CUDA kernels: raw pointers, sizes, a stream.
// No torch headers on either side, so the .cu files build with plain nvcc (also
// where torch is CPU-only) and csrc/ops.cpp links them when torch has CUDA.
// Every launcher returns a cudaError_t (as int): 0 on success.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Parameter dtype codes.
enum { BLIP_F32 = 0, BLIP_BF16 = 1, BLIP_F16 = 2 };

int blip_cuda_quantize(const void* w, const uint8_t* bits, void* out, int64_t n, int dtype,
                       float bound, cudaStream_t stream);

// *count (device int64, zeroed by the caller) += number of non-finite weights.
int blip_cuda_project(void* w, const float* prev, const uint8_t* bits, int64_t n, int dtype,
                      float bound, float lim, unsigned long long* count, cudaStream_t stream);

// momentum_buf may be NULL (no momentum). *count += number of skipped elements.
int blip_cuda_sgd_step(void* w, const void* grad, const float* prev, const uint8_t* bits,
                       float* momentum_buf, int64_t n, int dtype, float bound, float lim,
                       float lr, float momentum, float one_minus_dampening, float weight_decay,
                       int use_weight_decay, int nesterov, unsigned long long* count,
                       cudaStream_t stream);

int blip_cuda_update_bits(uint8_t* bits, float* fisher, float* fisher_old, int64_t n, float t1,
                          float t2, int max_bit, cudaStream_t stream);

int blip_cuda_sync(void* w, float* prev, const uint8_t* bits, int64_t n, int dtype, float bound,
                   cudaStream_t stream);

// fisher_w (out, in) += scale * sum_n (grad_out[n]^T x[n])^2 for x (n, L, in),
// grad_out (n, L, out), both of `dtype`.
int blip_cuda_fisher_linear_seq(float* fisher_w, const void* x, const void* grad_out, int dtype,
                                int64_t n, int64_t L, int64_t in_f, int64_t out_f, float scale,
                                cudaStream_t stream);

// fisher_w (out_ch, C/groups, kh, kw) += scale * sum_n g_n^2, g_n the exact per-sample
// weight gradient of a conv2d with input x (n, C, H, W) and grad_out (n, out_ch, Ho, Wo).
int blip_cuda_fisher_conv2d(float* fisher_w, const void* x, const void* grad_out, int dtype,
                            int64_t n, int64_t C, int64_t H, int64_t W, int64_t out_ch,
                            int64_t kh, int64_t kw, int64_t Ho, int64_t Wo, int64_t stride_h,
                            int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                            int64_t dil_w, int64_t groups, float scale, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
