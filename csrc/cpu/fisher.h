// CPU Fisher paths that need ATen (batched GEMM). Inputs are contiguous and already
// validated by blip_kernels.ops; csrc/ops.cpp routes CPU tensors here.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

namespace blip::cpu {

// Per-sample Fisher paths of the weight (3-D linear, conv2d). The 2-D linear path
// (one GEMM) and the bias terms are device-independent ATen code in csrc/ops.cpp.
void fisher_linear_seq_(at::Tensor& fisher_w, const at::Tensor& x, const at::Tensor& grad_out,
                        double scale);
void fisher_conv2d_(at::Tensor& fisher_w, const at::Tensor& x, const at::Tensor& grad_out,
                    std::array<int64_t, 2> stride, std::array<int64_t, 2> padding,
                    std::array<int64_t, 2> dilation, int64_t groups, double scale);

}  // namespace blip::cpu
