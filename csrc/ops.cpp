// Device routing for the backend contract. Inputs arrive contiguous and validated
// (blip_kernels.ops); the checks here only guard against misuse of _C directly.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "ops.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <utility>

#include "blip_math.h"
#include "cpu/elementwise.h"
#include "cpu/fisher.h"

#ifdef BLIP_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/blip_cuda.h"
#endif

namespace blip {
namespace {

// True for CUDA tensors (when built with CUDA), false for CPU; an error otherwise.
bool on_cuda(const at::Tensor& t) {
  if (t.is_cpu()) return false;
#ifdef BLIP_WITH_CUDA
  if (t.is_cuda()) return true;
#else
  TORCH_CHECK(!t.is_cuda(),
              "blip_kernels._C was built without CUDA; use the triton or reference backend "
              "for CUDA tensors (or rebuild with a CUDA-enabled torch and CUDA_HOME set)");
#endif
  TORCH_CHECK(false, "blip_kernels._C supports CPU and CUDA tensors, got device ", t.device());
  return false;
}

void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "blip_kernels._C: ", name, " must be contiguous");
}

std::array<int64_t, 2> pair(const std::vector<int64_t>& v, const char* name) {
  TORCH_CHECK(v.size() == 2, "blip_kernels._C: ", name, " must have 2 entries");
  return {v[0], v[1]};
}

#ifdef BLIP_WITH_CUDA
int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return BLIP_F32;
    case at::kBFloat16:
      return BLIP_BF16;
    case at::kHalf:
      return BLIP_F16;
    default:
      TORCH_CHECK(false, "blip_kernels._C: unsupported dtype ", t.scalar_type());
  }
}

void cuda_check(int err) {
  TORCH_CHECK(err == 0, "blip_kernels._C CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// The CUDA Fisher kernels read x and grad_out as one dtype; a mixed pair (rare) is
// widened to fp32 first, which loses nothing.
std::pair<at::Tensor, at::Tensor> same_dtype(const at::Tensor& x, const at::Tensor& c) {
  if (x.scalar_type() == c.scalar_type()) return {x, c};
  return {x.to(at::kFloat), c.to(at::kFloat)};
}

unsigned long long* counter_ptr(at::Tensor& count) {
  return reinterpret_cast<unsigned long long*>(count.mutable_data_ptr<int64_t>());
}
#endif

at::Tensor count_tensor(int64_t n) { return at::scalar_tensor(n, at::TensorOptions(at::kLong)); }

cpu::Dtype cpu_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cpu::Dtype::kF32;
    case at::kBFloat16:
      return cpu::Dtype::kBF16;
    case at::kHalf:
      return cpu::Dtype::kF16;
    default:
      TORCH_CHECK(false, "blip_kernels._C: unsupported parameter dtype ", t.scalar_type());
  }
  return cpu::Dtype::kF32;
}

// Hyper-parameters rounded to fp32 as the reference's 0-d fp32 tensors are.
SgdParams sgd_params(double lr, double momentum, double dampening, bool nesterov,
                     double weight_decay) {
  return SgdParams{static_cast<float>(lr),
                   static_cast<float>(momentum),
                   static_cast<float>(1.0 - dampening),
                   static_cast<float>(weight_decay),
                   weight_decay != 0.0,
                   nesterov};
}

}  // namespace

bool has_cuda() {
#ifdef BLIP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

at::Tensor quantize(const at::Tensor& w, const at::Tensor& bits, double bound) {
  check_dense(w, "w");
  check_dense(bits, "bits");
  at::Tensor out = at::empty_like(w);
  if (!on_cuda(w)) {
    cpu::quantize(w.const_data_ptr(), bits.const_data_ptr<uint8_t>(), out.mutable_data_ptr(),
                  w.numel(), cpu_dtype(w), static_cast<float>(bound));
    return out;
  }
#ifdef BLIP_WITH_CUDA
  const c10::cuda::CUDAGuard guard(w.device());
  cuda_check(blip_cuda_quantize(w.const_data_ptr(), bits.const_data_ptr<uint8_t>(),
                                out.mutable_data_ptr(), w.numel(), dtype_code(w),
                                static_cast<float>(bound), stream_of(w)));
  return out;
#else
  return {};  // unreachable: on_cuda() threw
#endif
}

at::Tensor project_(at::Tensor w, const at::Tensor& prev, const at::Tensor& bits, double bound,
                    int64_t max_bit) {
  check_dense(w, "w");
  const float b = static_cast<float>(bound);
  const float lim = project_limit(b, static_cast<int>(max_bit));
  if (!on_cuda(w)) {
    return count_tensor(cpu::project(w.mutable_data_ptr(), prev.const_data_ptr<float>(),
                                     bits.const_data_ptr<uint8_t>(), w.numel(), cpu_dtype(w), b,
                                     lim));
  }
#ifdef BLIP_WITH_CUDA
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor count = at::zeros({}, w.options().dtype(at::kLong));
  cuda_check(blip_cuda_project(w.mutable_data_ptr(), prev.const_data_ptr<float>(),
                               bits.const_data_ptr<uint8_t>(), w.numel(), dtype_code(w), b, lim,
                               counter_ptr(count), stream_of(w)));
  return count;
#else
  return {};  // unreachable: on_cuda() threw
#endif
}

at::Tensor sgd_step_(at::Tensor w, const at::Tensor& grad, const at::Tensor& prev,
                     const at::Tensor& bits, std::optional<at::Tensor> momentum_buf, double bound,
                     int64_t max_bit, double lr, double momentum, double dampening, bool nesterov,
                     double weight_decay) {
  check_dense(w, "w");
  if (momentum_buf.has_value()) check_dense(*momentum_buf, "momentum_buf");
  const float b = static_cast<float>(bound);
  const float lim = project_limit(b, static_cast<int>(max_bit));
  // As in the reference, a buffer only takes part when momentum != 0.
  float* buf = momentum_buf.has_value() && momentum != 0.0
                   ? momentum_buf->mutable_data_ptr<float>()
                   : nullptr;
  const SgdParams p = sgd_params(lr, momentum, dampening, nesterov, weight_decay);
  if (!on_cuda(w)) {
    return count_tensor(cpu::sgd_step(w.mutable_data_ptr(), grad.const_data_ptr(),
                                      prev.const_data_ptr<float>(),
                                      bits.const_data_ptr<uint8_t>(), buf, w.numel(),
                                      cpu_dtype(w), b, lim, p));
  }
#ifdef BLIP_WITH_CUDA
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor count = at::zeros({}, w.options().dtype(at::kLong));
  cuda_check(blip_cuda_sgd_step(
      w.mutable_data_ptr(), grad.const_data_ptr(), prev.const_data_ptr<float>(),
      bits.const_data_ptr<uint8_t>(), buf, w.numel(), dtype_code(w), b, lim, p.lr, p.momentum,
      p.one_minus_dampening, p.weight_decay, p.use_weight_decay, p.nesterov, counter_ptr(count),
      stream_of(w)));
  return count;
#else
  return {};  // unreachable: on_cuda() threw
#endif
}

at::Tensor sgd_step_foreach_(const std::vector<at::Tensor>& ws,
                             const std::vector<at::Tensor>& grads,
                             const std::vector<at::Tensor>& prevs,
                             const std::vector<at::Tensor>& bits,
                             const std::optional<std::vector<at::Tensor>>& momentum_bufs,
                             const std::vector<double>& bounds, int64_t max_bit, double lr,
                             double momentum, const std::vector<double>& dampenings,
                             bool nesterov, double weight_decay) {
  const size_t n = ws.size();
  TORCH_CHECK(grads.size() == n && prevs.size() == n && bits.size() == n &&
                  bounds.size() == n && dampenings.size() == n,
              "blip_kernels._C: sgd_step_foreach_ lists must all have ", n, " entries");
  // As in sgd_step_, buffers only take part when momentum != 0.
  const bool use_buf = momentum_bufs.has_value() && momentum != 0.0;
  TORCH_CHECK(!use_buf || momentum_bufs->size() == n,
              "blip_kernels._C: momentum_bufs must have ", n, " entries");
  if (n == 0) return count_tensor(0);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(ws[i].is_contiguous(), "blip_kernels._C: ws[", i, "] must be contiguous");
    TORCH_CHECK(!use_buf || (*momentum_bufs)[i].is_contiguous(),
                "blip_kernels._C: momentum_bufs[", i, "] must be contiguous");
  }
  if (!on_cuda(ws[0])) {
    // One native call for the whole list: on small layers the per-call Python
    // overhead, not the kernel, is what a step costs.
    int64_t skipped = 0;
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(ws[i].is_cpu(), "blip_kernels._C: ws[", i, "] is not on the CPU like ws[0]");
      const float b = static_cast<float>(bounds[i]);
      const float lim = project_limit(b, static_cast<int>(max_bit));
      float* buf = use_buf ? (*momentum_bufs)[i].mutable_data_ptr<float>() : nullptr;
      const SgdParams p = sgd_params(lr, momentum, dampenings[i], nesterov, weight_decay);
      skipped += cpu::sgd_step(ws[i].mutable_data_ptr(), grads[i].const_data_ptr(),
                               prevs[i].const_data_ptr<float>(),
                               bits[i].const_data_ptr<uint8_t>(), buf, ws[i].numel(),
                               cpu_dtype(ws[i]), b, lim, p);
    }
    return count_tensor(skipped);
  }
#ifdef BLIP_WITH_CUDA
  const c10::cuda::CUDAGuard guard(ws[0].device());
  // Every launch adds its skipped elements into the same device counter.
  at::Tensor count = at::zeros({}, ws[0].options().dtype(at::kLong));
  const cudaStream_t stream = stream_of(ws[0]);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(ws[i].device() == ws[0].device(), "blip_kernels._C: ws[", i, "] is on ",
                ws[i].device(), ", ws[0] on ", ws[0].device());
    const float b = static_cast<float>(bounds[i]);
    const float lim = project_limit(b, static_cast<int>(max_bit));
    float* buf = use_buf ? (*momentum_bufs)[i].mutable_data_ptr<float>() : nullptr;
    const SgdParams p = sgd_params(lr, momentum, dampenings[i], nesterov, weight_decay);
    cuda_check(blip_cuda_sgd_step(
        ws[i].mutable_data_ptr(), grads[i].const_data_ptr(), prevs[i].const_data_ptr<float>(),
        bits[i].const_data_ptr<uint8_t>(), buf, ws[i].numel(), dtype_code(ws[i]), b, lim, p.lr,
        p.momentum, p.one_minus_dampening, p.weight_decay, p.use_weight_decay, p.nesterov,
        counter_ptr(count), stream));
  }
  return count;
#else
  return {};  // unreachable: on_cuda() threw
#endif
}

void update_bits_(at::Tensor bits, at::Tensor fisher, at::Tensor fisher_old, int64_t task,
                  int64_t max_bit) {
  check_dense(bits, "bits");
  check_dense(fisher, "fisher");
  check_dense(fisher_old, "fisher_old");
  const float t1 = static_cast<float>(task + 1), t2 = static_cast<float>(task + 2);
  if (!on_cuda(bits)) {
    return cpu::update_bits(bits.mutable_data_ptr<uint8_t>(), fisher.mutable_data_ptr<float>(),
                            fisher_old.mutable_data_ptr<float>(), bits.numel(), t1, t2,
                            static_cast<int>(max_bit));
  }
#ifdef BLIP_WITH_CUDA
  const c10::cuda::CUDAGuard guard(bits.device());
  cuda_check(blip_cuda_update_bits(bits.mutable_data_ptr<uint8_t>(),
                                   fisher.mutable_data_ptr<float>(),
                                   fisher_old.mutable_data_ptr<float>(), bits.numel(), t1, t2,
                                   static_cast<int>(max_bit), stream_of(bits)));
#endif
}

void sync_(at::Tensor w, at::Tensor prev, const at::Tensor& bits, double bound) {
  check_dense(w, "w");
  check_dense(prev, "prev");
  if (!on_cuda(w)) {
    return cpu::sync(w.mutable_data_ptr(), prev.mutable_data_ptr<float>(),
                     bits.const_data_ptr<uint8_t>(), w.numel(), cpu_dtype(w),
                     static_cast<float>(bound));
  }
#ifdef BLIP_WITH_CUDA
  const c10::cuda::CUDAGuard guard(w.device());
  cuda_check(blip_cuda_sync(w.mutable_data_ptr(), prev.mutable_data_ptr<float>(),
                            bits.const_data_ptr<uint8_t>(), w.numel(), dtype_code(w),
                            static_cast<float>(bound), stream_of(w)));
#endif
}

void fisher_linear_(at::Tensor fisher_w, std::optional<at::Tensor> fisher_b, const at::Tensor& x,
                    const at::Tensor& grad_out, double scale) {
  check_dense(fisher_w, "fisher_w");
  const bool cuda = on_cuda(fisher_w);
  if (x.dim() == 2) {
    // Section 6: sum_n outer(c_n, x_n)^2 = (c*c)^T @ (x*x), one GEMM on either device.
    const at::Tensor cc = grad_out.to(at::kFloat).square();
    fisher_w.addmm_(cc.t(), x.to(at::kFloat).square(), /*beta=*/1.0, /*alpha=*/scale);
    if (fisher_b.has_value()) fisher_b->add_(cc.sum(0), scale);
    return;
  }
  TORCH_CHECK(x.dim() == 3, "blip_kernels._C: x must be 2-D or 3-D");
  if (!cuda) {
    cpu::fisher_linear_seq_(fisher_w, x, grad_out, scale);
  } else {
#ifdef BLIP_WITH_CUDA
    const c10::cuda::CUDAGuard guard(fisher_w.device());
    const auto [xs, cs] = same_dtype(x, grad_out);
    cuda_check(blip_cuda_fisher_linear_seq(
        fisher_w.mutable_data_ptr<float>(), xs.const_data_ptr(), cs.const_data_ptr(),
        dtype_code(xs), xs.size(0), xs.size(1), xs.size(2), cs.size(2),
        static_cast<float>(scale), stream_of(fisher_w)));
#endif
  }
  if (fisher_b.has_value()) {
    // The bias gradient of sample n is sum_l c[n, l]: tiny, so plain ATen.
    const at::Tensor gb = at::sum(grad_out, {1}, /*keepdim=*/false, at::kFloat);
    fisher_b->add_(gb.square().sum(0), scale);
  }
}

void fisher_conv2d_(at::Tensor fisher_w, std::optional<at::Tensor> fisher_b, const at::Tensor& x,
                    const at::Tensor& grad_out, const std::vector<int64_t>& stride,
                    const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                    int64_t groups, double scale) {
  check_dense(fisher_w, "fisher_w");
  check_dense(x, "x");
  check_dense(grad_out, "grad_out");
  const auto st = pair(stride, "stride"), pad = pair(padding, "padding"),
             dil = pair(dilation, "dilation");
  if (!on_cuda(fisher_w)) {
    cpu::fisher_conv2d_(fisher_w, x, grad_out, st, pad, dil, groups, scale);
  } else {
#ifdef BLIP_WITH_CUDA
    const c10::cuda::CUDAGuard guard(fisher_w.device());
    const auto [xs, cs] = same_dtype(x, grad_out);
    cuda_check(blip_cuda_fisher_conv2d(
        fisher_w.mutable_data_ptr<float>(), xs.const_data_ptr(), cs.const_data_ptr(),
        dtype_code(xs), x.size(0), x.size(1), x.size(2), x.size(3), fisher_w.size(0),
        fisher_w.size(2), fisher_w.size(3), grad_out.size(2), grad_out.size(3), st[0], st[1],
        pad[0], pad[1], dil[0], dil[1], groups, static_cast<float>(scale), stream_of(fisher_w)));
#endif
  }
  if (fisher_b.has_value()) {
    const at::Tensor gb = at::sum(grad_out.flatten(2), {2}, /*keepdim=*/false, at::kFloat);
    fisher_b->add_(gb.square().sum(0), scale);
  }
}

}  // namespace blip
