// Bindings of csrc/vq: vq_nearest and vq_embed.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "common/device.h"
#include "tensor_arg.h"
#include "vq/vq.h"

namespace cm3rt::py_binding {

namespace {

void check_codebook(const std::string& op, const TensorArg& cb) {
  check_rank(op, cb, 2, "[K, C]");
  check_last_dim_contiguous(op, cb);
  if (cb.dim(0) < 1 || cb.dim(1) < 1)
    fail_value(op, "argument 'codebook' must have K >= 1 codes of C >= 1 channels, got shape " +
                       cb.shape_str());
  checked_int(op, cb, 0);
  checked_int(op, cb, 1);
}

void vq_nearest(py::handle z_obj, py::handle cb_obj, py::handle sq_obj, py::handle out_obj,
                std::uintptr_t stream) {
  const std::string op = "vq_nearest";
  TensorArg z = import_tensor(z_obj, "z"), cb = import_tensor(cb_obj, "codebook");
  TensorArg out = import_tensor(out_obj, "out"), sq;
  const bool has_sq = import_optional(sq_obj, "codebook_sqnorm", sq);
  check_device_supported(op, z);
  check_same_device(op, z, cb);
  check_same_device(op, z, out);
  if (z.is_cuda()) check_dtype(op, z, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  else check_dtype(op, z, {DType::kFloat32});
  check_same_dtype(op, z, cb);
  check_codebook(op, cb);
  const int64_t K = cb.dim(0), C = cb.dim(1);
  check_rank(op, z, 2, "[N, C]");
  const int64_t N = z.dim(0);
  check_shape(op, z, {N, C}, "[N, C]");
  check_last_dim_contiguous(op, z);
  checked_int(op, z, 0);
  check_dtype(op, out, {DType::kInt64});
  check_shape(op, out, {N}, "[N]");
  check_contiguous(op, out);
  check_writable(op, out);
  if (has_sq) {
    check_same_device(op, z, sq);
    check_dtype(op, sq, {DType::kFloat32});
    check_shape(op, sq, {K}, "[K]");
    check_contiguous(op, sq);
  }
  if (N == 0) return;
  VqNearestParams p{};
  p.z = z.data;
  p.z_stride = z.strides[0];
  p.codebook = cb.data;
  p.cb_stride = cb.strides[0];
  p.sqnorm = has_sq ? sq.ptr<const float>() : nullptr;
  p.dtype = z.dtype;
  p.N = int(N);
  p.K = int(K);
  p.C = int(C);
  p.out = out.ptr<int64_t>();
  if (z.is_cuda()) {
    vq_nearest_cuda(p, stream_ptr(stream));
  } else {
    py::gil_scoped_release release;
    vq_nearest_cpu(p);
  }
}

template <typename I>
void check_indices(const std::string& op, const I* idx, int64_t n, int64_t K) {
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] < 0 || idx[i] >= K)
      fail_value(op, "argument 'idx' (flattened)[" + std::to_string(i) + "] = " +
                         std::to_string(int64_t(idx[i])) + " is out of range [0, " +
                         std::to_string(K) + ") (codebook size K)");
}

void vq_embed(py::handle idx_obj, py::handle cb_obj, py::handle out_obj, bool validate,
              std::uintptr_t stream) {
  const std::string op = "vq_embed";
  TensorArg idx = import_tensor(idx_obj, "idx"), cb = import_tensor(cb_obj, "codebook");
  TensorArg out = import_tensor(out_obj, "out");
  check_device_supported(op, cb);
  check_same_device(op, cb, idx);
  check_same_device(op, cb, out);
  check_dtype(op, cb, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});  // a plain copy
  check_dtype(op, idx, {DType::kInt32, DType::kInt64});
  check_codebook(op, cb);
  const int64_t K = cb.dim(0), C = cb.dim(1), n = idx.numel();
  check_contiguous(op, idx);
  check_same_dtype(op, cb, out);
  std::vector<int64_t> want = idx.shape;
  want.push_back(C);
  check_shape(op, out, want, "[..., C] (idx's shape + [C])");
  check_contiguous(op, out);
  check_writable(op, out);
  const bool i64 = idx.dtype == DType::kInt64;
  if (!idx.is_cuda() || validate) {
    std::vector<int64_t> host(static_cast<size_t>(n));
    if (n) {
      if (i64) {
        if (idx.is_cuda()) copy_device_to_host(host.data(), idx.data, size_t(n) * 8);
        else std::copy(idx.ptr<const int64_t>(), idx.ptr<const int64_t>() + n, host.begin());
      } else {
        std::vector<int32_t> h32(static_cast<size_t>(n));
        if (idx.is_cuda()) copy_device_to_host(h32.data(), idx.data, size_t(n) * 4);
        else std::copy(idx.ptr<const int32_t>(), idx.ptr<const int32_t>() + n, h32.begin());
        std::copy(h32.begin(), h32.end(), host.begin());
      }
    }
    check_indices(op, host.data(), n, K);
  }
  if (n == 0) return;
  VqEmbedParams p{};
  p.idx = idx.data;
  p.idx_int64 = i64;
  p.n = n;
  p.codebook = cb.data;
  p.cb_stride = cb.strides[0];
  p.K = int(K);
  p.C = int(C);
  p.dtype = cb.dtype;
  p.out = out.data;
  if (cb.is_cuda()) {
    vq_embed_cuda(p, stream_ptr(stream));
  } else {
    py::gil_scoped_release release;
    vq_embed_cpu(p);
  }
}

}  // namespace

void bind_vq(py::module_& m) {
  m.def("vq_nearest", &vq_nearest, py::arg("z"), py::arg("codebook"),
        py::arg("codebook_sqnorm"), py::arg("out"), py::arg("stream") = 0,
        "Nearest code per row of z [N, C] in codebook [K, C] (fused distance + argmin, ties to "
        "the lowest index; -1 for a row without a finite distance).");
  m.def("vq_embed", &vq_embed, py::arg("idx"), py::arg("codebook"), py::arg("out"),
        py::arg("validate") = false, py::arg("stream") = 0,
        "out[..., :] = codebook[idx[...], :]. CPU indices are always range-checked, CUDA ones "
        "with validate=True (out-of-range CUDA indices give zero rows).");
}

}  // namespace cm3rt::py_binding
