// Device routing for the backend contract, and the argument checks of every entry
// point: blip_kernels.ops validates before it calls a backend, but _C is also
// reachable directly (and the optimizer's hot loop skips the Python checks), so each
// function here re-checks shapes, dtypes, devices, contiguity, overlap and scalar
// ranges before it touches a pointer. The checks are O(1) per tensor.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "ops.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/core/TensorImpl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <ostream>
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

// ---------------------------------------------------------------------------
// argument checks (messages name the argument, as blip_kernels.ops does)

// The largest max_bit: 2^max_bit scalings and 1 - 2^-max_bit stay exact in fp32,
// and 1u << max_bit is defined. Same value as blip_kernels.ops.MAX_SUPPORTED_BIT.
constexpr int64_t kMaxBit = 24;
// Largest task id: task+1 and task+2 are exact in fp32 (ops.MAX_TASK).
constexpr int64_t kMaxTask = (int64_t{1} << 24) - 2;
// Doubles at or above 2^128 - 2^103 round to inf in fp32 (and casting them is UB).
constexpr double kF32Overflow = 340282356779733661637539395458142568448.0;
// Convolution geometry stays far from int64 overflow in the index math.
constexpr int64_t kMaxConvParam = int64_t{1} << 31;

// An argument's name as printed: "w", or "ws[3]" inside a list.
struct Name {
  const char* base;
  int64_t index = -1;
};
std::ostream& operator<<(std::ostream& os, const Name& n) {
  os << n.base;
  if (n.index >= 0) os << "[" << n.index << "]";
  return os;
}
Name at_index(const char* base, int64_t i) { return Name{base, i}; }

bool finite_f32(double v) { return std::fabs(v) < kF32Overflow; }  // false for NaN too

// The names blip_kernels.ops uses (torch's), not ATen's ("Byte", "Half").
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    case at::kByte:
      return "uint8";
    default:
      return c10::toString(t);
  }
}

bool is_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_device_type(const at::Tensor& t, const Name& name) {
  TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda(), "blip_kernels._C: ", name,
                    " is on ", t.device(), "; _C runs CPU and CUDA tensors");
}

// A tensor the kernels read or write as one dense buffer.
void check_dense_tensor(const at::Tensor& t, const Name& name) {
  TORCH_CHECK_VALUE(t.defined(), "blip_kernels._C: ", name, " is an undefined tensor");
  check_device_type(t, name);
  TORCH_CHECK_VALUE(t.is_contiguous(), "blip_kernels._C: ", name, " must be contiguous");
}

// The first tensor of an op: a parameter (fp32/bf16/fp16), dense.
void check_param(const at::Tensor& w, const Name& name) {
  check_dense_tensor(w, name);
  TORCH_CHECK_TYPE(is_param_dtype(w.scalar_type()), "blip_kernels._C: ", name,
                   " must have dtype float32, bfloat16 or float16; got ", dtype_name(w.scalar_type()));
}

// t has `dtype`, w's shape and device, and is dense.
void check_like(const at::Tensor& t, const Name& name, at::ScalarType dtype, const at::Tensor& w,
                const Name& wname) {
  check_dense_tensor(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "blip_kernels._C: ", name, " must have dtype ",
                   dtype_name(dtype), "; got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == w.device(), "blip_kernels._C: ", name, " is on ", t.device(),
                    "; ", wname, " is on ", w.device());
  TORCH_CHECK_VALUE(t.sizes() == w.sizes(), "blip_kernels._C: ", name, " has shape ", t.sizes(),
                    "; expected ", w.sizes(), " (the shape of ", wname, ")");
}

void check_same_device(const at::Tensor& t, const Name& name, const at::Tensor& ref,
                       const Name& rname) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "blip_kernels._C: ", name, " is on ",
                    t.device(), "; ", rname, " is on ", ref.device());
}

// Byte ranges of two dense tensors intersect (empty tensors overlap nothing).
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto a0 = reinterpret_cast<uintptr_t>(a.const_data_ptr());
  const auto b0 = reinterpret_cast<uintptr_t>(b.const_data_ptr());
  const uintptr_t a1 = a0 + static_cast<uintptr_t>(a.numel() * a.element_size());
  const uintptr_t b1 = b0 + static_cast<uintptr_t>(b.numel() * b.element_size());
  return a0 < b1 && b0 < a1;
}

// A tensor an op writes must not share memory with another argument: the backends
// read and write in different orders, so the result would depend on the backend.
void check_no_overlap(const at::Tensor& out, const Name& oname, const at::Tensor& other,
                      const Name& name) {
  TORCH_CHECK_VALUE(!overlaps(out, other), "blip_kernels._C: ", oname, " and ", name,
                    " share memory; an in-place op's output must not overlap its inputs");
}

// Tell autograd that t is about to be written (as any in-place torch op does) so a
// graph that saved t raises instead of silently using the new values. Throws for an
// inference tensor outside inference mode. Called after every check, before any write.
void mark_written(const at::Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); }

float checked_bound(double bound, const Name& name) {
  TORCH_CHECK_VALUE(finite_f32(bound) && static_cast<float>(bound) > 0.0f,
                    "blip_kernels._C: ", name, " must be a positive number finite in float32; got ",
                    bound);
  return static_cast<float>(bound);
}

void check_max_bit(int64_t max_bit) {
  TORCH_CHECK_VALUE(max_bit >= 1 && max_bit <= kMaxBit, "blip_kernels._C: max_bit must be in 1..",
                    kMaxBit, "; got ", max_bit);
}

void check_f32_at_least_zero(double v, const char* name) {
  TORCH_CHECK_VALUE(finite_f32(v) && v >= 0.0, "blip_kernels._C: ", name,
                    " must be a number >= 0 finite in float32; got ", v);
}

// The hyper-parameters shared by every tensor of a step.
void check_sgd_scalars(double lr, double momentum, double weight_decay) {
  check_f32_at_least_zero(lr, "lr");
  check_f32_at_least_zero(weight_decay, "weight_decay");
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum < 1.0,
                    "blip_kernels._C: momentum must be in [0, 1); got ", momentum);
}

void check_dampening(double dampening, double momentum, bool nesterov, const Name& dname) {
  TORCH_CHECK_VALUE(dampening >= 0.0 && dampening <= 1.0, "blip_kernels._C: ", dname,
                    " must be in [0, 1]; got ", dampening);
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0),
                    "blip_kernels._C: nesterov requires momentum > 0 and dampening == 0 (", dname,
                    " is ", dampening, ")");
}

// Everything one fused SGD step reads and writes (shared by sgd_step_ and its foreach).
void check_sgd_tensors(const at::Tensor& w, const at::Tensor& grad, const at::Tensor& prev,
                       const at::Tensor& bits, const at::Tensor* buf, int64_t i) {
  const Name wn = at_index(i < 0 ? "w" : "ws", i), gn = at_index(i < 0 ? "grad" : "grads", i),
             pn = at_index(i < 0 ? "prev" : "prevs", i), bn = at_index("bits", i),
             mn = at_index(i < 0 ? "momentum_buf" : "momentum_bufs", i);
  check_param(w, wn);
  check_like(grad, gn, w.scalar_type(), w, wn);
  check_like(prev, pn, at::kFloat, w, wn);
  check_like(bits, bn, at::kByte, w, wn);
  check_no_overlap(w, wn, grad, gn);
  check_no_overlap(w, wn, prev, pn);
  check_no_overlap(w, wn, bits, bn);
  if (buf != nullptr) {
    check_like(*buf, mn, at::kFloat, w, wn);
    check_no_overlap(*buf, mn, w, wn);
    check_no_overlap(*buf, mn, grad, gn);
    check_no_overlap(*buf, mn, prev, pn);
    check_no_overlap(*buf, mn, bits, bn);
  }
}

// Fisher buffers: fp32, dense, fisher_w of `shape`, fisher_b of (out,), on x's device,
// sharing memory with nothing else.
void check_fisher_buffers(const at::Tensor& fisher_w, const std::optional<at::Tensor>& fisher_b,
                          const at::Tensor& x, const at::Tensor& grad_out,
                          at::IntArrayRef shape, double scale) {
  const Name fwn{"fisher_w"}, fbn{"fisher_b"}, xn{"x"}, gn{"grad_out"};
  check_dense_tensor(fisher_w, fwn);
  TORCH_CHECK_TYPE(fisher_w.scalar_type() == at::kFloat,
                   "blip_kernels._C: fisher_w must have dtype float32; got ",
                   dtype_name(fisher_w.scalar_type()));
  check_same_device(fisher_w, fwn, x, xn);
  TORCH_CHECK_VALUE(fisher_w.sizes() == shape, "blip_kernels._C: fisher_w has shape ",
                    fisher_w.sizes(), "; expected ", shape);
  check_no_overlap(fisher_w, fwn, x, xn);
  check_no_overlap(fisher_w, fwn, grad_out, gn);
  if (fisher_b.has_value()) {
    const at::Tensor& fb = *fisher_b;
    check_dense_tensor(fb, fbn);
    TORCH_CHECK_TYPE(fb.scalar_type() == at::kFloat,
                     "blip_kernels._C: fisher_b must have dtype float32; got ", dtype_name(fb.scalar_type()));
    check_same_device(fb, fbn, x, xn);
    TORCH_CHECK_VALUE(fb.dim() == 1 && fb.size(0) == shape[0], "blip_kernels._C: fisher_b has shape ",
                      fb.sizes(), "; expected [", shape[0], "]");
    check_no_overlap(fb, fbn, fisher_w, fwn);
    check_no_overlap(fb, fbn, x, xn);
    check_no_overlap(fb, fbn, grad_out, gn);
  }
  check_f32_at_least_zero(scale, "scale");
}

// x and grad_out of a Fisher op: parameter dtypes, dense, one device.
void check_fisher_inputs(const at::Tensor& x, const at::Tensor& grad_out) {
  check_param(x, Name{"x"});
  check_param(grad_out, Name{"grad_out"});
  check_same_device(grad_out, Name{"grad_out"}, x, Name{"x"});
}

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

std::array<int64_t, 2> pair(const std::vector<int64_t>& v, const char* name, int64_t lo) {
  TORCH_CHECK_VALUE(v.size() == 2, "blip_kernels._C: ", name, " must have 2 entries; got ",
                    v.size());
  for (const int64_t e : v) {
    TORCH_CHECK_VALUE(e >= lo && e < kMaxConvParam, "blip_kernels._C: ", name,
                      " entries must be in ", lo, "..", kMaxConvParam - 1, "; got ", c10::IntArrayRef(v));
  }
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
      TORCH_CHECK(false, "blip_kernels._C: unsupported dtype ", dtype_name(t.scalar_type()));
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
      TORCH_CHECK(false, "blip_kernels._C: unsupported parameter dtype ", dtype_name(t.scalar_type()));
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
  check_param(w, Name{"w"});
  check_like(bits, Name{"bits"}, at::kByte, w, Name{"w"});
  checked_bound(bound, Name{"bound"});
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
  const Name wn{"w"}, pn{"prev"}, bn{"bits"};
  check_param(w, wn);
  check_like(prev, pn, at::kFloat, w, wn);
  check_like(bits, bn, at::kByte, w, wn);
  check_no_overlap(w, wn, prev, pn);
  check_no_overlap(w, wn, bits, bn);
  const float b = checked_bound(bound, Name{"bound"});
  check_max_bit(max_bit);
  mark_written(w);
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
  check_sgd_tensors(w, grad, prev, bits, momentum_buf.has_value() ? &*momentum_buf : nullptr, -1);
  TORCH_CHECK_VALUE(momentum == 0.0 || momentum_buf.has_value(),
                    "blip_kernels._C: momentum_buf is required when momentum != 0");
  const float b = checked_bound(bound, Name{"bound"});
  check_max_bit(max_bit);
  check_sgd_scalars(lr, momentum, weight_decay);
  check_dampening(dampening, momentum, nesterov, Name{"dampening"});
  mark_written(w);
  if (momentum_buf.has_value()) mark_written(*momentum_buf);
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
  const std::pair<const char*, size_t> lists[] = {{"grads", grads.size()},
                                                  {"prevs", prevs.size()},
                                                  {"bits", bits.size()},
                                                  {"bounds", bounds.size()},
                                                  {"dampenings", dampenings.size()}};
  for (const auto& [name, size] : lists) {
    TORCH_CHECK_VALUE(size == n, "blip_kernels._C: ", name, " has ", size, " entries; ws has ",
                      n);
  }
  TORCH_CHECK_VALUE(!momentum_bufs.has_value() || momentum_bufs->size() == n,
                    "blip_kernels._C: momentum_bufs has ", momentum_bufs->size(),
                    " entries; ws has ", n);
  TORCH_CHECK_VALUE(momentum == 0.0 || momentum_bufs.has_value(),
                    "blip_kernels._C: momentum_bufs is required when momentum != 0");
  check_max_bit(max_bit);
  check_sgd_scalars(lr, momentum, weight_decay);
  if (n == 0) return count_tensor(0);
  // Every tensor is checked before the first is written, so a bad entry writes nothing.
  for (size_t i = 0; i < n; ++i) {
    const auto idx = static_cast<int64_t>(i);
    check_sgd_tensors(ws[i], grads[i], prevs[i], bits[i],
                      momentum_bufs.has_value() ? &(*momentum_bufs)[i] : nullptr, idx);
    check_same_device(ws[i], at_index("ws", idx), ws[0], at_index("ws", 0));
    checked_bound(bounds[i], at_index("bounds", idx));
    check_dampening(dampenings[i], momentum, nesterov, at_index("dampenings", idx));
  }
  for (size_t i = 0; i < n; ++i) {
    mark_written(ws[i]);
    if (momentum_bufs.has_value()) mark_written((*momentum_bufs)[i]);
  }
  // As in sgd_step_, buffers only take part when momentum != 0.
  const bool use_buf = momentum_bufs.has_value() && momentum != 0.0;
  if (!on_cuda(ws[0])) {
    // One native call for the whole list: on small layers the per-call Python
    // overhead, not the kernel, is what a step costs.
    int64_t skipped = 0;
    for (size_t i = 0; i < n; ++i) {
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
  const Name bn{"bits"}, fn{"fisher"}, on{"fisher_old"};
  check_dense_tensor(bits, bn);
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte,
                   "blip_kernels._C: bits must have dtype uint8; got ", dtype_name(bits.scalar_type()));
  check_like(fisher, fn, at::kFloat, bits, bn);
  check_like(fisher_old, on, at::kFloat, bits, bn);
  check_no_overlap(bits, bn, fisher, fn);
  check_no_overlap(bits, bn, fisher_old, on);
  check_no_overlap(fisher, fn, fisher_old, on);
  TORCH_CHECK_VALUE(task >= 0 && task <= kMaxTask, "blip_kernels._C: task must be in 0..",
                    kMaxTask, "; got ", task);
  check_max_bit(max_bit);
  mark_written(bits);
  mark_written(fisher);
  mark_written(fisher_old);
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
  const Name wn{"w"}, pn{"prev"}, bn{"bits"};
  check_param(w, wn);
  check_like(prev, pn, at::kFloat, w, wn);
  check_like(bits, bn, at::kByte, w, wn);
  check_no_overlap(w, wn, prev, pn);
  check_no_overlap(w, wn, bits, bn);
  check_no_overlap(prev, pn, bits, bn);
  checked_bound(bound, Name{"bound"});
  mark_written(w);
  mark_written(prev);
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
  check_fisher_inputs(x, grad_out);
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3,
                    "blip_kernels._C: x must be 2-D (N, in) or 3-D (N, L, in); got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(grad_out.dim() == x.dim() &&
                        grad_out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "blip_kernels._C: grad_out has shape ", grad_out.sizes(), "; expected ",
                    x.sizes().slice(0, x.dim() - 1), " + (out,)");
  check_fisher_buffers(fisher_w, fisher_b, x, grad_out, {grad_out.size(-1), x.size(-1)}, scale);
  mark_written(fisher_w);
  if (fisher_b.has_value()) mark_written(*fisher_b);
  if (static_cast<float>(scale) == 0.0f) return;  // adds nothing, not even 0*inf = NaN (as blip_kernels.ops)
  const bool cuda = on_cuda(fisher_w);
  if (x.dim() == 2) {
    // Section 6: sum_n outer(c_n, x_n)^2 = (c*c)^T @ (x*x), one GEMM on either device.
    const at::Tensor cc = grad_out.to(at::kFloat).square();
    fisher_w.addmm_(cc.t(), x.to(at::kFloat).square(), /*beta=*/1.0, /*alpha=*/scale);
    if (fisher_b.has_value()) fisher_b->add_(cc.sum(0), scale);
    return;
  }
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
  const auto st = pair(stride, "stride", 1), pad = pair(padding, "padding", 0),
             dil = pair(dilation, "dilation", 1);
  check_fisher_inputs(x, grad_out);
  TORCH_CHECK_VALUE(x.dim() == 4, "blip_kernels._C: x must be 4-D (N, C_in, H, W); got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(fisher_w.defined() && fisher_w.dim() == 4,
                    "blip_kernels._C: fisher_w must be 4-D (C_out, C_in/groups, kh, kw)");
  const int64_t out_ch = fisher_w.size(0), cin_g = fisher_w.size(1);
  const int64_t kh = fisher_w.size(2), kw = fisher_w.size(3);
  TORCH_CHECK_VALUE(kh >= 1 && kw >= 1, "blip_kernels._C: fisher_w has a ", kh, "x", kw,
                    " kernel; it must be at least 1x1");
  TORCH_CHECK_VALUE(groups >= 1 && groups < kMaxConvParam && x.size(1) % groups == 0 &&
                        out_ch % groups == 0 && cin_g * groups == x.size(1),
                    "blip_kernels._C: groups=", groups, " must divide C_in=", x.size(1),
                    " and C_out=", out_ch, " with fisher_w's C_in/groups=", cin_g);
  TORCH_CHECK_VALUE(kh < kMaxConvParam && kw < kMaxConvParam && x.size(2) < kMaxConvParam &&
                        x.size(3) < kMaxConvParam,
                    "blip_kernels._C: conv sizes must be below 2^31");
  const int64_t ho = (x.size(2) + 2 * pad[0] - dil[0] * (kh - 1) - 1) / st[0] + 1;
  const int64_t wo = (x.size(3) + 2 * pad[1] - dil[1] * (kw - 1) - 1) / st[1] + 1;
  TORCH_CHECK_VALUE(x.size(2) + 2 * pad[0] - dil[0] * (kh - 1) - 1 >= 0 &&
                        x.size(3) + 2 * pad[1] - dil[1] * (kw - 1) - 1 >= 0,
                    "blip_kernels._C: kernel ", kh, "x", kw, " with dilation ", c10::IntArrayRef(dilation),
                    " is larger than the padded input");
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) &&
                        grad_out.size(1) == out_ch && grad_out.size(2) == ho &&
                        grad_out.size(3) == wo,
                    "blip_kernels._C: grad_out has shape ", grad_out.sizes(), "; expected [",
                    x.size(0), ", ", out_ch, ", ", ho, ", ", wo, "]");
  check_fisher_buffers(fisher_w, fisher_b, x, grad_out, fisher_w.sizes(), scale);
  mark_written(fisher_w);
  if (fisher_b.has_value()) mark_written(*fisher_b);
  if (static_cast<float>(scale) == 0.0f) return;  // as in fisher_linear_
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
