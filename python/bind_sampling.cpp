// Bindings of csrc/sampling: sample_logits (+ small test hooks for its shared math).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "common/device.h"
#include "sampling/philox.h"
#include "sampling/sample_logits.h"
#include "sample_groups.h"
#include "tensor_arg.h"

namespace cm3rt::py_binding {

namespace {

const char* const kModeNames[kNumSampleModes] = {"none", "cfg", "cfg3", "cdk"};

bool is_tensor_like(py::handle obj) {
  // Numbers first: hasattr on a number raises (and clears) an AttributeError, ~1 us each.
  if (PyFloat_Check(obj.ptr()) || PyLong_Check(obj.ptr())) return false;
  return PyCapsule_CheckExact(obj.ptr()) || py::hasattr(obj, "__dlpack__");
}

// A per-group argument: a Python number (one value for all groups) or a [G] tensor of `dtype`
// on the device of the logits. host() gives the G values on the host (a synchronising copy for
// CUDA tensors) for validation.
template <typename T>
struct GroupArg {
  std::string name;
  TensorArg tensor;
  bool is_tensor = false;
  T scalar{};

  PerGroup<T> per_group() const {
    return PerGroup<T>{is_tensor ? tensor.ptr<const T>() : nullptr, scalar};
  }
  std::vector<T> host(int G) const {
    std::vector<T> v(size_t(G), scalar);
    if (!is_tensor || G == 0) return v;
    if (tensor.is_cuda()) copy_device_to_host(v.data(), tensor.data, v.size() * sizeof(T));
    else std::copy(tensor.ptr<const T>(), tensor.ptr<const T>() + G, v.begin());
    return v;
  }
};

template <typename T>
GroupArg<T> group_arg(const std::string& op, py::handle obj, const std::string& name, DType dtype,
                      const TensorArg& logits) {
  GroupArg<T> a;
  a.name = name;
  if (is_tensor_like(obj)) {
    a.tensor = import_tensor(obj, name);
    a.is_tensor = true;
    check_same_device(op, logits, a.tensor);
    check_dtype(op, a.tensor, {dtype});
    check_rank(op, a.tensor, 1, "[G]");
    check_contiguous(op, a.tensor);
    return a;
  }
  try {
    a.scalar = obj.cast<T>();
  } catch (const py::cast_error&) {
    fail_type(op, "argument '" + name + "' must be a number or a [G] tensor, got " +
                      std::string(py::str(py::type::of(obj))));
  }
  return a;
}

template <typename T>
void check_group_len(const std::string& op, const GroupArg<T>& a, int64_t G) {
  if (a.is_tensor) check_shape(op, a.tensor, {G}, "[G]");
}

std::string at_group(const std::string& name, bool per_group, int g) {
  return per_group ? "'" + name + "'[" + std::to_string(g) + "]" : "'" + name + "'";
}

}  // namespace

// The descriptive twin of group_config_valid: raises on the first offending group. Shared
// with CpuDecoder.step_sample, whose groups come from the engine's packed step buffers.
void check_sample_groups(const std::string& op, int G, int64_t R, const SampleGroupsView& v,
                         const SampleGroupNames& per_group) {
  int64_t rows = 0;
  for (int g = 0; g < G; ++g) {
    auto where = [&](const char* name, bool tensor) { return at_group(name, tensor, g); };
    const int32_t S = v.streams[g], M = v.mode[g];
    if (S < 1 || S > 3)
      fail_value(op, "argument " + where("streams", per_group.streams) + " must be 1, 2 or 3 "
                     "(cond, [image-cond,] uncond rows), got " + std::to_string(S));
    rows += S;
    if (M < 0 || M >= kNumSampleModes)
      fail_value(op, "argument " + where("mode", per_group.mode) + " must be a mode id in 0..3 "
                     "(none, cfg, cfg3, cdk), got " + std::to_string(M));
    const int need = rows_used(M);
    if (M != kModeNone && S != need)
      fail_value(op, "mode '" + std::string(kModeNames[M]) + "' of group " + std::to_string(g) +
                         " needs " + std::to_string(need) + " streams, got " +
                         std::to_string(S) + " (argument 'streams')");
    const float T = v.temperature[g], P = v.top_p[g], CS = v.cfg_scale[g],
                CI = v.cfg_image_scale[g], A = v.cd_alpha[g];
    if (!(T >= 0.0f) || std::isinf(T))
      fail_value(op, "argument " + where("temperature", per_group.temperature) +
                         " must be finite and >= 0 (0 = argmax), got " + std::to_string(T));
    if (v.top_k[g] < 0)
      fail_value(op, "argument " + where("top_k", per_group.top_k) + " must be >= 0 (0 = off), "
                     "got " + std::to_string(v.top_k[g]));
    if (!(P > 0.0f && P <= 1.0f))
      fail_value(op, "argument " + where("top_p", per_group.top_p) + " must lie in (0, 1] "
                     "(1 = off), got " + std::to_string(P));
    if ((M == kModeCfg || M == kModeCfg3) && !std::isfinite(CS))
      fail_value(op, "argument " + where("cfg_scale", per_group.cfg_scale) + " must be finite, "
                     "got " + std::to_string(CS));
    if (M == kModeCfg3 && !std::isfinite(CI))
      fail_value(op, "argument " + where("cfg_image_scale", per_group.cfg_image_scale) +
                         " must be finite, got " + std::to_string(CI));
    if (M == kModeCdk) {
      if (!(A >= 0.0f && A <= 1.0f))
        fail_value(op, "argument " + where("cd_alpha", per_group.cd_alpha) + " must lie in "
                       "[0, 1], got " + std::to_string(A));
      if (v.cd_k[g] < 1)
        fail_value(op, "argument " + where("cd_k", per_group.cd_k) + " must be >= 1, got " +
                           std::to_string(v.cd_k[g]));
    }
  }
  if (rows != R)
    fail_value(op, "the stream counts (argument 'streams') sum to " + std::to_string(rows) +
                       " rows but 'logits' has R = " + std::to_string(R) + " rows");
}

namespace {

void validate_groups(const std::string& op, int G, int64_t R, const GroupArg<int32_t>& streams,
                     const GroupArg<int32_t>& mode, const GroupArg<float>& temperature,
                     const GroupArg<int32_t>& top_k, const GroupArg<float>& top_p,
                     const GroupArg<float>& cfg_scale, const GroupArg<float>& cfg_image_scale,
                     const GroupArg<float>& cd_alpha, const GroupArg<int32_t>& cd_k) {
  const auto S = streams.host(G), M = mode.host(G), K = top_k.host(G), CK = cd_k.host(G);
  const auto T = temperature.host(G), P = top_p.host(G), CS = cfg_scale.host(G),
             CI = cfg_image_scale.host(G), A = cd_alpha.host(G);
  SampleGroupsView v{S.data(), M.data(), T.data(), K.data(), P.data(), CS.data(), CI.data(),
                     A.data(), CK.data()};
  SampleGroupNames names{streams.is_tensor, mode.is_tensor, temperature.is_tensor,
                         top_k.is_tensor, top_p.is_tensor, cfg_scale.is_tensor,
                         cfg_image_scale.is_tensor, cd_alpha.is_tensor, cd_k.is_tensor};
  check_sample_groups(op, G, R, v, names);
}

void validate_scalars(const std::string& op, const GroupArg<int32_t>& mode,
                      const GroupArg<float>& temperature, const GroupArg<int32_t>& top_k,
                      const GroupArg<float>& top_p, const GroupArg<float>& cfg_scale,
                      const GroupArg<float>& cfg_image_scale, const GroupArg<float>& cd_alpha,
                      const GroupArg<int32_t>& cd_k) {
  if (!mode.is_tensor && (mode.scalar < 0 || mode.scalar >= kNumSampleModes))
    fail_value(op, "argument 'mode' must be a mode id in 0..3 (none, cfg, cfg3, cdk), got " +
                       std::to_string(mode.scalar));
  if (!temperature.is_tensor && (!(temperature.scalar >= 0.0f) || std::isinf(temperature.scalar)))
    fail_value(op, "argument 'temperature' must be finite and >= 0 (0 = argmax), got " +
                       std::to_string(temperature.scalar));
  if (!top_k.is_tensor && top_k.scalar < 0)
    fail_value(op, "argument 'top_k' must be >= 0 (0 = off), got " + std::to_string(top_k.scalar));
  if (!top_p.is_tensor && !(top_p.scalar > 0.0f && top_p.scalar <= 1.0f))
    fail_value(op, "argument 'top_p' must lie in (0, 1] (1 = off), got " +
                       std::to_string(top_p.scalar));
  for (const GroupArg<float>* s : {&cfg_scale, &cfg_image_scale})
    if (!s->is_tensor && !std::isfinite(s->scalar))
      fail_value(op, "argument '" + s->name + "' must be finite, got " + std::to_string(s->scalar));
  if (!cd_alpha.is_tensor && !(cd_alpha.scalar >= 0.0f && cd_alpha.scalar <= 1.0f))
    fail_value(op, "argument 'cd_alpha' must lie in [0, 1], got " + std::to_string(cd_alpha.scalar));
  if (!cd_k.is_tensor && cd_k.scalar < 1)
    fail_value(op, "argument 'cd_k' must be >= 1, got " + std::to_string(cd_k.scalar));
}

// Imports an allowed-token mask: bool [V] / [G, V], or packed int32 bits [W] / [G, W].
const void* import_mask(const std::string& op, py::handle obj, const std::string& name,
                        const TensorArg& logits, int64_t G, int64_t width, DType dtype,
                        int64_t& stride, TensorArg& keep) {
  stride = 0;
  if (obj.is_none()) return nullptr;
  keep = import_tensor(obj, name);
  check_same_device(op, logits, keep);
  check_dtype(op, keep, {dtype});
  const char* layout = dtype == DType::kBool ? "[V] or [G, V]" : "[ceil(V/32)] or [G, ceil(V/32)]";
  if (keep.rank() == 1) {
    check_shape(op, keep, {width}, layout);
  } else if (keep.rank() == 2) {
    check_shape(op, keep, {G, width}, layout);
    stride = keep.strides[0];
  } else {
    fail_value(op, "argument '" + name + "' must have shape " + layout + ", got " + keep.shape_str());
  }
  check_last_dim_contiguous(op, keep);
  return keep.data;
}

void sample_logits(py::handle logits_obj, py::handle streams_obj, py::handle mode_obj,
                   py::handle temperature_obj, py::handle top_k_obj, py::handle top_p_obj,
                   py::handle cfg_scale_obj, py::handle cfg_image_scale_obj,
                   py::handle cd_alpha_obj, py::handle cd_k_obj, py::handle seed_obj,
                   py::handle step_obj, py::handle allowed_obj, py::handle allowed_bits_obj,
                   py::handle tokens_obj, py::handle logprobs_obj, bool validate,
                   std::uintptr_t stream) {
  const std::string op = "sample_logits";
  TensorArg logits = import_tensor(logits_obj, "logits");
  check_device_supported(op, logits);
  check_dtype(op, logits, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  check_rank(op, logits, 2, "[R, V]");
  check_last_dim_contiguous(op, logits);
  const int64_t R = logits.dim(0), V = logits.dim(1);
  if (V < 1) fail_value(op, "argument 'logits' must have V >= 1 columns, got shape " + logits.shape_str());
  if (V > kMaxSampleVocab)
    fail_value(op, "vocabulary V = " + std::to_string(V) + " exceeds the supported " +
                       std::to_string(kMaxSampleVocab) + " (fixed-point mass sums)");
  if (R > INT32_MAX) fail_value(op, "argument 'logits' has more than 2^31 rows");

  auto streams = group_arg<int32_t>(op, streams_obj, "streams", DType::kInt32, logits);
  int64_t G;
  if (streams.is_tensor) {
    G = streams.tensor.dim(0);
  } else {
    if (streams.scalar < 1 || streams.scalar > 3)
      fail_value(op, "argument 'streams' must be 1, 2 or 3 (or an int32 [G] tensor), got " +
                         std::to_string(streams.scalar));
    if (R % streams.scalar != 0)
      fail_value(op, "rows of 'logits' R = " + std::to_string(R) + " are not divisible by "
                     "streams = " + std::to_string(streams.scalar));
    G = R / streams.scalar;
  }
  auto mode = group_arg<int32_t>(op, mode_obj, "mode", DType::kInt32, logits);
  auto temperature = group_arg<float>(op, temperature_obj, "temperature", DType::kFloat32, logits);
  auto top_k = group_arg<int32_t>(op, top_k_obj, "top_k", DType::kInt32, logits);
  auto top_p = group_arg<float>(op, top_p_obj, "top_p", DType::kFloat32, logits);
  auto cfg_scale = group_arg<float>(op, cfg_scale_obj, "cfg_scale", DType::kFloat32, logits);
  auto cfg_image_scale =
      group_arg<float>(op, cfg_image_scale_obj, "cfg_image_scale", DType::kFloat32, logits);
  auto cd_alpha = group_arg<float>(op, cd_alpha_obj, "cd_alpha", DType::kFloat32, logits);
  auto cd_k = group_arg<int32_t>(op, cd_k_obj, "cd_k", DType::kInt32, logits);
  auto seed = group_arg<int64_t>(op, seed_obj, "seed", DType::kInt64, logits);
  auto step = group_arg<int64_t>(op, step_obj, "step", DType::kInt64, logits);
  check_group_len(op, mode, G);
  check_group_len(op, temperature, G);
  check_group_len(op, top_k, G);
  check_group_len(op, top_p, G);
  check_group_len(op, cfg_scale, G);
  check_group_len(op, cfg_image_scale, G);
  check_group_len(op, cd_alpha, G);
  check_group_len(op, cd_k, G);
  check_group_len(op, seed, G);
  check_group_len(op, step, G);

  TensorArg tokens = import_tensor(tokens_obj, "out_tokens");
  TensorArg logprobs = import_tensor(logprobs_obj, "out_logprobs");
  for (const TensorArg* t : {&tokens, &logprobs}) {
    check_same_device(op, logits, *t);
    check_shape(op, *t, {G}, "[G]");
    check_contiguous(op, *t);
    check_writable(op, *t);
  }
  check_dtype(op, tokens, {DType::kInt64});
  check_dtype(op, logprobs, {DType::kFloat32});

  TensorArg allowed_keep, bits_keep;
  int64_t allowed_stride = 0, bits_stride = 0;
  const auto* allowed = static_cast<const uint8_t*>(
      import_mask(op, allowed_obj, "allowed", logits, G, V, DType::kBool, allowed_stride,
                  allowed_keep));
  const auto* bits = static_cast<const uint32_t*>(
      import_mask(op, allowed_bits_obj, "allowed_bits", logits, G, (V + 31) / 32, DType::kInt32,
                  bits_stride, bits_keep));
  if (allowed && bits)
    fail_value(op, "pass at most one of 'allowed' (bool) and 'allowed_bits' (packed int32)");

  // Numbers are checked always (no device traffic); [G] tensors on CPU always, on CUDA with
  // validate=True (a synchronising copy). Unchecked bad CUDA groups are flagged by the kernel
  // (token -1, logprob NaN), never read out of range.
  validate_scalars(op, mode, temperature, top_k, top_p, cfg_scale, cfg_image_scale, cd_alpha,
                   cd_k);
  const bool any_group_tensor = streams.is_tensor || mode.is_tensor || temperature.is_tensor ||
      top_k.is_tensor || top_p.is_tensor || cfg_scale.is_tensor || cfg_image_scale.is_tensor ||
      cd_alpha.is_tensor || cd_k.is_tensor;
  if (!logits.is_cuda() || validate || !any_group_tensor)  // numbers only: no device traffic
    validate_groups(op, int(G), R, streams, mode, temperature, top_k, top_p, cfg_scale,
                    cfg_image_scale, cd_alpha, cd_k);
  if (G == 0) return;

  SampleLogitsParams p{};
  p.logits = logits.data;
  p.row_stride = logits.strides[0];
  p.dtype = logits.dtype;
  p.R = int(R);
  p.V = int(V);
  p.G = int(G);
  p.streams = streams.per_group();
  p.mode = mode.per_group();
  p.temperature = temperature.per_group();
  p.top_k = top_k.per_group();
  p.top_p = top_p.per_group();
  p.cfg_scale = cfg_scale.per_group();
  p.cfg_image_scale = cfg_image_scale.per_group();
  p.cd_alpha = cd_alpha.per_group();
  p.cd_k = cd_k.per_group();
  p.seed = seed.per_group();
  p.step = step.per_group();
  p.allowed = allowed;
  p.allowed_stride = allowed_stride;
  p.allowed_bits = bits;
  p.allowed_bits_stride = bits_stride;
  p.tokens = tokens.ptr<int64_t>();
  p.logprobs = logprobs.ptr<float>();
  if (logits.is_cuda()) {
    sample_logits_cuda(p, stream_ptr(stream));
  } else {
    py::gil_scoped_release release;
    sample_logits_cpu(p);
  }
}

// ---- test hooks: the shared math, evaluated on the host ---------------------------------------
std::array<uint32_t, 4> philox_hook(std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
  const Philox4x32 out = philox4x32_10(Philox4x32{{ctr[0], ctr[1], ctr[2], ctr[3]}}, key[0], key[1]);
  return {out.v[0], out.v[1], out.v[2], out.v[3]};
}

std::vector<float> exp_nonpos_hook(const std::vector<float>& x) {
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = exp_nonpos(x[i]);
  return y;
}

std::vector<float> log_pos_hook(const std::vector<float>& x) {
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = log_pos(x[i]);
  return y;
}

// Both fixed-point weight forms, for every value given (they must agree bit for bit).
std::vector<std::array<uint64_t, 2>> weight_fixed_hook(const std::vector<float>& w) {
  std::vector<std::array<uint64_t, 2>> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) out[i] = {weight_fixed(w[i]), weight_fixed_halves(w[i])};
  return out;
}

}  // namespace

void bind_sampling(py::module_& m) {
  m.def("sample_logits", &sample_logits, py::arg("logits"), py::arg("streams"), py::arg("mode"),
        py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("cfg_scale"),
        py::arg("cfg_image_scale"), py::arg("cd_alpha"), py::arg("cd_k"), py::arg("seed"),
        py::arg("step"), py::arg("allowed"), py::arg("allowed_bits"), py::arg("out_tokens"),
        py::arg("out_logprobs"), py::arg("validate") = false, py::arg("stream") = 0,
        "One token per group from [R, V] logits (see csrc/sampling/sample_logits.h). Per-group "
        "arguments are numbers or [G] tensors (int32 / float32 / int64 for seed and step).");
  m.def("_philox4x32_10", &philox_hook, py::arg("counter"), py::arg("key"),
        "Test hook: Philox4x32-10 of the sampler on the host.");
  m.def("_exp_nonpos", &exp_nonpos_hook, py::arg("x"), "Test hook: the sampler's exp (x <= 0).");
  m.def("_log_pos", &log_pos_hook, py::arg("x"), "Test hook: the sampler's log (x > 0).");
  m.def("_weight_fixed", &weight_fixed_hook, py::arg("w"),
        "Test hook: the two forms of the sampler's fixed-point weight floor(w * 2^40).");
  // The combine modes, in id order: cm3rt.ops.SAMPLE_MODES is built from this tuple.
  py::tuple mode_names(kNumSampleModes);
  for (int i = 0; i < kNumSampleModes; ++i) mode_names[i] = kModeNames[i];
  m.attr("SAMPLE_MODE_NAMES") = mode_names;
}

}  // namespace cm3rt::py_binding
