// Runs the CUDA paged attention sources under the emulator against a float64 reference.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/paged_attention.h"
#include "attention/paged_attention_plan.h"
#include "common/dtype.h"
#include "emu.h"

namespace cm3rt {
int cuda_sm_count(int) { return emu::S().sm_count; }
void check_cuda_launch(const char*) {}
}  // namespace cm3rt

using namespace cm3rt;

struct Case {
  std::string name;
  std::vector<int> seq_lens, q_lens;
  int H, Hkv, D, BS;
  DType dtype = DType::kFloat32;
  bool causal = true;
  unsigned seed = 0;
  bool lse = true;
  int max_q_len = -1;       // as passed to the binding (-1: T)
  bool strided = false;     // q from a fused QKV buffer, out with head stride 2D
  int bad_seq = -1, bad_block = -1, bad_value = 0;  // corrupt one block id
  bool garbage_lens = false;  // corrupt cu_seqlens / seq_lens (only "no crash, no OOB")
  long ws_shrink = 0;       // pass a workspace this many bytes too small (expect an error)
  int sm_count = 132;
};

static int esize(DType t) { return dtype_size(t); }

static double tol_of(DType t) {
  return t == DType::kFloat32 ? 2e-5 : t == DType::kBFloat16 ? 2e-2 : 3e-3;
}

static void put(std::vector<unsigned char>& buf, size_t idx, DType t, float v) {
  if (t == DType::kFloat32) std::memcpy(&buf[idx * 4], &v, 4);
  else if (t == DType::kFloat16) { half_t h = from_float<half_t>(v); std::memcpy(&buf[idx * 2], &h, 2); }
  else { bf16_t h = from_float<bf16_t>(v); std::memcpy(&buf[idx * 2], &h, 2); }
}
static double get(const std::vector<unsigned char>& buf, size_t idx, DType t) {
  if (t == DType::kFloat32) { float f; std::memcpy(&f, &buf[idx * 4], 4); return f; }
  if (t == DType::kFloat16) { half_t h; std::memcpy(&h, &buf[idx * 2], 2); return to_float(h); }
  bf16_t h; std::memcpy(&h, &buf[idx * 2], 2); return to_float(h);
}

// Aligned byte buffer with NaN-poisoned guard bands on both sides.
struct Guarded {
  static constexpr size_t kGuard = 256;
  std::vector<unsigned char> raw;
  unsigned char* data;
  size_t bytes;
  explicit Guarded(size_t n) : raw(n + 2 * kGuard + 64, 0xff), bytes(n) {
    data = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw.data()) + kGuard + 63) & ~uintptr_t(63));
  }
  bool guards_intact() const {
    for (const unsigned char* p = raw.data(); p < data; ++p) if (*p != 0xff) return false;
    for (const unsigned char* p = data + bytes; p < raw.data() + raw.size(); ++p) if (*p != 0xff) return false;
    return true;
  }
};

static int failures = 0;
#define EXPECT(cond, ...) do { if (!(cond)) { ++failures; std::printf("  FAIL: " __VA_ARGS__); std::printf("\n"); } } while (0)

static void run(const Case& c) {
  auto t_start = std::chrono::steady_clock::now();
  emu::S().sm_count = c.sm_count;
  std::mt19937 rng(c.seed);
  std::normal_distribution<float> nd;
  const int B = int(c.seq_lens.size());
  const int H = c.H, Hkv = c.Hkv, D = c.D, BS = c.BS;
  const DType dt = c.dtype;
  std::vector<int> nblk(B);
  int MB = 1, NB = 3;
  for (int b = 0; b < B; ++b) { nblk[b] = (c.seq_lens[b] + BS - 1) / BS; MB = std::max(MB, nblk[b] + 1); NB += nblk[b]; }
  std::vector<int> perm(NB);
  for (int i = 0; i < NB; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  const size_t cache_elems = size_t(NB) * BS * Hkv * D;
  std::vector<unsigned char> kc(cache_elems * esize(dt)), vc(cache_elems * esize(dt));
  for (size_t i = 0; i < cache_elems; ++i) { put(kc, i, dt, nd(rng)); put(vc, i, dt, nd(rng)); }
  std::vector<int32_t> table(size_t(B) * MB, NB + 1000);
  int next = 0;
  for (int b = 0; b < B; ++b) for (int j = 0; j < nblk[b]; ++j) table[size_t(b) * MB + j] = perm[next++];
  std::vector<int32_t> ref_table = table;
  if (c.bad_seq >= 0) table[size_t(c.bad_seq) * MB + c.bad_block] = c.bad_value;
  int T = 0;
  std::vector<int32_t> cu(B + 1, 0);
  for (int b = 0; b < B; ++b) { cu[b + 1] = cu[b] + c.q_lens[b]; }
  T = cu[B];
  std::vector<int32_t> sl(c.seq_lens.begin(), c.seq_lens.end());
  if (c.garbage_lens) {
    for (int b = 0; b < B; ++b) { sl[b] = (b % 2) ? -5 : 1 << 30; }
    cu[1] = -7; if (B > 1) cu[B - 1] = 1 << 30;
  }
  const int64_t q_st = c.strided ? int64_t(H + 2 * Hkv) * D : int64_t(H) * D, q_sh = D;
  const int64_t o_st = c.strided ? int64_t(H) * 2 * D : int64_t(H) * D, o_sh = c.strided ? 2 * D : D;
  std::vector<unsigned char> qbuf(size_t(std::max(T, 1)) * q_st * esize(dt));
  for (size_t i = 0; i < qbuf.size() / esize(dt); ++i) put(qbuf, i, dt, nd(rng));
  const size_t out_elems = size_t(std::max(T, 1)) * o_st;
  Guarded out(out_elems * esize(dt));
  Guarded lse(size_t(std::max(T, 1)) * H * 4);

  const int mq = c.max_q_len > 0 ? std::min(c.max_q_len, T) : T;
  const int max_seq_len = MB * BS;
  const size_t ws_bytes = paged_attention_workspace_bytes(T, B, H, D, c.max_q_len > 0 ? c.max_q_len : T, max_seq_len, c.sm_count);
  Guarded ws(std::max<size_t>(ws_bytes, 16));

  emu::clear_globals();
  emu::register_global(qbuf.data(), qbuf.size(), "q");
  emu::register_global(kc.data(), kc.size(), "k_cache");
  emu::register_global(vc.data(), vc.size(), "v_cache");

  PagedAttentionParams p{};
  p.q = qbuf.data(); p.q_stride_t = q_st; p.q_stride_h = q_sh;
  p.k_cache = kc.data(); p.v_cache = vc.data();
  p.block_tables = table.data(); p.block_table_stride = MB;
  p.seq_lens = sl.data(); p.cu_seqlens_q = cu.data();
  p.out = out.data; p.out_stride_t = o_st; p.out_stride_h = o_sh;
  p.lse = c.lse ? reinterpret_cast<float*>(lse.data) : nullptr;
  p.T = T; p.B = B; p.H = H; p.Hkv = Hkv; p.D = D; p.NB = NB; p.BS = BS; p.MB = MB;
  p.scale = 1.0f / std::sqrt(float(D)); p.causal = c.causal; p.dtype = dt;
  p.max_q_len = mq; p.max_seq_len = max_seq_len;
  p.workspace = ws_bytes ? ws.data : nullptr;
  p.workspace_bytes = ws_bytes > size_t(c.ws_shrink) ? ws_bytes - c.ws_shrink : 0;
  if (c.ws_shrink && p.workspace_bytes == 0) p.workspace = nullptr;
  const auto plan = attn_plan::plan_decode(B, H, Hkv, D, max_seq_len, c.sm_count);
  const bool decode = mq == 1;
  std::printf("%-44s T=%d B=%d %s%s splits=%d ws=%zu ... ", c.name.c_str(), T, B,
              decode ? "decode" : "prefill", dt == DType::kFloat32 ? "/f32" : dt == DType::kFloat16 ? "/f16" : "/bf16",
              decode ? plan.splits : 0, ws_bytes);
  std::fflush(stdout);
  try {
    paged_attention_cuda(p, nullptr);
    EXPECT(!c.ws_shrink, "expected a workspace error");
  } catch (const std::invalid_argument& e) {
    EXPECT(c.ws_shrink && std::string(e.what()).find("'workspace'") != std::string::npos, "unexpected invalid_argument: %s", e.what());
    std::printf("threw as expected: %.90s\n", e.what());
    return;
  }
  EXPECT(out.guards_intact(), "out guard bands written");
  EXPECT(lse.guards_intact(), "lse guard bands written");
  EXPECT(ws.guards_intact(), "workspace guard bands written");
  if (c.garbage_lens) { std::printf("(no crash, guards intact)\n"); return; }

  const double tol = tol_of(dt);
  const double scale = 1.0 / std::sqrt(double(D));
  double max_err = 0, max_lse_err = 0;
  int bad_rows = 0, nan_rows = 0;
  const int group = H / Hkv;
  for (int b = 0; b < B; ++b) {
    const int ql = c.q_lens[b], s = c.seq_lens[b];
    for (int i = 0; i < ql; ++i) {
      const int t = cu[b] + i;
      const int kmax = c.causal ? std::max(0, std::min(s, s - ql + i + 1)) : s;
      const bool affected = c.bad_seq == b && kmax > c.bad_block * BS;
      for (int h = 0; h < H; ++h) {
        const int g = h / group;
        std::vector<double> sc(kmax);
        double m = -INFINITY;
        for (int j = 0; j < kmax; ++j) {
          const size_t row = ((size_t(ref_table[size_t(b) * MB + j / BS]) * BS + j % BS) * Hkv + g) * D;
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += get(qbuf, size_t(t) * q_st + h * q_sh + d, dt) * get(kc, row + d, dt);
          sc[j] = dot * scale;
          m = std::max(m, sc[j]);
        }
        double l = 0;
        std::vector<double> o(D, 0.0);
        for (int j = 0; j < kmax; ++j) {
          const double w = std::exp(sc[j] - m);
          l += w;
          const size_t row = ((size_t(ref_table[size_t(b) * MB + j / BS]) * BS + j % BS) * Hkv + g) * D;
          for (int d = 0; d < D; ++d) o[d] += w * get(vc, row + d, dt);
        }
        const double ref_lse = kmax ? m + std::log(l) : -INFINITY;
        bool row_nan = false;
        for (int d = 0; d < D; ++d) {
          const double ref = kmax ? o[d] / l : 0.0;
          std::vector<unsigned char> tmp(out.data, out.data + out.bytes);
          const double got = get(tmp, size_t(t) * o_st + h * o_sh + d, dt);
          if (affected) { row_nan |= !std::isnan(got); continue; }
          const double err = std::fabs(got - ref);
          if (!(err <= tol + tol * std::fabs(ref))) {
            if (bad_rows < 5) std::printf("\n    t=%d h=%d d=%d got %g ref %g", t, h, d, got, ref);
            ++bad_rows;
          }
          if (std::isfinite(err)) max_err = std::max(max_err, err); else max_err = INFINITY;
        }
        if (affected) { if (row_nan) ++nan_rows; }
        if (c.lse) {
          const float got = reinterpret_cast<float*>(lse.data)[size_t(t) * H + h];
          if (affected) { if (!std::isnan(got)) ++nan_rows; }
          else if (std::isinf(ref_lse)) { if (!(std::isinf(got) && got < 0)) { ++bad_rows; std::printf("\n    lse t=%d h=%d got %g ref -inf", t, h, got); } }
          else {
            const double err = std::fabs(got - ref_lse);
            max_lse_err = std::max(max_lse_err, std::isfinite(err) ? err : INFINITY);
            if (!(err <= 1e-4 + 1e-4 * std::fabs(ref_lse))) { ++bad_rows; if (bad_rows < 8) std::printf("\n    lse t=%d h=%d got %g ref %g", t, h, got, ref_lse); }
          }
        }
      }
    }
  }
  // Strided out: the gaps between heads must stay untouched (NaN poison).
  if (c.strided)
    for (int t = 0; t < T; ++t) for (int h = 0; h < H; ++h) for (int d = D; d < 2 * D; ++d) {
      std::vector<unsigned char> tmp(out.data, out.data + out.bytes);
      if (!std::isnan(get(tmp, size_t(t) * o_st + h * o_sh + d, dt))) { ++bad_rows; break; }
    }
  EXPECT(bad_rows == 0, "%d mismatching values (max err %g)", bad_rows, max_err);
  EXPECT(nan_rows == 0, "%d affected rows not NaN", nan_rows);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::printf("max err %.2e lse %.2e  [%.1fs, %ld warp ops]\n", max_err, max_lse_err, secs, emu::S().warp_ops);
}

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };
  const DType all[3] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  // test_decode_single
  for (int D : {64, 128}) for (int BS : {16, 32}) for (int s : {1, 7, 97, 1025}) for (DType dt : all)
    add({"decode_single D" + std::to_string(D) + " BS" + std::to_string(BS) + " s" + std::to_string(s), {s}, {1}, 8, 2, D, BS, dt, true, unsigned(s + D)});
  // test_gqa_ratios_mixed_batch
  for (auto hk : std::vector<std::pair<int,int>>{{4, 4}, {8, 2}, {8, 1}, {12, 3}}) for (DType dt : all)
    add({"mixed H" + std::to_string(hk.first) + "/" + std::to_string(hk.second), {97, 300, 7, 1025, 1, 64}, {97, 45, 1, 1, 1, 17}, hk.first, hk.second, 64, 16, dt, true, unsigned(hk.first * 7 + hk.second)});
  // test_head_dims_prefill
  for (int D : {32, 64, 80, 96, 128, 256}) for (DType dt : all)
    add({"head_dim " + std::to_string(D), {33, 130}, {33, 70}, 4, 2, D, 16, dt, true, unsigned(D)});
  // test_long_prefill_split
  for (bool causal : {true, false})
    add({std::string("long_prefill ") + (causal ? "causal" : "full"), {1025}, {513}, 2, 1, 128, 32, DType::kFloat32, causal, 3});
  for (bool causal : {true, false}) for (DType dt : {DType::kBFloat16, DType::kFloat16})
    add({std::string("long_prefill16 ") + (causal ? "causal" : "full"), {1025}, {200}, 2, 1, 128, 32, dt, causal, 3});
  // test_zero_length_query_sequence
  for (DType dt : all) add({"zero_len_q", {10, 20, 5}, {3, 0, 5}, 4, 2, 64, 16, dt, true, 11});
  // noncontiguous q / out
  for (DType dt : all) { Case c{"strided", {40, 9}, {40, 1}, 4, 2, 64, 16, dt, true, 5}; c.strided = true; add(c); }
  { Case c{"strided decode", {40, 9}, {1, 1}, 4, 2, 64, 16, DType::kBFloat16, true, 5}; c.strided = true; c.max_q_len = 1; add(c); }
  // decode: batches, all head dims, GQA groups > kMaxHeads, splits with q_len 0 rows, non-causal
  for (int D : {32, 80, 96, 256}) for (DType dt : all)
    add({"decode D" + std::to_string(D), {700, 3, 300}, {1, 1, 1}, 6, 2, D, 16, dt, true, unsigned(D)});
  for (DType dt : all) { Case c{"decode group12 q0", {1500, 600, 2}, {1, 0, 1}, 12, 1, 64, 16, dt, true, 7}; c.max_q_len = 1; add(c); }
  { Case c{"decode noncausal nolse", {900, 40}, {1, 1}, 8, 8, 128, 32, DType::kFloat16, false, 8}; c.lse = false; add(c); }
  { Case c{"decode one split", {900, 40}, {1, 1}, 8, 8, 128, 32, DType::kBFloat16, true, 8}; c.sm_count = 1; add(c); }
  // prefill: q_len beyond keys? (q_len <= seq_len by contract) ; q tiles past 64; causal q_len < seq
  for (DType dt : all) add({"chunked prefill", {300, 129, 64}, {130, 65, 64}, 4, 1, 64, 16, dt, true, 21});
  for (DType dt : all) add({"prefill noncausal", {77, 200}, {77, 66}, 2, 2, 96, 16, dt, false, 22});
  // bad block ids -> NaN rows, no out-of-bounds
  for (DType dt : all) { Case c{"bad block prefill", {100, 50}, {100, 10}, 4, 2, 64, 16, dt, true, 31}; c.bad_seq = 0; c.bad_block = 3; c.bad_value = 1 << 20; add(c); }
  for (DType dt : all) { Case c{"bad block decode", {1000, 50}, {1, 1}, 4, 2, 64, 16, dt, true, 32}; c.bad_seq = 0; c.bad_block = 40; c.bad_value = -3; add(c); }
  { Case c{"bad block decode 1 split", {300, 50}, {1, 1}, 4, 2, 64, 16, DType::kFloat32, true, 33}; c.bad_seq = 1; c.bad_block = 0; c.bad_value = -1; c.sm_count = 1; add(c); }
  // garbage lengths: clamped, never out of bounds
  for (DType dt : all) { Case c{"garbage lens prefill", {100, 50, 30}, {20, 10, 5}, 4, 2, 64, 16, dt, true, 41}; c.garbage_lens = true; add(c); }
  { Case c{"garbage lens decode", {600, 50, 30}, {1, 1, 1}, 4, 2, 64, 16, DType::kBFloat16, true, 42}; c.garbage_lens = true; add(c); }
  // the CUDA-only python tests' decode batch
  for (int D : {80, 256}) for (DType dt : all) { Case c{"pytest decode batch D" + std::to_string(D), {1500, 600, 2, 900}, {1, 0, 1, 1}, 12, 1, D, 16, dt, true, unsigned(D)}; c.max_q_len = 1; add(c); }
  { Case c{"pytest graph", {1200, 333}, {1, 1}, 8, 2, 128, 16, DType::kBFloat16, true, 4}; c.max_q_len = 1; add(c); }
  // workspace too small -> invalid_argument naming 'workspace'
  { Case c{"workspace too small", {2000}, {1}, 8, 2, 64, 16, DType::kFloat16, true, 51}; c.ws_shrink = 4; add(c); }

  // Cases whose rows are all decode rows also run with the host bound max_q_len = 1 (the
  // split-KV path); without it (T > 1) they exercise the prefill kernels.
  std::vector<Case> extra;
  for (const Case& c : cases) {
    bool dec = true;
    for (int q : c.q_lens) dec = dec && q <= 1;
    int T = 0;
    for (int q : c.q_lens) T += q;
    if (dec && c.max_q_len < 0 && T > 1) { Case d = c; d.max_q_len = 1; d.name += " [mq1]"; extra.push_back(d); }
  }
  cases.insert(cases.end(), extra.begin(), extra.end());
  std::vector<Case> chosen;
  for (const Case& c : cases) if (only.empty() || c.name.find(only) != std::string::npos) chosen.push_back(c);
  cases = chosen;
  for (const Case& c : cases) run(c);
  std::printf("%zu cases, %d failures\n", cases.size(), failures);
  return failures ? 1 : 0;
}
