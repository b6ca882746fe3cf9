// sample_logits on the CPU (contract: sample_logits.h).
//
// A group is processed in a few passes over its row, all in a per-thread row buffer of V
// floats (256 KiB for V = 65536, which stays in L2): combine -> z, the top-k radix passes on
// z, the weight pass (z -> w = exp(z - max)), the top-p radix passes on w, the draw. Every
// decision uses the shared math of sampling_math.h, so the token equals the CUDA kernel's.
// OpenMP: groups in parallel when there are at least as many groups as threads, otherwise the
// passes of each group are split into vocabulary chunks whose partial results (integer
// histograms, maxima) are merged in chunk order.
#include <omp.h>

#include <algorithm>
#include <array>
#include <stdexcept>
#include <cmath>
#include <vector>

#include "sampling/philox.h"
#include "sampling/sample_logits.h"

namespace cm3rt {

namespace {

constexpr int kChunk = 4096;         // tokens per work item of a split row
constexpr int kMinSplitRow = 32768;  // shorter rows are not split (fork/join would cost more)

using Hist = std::array<uint64_t, kRadixBins>;

// Runs body(t0, t1, acc) over [0, V) into `out`: in one piece, or in chunks on the OpenMP team
// with per-chunk accumulators merged in chunk order (a fixed order: results never depend on
// the thread count). Dynamic scheduling: on a busy machine a descheduled thread's chunks are
// taken over by the others.
template <typename Acc, typename Body, typename Merge>
void reduce_row(int V, bool par, Acc& out, Body&& body, Merge&& merge) {
  if (!par) {
    body(0, V, out);
    return;
  }
  const int nchunks = (V + kChunk - 1) / kChunk;
  std::vector<Acc> parts(static_cast<size_t>(nchunks));  // value-initialised: identity
#pragma omp parallel for schedule(dynamic, 1)
  for (int ch = 0; ch < nchunks; ++ch)
    body(ch * kChunk, std::min(V, (ch + 1) * kChunk), parts[size_t(ch)]);
  for (const Acc& a : parts) merge(out, a);
}

void merge_hist(Hist& a, const Hist& b) {
  for (int i = 0; i < kRadixBins; ++i) a[i] += b[i];
}

// The input rows of one group and its per-token score (steps 1-3).
template <typename T>
struct GroupRows {
  const T* c;
  const T* i;  // cfg3 only
  const T* u;  // all modes but none
  const uint8_t* allowed;
  const uint32_t* bits;
  GroupConfig cfg;
  float cd_min;
  float inv_t;

  float score(int t, bool& bad) const {
    if (!token_allowed(allowed, bits, t)) return -INFINITY;
    const float cv = to_float(c[t]);
    const float iv = i ? to_float(i[t]) : 0.0f;
    const float uv = u ? to_float(u[t]) : 0.0f;
    return token_score(cfg.mode, cv, iv, uv, cfg.cfg_scale, cfg.cfg_image_scale, cd_min, inv_t,
                       bad);
  }
};

// Pass 1 over tokens [t0, t1): z into zb, the max key and the bad-input flag. MODE and MASK
// are compile-time so the loop body is straight-line selects and vectorises.
// MASK: 0 none, 1 bool bytes, 2 packed bits.
template <int MODE, int MASK, typename T>
void score_chunk(const GroupRows<T>& g, int t0, int t1, float* zb, uint32_t& max_key,
                 bool& bad) {
  const T* c = g.c;
  const T* i = g.i;
  const T* u = g.u;
  const uint8_t* al = g.allowed;
  const uint32_t* bits = g.bits;
  const float s_txt = g.cfg.cfg_scale, s_img = g.cfg.cfg_image_scale;
  const float cd_min = g.cd_min, inv_t = g.inv_t;
  uint32_t mk = max_key;
  int any_bad = 0;
#pragma omp simd reduction(max : mk) reduction(| : any_bad)
  for (int t = t0; t < t1; ++t) {
    bool ok = true;
    if (MASK == 1) ok = al[t] != 0;
    if (MASK == 2) ok = ((bits[t >> 5] >> (t & 31)) & 1u) != 0;
    const float cv = to_float(c[t]);
    const float iv = MODE == kModeCfg3 ? to_float(i[t]) : 0.0f;
    const float uv = MODE != kModeNone ? to_float(u[t]) : 0.0f;
    bool b = false;
    float z = token_score(MODE, cv, iv, uv, s_txt, s_img, cd_min, inv_t, b);
    z = ok ? z : -INFINITY;
    any_bad |= int(ok & b);  // bitwise: GCC 12 miscompiles `ok && b` here (mixed-width masks)
    zb[t] = z;
    const uint32_t key = float_key(z);
    mk = key > mk ? key : mk;
  }
  max_key = mk;
  bad = bad || any_bad != 0;
}

template <int MODE, typename T>
void score_chunk_mask(const GroupRows<T>& g, int t0, int t1, float* zb, uint32_t& max_key,
                      bool& bad) {
  if (g.allowed) score_chunk<MODE, 1>(g, t0, t1, zb, max_key, bad);
  else if (g.bits) score_chunk<MODE, 2>(g, t0, t1, zb, max_key, bad);
  else score_chunk<MODE, 0>(g, t0, t1, zb, max_key, bad);
}

template <typename T>
void score_range(const GroupRows<T>& g, int t0, int t1, float* zb, uint32_t& max_key,
                 bool& bad) {
  switch (g.cfg.mode) {
    case kModeCfg: score_chunk_mask<kModeCfg>(g, t0, t1, zb, max_key, bad); break;
    case kModeCfg3: score_chunk_mask<kModeCfg3>(g, t0, t1, zb, max_key, bad); break;
    case kModeCdk: score_chunk_mask<kModeCdk>(g, t0, t1, zb, max_key, bad); break;
    default: score_chunk_mask<kModeNone>(g, t0, t1, zb, max_key, bad); break;
  }
}

// cdk: the k-th largest cond logit among allowed tokens with a finite cond logit, or -inf when
// fewer than k such tokens exist (then every allowed token passes the plausibility filter).
template <typename T>
float cdk_kth_cond_logit(const GroupRows<T>& g, int V, bool par) {
  auto cand_key = [&](int t, uint32_t& key) {
    if (!token_allowed(g.allowed, g.bits, t)) return false;
    const float cv = to_float(g.c[t]);
    if (!(std::fabs(cv) < INFINITY)) return false;
    key = float_key(cv);
    return true;
  };
  RadixState s = radix_init();
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    Hist h{};
    reduce_row(V, par, h,
               [&](int t0, int t1, Hist& acc) {
                 for (int t = t0; t < t1; ++t) {
                   uint32_t key;
                   if (cand_key(t, key) && radix_matches(s, key)) ++acc[radix_bin(key, pass)];
                 }
               },
               merge_hist);
    if (pass == 0) {
      uint64_t total = 0;
      for (uint64_t x : h) total += x;
      if (total < uint64_t(g.cfg.cd_k)) return -INFINITY;
    }
    if (!radix_choose(s, h.data(), double(g.cfg.cd_k), pass)) return -INFINITY;
  }
  return key_float(s.prefix);
}

struct MaxStat {
  uint32_t best_key = 0;  // below key(-inf): "nothing seen"
  bool bad = false;
};

void merge_max(MaxStat& a, const MaxStat& b) {
  a.best_key = b.best_key > a.best_key ? b.best_key : a.best_key;
  a.bad = a.bad || b.bad;
}

// Radix search over the row buffer. `key(t, k)` gives a candidate's key (false: not a
// candidate), `weight(t)` its weight. The first pass's histogram may be given (fused into an
// earlier pass). The second pass scans the row once more and keeps the tokens of the chosen
// top bucket; the last passes run over that short list only.
template <typename Key, typename Weight>
RadixState radix_search(int V, bool par, double limit, const Hist* first, Key&& key_of,
                        Weight&& weight_of) {
  struct Item {
    uint32_t key;
    uint64_t w;
  };
  struct Part {
    Hist hist{};
    std::vector<Item> items;
  };
  RadixState s = radix_init();
  Hist h{};
  if (first) {
    h = *first;
  } else {
    reduce_row(V, par, h,
               [&](int t0, int t1, Hist& acc) {
                 for (int t = t0; t < t1; ++t) {
                   uint32_t key;
                   if (key_of(t, key)) acc[radix_bin(key, 0)] += weight_of(t);
                 }
               },
               merge_hist);
  }
  radix_choose(s, h.data(), limit, 0);  // a candidate always exists here (the max token)
  Part list;
  reduce_row(V, par, list,
             [&](int t0, int t1, Part& acc) {
               for (int t = t0; t < t1; ++t) {
                 uint32_t key;
                 if (key_of(t, key) && radix_matches(s, key)) {
                   const uint64_t w = weight_of(t);
                   acc.hist[radix_bin(key, 1)] += w;
                   acc.items.push_back(Item{key, w});
                 }
               }
             },
             [](Part& a, const Part& b) {
               merge_hist(a.hist, b.hist);
               a.items.insert(a.items.end(), b.items.begin(), b.items.end());
             });
  radix_choose(s, list.hist.data(), limit, 1);
  for (int pass = 2; pass < kRadixPasses; ++pass) {
    Hist hp{};
    for (const Item& it : list.items)
      if (radix_matches(s, it.key)) hp[radix_bin(it.key, pass)] += it.w;
    radix_choose(s, hp.data(), limit, pass);
  }
  return s;
}

template <typename T>
void sample_group(const SampleLogitsParams& p, int g, int64_t row0, bool par,
                  std::vector<float>& buf) {
  p.tokens[g] = -1;
  p.logprobs[g] = NAN;
  GroupRows<T> rows{};
  rows.cfg = group_config(p, g);
  const GroupConfig& cfg = rows.cfg;
  if (!group_config_valid(cfg) || row0 < 0 || row0 + cfg.streams > p.R) return;
  const int V = p.V;
  const T* base = static_cast<const T*>(p.logits) + row0 * p.row_stride;
  rows.c = base;
  rows.i = cfg.mode == kModeCfg3 ? base + p.row_stride : nullptr;
  rows.u = cfg.mode == kModeNone ? nullptr : base + (rows_used(cfg.mode) - 1) * p.row_stride;
  rows.allowed = p.allowed ? p.allowed + g * p.allowed_stride : nullptr;
  rows.bits = p.allowed_bits ? p.allowed_bits + g * p.allowed_bits_stride : nullptr;
  const bool greedy = cfg.temperature == 0.0f;
  rows.inv_t = greedy ? 1.0f : 1.0f / cfg.temperature;
  rows.cd_min = -INFINITY;
  if (cfg.mode == kModeCdk)
    rows.cd_min = cdk_min_logit(cdk_kth_cond_logit(rows, V, par), cfg.cd_alpha);

  // Pass 1: z into the buffer; the max and the bad-input flag.
  buf.resize(size_t(V));
  float* zb = buf.data();
  MaxStat mx;
  reduce_row(V, par, mx,
             [&](int t0, int t1, MaxStat& acc) {
               score_range(rows, t0, t1, zb, acc.best_key, acc.bad);
             },
             merge_max);
  if (mx.bad || mx.best_key <= kKeyNegInf) return;  // NaN / +inf input, or nothing allowed
  if (greedy) {  // the lowest id holding the max
    int t = 0;
    while (float_key(zb[t]) != mx.best_key) ++t;
    p.tokens[g] = t;
    p.logprobs[g] = 0.0f;
    return;
  }
  const float zmax = key_float(mx.best_key);

  // Top-k threshold on z (counts).
  uint32_t k_min_key = kKeyNegInf + 1;
  if (cfg.top_k > 0 && cfg.top_k < V) {
    k_min_key = radix_search(
        V, par, double(cfg.top_k), nullptr,
        [&](int t, uint32_t& key) {
          key = float_key(zb[t]);
          return key > kKeyNegInf;
        },
        [](int) { return uint64_t(1); }).prefix;
  }

  // Weight pass: z -> w = exp(z - max) (0 outside top-k); total mass; top-p's first histogram.
  const bool use_top_p = cfg.top_p < 1.0f;
  struct MassStat {
    uint64_t total = 0;
    Hist hist{};
  };
  MassStat ms;
  reduce_row(V, par, ms,
             [&](int t0, int t1, MassStat& acc) {
#pragma omp simd
               for (int t = t0; t < t1; ++t) {
                 // exp first, then a select: a call under the condition is control flow,
                 // and the loop would not vectorise (5x slower on a 512-code row).
                 const float z = zb[t];
                 const float w = exp_nonpos(z - zmax);
                 zb[t] = float_key(z) >= k_min_key ? w : 0.0f;
               }
               if (use_top_p) {  // the total is the sum of the histogram
                 for (int t = t0; t < t1; ++t) {
                   const float w = zb[t];
                   if (w >= kMinWeighted) acc.hist[radix_bin(float_bits(w), 0)] += weight_fixed(w);
                 }
               } else {
                 uint64_t total = 0;
#pragma omp simd reduction(+ : total)
                 for (int t = t0; t < t1; ++t) total += weight_fixed_halves(zb[t]);
                 acc.total += total;
               }
             },
             [](MassStat& a, const MassStat& b) {
               a.total += b.total;
               merge_hist(a.hist, b.hist);
             });
  if (use_top_p)
    for (uint64_t x : ms.hist) ms.total += x;

  // Top-p threshold on w (mass); w >= 0, so its bits order like its values.
  uint32_t p_min_bits = 1;  // every w > 0
  uint64_t kept_mass = ms.total;
  if (use_top_p) {
    const RadixState s = radix_search(
        V, par, double(cfg.top_p) * double(ms.total), &ms.hist,
        [&](int t, uint32_t& key) {
          key = float_bits(zb[t]);
          return key != 0;
        },
        [&](int t) { return weight_fixed(zb[t]); });
    p_min_bits = s.prefix;
    kept_mass = s.above + s.at;
  }

  // Draw: the first token (in id order) whose running kept mass exceeds u * kept_mass.
  const uint64_t target =
      mulhi64(philox_u64(cfg.seed, cfg.step, kSampleDrawLane), kept_mass);
  auto kept_weight = [&](int t) {
    return float_bits(zb[t]) >= p_min_bits ? weight_fixed_halves(zb[t]) : uint64_t(0);
  };
  auto chunk_mass = [&](int t0, int t1) {
    uint64_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int t = t0; t < t1; ++t) s += kept_weight(t);
    return s;
  };
  // Chunk masses (in parallel when splitting the row), then a scan of the one chunk that
  // holds the target.
  constexpr int kDrawChunk = 1024;
  const int nchunks = (V + kDrawChunk - 1) / kDrawChunk;
  uint64_t run = 0;
  int ch = 0;
  if (par) {
    std::vector<uint64_t> sums(static_cast<size_t>(nchunks));
#pragma omp parallel for schedule(dynamic, 1)
    for (int k = 0; k < nchunks; ++k)
      sums[size_t(k)] = chunk_mass(k * kDrawChunk, std::min(V, (k + 1) * kDrawChunk));
    while (ch < nchunks - 1 && run + sums[size_t(ch)] <= target) run += sums[size_t(ch++)];
  } else {
    for (; ch < nchunks - 1; ++ch) {
      const uint64_t m = chunk_mass(ch * kDrawChunk, std::min(V, (ch + 1) * kDrawChunk));
      if (run + m > target) break;
      run += m;
    }
  }
  // Inside the chunk: whole blocks by their (vectorised) mass, then the block's tokens.
  constexpr int kDrawBlock = 64;
  const int chunk_end = std::min(V, (ch + 1) * kDrawChunk);
  int t = ch * kDrawChunk;
  for (; t + kDrawBlock <= chunk_end; t += kDrawBlock) {
    const uint64_t m = chunk_mass(t, t + kDrawBlock);
    if (run + m > target) break;
    run += m;
  }
  int token = -1;
  for (; t < chunk_end; ++t) {
    run += kept_weight(t);
    if (run > target) { token = t; break; }
  }
  if (token < 0) return;  // unreachable: target < kept_mass
  bool bad = false;
  const float z = rows.score(token, bad);
  p.tokens[g] = token;
  p.logprobs[g] = (z - zmax) - std::log(float(kept_mass) * (1.0f / kWeightScale));
}

template <typename T>
void sample_all(const SampleLogitsParams& p) {
  std::vector<int64_t> row0(size_t(p.G));
  int64_t r = 0;
  for (int g = 0; g < p.G; ++g) {
    row0[size_t(g)] = r;
    r += p.streams.at(g);
  }
  const int threads = omp_get_max_threads();
  if (p.G >= threads || p.V < kMinSplitRow) {
#pragma omp parallel if (p.G > 1)
    {
      std::vector<float> buf;
#pragma omp for schedule(dynamic, 1)
      for (int g = 0; g < p.G; ++g) sample_group<T>(p, g, row0[size_t(g)], false, buf);
    }
  } else {
    std::vector<float> buf;
    for (int g = 0; g < p.G; ++g) sample_group<T>(p, g, row0[size_t(g)], true, buf);
  }
}

}  // namespace

void sample_logits_cpu(const SampleLogitsParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: sample_all<float>(p); break;
    case DType::kFloat16: sample_all<half_t>(p); break;
    case DType::kBFloat16: sample_all<bf16_t>(p); break;
    default: throw std::invalid_argument("sample_logits: logits must be float32/float16/bfloat16");
  }
}

}  // namespace cm3rt
