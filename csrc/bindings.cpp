// Python bindings of blip_kernels._C: exactly the backend contract of reference.py.
// torch/python.h (pybind11 + tensor casters) without torch/all.h: a much faster build.
#include <torch/python.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "BLIP fused kernels: CPU (OpenMP) and, when built with CUDA, CUDA";
  using namespace pybind11::literals;
  // The kernels never touch Python objects: let other Python threads run meanwhile.
  using nogil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("has_cuda", &blip::has_cuda, "True when the CUDA kernels were compiled in");
  m.def("quantize", &blip::quantize, nogil(), "w"_a, "bits"_a, "bound"_a);
  m.def("project_", &blip::project_, nogil(), "w"_a, "prev"_a, "bits"_a, "bound"_a, "max_bit"_a);
  m.def("sgd_step_", &blip::sgd_step_, nogil(), "w"_a, "grad"_a, "prev"_a, "bits"_a, "momentum_buf"_a,
        "bound"_a, "max_bit"_a, "lr"_a, "momentum"_a, "dampening"_a, "nesterov"_a,
        "weight_decay"_a);
  m.def("sgd_step_foreach_", &blip::sgd_step_foreach_, nogil(), "ws"_a, "grads"_a, "prevs"_a,
        "bits"_a, "momentum_bufs"_a, "bounds"_a, "max_bit"_a, "lr"_a, "momentum"_a,
        "dampenings"_a, "nesterov"_a, "weight_decay"_a);
  m.def("update_bits_", &blip::update_bits_, nogil(), "bits"_a, "fisher"_a, "fisher_old"_a, "task"_a,
        "max_bit"_a);
  m.def("sync_", &blip::sync_, nogil(), "w"_a, "prev"_a, "bits"_a, "bound"_a);
  m.def("fisher_linear_", &blip::fisher_linear_, nogil(), "fisher_w"_a, "fisher_b"_a, "x"_a,
        "grad_out"_a, "scale"_a);
  m.def("fisher_conv2d_", &blip::fisher_conv2d_, nogil(), "fisher_w"_a, "fisher_b"_a, "x"_a,
        "grad_out"_a, "stride"_a, "padding"_a, "dilation"_a, "groups"_a, "scale"_a);
}
