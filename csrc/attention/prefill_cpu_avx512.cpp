// AVX-512 prefill tile of the CPU paged attention (see prefill_cpu_avx512.h), compiled when
// the build CPU has AVX-512 F/BW/VL (-march=native), as linear_cpu_avx512.cpp is; without
// it prefill_tile_avx512_available() is false and paged_attention_cpu.cpp keeps its portable
// 8-lane path for every item.
//
// A tile of up to 64 query rows runs a FlashAttention-2 loop over blocks of kKeyBlock keys:
//   S = Q K^T (micro-kernel), online softmax per row, O = alpha O + P V (micro-kernel).
// Both products put the 16 vector lanes on query rows, so nothing is ever reduced across
// lanes:
//   * Q is transposed once per tile into qt[d][row] (zero rows past the tile's rows);
//     scores come out as st[key][row], 16 rows a vector. A key element is broadcast and
//     multiplied into MV row vectors; NR keys x MV row vectors of accumulators stay in
//     registers over the whole head dim.
//   * The softmax of a key block is then vertical: a row's max, exp and sum are lane-wise
//     ops down the keys of the block, and the causal mask is a lane compare of the key
//     position against each row's limit, done only on blocks that reach past the first
//     row's limit (the diagonal); blocks past the last row's limit are never visited (the
//     caller clips k_end).
//   * The output is kept transposed as well, ot[d][row]: P V broadcasts a value element
//     and multiplies it into the MV row vectors of weights p[key][row], and the per-row
//     rescale alpha is a lane-wise multiply. ot is transposed back once, at the end.
// Each key block's K rows are copied (fp16: widened) into one contiguous per-thread block,
// and so are its V rows (bf16: packed in pairs, below), once per block for all the tile's
// rows: in the paged cache one kv head's keys lie Hkv * D elements apart, so the rows a
// micro-kernel reads at once would share one L1 set.
// bf16 caches, where the CPU has AVX512_BF16, multiply bf16 pairs with VDPBF16PS instead of
// widening (half the instructions; see score_keys_bf16).
//
// bench/bench_attention.py prefill (S = 2048 causal, 32 heads of 128) on AMD Zen 4, 2
// threads: bf16 2.6x and fp32 1.5x torch's SDPA, where the portable path ran 0.85x and 0.64x;
// alone on the machine ~300 and ~180 GFLOP/s. The two products take ~75% of the time
// (perf), the softmax ~10%, the packing and the transposes the rest.
#include "attention/prefill_cpu_avx512.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* values.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "attention/online_softmax.h"
#include "common/dispatch.h"
#include "cpu/scratch.h"
#include "cpu/vec512.h"

namespace cm3rt {

namespace {

constexpr int kLanes = 16;
constexpr int kMaxRowVectors = kPrefillTileMaxRows / kLanes;
constexpr int kKeyBlock = 64;  // keys per online-softmax step

// Register tiles (32 zmm registers): scores NR keys x MV row vectors, P V DR head-dim
// elements x MV row vectors, plus MV loaded vectors and one broadcast.
template <int MV> struct Blocking;
template <> struct Blocking<4> { static constexpr int kScoreKeys = 6, kValueDims = 6; };
template <> struct Blocking<3> { static constexpr int kScoreKeys = 8, kValueDims = 8; };
template <> struct Blocking<2> { static constexpr int kScoreKeys = 12, kValueDims = 12; };
template <> struct Blocking<1> { static constexpr int kScoreKeys = 16, kValueDims = 16; };


// In-place transpose of a 16 x 16 block of 32-bit elements (v[i] = row i): 64 shuffles
// instead of 256 strided scalar moves. After 32- and 64-bit interleaves, v[4i + c] holds in
// its 128-bit lane L the column 4L + c of rows 4i..4i+3; a 4 x 4 transpose of 128-bit lanes
// then gathers each column.
inline void transpose16x16(__m512i* v) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(b[c], b[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i x1 = _mm512_shuffle_i32x4(b[c], b[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i x2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i x3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
    v[c] = _mm512_shuffle_i32x4(x0, x2, _MM_SHUFFLE(2, 0, 2, 0));
    v[4 + c] = _mm512_shuffle_i32x4(x0, x2, _MM_SHUFFLE(3, 1, 3, 1));
    v[8 + c] = _mm512_shuffle_i32x4(x1, x3, _MM_SHUFFLE(2, 0, 2, 0));
    v[12 + c] = _mm512_shuffle_i32x4(x1, x3, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// 16 fp32 lanes stored as a cache dtype, rounded as from_float<T> (nearest even; NaN stays
// NaN, quietened, as in common/dtype.h).
inline void narrow16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
inline void narrow16(bf16_t* dst, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(r));
}
inline void narrow16(half_t* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// st[j][row] = qt[.][row] . k[j] for NR keys, MV row vectors (row stride M = 16 MV).
template <int D, int MV, int NR>
inline void score_keys(const float* qt, const float* const* k, float* st) {
  constexpr int M = MV * kLanes;
  __m512 acc[NR][MV];
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < MV; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m512 q[MV];
    for (int i = 0; i < MV; ++i) q[i] = _mm512_loadu_ps(qt + d * M + i * kLanes);
    for (int j = 0; j < NR; ++j) {
      const __m512 kb = _mm512_set1_ps(k[j][d]);
      for (int i = 0; i < MV; ++i) acc[j][i] = _mm512_fmadd_ps(q[i], kb, acc[j][i]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < MV; ++i) _mm512_storeu_ps(st + j * M + i * kLanes, acc[j][i]);
}

// ot[d][row] = alpha[row] ot[d][row] + sum_n pt[n][row] v[n][d] for head-dim elements
// d in [d0, d0 + DR), over n < n_keys.
template <int MV, int DR>
inline void accumulate_dims(float* ot, const float* alpha, const float* pt, const float* const* v,
                            int n_keys, int d0) {
  constexpr int M = MV * kLanes;
  __m512 acc[DR][MV];
  for (int i = 0; i < MV; ++i) {
    const __m512 a = _mm512_loadu_ps(alpha + i * kLanes);
    for (int j = 0; j < DR; ++j)
      acc[j][i] = _mm512_mul_ps(_mm512_loadu_ps(ot + (d0 + j) * M + i * kLanes), a);
  }
  for (int n = 0; n < n_keys; ++n) {
    __m512 p[MV];
    for (int i = 0; i < MV; ++i) p[i] = _mm512_loadu_ps(pt + n * M + i * kLanes);
    const float* vn = v[n] + d0;
    for (int j = 0; j < DR; ++j) {
      const __m512 vb = _mm512_set1_ps(vn[j]);
      for (int i = 0; i < MV; ++i) acc[j][i] = _mm512_fmadd_ps(p[i], vb, acc[j][i]);
    }
  }
  for (int j = 0; j < DR; ++j)
    for (int i = 0; i < MV; ++i) _mm512_storeu_ps(ot + (d0 + j) * M + i * kLanes, acc[j][i]);
}

// The head dim in runs of DR, then the remainder (D is a multiple of 16) in one smaller run.
template <int D, int MV, int DR>
inline void accumulate_block(float* ot, const float* alpha, const float* pt,
                             const float* const* v, int n_keys) {
  int d0 = 0;
  for (; d0 + DR <= D; d0 += DR) accumulate_dims<MV, DR>(ot, alpha, pt, v, n_keys, d0);
  if constexpr (D % DR != 0) {
    constexpr int kRest = D % DR;
    accumulate_dims<MV, kRest>(ot, alpha, pt, v, n_keys, d0);
  }
}

#if defined(__AVX512BF16__)
// The same two products for bf16 caches with VDPBF16PS, which adds the exact products of
// a pair of bf16 elements into each fp32 lane: half the instructions of widening + FMA, and
// nothing is widened. Both operands of a product are laid out in pairs along the sum:
//   scores: qp[d / 2][row] holds (q[row][d], q[row][d + 1]), and a key row (bf16 in the
//           cache, read as it lies) gives the broadcast pair (k[d], k[d + 1]);
//   P V:    pp[n / 2][row] holds the weights (p[n][row], p[n + 1][row]) rounded to bf16, and
//           vp[n / 2][d] the values (v[n][d], v[n + 1][d]), packed once per key block.
// Rounding the weights to bf16 (relative error <= 2^-9) is the one step less exact than the
// fp32 path (torch's bf16 attention rounds them too: against a float64 reference both give
// max 9.0e-3, mean 1.5e-4 on 1024 tokens of head dim 128, the fp32-weight path 6.8e-3 and
// 1.05e-4); the sums stay fp32. The instruction flushes denormal inputs, products below
// 2^-126, far under what a bf16 output can hold next to the other terms.
inline __m512i broadcast_pair(const bf16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return _mm512_set1_epi32(pair);
}
inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

template <int D, int MV, int NR>
inline void score_keys_bf16(const uint32_t* qp, const bf16_t* const* k, float* st) {
  constexpr int M = MV * kLanes;
  __m512 acc[NR][MV];
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < MV; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 2) {
    __m512i q[MV];
    for (int i = 0; i < MV; ++i) q[i] = _mm512_loadu_si512(qp + (d / 2) * M + i * kLanes);
    for (int j = 0; j < NR; ++j) {
      const __m512i kb = broadcast_pair(k[j] + d);
      for (int i = 0; i < MV; ++i) acc[j][i] = dot_pairs(acc[j][i], q[i], kb);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < MV; ++i) _mm512_storeu_ps(st + j * M + i * kLanes, acc[j][i]);
}

// (a[lane], b[lane]) as a bf16 pair per lane, rounded to nearest even.
inline __m512i pack_pairs(__m512 a, __m512 b) {
  const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(a));
  const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(b));
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}
// vp[d] = (v0[d], v1[d]) for d < D, v1 = nullptr reading as zeros: one two-source word
// permute per 16 pairs.
template <int D>
inline void pack_value_pairs(const bf16_t* v0, const bf16_t* v1, uint32_t* vp) {
  // Words of the result: 2k from v0[k] (index k), 2k + 1 from v1[k] (index 32 + k); the
  // upper 16 pairs take k + 16.
  alignas(64) static const uint16_t kLow[32] = {
      0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_load_si512(kLow);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  int d = 0;
  for (; d + 32 <= D; d += 32) {
    const __m512i a = _mm512_loadu_si512(v0 + d);
    const __m512i b = v1 ? _mm512_loadu_si512(v1 + d) : _mm512_setzero_si512();
    _mm512_storeu_si512(vp + d, _mm512_permutex2var_epi16(a, low, b));
    _mm512_storeu_si512(vp + d + 16, _mm512_permutex2var_epi16(a, high, b));
  }
  if constexpr (D % 32 != 0) {  // 16 left (D is a multiple of 16)
    auto load_half = [&](const bf16_t* row) {
      return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d)));
    };
    const __m512i b = v1 ? load_half(v1) : _mm512_setzero_si512();
    _mm512_storeu_si512(vp + d, _mm512_permutex2var_epi16(load_half(v0), low, b));
  }
}

template <int MV, int DR>
inline void accumulate_dims_bf16(float* ot, const float* alpha, const uint32_t* pp,
                                 const uint32_t* vp, int n_pairs, int d0, int D) {
  constexpr int M = MV * kLanes;
  __m512 acc[DR][MV];
  for (int i = 0; i < MV; ++i) {
    const __m512 a = _mm512_loadu_ps(alpha + i * kLanes);
    for (int j = 0; j < DR; ++j)
      acc[j][i] = _mm512_mul_ps(_mm512_loadu_ps(ot + (d0 + j) * M + i * kLanes), a);
  }
  for (int n = 0; n < n_pairs; ++n) {
    __m512i w[MV];
    for (int i = 0; i < MV; ++i) w[i] = _mm512_loadu_si512(pp + n * M + i * kLanes);
    const uint32_t* vn = vp + size_t(n) * D + d0;
    for (int j = 0; j < DR; ++j) {
      const __m512i vb = _mm512_set1_epi32(int32_t(vn[j]));
      for (int i = 0; i < MV; ++i) acc[j][i] = dot_pairs(acc[j][i], w[i], vb);
    }
  }
  for (int j = 0; j < DR; ++j)
    for (int i = 0; i < MV; ++i) _mm512_storeu_ps(ot + (d0 + j) * M + i * kLanes, acc[j][i]);
}

template <int D, int MV, int DR>
inline void accumulate_block_bf16(float* ot, const float* alpha, const uint32_t* pp,
                                  const uint32_t* vp, int n_pairs) {
  int d0 = 0;
  for (; d0 + DR <= D; d0 += DR) accumulate_dims_bf16<MV, DR>(ot, alpha, pp, vp, n_pairs, d0, D);
  if constexpr (D % DR != 0) {
    constexpr int kRest = D % DR;
    accumulate_dims_bf16<MV, kRest>(ot, alpha, pp, vp, n_pairs, d0, D);
  }
}
#endif

// Row state of a tile, MV vectors of 16 rows each.
template <int MV>
struct RowStates {
  __m512 m[MV];        // running max of the scaled scores (-inf: nothing seen)
  __m512 l[MV];        // running sum of exp(score - m)
  __m512i limit[MV];   // keys each row may attend (causal), INT_MAX for padding rows
};

// Folds the raw scores st[n][row] of keys j0 + n (n < n_keys) into the row states, masking
// keys at or past each row's limit (only when `masked`), and writes the weights
// exp(scale s - m) (0 where masked) to st, or as bf16 key pairs to pp (kPairs: pp[n / 2][row]
// = (w[n][row], w[n + 1][row]), an odd last key paired with 0); alpha gets the rescale of the
// old accumulator. The scale is positive, so the max of the raw scores gives the max of the
// scaled ones.
template <int MV, bool kPairs>
inline void softmax_block(float* st, uint32_t* pp, int n_keys, int j0, bool masked, float scale,
                          RowStates<MV>& rs, float* alpha) {
  constexpr int M = MV * kLanes;
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  for (int i = 0; i < MV; ++i) {
    float* col = st + i * kLanes;
    // Lanes whose key n is valid: j0 + n < limit.
    auto keep = [&](int n) {
      return masked ? _mm512_cmp_epi32_mask(_mm512_set1_epi32(j0 + n), rs.limit[i], _MM_CMPINT_LT)
                    : __mmask16(0xffff);
    };
    __m512 block_max = neg_inf;
    for (int n = 0; n < n_keys; ++n)
      block_max = _mm512_mask_max_ps(block_max, keep(n), block_max, _mm512_loadu_ps(col + n * M));
    const __m512 m_new = _mm512_max_ps(rs.m[i], _mm512_mul_ps(block_max, vscale));
    // exp(m_old - m_new): 0 from an empty state (-inf underflows), 1 while still empty
    // (m_new = -inf, where the subtraction would give NaN).
    const __mmask16 empty = _mm512_cmp_ps_mask(m_new, neg_inf, _CMP_EQ_OQ);
    const __m512 a = _mm512_mask_mov_ps(cpu::exp16_nonpositive(_mm512_sub_ps(rs.m[i], m_new)),
                                        empty, _mm512_set1_ps(1.0f));
    _mm512_storeu_ps(alpha + i * kLanes, a);
    // A row with no valid key in the block has all its lanes masked, so the NaN or inf of
    // scale s - m_new (m_new = -inf) never reaches a weight.
    auto weight = [&](int n) {
      const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(col + n * M), vscale, m_new);
      return _mm512_maskz_mov_ps(keep(n), cpu::exp16_nonpositive(x));
    };
    __m512 sum = _mm512_setzero_ps();
    if constexpr (kPairs) {
#if defined(__AVX512BF16__)
      for (int n = 0; n < n_keys; n += 2) {
        const __m512 w0 = weight(n);
        const __m512 w1 = n + 1 < n_keys ? weight(n + 1) : _mm512_setzero_ps();
        _mm512_storeu_si512(pp + (n / 2) * M + i * kLanes, pack_pairs(w0, w1));
        sum = _mm512_add_ps(sum, _mm512_add_ps(w0, w1));
      }
#endif
    } else {
      for (int n = 0; n < n_keys; ++n) {
        const __m512 w = weight(n);
        _mm512_storeu_ps(col + n * M, w);
        sum = _mm512_add_ps(sum, w);
      }
    }
    rs.m[i] = m_new;
    rs.l[i] = _mm512_fmadd_ps(rs.l[i], a, sum);
  }
}

// Whether the tile multiplies bf16 pairs (VDPBF16PS) instead of widening to fp32.
template <typename T>
constexpr bool kBf16Pairs =
#if defined(__AVX512BF16__)
    std::is_same_v<T, bf16_t>;
#else
    false;
#endif

template <typename T, int D, int MV>
void run_tile(const PagedAttentionParams& p, const PrefillTile& t) {
  constexpr int M = MV * kLanes;
  constexpr int NR = Blocking<MV>::kScoreKeys, DR = Blocking<MV>::kValueDims;
  constexpr bool kPairs = kBf16Pairs<T>;
  // Key blocks are whole runs of NR keys; the last run of a short block repeats a key.
  constexpr int kKeys = (kKeyBlock + NR - 1) / NR * NR;
  constexpr int kPairRows = (kKeyBlock + 1) / 2;
  const int group = p.H / p.Hkv;
  const int rows = (t.q_end - t.q_begin) * group;
  const int t0 = p.cu_seqlens_q[t.b];
  const int ql = p.cu_seqlens_q[t.b + 1] - t0, seq_len = p.seq_lens[t.b];

  // Per-thread scratch (contents unspecified until written here).
  float* qt = cpu::thread_scratch<float, 0>(size_t(D) * M);  // fp32 qt, or bf16 pairs qp
  float* ot = cpu::thread_scratch<float, 1>(size_t(D) * M);
  float* st = cpu::thread_scratch<float, 2>(size_t(kKeys) * M);
  float* alpha = cpu::thread_scratch<float, 3>(M);
  // V rows widened (fp32 path, fp16 / bf16 cache), or the V pairs vp (bf16 pairs).
  float* widened = cpu::thread_scratch<float, 4>(size_t(kKeys) * D);
  uint32_t* pp = cpu::thread_scratch<uint32_t, 5>(size_t(kPairRows) * M);
  uint32_t* qp = reinterpret_cast<uint32_t*>(qt);
  uint32_t* vp = reinterpret_cast<uint32_t*>(widened);

  // Q transposed (rows past the tile zero), 16 rows x 16 columns at a time; a column is an
  // fp32 element, or a bf16 pair for the pair kernels. And each row's causal limit.
  const T* q = static_cast<const T*>(p.q);
  alignas(64) int32_t limit[kPrefillTileMaxRows];
  for (int r = 0; r < M; ++r) limit[r] = INT_MAX;
  const T* q_rows[kPrefillTileMaxRows];
  for (int r = 0; r < rows; ++r) {
    const int qi = t.q_begin + r / group, h = t.g * group + r % group;
    q_rows[r] = q + (t0 + qi) * p.q_stride_t + h * p.q_stride_h;
    limit[r] = causal_key_count(seq_len, ql, qi, p.causal);
  }
  constexpr int kColumns = kPairs ? D / 2 : D;
  constexpr int kElemsPerColumn = kPairs ? 2 : 1;
  for (int i = 0; i < MV; ++i)
    for (int c0 = 0; c0 < kColumns; c0 += kLanes) {
      const int n_columns = std::min(kLanes, kColumns - c0);
      const __mmask16 columns_left = __mmask16((1u << n_columns) - 1);
      __m512i block[kLanes];
      for (int r = 0; r < kLanes; ++r) {
        const int row = i * kLanes + r;
        if (row >= rows) {
          block[r] = _mm512_setzero_si512();
        } else if constexpr (kPairs) {  // D = 80 has 40 pair columns: a masked tail
          block[r] = _mm512_maskz_loadu_epi32(columns_left, q_rows[row] + c0 * kElemsPerColumn);
        } else {
          block[r] = _mm512_castps_si512(cpu::load16(q_rows[row] + c0));
        }
      }
      transpose16x16(block);
      for (int c = 0; c < n_columns; ++c)
        _mm512_storeu_si512(qt + size_t(c0 + c) * M + i * kLanes, block[c]);
    }
  const int first_row_limit = limit[0];  // rows are token-major: the smallest limit
  std::fill(ot, ot + size_t(D) * M, 0.0f);
  RowStates<MV> rs;
  for (int i = 0; i < MV; ++i) {
    rs.m[i] = _mm512_set1_ps(-INFINITY);
    rs.l[i] = _mm512_setzero_ps();
    rs.limit[i] = _mm512_load_si512(limit + i * kLanes);
  }

  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const int32_t* table = p.block_tables + int64_t(t.b) * p.block_table_stride;
  auto key_offset = [&](int j) {
    return ((int64_t(table[j / p.BS]) * p.BS + j % p.BS) * p.Hkv + t.g) * D;
  };
  // Rows of the key block: K as the score kernel reads it, V for the fp32 P V.
  using KeyRow = std::conditional_t<kPairs, bf16_t, float>;
  KeyRow* key_block = cpu::thread_scratch<KeyRow, 6>(size_t(kKeyBlock) * D);
  const KeyRow* k_rows[kKeys];
  const float* v_rows[kKeys];
  const T* v_cache_rows[kKeyBlock + 1];
  for (int j0 = t.k_begin; j0 < t.k_end; j0 += kKeyBlock) {
    const int n_keys = std::min(kKeyBlock, t.k_end - j0);
    for (int n = 0; n < n_keys; ++n) {
      const int64_t off = key_offset(j0 + n);
      // K rows are copied (or widened) into one contiguous block: in the cache, one kv
      // head's keys lie Hkv * D elements apart (16 KB for 32 heads of 128 fp32), so the NR
      // rows a score kernel reads at once would share one L1 set and evict each other.
      KeyRow* kb = key_block + size_t(n) * D;
      if constexpr (std::is_same_v<T, KeyRow>) {
        std::memcpy(kb, kc + off, sizeof(T) * D);
      } else {
        for (int d = 0; d < D; d += kLanes) _mm512_storeu_ps(kb + d, cpu::load16(kc + off + d));
      }
      k_rows[n] = kb;
      // V likewise (P V reads the whole block once per run of DR head-dim elements); the
      // pair path packs its V pairs from the cache rows instead.
      if constexpr (kPairs) {
        v_cache_rows[n] = vc + off;
      } else {
        float* vw = widened + size_t(n) * D;
        if constexpr (std::is_same_v<T, float>) {
          std::memcpy(vw, vc + off, sizeof(float) * D);
        } else {
          for (int d = 0; d < D; d += kLanes) _mm512_storeu_ps(vw + d, cpu::load16(vc + off + d));
        }
        v_rows[n] = vw;
      }
    }
    for (int n = n_keys; n < kKeys; ++n) k_rows[n] = k_rows[n_keys - 1];
    const bool masked = j0 + n_keys > first_row_limit;
    if constexpr (kPairs) {
#if defined(__AVX512BF16__)
      for (int n = 0; n < n_keys; n += NR) score_keys_bf16<D, MV, NR>(qp, k_rows + n, st + n * M);
      softmax_block<MV, true>(st, pp, n_keys, j0, masked, p.scale, rs, alpha);
      // Values in key pairs; an odd last key pairs with value 0 (and weight 0).
      const int n_pairs = (n_keys + 1) / 2;
      for (int n = 0; n < n_pairs; ++n) {
        const bf16_t* v0 = v_cache_rows[2 * n];
        const bf16_t* v1 = 2 * n + 1 < n_keys ? v_cache_rows[2 * n + 1] : nullptr;
        pack_value_pairs<D>(v0, v1, vp + size_t(n) * D);
      }
      accumulate_block_bf16<D, MV, DR>(ot, alpha, pp, vp, n_pairs);
#endif
    } else {
      for (int n = 0; n < n_keys; n += NR) score_keys<D, MV, NR>(qt, k_rows + n, st + n * M);
      softmax_block<MV, false>(st, nullptr, n_keys, j0, masked, p.scale, rs, alpha);
      accumulate_block<D, MV, DR>(ot, alpha, st, v_rows, n_keys);
    }
  }

  // Write the rows: normalised, transposed back.
  alignas(64) float m[kPrefillTileMaxRows], l[kPrefillTileMaxRows];
  for (int i = 0; i < MV; ++i) {
    _mm512_store_ps(m + i * kLanes, rs.m[i]);
    _mm512_store_ps(l + i * kLanes, rs.l[i]);
  }
  T* out = static_cast<T*>(p.out);
  alignas(64) float inv[kPrefillTileMaxRows];
  void* dst_rows[kPrefillTileMaxRows];  // T* (final output) or float* (split partials)
  for (int r = 0; r < rows; ++r) {
    const SoftmaxState state{m[r], l[r]};
    inv[r] = softmax_inv_sum(state);
    const int qi = t.q_begin + r / group, h = t.g * group + r % group;
    if (t.partial_out == nullptr) {
      dst_rows[r] = out + (t0 + qi) * p.out_stride_t + h * p.out_stride_h;
      if (p.lse) p.lse[int64_t(t0 + qi) * p.H + h] = softmax_lse(state);
    } else {
      dst_rows[r] = t.partial_out + size_t(r) * D;
      t.partial_lse[r] = softmax_lse(state);
    }
  }
  for (int i = 0; i < MV; ++i)
    for (int d0 = 0; d0 < D; d0 += kLanes) {
      __m512i block[kLanes];  // ot[d0 + c][16 rows] -> 16 rows of ot[row][d0 .. d0 + 16]
      for (int c = 0; c < kLanes; ++c)
        block[c] = _mm512_loadu_si512(ot + size_t(d0 + c) * M + i * kLanes);
      transpose16x16(block);
      for (int r = 0; r < kLanes && i * kLanes + r < rows; ++r) {
        const int row = i * kLanes + r;
        const __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(block[r]), _mm512_set1_ps(inv[row]));
        if (t.partial_out == nullptr) narrow16(static_cast<T*>(dst_rows[row]) + d0, v);
        else narrow16(static_cast<float*>(dst_rows[row]) + d0, v);
      }
    }
}

template <typename T, int D>
void run_tile_rows(const PagedAttentionParams& p, const PrefillTile& t) {
  const int rows = (t.q_end - t.q_begin) * (p.H / p.Hkv);
  switch ((rows + kLanes - 1) / kLanes) {
    case 1: return run_tile<T, D, 1>(p, t);
    case 2: return run_tile<T, D, 2>(p, t);
    case 3: return run_tile<T, D, 3>(p, t);
    default: return run_tile<T, D, kMaxRowVectors>(p, t);
  }
}

}  // namespace

bool prefill_tile_avx512_available(const PagedAttentionParams& p) {
  return p.Hkv > 0 && p.H / p.Hkv <= kPrefillTileMaxRows;
}

void prefill_tile_avx512(const PagedAttentionParams& p, const PrefillTile& tile) {
  CM3RT_DISPATCH_FLOAT(p.dtype, "paged_attention", T, [&] {
    CM3RT_DISPATCH_HEAD_DIM(p.D, "paged_attention", kHeadDim, [&] {
      run_tile_rows<T, kHeadDim>(p, tile);
    });
  });
}

}  // namespace cm3rt

#else  // no AVX-512 at build time

namespace cm3rt {
bool prefill_tile_avx512_available(const PagedAttentionParams&) { return false; }
void prefill_tile_avx512(const PagedAttentionParams&, const PrefillTile&) {}
}  // namespace cm3rt

#endif
