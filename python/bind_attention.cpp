// Bindings of csrc/attention: kv_append and paged_attention.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "attention/kv_append.h"
#include "attention/paged_attention.h"
#include "bindings.h"
#include "common/device.h"
#include "tensor_arg.h"

namespace cm3rt::py_binding {

namespace {

// Host copy of an int32 index tensor (a synchronising copy for CUDA tensors).
std::vector<int32_t> host_ints(const TensorArg& t) {
  std::vector<int32_t> v(size_t(t.numel()));
  if (v.empty()) return v;
  if (t.is_cuda()) copy_device_to_host(v.data(), t.data, v.size() * sizeof(int32_t));
  else std::copy(t.ptr<int32_t>(), t.ptr<int32_t>() + v.size(), v.begin());
  return v;
}

void validate_slots(const std::string& op, const TensorArg& slots, int64_t num_slots) {
  const auto s = host_ints(slots);
  for (size_t t = 0; t < s.size(); ++t)
    if (s[t] < -1 || s[t] >= num_slots)
      fail_value(op, "argument 'slots'[" + std::to_string(t) + "] = " + std::to_string(s[t]) +
                         " is out of range [-1, " + std::to_string(num_slots) +
                         ") (NB * BS cache slots; -1 skips the token)");
}

void validate_attention_indices(const std::string& op, const TensorArg& block_tables,
                                const TensorArg& seq_lens, const TensorArg& cu, int T, int NB,
                                int BS, int MB) {
  const auto bt = host_ints(block_tables);
  const auto sl = host_ints(seq_lens);
  const auto c = host_ints(cu);
  const int B = int(sl.size());
  if (c[0] != 0) fail_value(op, "cu_seqlens_q[0] must be 0, got " + std::to_string(c[0]));
  if (c[B] != T)
    fail_value(op, "cu_seqlens_q[B] must equal the number of query rows T = " + std::to_string(T) +
                       ", got " + std::to_string(c[B]));
  for (int b = 0; b < B; ++b) {
    const int q_len = c[b + 1] - c[b];
    if (q_len < 0)
      fail_value(op, "cu_seqlens_q must be non-decreasing, but cu_seqlens_q[" +
                         std::to_string(b + 1) + "] = " + std::to_string(c[b + 1]) + " < cu_seqlens_q[" +
                         std::to_string(b) + "] = " + std::to_string(c[b]));
    if (sl[b] < q_len || int64_t(sl[b]) > int64_t(MB) * BS)
      fail_value(op, "seq_lens[" + std::to_string(b) + "] = " + std::to_string(sl[b]) +
                         " must lie in [q_len, MB * BS] = [" + std::to_string(q_len) + ", " +
                         std::to_string(int64_t(MB) * BS) + "]");
    const int used_blocks = (sl[b] + BS - 1) / BS;
    const int64_t row = int64_t(b) * block_tables.strides[0];
    for (int j = 0; j < used_blocks; ++j) {
      const int32_t id = bt[size_t(row + j * block_tables.strides[1])];
      if (id < 0 || id >= NB)
        fail_value(op, "block_tables[" + std::to_string(b) + ", " + std::to_string(j) + "] = " +
                           std::to_string(id) + " is out of range [0, " + std::to_string(NB) +
                           ") for a block that holds keys of the sequence");
    }
  }
}

void kv_append(py::handle k_obj, py::handle v_obj, py::handle kc_obj, py::handle vc_obj,
               py::handle slots_obj, bool validate, std::uintptr_t stream) {
  const std::string op = "kv_append";
  TensorArg k = import_tensor(k_obj, "k"), v = import_tensor(v_obj, "v");
  TensorArg kc = import_tensor(kc_obj, "k_cache"), vc = import_tensor(vc_obj, "v_cache");
  TensorArg slots = import_tensor(slots_obj, "slots");
  check_device_supported(op, k);
  for (const TensorArg* t : {&v, &kc, &vc, &slots}) check_same_device(op, k, *t);
  check_dtype(op, k, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  for (const TensorArg* t : {&v, &kc, &vc}) check_same_dtype(op, k, *t);
  check_dtype(op, slots, {DType::kInt32});
  check_rank(op, kc, 4, "[NB, BS, Hkv, D]");
  const int64_t NB = kc.dim(0), BS = kc.dim(1), Hkv = kc.dim(2), D = kc.dim(3);
  check_shape(op, vc, {NB, BS, Hkv, D}, "[NB, BS, Hkv, D]");
  check_rank(op, k, 3, "[T, Hkv, D]");
  const int64_t T = k.dim(0);
  check_shape(op, k, {T, Hkv, D}, "[T, Hkv, D]");
  check_shape(op, v, {T, Hkv, D}, "[T, Hkv, D]");
  check_shape(op, slots, {T}, "[T]");
  check_last_dim_contiguous(op, k);
  check_last_dim_contiguous(op, v);
  check_contiguous(op, kc);
  check_contiguous(op, vc);
  check_contiguous(op, slots);
  check_writable(op, kc);
  check_writable(op, vc);
  if (NB * BS > INT32_MAX) fail_value(op, "cache has more than 2^31 slots");
  if (validate || !k.is_cuda()) validate_slots(op, slots, NB * BS);
  if (T == 0) return;

  KvAppendParams p{};
  p.k = k.data; p.v = v.data;
  p.k_stride_t = k.strides[0]; p.k_stride_h = k.strides[1];
  p.v_stride_t = v.strides[0]; p.v_stride_h = v.strides[1];
  p.k_cache = kc.data; p.v_cache = vc.data;
  p.slots = slots.ptr<int32_t>();
  p.T = int(T); p.Hkv = int(Hkv); p.D = int(D); p.NB = int(NB); p.BS = int(BS);
  p.dtype = k.dtype;
  if (k.is_cuda()) {
    kv_append_cuda(p, stream_ptr(stream));
  } else {
    py::gil_scoped_release release;
    kv_append_cpu(p);
  }
}

void paged_attention(py::handle q_obj, py::handle kc_obj, py::handle vc_obj, py::handle bt_obj,
                     py::handle sl_obj, py::handle cu_obj, py::handle out_obj, py::handle lse_obj,
                     double scale, bool causal, int max_q_len, int max_seq_len,
                     py::handle ws_obj, bool validate, std::uintptr_t stream) {
  const std::string op = "paged_attention";
  TensorArg q = import_tensor(q_obj, "q");
  TensorArg kc = import_tensor(kc_obj, "k_cache"), vc = import_tensor(vc_obj, "v_cache");
  TensorArg bt = import_tensor(bt_obj, "block_tables"), sl = import_tensor(sl_obj, "seq_lens");
  TensorArg cu = import_tensor(cu_obj, "cu_seqlens_q"), out = import_tensor(out_obj, "out");
  TensorArg lse, ws;
  const bool has_lse = import_optional(lse_obj, "lse", lse);
  const bool has_ws = import_optional(ws_obj, "workspace", ws);
  check_device_supported(op, q);
  for (const TensorArg* t : {&kc, &vc, &bt, &sl, &cu, &out}) check_same_device(op, q, *t);
  check_dtype(op, q, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  for (const TensorArg* t : {&kc, &vc, &out}) check_same_dtype(op, q, *t);
  for (const TensorArg* t : {&bt, &sl, &cu}) check_dtype(op, *t, {DType::kInt32});

  check_rank(op, kc, 4, "[NB, BS, Hkv, D]");
  const int64_t NB = kc.dim(0), BS = kc.dim(1), Hkv = kc.dim(2), D = kc.dim(3);
  check_shape(op, vc, {NB, BS, Hkv, D}, "[NB, BS, Hkv, D]");
  check_rank(op, q, 3, "[T, H, D]");
  const int64_t T = q.dim(0), H = q.dim(1);
  check_shape(op, q, {T, H, D}, "[T, H, D]");
  check_shape(op, out, {T, H, D}, "[T, H, D]");
  if (Hkv <= 0 || H % Hkv != 0)
    fail_value(op, "query heads H = " + std::to_string(H) + " must be a multiple of kv heads Hkv = " +
                       std::to_string(Hkv));
  check_rank(op, bt, 2, "[B, MB]");
  const int64_t B = bt.dim(0), MB = bt.dim(1);
  check_shape(op, sl, {B}, "[B]");
  check_shape(op, cu, {B + 1}, "[B + 1]");
  if (has_lse) {
    check_same_device(op, q, lse);
    check_dtype(op, lse, {DType::kFloat32});
    check_shape(op, lse, {T, H}, "[T, H]");
    check_contiguous(op, lse);
    check_writable(op, lse);
  }
  check_last_dim_contiguous(op, q);
  check_last_dim_contiguous(op, out);
  check_contiguous(op, bt);
  check_contiguous(op, kc);
  check_contiguous(op, vc);
  check_contiguous(op, sl);
  check_contiguous(op, cu);
  check_writable(op, out);
  if (!(scale > 0.0)) fail_value(op, "scale must be > 0, got " + std::to_string(scale));
  if (BS <= 0) fail_value(op, "block size (k_cache dim 1) must be > 0");
  for (const TensorArg* t : {&q, &kc, &bt}) for (int d = 0; d < t->rank(); ++d) checked_int(op, *t, d);
  if (validate || !q.is_cuda())
    validate_attention_indices(op, bt, sl, cu, int(T), int(NB), int(BS), int(MB));

  PagedAttentionParams p{};
  p.q = q.data; p.q_stride_t = q.strides[0]; p.q_stride_h = q.strides[1];
  p.k_cache = kc.data; p.v_cache = vc.data;
  p.block_tables = bt.ptr<int32_t>(); p.block_table_stride = bt.strides[0];
  p.seq_lens = sl.ptr<int32_t>(); p.cu_seqlens_q = cu.ptr<int32_t>();
  p.out = out.data; p.out_stride_t = out.strides[0]; p.out_stride_h = out.strides[1];
  p.lse = has_lse ? lse.ptr<float>() : nullptr;
  p.T = int(T); p.B = int(B); p.H = int(H); p.Hkv = int(Hkv); p.D = int(D);
  p.NB = int(NB); p.BS = int(BS); p.MB = int(MB);
  p.scale = float(scale); p.causal = causal; p.dtype = q.dtype;
  p.max_q_len = max_q_len > 0 ? std::min<int>(max_q_len, int(T)) : int(T);
  const int64_t cap = MB * BS;
  p.max_seq_len = max_seq_len > 0 ? int(std::min<int64_t>(max_seq_len, cap)) : int(cap);
  if (has_ws) {
    check_same_device(op, q, ws);
    check_contiguous(op, ws);
    p.workspace = ws.data;
    p.workspace_bytes = size_t(ws.numel()) * dtype_size(ws.dtype);
  }
  if (T == 0 || B == 0) return;
  if (q.is_cuda()) {
    paged_attention_cuda(p, stream_ptr(stream));
  } else {
    py::gil_scoped_release release;
    paged_attention_cpu(p);
  }
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("kv_append", &kv_append, py::arg("k"), py::arg("v"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slots"), py::arg("validate") = false, py::arg("stream") = 0,
        "Scatter k, v [T, Hkv, D] into the paged caches at `slots` (-1 skips). CPU arguments are "
        "always range-checked; CUDA ones when validate=True (a synchronising check).");
  m.def("paged_attention", &paged_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_tables"), py::arg("seq_lens"), py::arg("cu_seqlens_q"), py::arg("out"),
        py::arg("lse") = py::none(), py::arg("scale") = 1.0, py::arg("causal") = true,
        py::arg("max_q_len") = -1, py::arg("max_seq_len") = -1,
        py::arg("workspace") = py::none(), py::arg("validate") = false, py::arg("stream") = 0,
        "Varlen attention over a paged KV cache (see csrc/attention/paged_attention.h).");
  m.def("paged_attention_workspace_bytes", &paged_attention_workspace_bytes, py::arg("T"),
        py::arg("B"), py::arg("H"), py::arg("D"), py::arg("max_q_len"), py::arg("max_seq_len"),
        py::arg("sm_count"),
        "Scratch bytes the CUDA paged_attention needs for these shapes (0 if none).");
}

}  // namespace cm3rt::py_binding
