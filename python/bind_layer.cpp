// Bindings of csrc/layer: the fused CPU layer ops (rms_norm, qk_norm_rope, swiglu).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "layer/layer_ops.h"
#include "tensor_arg.h"

namespace cm3rt::py_binding {

namespace {

constexpr std::initializer_list<DType> kActivationDtypes = {DType::kFloat32, DType::kBFloat16,
                                                            DType::kFloat16};

void check_cpu(const std::string& op, const TensorArg& t) {
  if (t.is_cuda())
    fail_value(op, "argument '" + t.name + "' is on " + t.device_str() +
                       "; this op has a CPU kernel only (on CUDA the model runs the torch ops)");
}

// A [T, N] activation matrix: CPU, an activation dtype, last dim contiguous, int32 dims.
void check_rows(const std::string& op, const TensorArg& t, const char* layout) {
  check_cpu(op, t);
  check_dtype(op, t, kActivationDtypes);
  check_rank(op, t, 2, layout);
  check_last_dim_contiguous(op, t);
  checked_int(op, t, 0);
  checked_int(op, t, 1);
}

void check_param(const std::string& op, const TensorArg& x, const TensorArg& t,
                 std::vector<int64_t> shape, const char* layout) {
  check_cpu(op, t);
  check_same_dtype(op, x, t);
  check_shape(op, t, std::move(shape), layout);
  check_contiguous(op, t);
}

void rms_norm(py::handle x_obj, py::handle w_obj, py::handle res_obj, py::handle out_obj,
              double eps) {
  const std::string op = "rms_norm";
  TensorArg x = import_tensor(x_obj, "x"), w = import_tensor(w_obj, "weight");
  TensorArg out = import_tensor(out_obj, "out"), res;
  const bool has_res = import_optional(res_obj, "residual", res);
  check_rows(op, x, "[T, H]");
  const int64_t T = x.dim(0), H = x.dim(1);
  check_param(op, x, w, {H}, "[H]");
  check_param(op, x, out, {T, H}, "[T, H]");
  check_writable(op, out);
  if (has_res) {
    check_param(op, x, res, {T, H}, "[T, H]");
    check_writable(op, res);
  }
  RmsNormParams p{};
  p.x = x.data;
  p.x_stride = x.strides[0];
  p.residual = has_res ? res.data : nullptr;
  p.weight = w.data;
  p.out = out.data;
  p.dtype = x.dtype;
  p.T = int(T);
  p.H = int(H);
  p.eps = float(eps);
  py::gil_scoped_release release;
  rms_norm_cpu(p);
}

void qk_norm_rope(py::handle qkv_obj, py::handle qw_obj, py::handle qb_obj, py::handle kw_obj,
                  py::handle kb_obj, py::handle pos_obj, py::handle freq_obj, double eps) {
  const std::string op = "qk_norm_rope";
  TensorArg qkv = import_tensor(qkv_obj, "qkv");
  TensorArg qw = import_tensor(qw_obj, "q_weight"), qb = import_tensor(qb_obj, "q_bias");
  TensorArg kw = import_tensor(kw_obj, "k_weight"), kb = import_tensor(kb_obj, "k_bias");
  TensorArg pos = import_tensor(pos_obj, "positions"), freq = import_tensor(freq_obj, "inv_freq");
  check_rows(op, qkv, "[T, (Hq + 2 Hkv) * D]");
  check_writable(op, qkv);
  check_rank(op, qw, 2, "[Hq, D]");
  check_rank(op, kw, 2, "[Hkv, D]");
  const int64_t T = qkv.dim(0), Hq = qw.dim(0), D = qw.dim(1), Hkv = kw.dim(0);
  if (D < 2 || D % 2 != 0) fail_value(op, "head_dim (q_weight's last dim) must be even, got " +
                                          std::to_string(D));
  if (qkv.dim(1) != (Hq + 2 * Hkv) * D)
    fail_value(op, "argument 'qkv' must be [T, (Hq + 2 Hkv) * D] = [T, " +
                       std::to_string((Hq + 2 * Hkv) * D) + "] for Hq = " + std::to_string(Hq) +
                       ", Hkv = " + std::to_string(Hkv) + ", D = " + std::to_string(D) +
                       ", got " + qkv.shape_str());
  check_param(op, qkv, qw, {Hq, D}, "[Hq, D]");
  check_param(op, qkv, qb, {Hq, D}, "[Hq, D]");
  check_param(op, qkv, kw, {Hkv, D}, "[Hkv, D]");
  check_param(op, qkv, kb, {Hkv, D}, "[Hkv, D]");
  check_cpu(op, pos);
  check_dtype(op, pos, {DType::kInt64});
  check_shape(op, pos, {T}, "[T]");
  check_contiguous(op, pos);
  check_cpu(op, freq);
  check_dtype(op, freq, {DType::kFloat32});
  check_shape(op, freq, {D / 2}, "[D / 2]");
  check_contiguous(op, freq);
  QkNormRopeParams p{};
  p.qkv = qkv.data;
  p.qkv_stride = qkv.strides[0];
  p.q_weight = qw.data;
  p.q_bias = qb.data;
  p.k_weight = kw.data;
  p.k_bias = kb.data;
  p.positions = pos.ptr<const int64_t>();
  p.inv_freq = freq.ptr<const float>();
  p.dtype = qkv.dtype;
  p.T = int(T);
  p.Hq = int(Hq);
  p.Hkv = int(Hkv);
  p.D = int(D);
  p.eps = float(eps);
  py::gil_scoped_release release;
  qk_norm_rope_cpu(p);
}

void swiglu(py::handle gu_obj, py::handle out_obj) {
  const std::string op = "swiglu";
  TensorArg gu = import_tensor(gu_obj, "gate_up"), out = import_tensor(out_obj, "out");
  check_rows(op, gu, "[T, 2I]");
  const int64_t T = gu.dim(0), I2 = gu.dim(1);
  if (I2 % 2 != 0) fail_value(op, "argument 'gate_up' must be [T, 2I] (even last dim), got " +
                                  gu.shape_str());
  check_param(op, gu, out, {T, I2 / 2}, "[T, I]");
  check_writable(op, out);
  SwigluParams p{};
  p.gate_up = gu.data;
  p.gate_up_stride = gu.strides[0];
  p.out = out.data;
  p.dtype = gu.dtype;
  p.T = int(T);
  p.I = int(I2 / 2);
  py::gil_scoped_release release;
  swiglu_cpu(p);
}

}  // namespace

void bind_layer(py::module_& m) {
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("residual"),
        py::arg("out"), py::arg("eps"),
        "out = weight * x / rms(x) per row (CPU); with residual: residual += x first and the "
        "norm is of the sum.");
  m.def("qk_norm_rope", &qk_norm_rope, py::arg("qkv"), py::arg("q_weight"), py::arg("q_bias"),
        py::arg("k_weight"), py::arg("k_bias"), py::arg("positions"), py::arg("inv_freq"),
        py::arg("eps"),
        "In place on qkv's q and k heads: per-head LayerNorm + affine, then RoPE (CPU).");
  m.def("swiglu", &swiglu, py::arg("gate_up"), py::arg("out"),
        "out = silu(gate) * up of the fused [T, 2I] gate/up projection (CPU).");
}

}  // namespace cm3rt::py_binding
