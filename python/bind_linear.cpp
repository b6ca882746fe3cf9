// Bindings of csrc/linear: the weight-streaming linear layer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <cstdint>
#include <string>

#include "bindings.h"
#include "linear/linear.h"
#include "tensor_arg.h"

namespace cm3rt::py_binding {

namespace {

// Checks shared by both layouts, then runs. w is [N, K] (w_packed false) or panels.
void run_linear(const std::string& op, const TensorArg& x, const TensorArg& w, int64_t N,
                bool w_packed, py::handle scales_obj, const TensorArg& out,
                std::uintptr_t stream) {
  TensorArg scales;
  const bool has_scales = import_optional(scales_obj, "scales", scales);
  const int64_t M = x.dim(0), K = x.dim(1);
  check_same_dtype(op, x, out);
  check_shape(op, out, {M, N}, "[M, N]");
  check_last_dim_contiguous(op, out);
  check_writable(op, out);
  const bool int8 = w.dtype == DType::kInt8;
  if (int8 != has_scales)
    fail_value(op, int8 ? "argument 'scales' is required with int8 weights ([N] float32)"
                        : "argument 'scales' goes with int8 weights only, got " +
                              std::string(dtype_name(w.dtype)) + " weights");
  if (has_scales) {
    check_same_device(op, x, scales);
    check_dtype(op, scales, {DType::kFloat32});
    check_shape(op, scales, {N}, "[N]");
    check_contiguous(op, scales);
  }
  if (M == 0 || N == 0) return;
  LinearParams p{};
  p.x = x.data;
  p.x_stride = x.strides[0];
  p.x_dtype = x.dtype;
  p.w = w.data;
  p.w_stride = w_packed ? 0 : w.strides[0];
  p.w_packed = w_packed;
  p.w_dtype = w.dtype;
  p.scales = has_scales ? scales.ptr<const float>() : nullptr;
  p.out = out.data;
  p.out_stride = out.strides[0];
  p.M = int(M);
  p.N = int(N);
  p.K = int(K);
  if (x.is_cuda()) {
    linear_cuda(p, stream_ptr(stream));
  } else {
    py::gil_scoped_release release;
    linear_cpu(p);
  }
}

// Checks of x and out common to both layouts.
void check_x_out(const std::string& op, const TensorArg& x, const TensorArg& w,
                 const TensorArg& out) {
  check_device_supported(op, x);
  check_same_device(op, x, w);
  check_same_device(op, x, out);
  check_dtype(op, x, {DType::kFloat32, DType::kBFloat16});
  check_dtype(op, w, {DType::kFloat32, DType::kBFloat16, DType::kInt8});
  check_rank(op, x, 2, "[M, K]");
  check_last_dim_contiguous(op, x);
  checked_int(op, x, 0);
  checked_int(op, x, 1);
}

void linear(py::handle x_obj, py::handle w_obj, py::handle scales_obj, py::handle out_obj,
            std::uintptr_t stream) {
  const std::string op = "linear";
  TensorArg x = import_tensor(x_obj, "x"), w = import_tensor(w_obj, "weight");
  TensorArg out = import_tensor(out_obj, "out");
  check_x_out(op, x, w, out);
  check_rank(op, w, 2, "[N, K]");
  const int64_t N = w.dim(0);
  check_shape(op, w, {N, x.dim(1)}, "[N, K] (K = x's last dim)");
  check_last_dim_contiguous(op, w);
  checked_int(op, w, 0);
  run_linear(op, x, w, N, false, scales_obj, out, stream);
}

void linear_packed(py::handle x_obj, py::handle w_obj, int64_t n, py::handle scales_obj,
                   py::handle out_obj) {
  const std::string op = "linear_packed";
  TensorArg x = import_tensor(x_obj, "x"), w = import_tensor(w_obj, "packed");
  TensorArg out = import_tensor(out_obj, "out");
  check_x_out(op, x, w, out);
  if (x.is_cuda()) fail_value(op, "packed weights are a CPU layout; use linear on CUDA");
  if (n < 0 || n > INT32_MAX) fail_value(op, "n = " + std::to_string(n) + " out of range");
  const int64_t g = panel_group(w.dtype), K = x.dim(1);
  check_rank(op, w, 3, "[ceil(N / 16), ceil(K / g), 16 g] (linear_pack)");
  check_shape(op, w, {(n + kPanelChannels - 1) / kPanelChannels, (K + g - 1) / g, kPanelChannels * g},
              "[ceil(N / 16), ceil(K / g), 16 g] (linear_pack of an [N, K] weight, K = x's "
              "last dim, g = 1 for float32, 2 for bfloat16 / int8)");
  check_contiguous(op, w);
  run_linear(op, x, w, n, true, scales_obj, out, 0);
}

}  // namespace

void bind_linear(py::module_& m) {
  m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("scales"), py::arg("out"),
        py::arg("stream") = 0,
        "out[M, N] = x[M, K] @ weight[N, K]^T (* scales[N] for int8 weights), fp32 "
        "accumulation; weights float32 / bfloat16 / int8, activations float32 / bfloat16.");
  m.def("linear_packed", &linear_packed, py::arg("x"), py::arg("packed"), py::arg("n"),
        py::arg("scales"), py::arg("out"),
        "linear on packed weights (CPU): packed = linear_pack(weight[N, K]), n = N.");
  m.def("linear_cpu_packed_fast_pairs", &linear_cpu_packed_fast_pairs,
        "The 'x/weight' dtype pairs linear_packed runs with a vector kernel on this CPU.");
  m.def("linear_cpu_kernels", &linear_cpu_kernels,
        "The CPU linear kernels this build and machine have, best first.");
  m.def("set_linear_cpu_kernel", &set_linear_cpu_kernel, py::arg("name"),
        "Use at most this CPU linear kernel ('' restores the best).");
}

}  // namespace cm3rt::py_binding
