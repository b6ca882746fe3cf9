// Bindings of csrc/model: CpuDecoder, the whole-step CPU forward of a Chameleon decoder.
// The weights and KV cache are imported once, at construction (the object keeps their DLPack
// capsules, so the memory stays alive); a step imports only its index tensors and the logits
// buffer. Not in cm3rt._emu: the emulator copies a tensor argument for the duration of one
// call, and this object keeps its arguments across calls.
#if !defined(CM3RT_EMU)
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bindings.h"
#include "linear/linear.h"
#include "model/decoder_cpu.h"
#include "sample_groups.h"
#include "sampling/sample_logits.h"
#include "tensor_arg.h"

namespace cm3rt::py_binding {

namespace {

const std::string kOp = "CpuDecoder";

void check_cpu_contiguous(const TensorArg& t) {
  if (t.is_cuda())
    fail_value(kOp, "argument '" + t.name + "' is on " + t.device_str() + "; the whole-step "
                    "decoder runs on the CPU");
  check_contiguous(kOp, t);
}

class CpuDecoder {
 public:
  CpuDecoder(py::dict config, py::handle embed, py::handle final_norm, py::handle inv_freq,
             py::list layers, py::list caches, py::list heads) {
    TensorArg& e = keep(embed, "embed_tokens");
    check_dtype(kOp, e, {DType::kFloat32, DType::kBFloat16});
    check_rank(kOp, e, 2, "[V, H]");
    w_.dtype = e.dtype;
    w_.vocab_rows = checked_int(kOp, e, 0);
    w_.H = checked_int(kOp, e, 1);
    w_.embed = e.data;
    w_.final_norm = param(final_norm, "norm", {w_.H}, "[H]");
    w_.rms_eps = config["rms_norm_eps"].cast<float>();
    w_.qk_eps = config["qk_norm_eps"].cast<float>();
    w_.swin_norm = config["swin_norm"].cast<bool>();
    if (layers.size() != caches.size())
      fail_value(kOp, std::to_string(layers.size()) + " layers but " +
                          std::to_string(caches.size()) + " (k_cache, v_cache) pairs");
    for (size_t i = 0; i < layers.size(); ++i)
      add_layer(layers[i].cast<py::dict>(), caches[i].cast<py::tuple>(), int(i));
    if (layers.empty()) fail_value(kOp, "the model has no layers");
    TensorArg& f = keep(inv_freq, "inv_freq");
    check_dtype(kOp, f, {DType::kFloat32});
    check_shape(kOp, f, {w_.D / 2}, "[D / 2]");
    w_.inv_freq = f.ptr<const float>();
    for (size_t i = 0; i < heads.size(); ++i) {
      const py::tuple h = heads[i].cast<py::tuple>();
      if (h.size() != 3) fail_value(kOp, "heads[" + std::to_string(i) + "] must be (weight "
                                         "or its row count, scales or None, packed or None)");
      w_.heads.push_back(projection(h[0], h[1], h[2], "heads[" + std::to_string(i) + "]", -1,
                                    w_.H));
    }
  }

  // One forward step; writes logits [R, N_head] (float32) of `rows` unless R = 0.
  void step(py::handle ids_obj, py::handle pos_obj, py::handle slots_obj, py::handle bt_obj,
            py::handle lens_obj, py::handle cu_obj, py::handle rows_obj, int max_q_len,
            int max_seq_len, int head, py::handle logits_obj) {
    TensorArg ids = step_arg(ids_obj, "ids", DType::kInt64);
    TensorArg pos = step_arg(pos_obj, "positions", DType::kInt64);
    TensorArg slots = step_arg(slots_obj, "slots", DType::kInt32);
    TensorArg bt = import_tensor(bt_obj, "block_tables");
    check_cpu_contiguous(bt);
    check_dtype(kOp, bt, {DType::kInt32});
    check_rank(kOp, bt, 2, "[B, MB]");
    TensorArg lens = step_arg(lens_obj, "seq_lens", DType::kInt32);
    TensorArg cu = step_arg(cu_obj, "cu_seqlens_q", DType::kInt32);
    TensorArg rows = step_arg(rows_obj, "rows", DType::kInt64);
    const int64_t T = ids.numel(), B = bt.dim(0), R = rows.numel();
    check_shape(kOp, pos, {T}, "[T]");
    check_shape(kOp, slots, {T}, "[T]");
    check_shape(kOp, lens, {B}, "[B]");
    check_shape(kOp, cu, {B + 1}, "[B + 1]");
    DecoderStepInputs s{};
    s.ids = ids.ptr<const int64_t>();
    s.positions = pos.ptr<const int64_t>();
    s.slots = slots.ptr<const int32_t>();
    s.block_tables = bt.ptr<const int32_t>();
    s.seq_lens = lens.ptr<const int32_t>();
    s.cu_seqlens_q = cu.ptr<const int32_t>();
    s.rows = rows.ptr<const int64_t>();
    s.T = int(T);
    s.B = int(B);
    s.MB = int(bt.dim(1));
    s.R = int(R);
    s.max_q_len = max_q_len;
    s.max_seq_len = max_seq_len;
    s.head = head;
    TensorArg logits;
    if (R > 0) {
      check_head(head);
      logits = import_tensor(logits_obj, "logits");
      check_cpu_contiguous(logits);
      check_dtype(kOp, logits, {DType::kFloat32});
      check_shape(kOp, logits, {R, w_.heads[head].N}, "[R, N_head]");
      check_writable(kOp, logits);
      s.logits = logits.ptr<float>();
    }
    validate_decoder_step(w_, s);
    reserve_scratch(decoder_step_scratch_bytes(w_, s.T, s.R, head));
    py::gil_scoped_release release;
    decoder_step_cpu(w_, s, scratch_.get(), scratch_bytes_);
  }

  // One step from the engine's packed host buffers (cm3rt/engine/step_inputs.py, PackedStep):
  // the forward, then one token per sampling group, drawn by the sampler kernel from logits
  // that stay in this object's scratch. -> (tokens, logprobs) as lists, tokens as columns of
  // the head (the image head's column k is its k-th row). The buffers' layout, for
  // dims = (T, B, R, G, MB, max_q_len, max_seq_len):
  //   int64:   ids [T], positions [T], rows [R], seed [G], step [G]
  //   int32:   slots [T], seq_lens [B], cu_seqlens_q [B + 1], block_tables [B * MB],
  //            streams [G], mode [G], top_k [G], cd_k [G], mask_kind [G]
  //   float32: temperature [G], top_p [G], cfg_scale [G], cfg_image_scale [G], cd_alpha [G]
  // allowed_bits: the engine's packed allowed-token table [kinds, ceil(N_head / 32)] (group g
  // reads row mask_kind[g]), or None: every column allowed (the image head).
  py::tuple step_sample(py::handle i64_obj, py::handle i32_obj, py::handle f32_obj,
                        std::array<int64_t, 7> dims, int head, py::handle allowed_bits_obj) {
    const auto [T, B, R, G, MB, max_q_len, max_seq_len] = dims;
    if (T < 1 || B < 1 || R < 0 || G < 0 || MB < 1 || G > R || max_q_len < 1 ||
        max_seq_len < 1 || T > INT32_MAX || R > INT32_MAX || B * MB > INT32_MAX)
      fail_value(kOp, "dims (T, B, R, G, MB, max_q_len, max_seq_len) = (" + join(dims) +
                          ") do not describe a step");
    TensorArg i64 = step_arg(i64_obj, "i64", DType::kInt64);
    TensorArg i32 = step_arg(i32_obj, "i32", DType::kInt32);
    TensorArg f32 = step_arg(f32_obj, "f32", DType::kFloat32);
    check_shape(kOp, i64, {2 * T + R + 2 * G}, "[2 T + R + 2 G]");
    check_shape(kOp, i32, {T + 2 * B + 1 + B * MB + 5 * G}, "[T + 2 B + 1 + B MB + 5 G]");
    check_shape(kOp, f32, {5 * G}, "[5 G]");
    const int64_t* q = i64.ptr<const int64_t>();
    const int32_t* d = i32.ptr<const int32_t>();
    const float* f = f32.ptr<const float>();
    DecoderStepInputs s{};
    s.ids = q;
    s.positions = q + T;
    s.rows = q + 2 * T;
    const int64_t* seed = q + 2 * T + R;
    const int64_t* step = seed + G;
    s.slots = d;
    s.seq_lens = d + T;
    s.cu_seqlens_q = d + T + B;
    s.block_tables = d + T + 2 * B + 1;
    const int32_t* group_ints = s.block_tables + B * MB;  // streams, mode, top_k, cd_k, kind
    s.T = int(T);
    s.B = int(B);
    s.MB = int(MB);
    s.R = int(R);
    s.max_q_len = int(max_q_len);
    s.max_seq_len = int(max_seq_len);
    s.head = head;
    if (R > 0) check_head(head);
    const int N = R > 0 ? w_.heads[head].N : 0;
    if (N > kMaxSampleVocab)
      fail_value(kOp, "head " + std::to_string(head) + " has " + std::to_string(N) +
                          " rows, more than the sampler's " + std::to_string(kMaxSampleVocab));
    validate_decoder_step(w_, s);
    // The sampler's groups: checked on the host like sample_logits' [G] tensors.
    const SampleGroupsView v{group_ints, group_ints + G, f, group_ints + 2 * G, f + G,
                             f + 2 * G, f + 3 * G, f + 4 * G, group_ints + 3 * G};
    check_sample_groups(kOp + ".step_sample", int(G), R, v, SampleGroupNames{
        true, true, true, true, true, true, true, true, true});
    const int32_t* kinds = group_ints + 4 * G;
    TensorArg allowed;
    const uint32_t* allowed_rows = nullptr;
    if (!allowed_bits_obj.is_none() && G > 0) {
      allowed = import_tensor(allowed_bits_obj, "allowed_bits");
      check_cpu_contiguous(allowed);
      check_dtype(kOp, allowed, {DType::kInt32});
      check_rank(kOp, allowed, 2, "[kinds, ceil(N_head / 32)]");
      const int64_t words = (N + 31) / 32;
      check_shape(kOp, allowed, {allowed.dim(0), words}, "[kinds, ceil(N_head / 32)]");
      for (int64_t g = 0; g < G; ++g)
        if (kinds[g] < 0 || kinds[g] >= allowed.dim(0))
          fail_value(kOp, "mask_kind[" + std::to_string(g) + "] = " + std::to_string(kinds[g]) +
                              " is not a row of 'allowed_bits' (" +
                              std::to_string(allowed.dim(0)) + " rows)");
      // The rows the groups read, gathered: the sampler takes [G, words] with a row stride.
      mask_rows_.resize(size_t(G * words));
      const auto* table = allowed.ptr<const uint32_t>();
      for (int64_t g = 0; g < G; ++g)
        std::copy(table + kinds[g] * words, table + (kinds[g] + 1) * words,
                  mask_rows_.begin() + g * words);
      allowed_rows = mask_rows_.data();
    }
    logits_.resize(size_t(R) * size_t(N));
    s.logits = R > 0 ? logits_.data() : nullptr;
    reserve_scratch(decoder_step_scratch_bytes(w_, s.T, s.R, head));
    std::vector<int64_t> tokens(static_cast<size_t>(G));
    std::vector<float> logprobs(static_cast<size_t>(G));
    {
      py::gil_scoped_release release;
      decoder_step_cpu(w_, s, scratch_.get(), scratch_bytes_);
      if (G > 0) {
        SampleLogitsParams p{};
        p.logits = logits_.data();
        p.row_stride = N;
        p.dtype = DType::kFloat32;
        p.R = int(R);
        p.V = N;
        p.G = int(G);
        p.streams = PerGroup<int32_t>{v.streams, 0};
        p.mode = PerGroup<int32_t>{v.mode, 0};
        p.temperature = PerGroup<float>{v.temperature, 0.0f};
        p.top_k = PerGroup<int32_t>{v.top_k, 0};
        p.top_p = PerGroup<float>{v.top_p, 0.0f};
        p.cfg_scale = PerGroup<float>{v.cfg_scale, 0.0f};
        p.cfg_image_scale = PerGroup<float>{v.cfg_image_scale, 0.0f};
        p.cd_alpha = PerGroup<float>{v.cd_alpha, 0.0f};
        p.cd_k = PerGroup<int32_t>{v.cd_k, 0};
        p.seed = PerGroup<int64_t>{seed, 0};
        p.step = PerGroup<int64_t>{step, 0};
        p.allowed_bits = allowed_rows;
        p.allowed_bits_stride = allowed_rows ? (N + 31) / 32 : 0;
        p.tokens = tokens.data();
        p.logprobs = logprobs.data();
        sample_logits_cpu(p);
      }
    }
    return py::make_tuple(py::cast(tokens), py::cast(logprobs));
  }

  int num_heads() const { return int(w_.heads.size()); }

 private:
  struct FreeDeleter {
    void operator()(char* p) const { std::free(p); }
  };

  void check_head(int head) const {
    if (head < 0 || head >= int(w_.heads.size()))
      fail_value(kOp, "head " + std::to_string(head) + " does not exist (the decoder has " +
                          std::to_string(w_.heads.size()) + ")");
  }

  void reserve_scratch(size_t need) {
    if (need <= scratch_bytes_) return;
    scratch_.reset(static_cast<char*>(std::aligned_alloc(64, (need + 63) / 64 * 64)));
    if (!scratch_) throw std::bad_alloc();
    scratch_bytes_ = need;
  }

  static std::string join(const std::array<int64_t, 7>& v) {
    std::string out;
    for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
    return out;
  }

  TensorArg& keep(py::handle obj, const std::string& name) {
    kept_.push_back(std::make_unique<TensorArg>(import_tensor(obj, name)));
    check_cpu_contiguous(*kept_.back());
    return *kept_.back();
  }

  // A norm / qk-norm parameter: the activation dtype, this shape.
  const void* param(py::handle obj, const std::string& name, std::vector<int64_t> shape,
                    const char* layout) {
    TensorArg& t = keep(obj, name);
    check_dtype(kOp, t, {w_.dtype});
    check_shape(kOp, t, std::move(shape), layout);
    return t.data;
  }

  // A projection weight [N, K] (N = -1: any) in the activation dtype, or int8 with scales,
  // and its panels (ops.linear_pack of it; None: not packed). A model that keeps only the
  // panels (ChameleonModel.pack_weights_) passes the weight's row count N instead of it.
  ProjectionWeight projection(py::handle w_obj, py::handle scales_obj, py::handle packed_obj,
                              const std::string& name, int64_t N, int64_t K) {
    ProjectionWeight p;
    p.K = int(K);
    if (py::isinstance<py::int_>(w_obj) && !py::isinstance<py::bool_>(w_obj)) {
      const int64_t rows = w_obj.cast<int64_t>();
      if (packed_obj.is_none())
        fail_value(kOp, "argument '" + name + "': a row count in place of the weight needs "
                        "the weight's panels (" + name + "_packed)");
      if (rows < 1 || rows >= (int64_t(1) << 31) || (N >= 0 && rows != N))
        fail_value(kOp, "argument '" + name + "': row count " + std::to_string(rows) +
                        (N >= 0 ? " is not the " + std::to_string(N) + " the model needs"
                                : " out of range"));
      p.N = int(rows);
      p.dtype = DType::kInt8;  // replaced by the panels' dtype below
    } else {
      TensorArg& t = keep(w_obj, name);
      check_dtype(kOp, t, {w_.dtype, DType::kInt8});
      check_shape(kOp, t, {N, K}, "[N, K]");
      p.w = t.data;
      p.dtype = t.dtype;
      p.N = checked_int(kOp, t, 0);
    }
    if (!packed_obj.is_none()) {
      TensorArg& pk = keep(packed_obj, name + "_packed");
      if (p.w) check_dtype(kOp, pk, {p.dtype});
      else check_dtype(kOp, pk, {w_.dtype, DType::kInt8});
      p.dtype = pk.dtype;
      const int64_t g = panel_group(p.dtype);
      check_shape(kOp, pk, {(p.N + kPanelChannels - 1) / kPanelChannels, (K + g - 1) / g,
                            kPanelChannels * g},
                  "[ceil(N / 16), ceil(K / g), 16 g] (linear_pack of the weight)");
      p.packed = pk.data;
    }
    const bool int8 = p.dtype == DType::kInt8;
    if (int8 != !scales_obj.is_none())
      fail_value(kOp, "argument '" + name + "': int8 weights need their [N] float32 scales, "
                      "and only int8 weights have scales");
    if (int8) {
      TensorArg& s = keep(scales_obj, name + "_scales");
      check_dtype(kOp, s, {DType::kFloat32});
      check_shape(kOp, s, {p.N}, "[N]");
      p.scales = s.ptr<const float>();
    }
    return p;
  }

  void add_layer(py::dict l, py::tuple cache, int i) {
    const std::string at = "layers[" + std::to_string(i) + "].";
    auto get = [&](const char* name) -> py::handle {
      if (!l.contains(name)) fail_value(kOp, at + name + " is missing");
      return l[name];
    };
    auto packed = [&](const std::string& name) -> py::handle {  // optional: None if absent
      const std::string key = name + "_packed";
      return l.contains(key.c_str()) ? py::handle(l[key.c_str()]) : py::handle(py::none());
    };
    DecoderLayerWeights d{};
    TensorArg& qw = keep(get("q_norm_weight"), at + "q_norm_weight");
    TensorArg& kw = keep(get("k_norm_weight"), at + "k_norm_weight");
    check_rank(kOp, qw, 2, "[Hq, D]");
    check_rank(kOp, kw, 2, "[Hkv, D]");
    const int Hq = checked_int(kOp, qw, 0), D = checked_int(kOp, qw, 1);
    const int Hkv = checked_int(kOp, kw, 0);
    if (i == 0) {
      w_.Hq = Hq, w_.D = D, w_.Hkv = Hkv;
    } else if (Hq != w_.Hq || D != w_.D || Hkv != w_.Hkv) {
      fail_value(kOp, at + "heads differ from layer 0's");
    }
    if (D < 2 || D % 2 || Hkv < 1 || Hq % Hkv)
      fail_value(kOp, at + "head layout Hq = " + std::to_string(Hq) + ", Hkv = " +
                          std::to_string(Hkv) + ", D = " + std::to_string(D) + " is not one "
                          "the kernels take (even D, Hq a multiple of Hkv)");
    for (TensorArg* t : {&qw, &kw}) check_dtype(kOp, *t, {w_.dtype});
    check_shape(kOp, kw, {Hkv, D}, "[Hkv, D]");
    d.q_norm_weight = qw.data;
    d.k_norm_weight = kw.data;
    d.q_norm_bias = param(get("q_norm_bias"), at + "q_norm_bias", {Hq, D}, "[Hq, D]");
    d.k_norm_bias = param(get("k_norm_bias"), at + "k_norm_bias", {Hkv, D}, "[Hkv, D]");
    d.input_norm = param(get("input_layernorm"), at + "input_layernorm", {w_.H}, "[H]");
    d.post_norm = param(get("post_attention_layernorm"), at + "post_attention_layernorm",
                        {w_.H}, "[H]");
    d.qkv = projection(get("qkv_proj"), get("qkv_proj_scales"), packed("qkv_proj"),
                       at + "qkv_proj", int64_t(Hq + 2 * Hkv) * D, w_.H);
    d.o = projection(get("o_proj"), get("o_proj_scales"), packed("o_proj"), at + "o_proj", w_.H,
                     int64_t(Hq) * D);
    d.gate_up = projection(get("gate_up_proj"), get("gate_up_proj_scales"),
                           packed("gate_up_proj"), at + "gate_up_proj", -1, w_.H);
    if (d.gate_up.N % 2) fail_value(kOp, at + "gate_up_proj must have an even row count");
    if (i == 0) w_.I = d.gate_up.N / 2;
    else if (d.gate_up.N != 2 * w_.I) fail_value(kOp, at + "MLP width differs from layer 0's");
    d.down = projection(get("down_proj"), get("down_proj_scales"), packed("down_proj"),
                        at + "down_proj", w_.H, w_.I);
    if (cache.size() != 2) fail_value(kOp, "caches[" + std::to_string(i) + "] must be (k, v)");
    TensorArg& kc = keep(cache[0], "caches[" + std::to_string(i) + "][0]");
    TensorArg& vc = keep(cache[1], "caches[" + std::to_string(i) + "][1]");
    check_dtype(kOp, kc, {w_.dtype});
    check_rank(kOp, kc, 4, "[NB, BS, Hkv, D]");
    const int NB = checked_int(kOp, kc, 0), BS = checked_int(kOp, kc, 1);
    if (i == 0) w_.NB = NB, w_.BS = BS;
    check_shape(kOp, kc, {w_.NB, w_.BS, Hkv, D}, "[NB, BS, Hkv, D] (as layer 0's)");
    check_dtype(kOp, vc, {w_.dtype});
    check_shape(kOp, vc, {w_.NB, w_.BS, Hkv, D}, "[NB, BS, Hkv, D] (as layer 0's)");
    check_writable(kOp, kc);
    check_writable(kOp, vc);
    d.k_cache = kc.data;
    d.v_cache = vc.data;
    w_.layers.push_back(d);
  }

  static TensorArg step_arg(py::handle obj, const char* name, DType dtype) {
    TensorArg t = import_tensor(obj, name);
    check_cpu_contiguous(t);
    check_dtype(kOp, t, {dtype});
    check_rank(kOp, t, 1, "[n]");
    return t;
  }

  DecoderWeights w_{};
  std::vector<std::unique_ptr<TensorArg>> kept_;  // stable addresses: keep() returns refs
  std::unique_ptr<char, FreeDeleter> scratch_;
  size_t scratch_bytes_ = 0;
  std::vector<float> logits_;         // step_sample's logits [R, N_head]
  std::vector<uint32_t> mask_rows_;   // step_sample's allowed rows [G, ceil(N_head / 32)]
};

}  // namespace

void bind_decoder(py::module_& m) {
  py::class_<CpuDecoder>(m, "CpuDecoder",
                         "The whole forward step of a Chameleon decoder on the CPU (one call "
                         "a step; bit-identical to the per-op CPU path).")
      .def(py::init<py::dict, py::handle, py::handle, py::handle, py::list, py::list,
                    py::list>(),
           py::arg("config"), py::arg("embed"), py::arg("final_norm"), py::arg("inv_freq"),
           py::arg("layers"), py::arg("caches"), py::arg("heads"))
      .def("step", &CpuDecoder::step, py::arg("ids"), py::arg("positions"), py::arg("slots"),
           py::arg("block_tables"), py::arg("seq_lens"), py::arg("cu_seqlens_q"),
           py::arg("rows"), py::arg("max_q_len"), py::arg("max_seq_len"), py::arg("head"),
           py::arg("logits"))
      .def("step_sample", &CpuDecoder::step_sample, py::arg("i64"), py::arg("i32"),
           py::arg("f32"), py::arg("dims"), py::arg("head"), py::arg("allowed_bits"))
      .def_property_readonly("num_heads", &CpuDecoder::num_heads);
}

}  // namespace cm3rt::py_binding
#endif  // !CM3RT_EMU
