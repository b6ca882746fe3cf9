// AVX-512 decode kernel of the CPU paged attention (see decode_cpu_avx512.h), compiled when
// the build CPU has AVX-512 F/BW/VL (-march=native), as prefill_cpu_avx512.cpp is; without
// it decode_avx512_available() is false and paged_attention_cpu.cpp keeps its portable
// 8-lane path for decode items.
//
// A decode item is a few query rows per kv head (q_len <= 4 tokens x `group` query heads)
// against a long key range, so the work per key is small and the kernel must keep up with
// the memory stream: each key and value row is read from the cache once, in its own dtype,
// for every query row of its kv head. Keys go in blocks of kKeyBlock = 64 (gathered across
// page blocks), all kv heads of the item per block:
//   * Scores, in memory order (runs of 16 keys, all kv heads: a page block's rows lie
//     together): the 16 lanes run along the head dim. A register block of RB query rows x
//     KB keys (RB KB <= 16 accumulators) sums over the whole head dim, and one 16-way lane
//     reduction (sum_lanes_of_16) turns the 16 accumulators into 16 scores. Lanes on keys
//     (as the prefill kernel puts lanes on query rows) would need each key block
//     transposed, which costs more than the reduction for a handful of rows.
//   * Softmax, per row over the 64 keys: four score vectors, the causal limit a lane mask;
//     the row's scalar work (max, rescale, sum) is shared by 64 keys.
//   * P V, per kv head: lanes again along the head dim; RB rows x DC vectors of the fp32
//     output rows stay in registers over the 64 keys, each value vector loaded once for the
//     RB rows, the rescale of the old output applied once per block.
// bf16 caches, where the CPU has AVX512_BF16, multiply bf16 pairs with VDPBF16PS instead of
// widening to fp32 (half the multiply instructions and no widening; widen + FMA left the
// portable path compute bound on Zen 4, whose zmm FMA rate is half of Sapphire Rapids'):
//   * scores: the query row (bf16 in q already, so not rounded again) and the key row are
//     read as they lie, as pairs along the head dim: exact products, fp32 sums;
//   * P V: the weights are rounded to bf16 and paired along the keys (w[j], w[j + 1]), and
//     two value rows are interleaved into pairs (v[j][d], v[j + 1][d]) with one word
//     permute per 16 pairs, as in the prefill kernel (the same rounding of the weights,
//     relative error <= 2^-9, as torch's bf16 attention does).
// fp32 and fp16 caches use fp32 FMA (fp16 widened as loaded).
// Prefetch (into L2): a block's value rows while its scores are computed, the next block's
// key rows during P V. With the hardware prefetchers alone the bf16 bench (8 x 4096 keys,
// Zen 4, 1 thread) ran 6.9 GB/s against 9.8; prefetching both K and V of the next block
// during the scores, or in plain memory order, measured the same or slower.
#include "attention/decode_cpu_avx512.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* values.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "attention/online_softmax.h"
#include "common/dispatch.h"
#include "cpu/scratch.h"
#include "cpu/vec.h"
#include "cpu/vec512.h"

namespace cm3rt {

namespace {

constexpr int kLanes = 16;
constexpr int kKeyBlock = 64;  // keys per online-softmax step
constexpr int kScoreVectors = kKeyBlock / 16;  // score vectors per row and key block
constexpr int kMaxHeadDim = 256;

// Whether bf16 caches multiply bf16 pairs (VDPBF16PS) instead of widening to fp32.
template <typename T>
constexpr bool kBf16Pairs =
#if defined(__AVX512BF16__)
    std::is_same_v<T, bf16_t>;
#else
    false;
#endif

// The element type of the query rows the score product reads: bf16 for the pair kernels,
// fp32 otherwise (fp16 queries are widened once per item).
template <typename T>
using ScoreElem = std::conditional_t<kBf16Pairs<T>, bf16_t, float>;


// Lane i of the result = the sum of the 16 lanes of v[i]. Four levels of (two shuffles, one
// add), each halving the vectors and doubling the sums a vector carries: 45 instructions
// instead of 16 separate horizontal sums. The levels leave the sum of input k in lane
// 4 (k % 4) + k / 4, so the inputs are taken in that (self-inverse) order.
inline __m512 sum_lanes_of_16(const __m512 (&v)[16]) {
  auto in = [&](int k) { return v[(k % 4) * 4 + k / 4]; };
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: x[i] = 8 partials of in(2i), 8 of in(2i + 1)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(in(2 * i), in(2 * i + 1), 0x44),
                         _mm512_shuffle_f32x4(in(2 * i), in(2 * i + 1), 0xee));
  for (int i = 0; i < 4; ++i)  // 128-bit lane L of y[i]: 4 partials of in(4i + L)
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; ++i)  // lane L of z[i]: 2 partials of in(8i + L), 2 of in(8i + 4 + L)
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(y[2 * i], y[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(y[2 * i], y[2 * i + 1], 0xee));
  // lane 4L + c: in(4c + L)
  return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xdd));
}

// Rows to prefetch into L2 (prefetcht1), handed out a few at a time from inside the compute
// loops: a burst of them would fill the core's miss buffers and stall the arithmetic until
// they drain, where spread out the loads overlap the compute. Into L1 (prefetcht0) the
// rows would evict the ones being computed (measured: slower than no prefetch at all).
template <typename T, int D>
struct PrefetchRows {
  const T* const* rows = nullptr;
  int n = 0;
  int next = 0;
  void issue(int count) {
    for (const int end = std::min(n, next + count); next < end; ++next)
      for (int b = 0; b < D * int(sizeof(T)); b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(rows[next]) + b, _MM_HINT_T1);
  }
  void issue_rest() { issue(n - next); }
};

// Keys per register block of the scores for RB query rows: RB KB <= 16 accumulators.
template <int RB>
constexpr int kScoreKeys = RB == 1 ? 16 : RB == 2 ? 8 : 4;

// s[r][j] = q[r] . k[j] (raw, unscaled) for r < RB, j < n (rounded up to a whole register
// block: k holds kKeyBlock pointers, the ones past n repeating a real key). s rows are
// kKeyBlock apart. Issues KB rows of `prefetch` per register block.
template <typename T, int D, int RB>
inline void score_rows(const ScoreElem<T>* const* q, const T* const* k, int n, float* s,
                       PrefetchRows<T, D>& prefetch) {
  constexpr int KB = kScoreKeys<RB>;
  for (int j0 = 0; j0 < n; j0 += KB) {
    prefetch.issue(KB);
    __m512 acc[RB][KB];
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < KB; ++j) acc[r][j] = _mm512_setzero_ps();
    if constexpr (kBf16Pairs<T>) {
#if defined(__AVX512BF16__)
      // 16 bf16 pairs a vector; D % 32 == 16 (80) ends on a half vector, zero-filled.
      auto step = [&](int d, __mmask32 m) {
        __m512i qv[RB];
        for (int r = 0; r < RB; ++r) qv[r] = _mm512_maskz_loadu_epi16(m, q[r] + d);
        for (int j = 0; j < KB; ++j) {
          const __m512i kv = _mm512_maskz_loadu_epi16(m, k[j0 + j] + d);
          for (int r = 0; r < RB; ++r)
            acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)qv[r], (__m512bh)kv);
        }
      };
      int d = 0;
      for (; d + 32 <= D; d += 32) step(d, ~__mmask32(0));
      if constexpr (D % 32 != 0) step(d, __mmask32(0xffff));
#endif
    } else {
      for (int d = 0; d < D; d += kLanes) {
        __m512 qv[RB];
        for (int r = 0; r < RB; ++r) qv[r] = _mm512_loadu_ps(q[r] + d);
        for (int j = 0; j < KB; ++j) {
          const __m512 kv = cpu::load16(k[j0 + j] + d);
          for (int r = 0; r < RB; ++r) acc[r][j] = _mm512_fmadd_ps(qv[r], kv, acc[r][j]);
        }
      }
    }
    __m512 flat[kLanes];  // accumulator r KB + j; the unused ones zero
    for (int i = 0; i < kLanes; ++i)
      flat[i] = i < RB * KB ? acc[i / KB][i % KB] : _mm512_setzero_ps();
    const __m512 sums = sum_lanes_of_16(flat);  // lane r KB + j: row r, key j0 + j
    // Row r's KB lanes go to s[r][j0 ...]: a masked store, shifted so that lane r KB lands
    // on key j0 (the other lanes are not written).
    for (int r = 0; r < RB; ++r)
      _mm512_mask_storeu_ps(s + r * (kKeyBlock - KB) + j0,
                            __mmask16(((1u << KB) - 1) << (r * KB)), sums);
  }
}

// Folds the raw scores s[0 .. n) of keys j0 .. j0 + n into a row's state, masking the keys
// at or past the row's causal limit, and writes the weights exp(scale s - m) (0 where
// masked) to w: n fp32, or n / 2 bf16 pairs (w[2i], w[2i + 1]) for the pair kernels (an
// odd last key paired with 0). Returns alpha, the rescale of the row's old accumulator.
// The per-row scalar work (two reductions, one exp) is shared by kKeyBlock keys.
template <bool kPairs>
inline float softmax_row(const float* s, int n, int j0, int limit, float scale,
                         SoftmaxState& st, void* w) {
  const int valid = std::clamp(std::min(n, limit - j0), 0, kKeyBlock);
  const int vectors = (n + kLanes - 1) / kLanes;
  __mmask16 keep[kScoreVectors];
  __m512 raw[kScoreVectors];
  __m512 block_max = _mm512_set1_ps(-INFINITY);
  for (int i = 0; i < vectors; ++i) {
    keep[i] = cpu::first_lanes(std::clamp(valid - i * kLanes, 0, kLanes));
    raw[i] = _mm512_loadu_ps(s + i * kLanes);
    block_max = _mm512_mask_max_ps(block_max, keep[i], block_max, raw[i]);
  }
  // The scale is positive: the max of the raw scores gives the max of the scaled ones
  // (-inf when no key of the block is valid).
  const float alpha = softmax_update_max(st, _mm512_reduce_max_ps(block_max) * scale);
  const __m512 vscale = _mm512_set1_ps(scale), m = _mm512_set1_ps(st.m);
  __m512 sum = _mm512_setzero_ps();
  for (int i = 0; i < vectors; ++i) {
    // A row with no valid key has every lane masked, so the NaN of scale s - (-inf) never
    // reaches a weight.
    const __m512 weights =
        _mm512_maskz_mov_ps(keep[i], cpu::exp16_nonpositive(_mm512_fmsub_ps(raw[i], vscale, m)));
    sum = _mm512_add_ps(sum, weights);
    if constexpr (kPairs) {
#if defined(__AVX512BF16__)
      _mm256_storeu_si256(static_cast<__m256i*>(w) + i, (__m256i)_mm512_cvtneps_pbh(weights));
#endif
    } else {
      _mm512_storeu_ps(static_cast<float*>(w) + i * kLanes, weights);
    }
  }
  st.l += _mm512_reduce_add_ps(sum);
  return alpha;
}

// Output vectors (16 head-dim elements each) per register block of P V for RB rows.
template <int RB, int D>
constexpr int kValueVectors = std::min(D / kLanes, RB == 1 ? 8 : RB == 2 ? 8 : RB == 3 ? 5 : 4);

// acc[r][d] = alpha[r] acc[r][d] + sum_{j < n} w[r][j] v[j][d] for r < RB and the DC
// vectors of head-dim elements from d0 (acc rows D apart, w rows kKeyBlock apart).
template <typename T, int D, int RB, int DC>
inline void accumulate_dims_fp32(float* acc, const float* alpha, const float* w,
                                 const T* const* v, int n, int d0, PrefetchRows<T, D>& prefetch) {
  __m512 o[RB][DC];
  for (int r = 0; r < RB; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < DC; ++c)
      o[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + d0 + c * kLanes), a);
  }
  for (int j = 0; j < n; ++j) {
    prefetch.issue(1);
    __m512 wb[RB];
    for (int r = 0; r < RB; ++r) wb[r] = _mm512_set1_ps(w[r * kKeyBlock + j]);
    for (int c = 0; c < DC; ++c) {
      const __m512 vv = cpu::load16(v[j] + d0 + c * kLanes);
      for (int r = 0; r < RB; ++r) o[r][c] = _mm512_fmadd_ps(wb[r], vv, o[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < DC; ++c) _mm512_storeu_ps(acc + r * D + d0 + c * kLanes, o[r][c]);
}

#if defined(__AVX512BF16__)
// A bf16 row of zeros: the partner of an odd last value row (its weight is 0, but the row
// past the block may not be a real one, and 0 x inf would be NaN).
alignas(64) const uint16_t kZeroRow[kMaxHeadDim] = {};

// The same for bf16 pairs: w holds the weight pairs of a row (rows kKeyBlock words apart), and
// each pair of value rows (j, j + 1) is interleaved into (v[j][d], v[j + 1][d]) pairs, one
// two-source word permute per 16 pairs, shared by the RB rows.
template <int D, int RB, int DC>
inline void accumulate_dims_pairs(float* acc, const float* alpha, const uint32_t* w,
                                  const bf16_t* const* v, int n, int d0,
                                  PrefetchRows<bf16_t, D>& prefetch) {
  // Words of a permute's result: 2i from the first row (index i), 2i + 1 from the second
  // (index 32 + i); the upper 16 pairs take i + 16.
  alignas(64) static const uint16_t kLow[32] = {
      0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_load_si512(kLow);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  const bf16_t* zero_row = reinterpret_cast<const bf16_t*>(kZeroRow);
  __m512 o[RB][DC];
  for (int r = 0; r < RB; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < DC; ++c)
      o[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + d0 + c * kLanes), a);
  }
  for (int j = 0; j < n; j += 2) {
    prefetch.issue(2);
    __m512i wb[RB];
    for (int r = 0; r < RB; ++r)
      wb[r] = _mm512_set1_epi32(int32_t(w[r * kKeyBlock + j / 2]));
    const bf16_t* v0 = v[j] + d0;
    const bf16_t* v1 = (j + 1 < n ? v[j + 1] : zero_row) + d0;
    for (int c = 0; c < DC; c += 2) {
      if (c + 1 < DC) {  // 32 elements of each row: two vectors of pairs
        const __m512i a = _mm512_loadu_si512(v0 + c * kLanes);
        const __m512i b = _mm512_loadu_si512(v1 + c * kLanes);
        const __m512i lo = _mm512_permutex2var_epi16(a, low, b);
        const __m512i hi = _mm512_permutex2var_epi16(a, high, b);
        for (int r = 0; r < RB; ++r) {
          o[r][c] = _mm512_dpbf16_ps(o[r][c], (__m512bh)lo, (__m512bh)wb[r]);
          o[r][c + 1] = _mm512_dpbf16_ps(o[r][c + 1], (__m512bh)hi, (__m512bh)wb[r]);
        }
      } else {  // an odd last vector: 16 elements of each row
        const __m512i a = _mm512_maskz_loadu_epi16(__mmask32(0xffff), v0 + c * kLanes);
        const __m512i b = _mm512_maskz_loadu_epi16(__mmask32(0xffff), v1 + c * kLanes);
        const __m512i lo = _mm512_permutex2var_epi16(a, low, b);
        for (int r = 0; r < RB; ++r)
          o[r][c] = _mm512_dpbf16_ps(o[r][c], (__m512bh)lo, (__m512bh)wb[r]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < DC; ++c) _mm512_storeu_ps(acc + r * D + d0 + c * kLanes, o[r][c]);
}
#endif

// P V for RB rows over the whole head dim: runs of DC vectors, then the remainder. Issues
// `prefetch` rows along the keys.
template <typename T, int D, int RB>
inline void accumulate_rows(float* acc, const float* alpha, const void* w, const T* const* v,
                            int n, PrefetchRows<T, D>& prefetch) {
  constexpr int DC = kValueVectors<RB, D>;
  constexpr int kRest = (D / kLanes) % DC;
  auto run = [&](auto dc, int d0) {
    constexpr int kVectors = decltype(dc)::value;
    if constexpr (kBf16Pairs<T>) {
#if defined(__AVX512BF16__)
      accumulate_dims_pairs<D, RB, kVectors>(acc, alpha, static_cast<const uint32_t*>(w), v, n,
                                             d0, prefetch);
#endif
    } else {
      accumulate_dims_fp32<T, D, RB, kVectors>(acc, alpha, static_cast<const float*>(w), v, n,
                                               d0, prefetch);
    }
  };
  int d0 = 0;
  for (; d0 + DC * kLanes <= D; d0 += DC * kLanes) run(std::integral_constant<int, DC>{}, d0);
  if constexpr (kRest != 0) run(std::integral_constant<int, kRest>{}, d0);
}

// Calls f(std::integral_constant<int, RB>) for each register block of the R rows of a kv
// head, with the block's first row: blocks of 4, then one of 1 to 3.
template <typename F>
inline void for_row_blocks(int R, F&& f) {
  int r = 0;
  for (; r + 4 <= R; r += 4) f(std::integral_constant<int, 4>{}, r);
  switch (R - r) {
    case 3: f(std::integral_constant<int, 3>{}, r); break;
    case 2: f(std::integral_constant<int, 2>{}, r); break;
    case 1: f(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

template <typename T, int D>
void run_item(const PagedAttentionParams& p, const DecodeItem& it) {
  using QElem = ScoreElem<T>;
  constexpr bool kPairs = kBf16Pairs<T>;
  const int group = p.H / p.Hkv;
  const int R = (it.q_end - it.q_begin) * group;  // rows per kv head
  const int rows = (it.g1 - it.g0) * R;
  const int t0 = p.cu_seqlens_q[it.b];
  const int ql = p.cu_seqlens_q[it.b + 1] - t0, seq_len = p.seq_lens[it.b];

  // Per-thread scratch (contents unspecified until written here).
  const QElem** q_rows = cpu::thread_scratch<const QElem*, 0>(rows);
  float* q_widened = cpu::thread_scratch<float, 1>(std::is_same_v<T, QElem> ? 0 : size_t(rows) * D);
  float* acc = cpu::thread_scratch<float, 2>(size_t(rows) * D);
  SoftmaxState* state = cpu::thread_scratch<SoftmaxState, 3>(rows);
  int* limit = cpu::thread_scratch<int, 4>(rows);

  const T* q = static_cast<const T*>(p.q);
  for (int r = 0; r < rows; ++r) {
    const int g = it.g0 + r / R, rest = r % R;
    const int qi = it.q_begin + rest / group, h = g * group + rest % group;
    const T* src = q + (t0 + qi) * p.q_stride_t + h * p.q_stride_h;
    if constexpr (std::is_same_v<T, QElem>) {
      q_rows[r] = src;  // read in place: fp32, or bf16 for the pair kernels
    } else {
      cpu::to_float_n(src, q_widened + size_t(r) * D, D);
      q_rows[r] = q_widened + size_t(r) * D;
    }
    limit[r] = causal_key_count(seq_len, ql, qi, p.causal);
    state[r] = softmax_state_init();
  }
  std::fill(acc, acc + size_t(rows) * D, 0.0f);

  // Per key block: raw scores, then weights (fp32, or bf16 pairs in the first half of a
  // row: rows kKeyBlock words apart either way), and each row's rescale.
  using ScoreRow = float[kKeyBlock];
  auto* s = reinterpret_cast<ScoreRow*>(cpu::thread_scratch<float, 5>(size_t(rows) * kKeyBlock));
  auto* w = reinterpret_cast<ScoreRow*>(cpu::thread_scratch<float, 6>(size_t(rows) * kKeyBlock));
  float* alpha = cpu::thread_scratch<float, 7>(rows);

  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const int32_t* table = p.block_tables + int64_t(it.b) * p.block_table_stride;
  // Element offsets (kv head g0) of the n keys from j0, one division for the block.
  auto block_offsets = [&](int j0, int n, int64_t* off) {
    int page = j0 / p.BS, slot = j0 % p.BS;
    for (int i = 0; i < n; ++i) {
      off[i] = ((int64_t(table[page]) * p.BS + slot) * p.Hkv + it.g0) * D;
      if (++slot == p.BS) { slot = 0; ++page; }
    }
  };
  int64_t offsets[2][kKeyBlock];  // this key block's, the next one's
  // (A split past its rows' causal limit has k_end <= k_begin: no block.)
  const int n_blocks = std::max(0, (it.k_end - it.k_begin + kKeyBlock - 1) / kKeyBlock);
  auto block_keys = [&](int i) {
    return std::min(kKeyBlock, it.k_end - it.k_begin - i * kKeyBlock);
  };
  if (n_blocks > 0) block_offsets(it.k_begin, block_keys(0), offsets[0]);
  for (int i = 0; i < n_blocks; ++i) {
    const int j0 = it.k_begin + i * kKeyBlock, n = block_keys(i);
    const int64_t* off = offsets[i % 2];
    const int n_next = i + 1 < n_blocks ? block_keys(i + 1) : 0;
    int64_t* off_next = offsets[(i + 1) % 2];
    if (n_next > 0) block_offsets(j0 + kKeyBlock, n_next, off_next);

    // Scores in memory order: runs of 16 keys (a page block's rows lie together, all kv
    // heads), each kv head's rows of the run. Meanwhile the same value rows are
    // prefetched, for P V below.
    for (int c = 0; c < n; c += kLanes) {
      const int n_run = std::min(kLanes, n - c);
      for (int g = it.g0; g < it.g1; ++g) {
        const int64_t head = int64_t(g - it.g0) * D;
        // Key rows of the run; past n_run, the last one again (its scores are masked).
        const T* k_rows[kLanes];
        const T* v_rows[kLanes];
        for (int j = 0; j < kLanes; ++j) k_rows[j] = kc + off[c + std::min(j, n_run - 1)] + head;
        for (int j = 0; j < n_run; ++j) v_rows[j] = vc + off[c + j] + head;
        PrefetchRows<T, D> prefetch{v_rows, n_run};
        const int r0 = (g - it.g0) * R;
        for_row_blocks(R, [&](auto rb, int r) {
          score_rows<T, D, decltype(rb)::value>(q_rows + r0 + r, k_rows, n_run, s[r0 + r] + c,
                                                prefetch);
        });
        prefetch.issue_rest();
      }
    }
    for (int r = 0; r < rows; ++r)
      alpha[r] = softmax_row<kPairs>(s[r], n, j0, limit[r], p.scale, state[r], w[r]);
    // P V per kv head over the whole block, the output rows' rescale done once; meanwhile
    // the next block's key rows of that kv head are prefetched.
    for (int g = it.g0; g < it.g1; ++g) {
      const int64_t head = int64_t(g - it.g0) * D;
      const T* v_rows[kKeyBlock];
      for (int j = 0; j < n; ++j) v_rows[j] = vc + off[j] + head;
      const T* k_rows_next[kKeyBlock];
      for (int j = 0; j < n_next; ++j) k_rows_next[j] = kc + off_next[j] + head;
      PrefetchRows<T, D> prefetch{k_rows_next, n_next};
      const int r0 = (g - it.g0) * R;
      for_row_blocks(R, [&](auto rb, int r) {
        accumulate_rows<T, D, decltype(rb)::value>(acc + size_t(r0 + r) * D, alpha + r0 + r,
                                                   w[r0 + r], v_rows, n, prefetch);
      });
      prefetch.issue_rest();
    }
  }

  // Write the rows: final rows directly, split partials normalised to the merge buffer.
  T* out = static_cast<T*>(p.out);
  for (int r = 0; r < rows; ++r) {
    const int g = it.g0 + r / R, rest = r % R;
    const int qi = it.q_begin + rest / group, h = g * group + rest % group;
    const float inv = softmax_inv_sum(state[r]);
    const float* a = acc + size_t(r) * D;
    if (it.partial_out == nullptr) {
      cpu::from_float_n(a, out + (t0 + qi) * p.out_stride_t + h * p.out_stride_h, D, inv);
      if (p.lse) p.lse[int64_t(t0 + qi) * p.H + h] = softmax_lse(state[r]);
    } else {
      float* dst = it.partial_out + size_t(r) * D;
      for (int d = 0; d < D; ++d) dst[d] = a[d] * inv;
      it.partial_lse[r] = softmax_lse(state[r]);
    }
  }
}

}  // namespace

bool decode_avx512_available(const PagedAttentionParams& p) {
  return p.Hkv > 0 && p.H / p.Hkv <= kDecodeMaxRowsPerKvHead && p.D <= kMaxHeadDim;
}

void decode_avx512(const PagedAttentionParams& p, const DecodeItem& item) {
  CM3RT_DISPATCH_FLOAT(p.dtype, "paged_attention", T, [&] {
    CM3RT_DISPATCH_HEAD_DIM(p.D, "paged_attention", kHeadDim, [&] {
      run_item<T, kHeadDim>(p, item);
    });
  });
}

}  // namespace cm3rt

#else  // no AVX-512 at build time

namespace cm3rt {
bool decode_avx512_available(const PagedAttentionParams&) { return false; }
void decode_avx512(const PagedAttentionParams&, const DecodeItem&) {}
}  // namespace cm3rt

#endif
