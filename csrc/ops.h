// The backend contract of blip_kernels (see reference.py) as C++ functions that
// route CPU tensors to csrc/cpu and CUDA tensors to the csrc/cuda launchers.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace blip {

bool has_cuda();
at::Tensor quantize(const at::Tensor& w, const at::Tensor& bits, double bound);
at::Tensor project_(at::Tensor w, const at::Tensor& prev, const at::Tensor& bits, double bound,
                    int64_t max_bit);
at::Tensor sgd_step_(at::Tensor w, const at::Tensor& grad, const at::Tensor& prev,
                     const at::Tensor& bits, std::optional<at::Tensor> momentum_buf, double bound,
                     int64_t max_bit, double lr, double momentum, double dampening, bool nesterov,
                     double weight_decay);
// sgd_step_ over lists of tensors (all on one device) in one call; the summed count.
at::Tensor sgd_step_foreach_(const std::vector<at::Tensor>& ws,
                             const std::vector<at::Tensor>& grads,
                             const std::vector<at::Tensor>& prevs,
                             const std::vector<at::Tensor>& bits,
                             const std::optional<std::vector<at::Tensor>>& momentum_bufs,
                             const std::vector<double>& bounds, int64_t max_bit, double lr,
                             double momentum, const std::vector<double>& dampenings,
                             bool nesterov, double weight_decay);
void update_bits_(at::Tensor bits, at::Tensor fisher, at::Tensor fisher_old, int64_t task,
                  int64_t max_bit);
void sync_(at::Tensor w, at::Tensor prev, const at::Tensor& bits, double bound);
void fisher_linear_(at::Tensor fisher_w, std::optional<at::Tensor> fisher_b, const at::Tensor& x,
                    const at::Tensor& grad_out, double scale);
void fisher_conv2d_(at::Tensor fisher_w, std::optional<at::Tensor> fisher_b, const at::Tensor& x,
                    const at::Tensor& grad_out, const std::vector<int64_t>& stride,
                    const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                    int64_t groups, double scale);

}  // namespace blip
