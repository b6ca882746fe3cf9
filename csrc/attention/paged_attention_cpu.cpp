// paged_attention on the CPU: online-softmax tiling over key chunks.
//
// Work item = (sequence b, kv head g, query tile, key split). A tile holds the `group`
// query heads that share kv head g for up to `q_tile` consecutive query tokens, so each key
// and value row is read once for all of them (GQA amortisation). Keys are processed in
// chunks of kKeyChunk (never crossing a page block): scored (register-blocked dot products), folded
// into the running softmax state (online_softmax.h, shared with the CUDA kernels), and
// accumulated into the fp32 output rows (register-blocked axpy). K and V are read straight
// from the cache in their own dtype and widened in registers: no copies. When the items are too
// few to keep every core busy (one long sequence, small decode batch), the key range is
// split and the partial results are merged by their log-sum-exp, as the CUDA decode path
// does.
//
// Prefill-shaped items (q_len > kAllHeadsMaxQLen, at least kTileKernelMinRows query rows)
// run instead on the AVX-512 tile kernel where the build has one (prefill_cpu_avx512.cpp:
// FlashAttention-2 style, 64-row query tiles x 64-key blocks, GEMM-like micro-kernels, bf16
// pairs with VDPBF16PS); the planning, the key splits and their merge stay here, and so does
// everything else (short prefills, builds without AVX-512).
//
// Decode-shaped items (q_len <= kAllHeadsMaxQLen: decode, speculative verify) run likewise on
// the AVX-512 decode kernel where the build has one (decode_cpu_avx512.cpp: 16-lane dot
// products along the head dim over blocks of 64 keys, bf16 pairs with VDPBF16PS), unless an
// item holds more than kDecodeMaxRowsPerKvHead rows per kv head.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/decode_cpu_avx512.h"
#include "attention/online_softmax.h"
#include "attention/paged_attention.h"
#include "attention/prefill_cpu_avx512.h"
#include "common/dispatch.h"
#include "cpu/vec.h"

namespace cm3rt {

namespace {

using cpu::v8f;
using cpu::load8;
using cpu::store8;
using cpu::splat8;

constexpr int kKeyChunk = 16;       // keys scored per online-softmax step
constexpr int kRowsPerTile = 32;    // target query rows (tokens x group heads) per item
constexpr int kMinKeysPerSplit = 256;
// Sequences with at most this many query rows (decode, speculative verify) are one item
// for all kv heads: a key row of all heads is contiguous in the cache ([BS, Hkv, D] per
// block), so the item streams through memory instead of striding by Hkv * D.
constexpr int kAllHeadsMaxQLen = 4;
// Prefill items of at least this many query rows go to the AVX-512 tile kernel
// (prefill_cpu_avx512.h), fewer stay here: its 16 lanes hold query rows, so a small item
// leaves most lanes idle. Measured on AMD Zen 4 (2 threads, 4 sequences of 1024 keys, 32
// heads of 128, tile kernel time / this path's): fp32 5 rows 1.32, 8 rows 1.10, 10 rows
// 0.92, 12 rows 0.86; bf16 5 rows 1.08, 8 rows 0.93, 10 rows 0.69, 16 rows 0.54.
constexpr int kTileKernelMinRows = 10;

struct WorkItem {
  int b;                 // sequence
  int g0, g1;            // kv heads [g0, g1) of the item
  int q_begin, q_end;    // query tokens of the tile, relative to the sequence
  int split, n_splits;   // key split of this item
  int64_t partial;       // offset of this item's partial result (n_splits > 1), in rows
};

// Per-thread scratch, sized for the largest tile.
struct Scratch {
  std::vector<float> q, acc, s, alpha;
  std::vector<SoftmaxState> st;
  std::vector<int> kmax;
  void reserve(int rows, int D) {
    q.resize(size_t(rows) * D);
    acc.resize(size_t(rows) * D);
    s.resize(size_t(rows) * kKeyChunk);
    alpha.resize(rows);
    st.resize(rows);
    kmax.resize(rows);
  }
};

// Software prefetch of n rows of row_bytes each, `stride` elements apart, into L2
// (PREFETCHT1): a chunk's burst of prefetches into L1 held the core's L1 miss buffers and
// stalled it (AMD Zen 3, one thread, 8 sequences x 1024 keys, 16 heads of 64, bf16:
// 3.08 -> 2.41 ms; fp32 5.89 -> 4.77 ms), as the AVX-512 decode kernel found.
template <typename T>
inline void prefetch_rows(const T* rows, int64_t stride, int n, int row_bytes) {
  for (int j = 0; j < n; ++j) {
    const char* row = reinterpret_cast<const char*>(rows + j * stride);
    for (int b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
  }
}

// s[r][j] = q[r] . k[j] for r < rows, j < n. q: fp32 rows (pre-scaled), stride D; k: key
// rows of the cache dtype, `k_stride` elements apart. Blocks of 4 rows x 2 keys (then
// 2 x 4 for the remainder) keep 8 accumulators in registers, reduced together (reduce8x8).
template <int D, typename T>
void score_chunk(const float* q, int rows, const T* k, int64_t k_stride, int n, float* s) {
  int r = 0;
  // 4 rows x 2 keys: each key element is loaded (and widened) once per 4 query rows.
  for (; r + 4 <= rows; r += 4) {
    const float* q0 = q + size_t(r) * D;
    float* s0 = s + size_t(r) * kKeyChunk;
    int j = 0;
    for (; j + 2 <= n; j += 2) {
      v8f a00{}, a01{}, a10{}, a11{}, a20{}, a21{}, a30{}, a31{};
      const T* k0 = k + j * k_stride;
      const T* k1 = k0 + k_stride;
      for (int d = 0; d < D; d += 8) {
        const v8f y0 = load8(k0 + d), y1 = load8(k1 + d);
        const v8f x0 = load8(q0 + d), x1 = load8(q0 + D + d);
        const v8f x2 = load8(q0 + 2 * D + d), x3 = load8(q0 + 3 * D + d);
        a00 += x0 * y0; a01 += x0 * y1; a10 += x1 * y0; a11 += x1 * y1;
        a20 += x2 * y0; a21 += x2 * y1; a30 += x3 * y0; a31 += x3 * y1;
      }
      const v8f sums = cpu::reduce8x8(a00, a01, a10, a11, a20, a21, a30, a31);
      for (int i = 0; i < 4; ++i) {
        s0[i * kKeyChunk + j] = sums[2 * i];
        s0[i * kKeyChunk + j + 1] = sums[2 * i + 1];
      }
    }
    for (; j < n; ++j) {
      v8f a0{}, a1{}, a2{}, a3{};
      const T* kj = k + j * k_stride;
      for (int d = 0; d < D; d += 8) {
        const v8f y = load8(kj + d);
        a0 += load8(q0 + d) * y;
        a1 += load8(q0 + D + d) * y;
        a2 += load8(q0 + 2 * D + d) * y;
        a3 += load8(q0 + 3 * D + d) * y;
      }
      s0[j] = cpu::hsum8(a0);
      s0[kKeyChunk + j] = cpu::hsum8(a1);
      s0[2 * kKeyChunk + j] = cpu::hsum8(a2);
      s0[3 * kKeyChunk + j] = cpu::hsum8(a3);
    }
  }
  for (; r + 2 <= rows; r += 2) {
    const float* q0 = q + size_t(r) * D;
    const float* q1 = q0 + D;
    float* s0 = s + size_t(r) * kKeyChunk;
    float* s1 = s0 + kKeyChunk;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      v8f a00{}, a01{}, a02{}, a03{}, a10{}, a11{}, a12{}, a13{};
      const T* k0 = k + j * k_stride;
      const T* k1 = k0 + k_stride;
      const T* k2 = k1 + k_stride;
      const T* k3 = k2 + k_stride;
      for (int d = 0; d < D; d += 8) {
        const v8f x0 = load8(q0 + d), x1 = load8(q1 + d);
        const v8f y0 = load8(k0 + d), y1 = load8(k1 + d);
        const v8f y2 = load8(k2 + d), y3 = load8(k3 + d);
        a00 += x0 * y0; a01 += x0 * y1; a02 += x0 * y2; a03 += x0 * y3;
        a10 += x1 * y0; a11 += x1 * y1; a12 += x1 * y2; a13 += x1 * y3;
      }
      const v8f sums = cpu::reduce8x8(a00, a01, a02, a03, a10, a11, a12, a13);
      for (int i = 0; i < 4; ++i) { s0[j + i] = sums[i]; s1[j + i] = sums[4 + i]; }
    }
    for (; j < n; ++j) {
      v8f a0{}, a1{};
      const T* kj = k + j * k_stride;
      for (int d = 0; d < D; d += 8) {
        const v8f y = load8(kj + d);
        a0 += load8(q0 + d) * y;
        a1 += load8(q1 + d) * y;
      }
      s0[j] = cpu::hsum8(a0);
      s1[j] = cpu::hsum8(a1);
    }
  }
  for (; r < rows; ++r) {  // one row (decode without GQA): 8 keys, 8 independent chains
    const float* q0 = q + size_t(r) * D;
    float* s0 = s + size_t(r) * kKeyChunk;
    int j = 0;
    for (; j + 8 <= n; j += 8) {
      v8f a0{}, a1{}, a2{}, a3{}, a4{}, a5{}, a6{}, a7{};
      const T* k0 = k + j * k_stride;
      for (int d = 0; d < D; d += 8) {
        const v8f x = load8(q0 + d);
        a0 += x * load8(k0 + d);
        a1 += x * load8(k0 + k_stride + d);
        a2 += x * load8(k0 + 2 * k_stride + d);
        a3 += x * load8(k0 + 3 * k_stride + d);
        a4 += x * load8(k0 + 4 * k_stride + d);
        a5 += x * load8(k0 + 5 * k_stride + d);
        a6 += x * load8(k0 + 6 * k_stride + d);
        a7 += x * load8(k0 + 7 * k_stride + d);
      }
      store8(s0 + j, cpu::reduce8x8(a0, a1, a2, a3, a4, a5, a6, a7));
    }
    for (; j < n; ++j) {
      v8f a0{};
      const T* kj = k + j * k_stride;
      for (int d = 0; d < D; d += 8) a0 += load8(q0 + d) * load8(kj + d);
      s0[j] = cpu::hsum8(a0);
    }
  }
}

// acc[r] = alpha[r] * acc[r] + sum_j p[r][j] * v[j] for r < rows (p in s, stride kKeyChunk;
// v rows of the cache dtype, `v_stride` apart). Blocks of 4 rows x 16 columns stay in
// registers across the n keys.
template <int D, typename T>
void accumulate_chunk(float* acc, int rows, const float* alpha, const float* p, const T* v,
                      int64_t v_stride, int n) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    for (int d = 0; d < D; d += 16) {
      v8f c[4][2];
      for (int i = 0; i < 4; ++i) {
        const v8f a = splat8(alpha[r + i]);
        c[i][0] = load8(acc + size_t(r + i) * D + d) * a;
        c[i][1] = load8(acc + size_t(r + i) * D + d + 8) * a;
      }
      for (int j = 0; j < n; ++j) {
        const T* vj = v + j * v_stride + d;
        const v8f v0 = load8(vj), v1 = load8(vj + 8);
        for (int i = 0; i < 4; ++i) {
          const v8f w = splat8(p[size_t(r + i) * kKeyChunk + j]);
          c[i][0] += w * v0;
          c[i][1] += w * v1;
        }
      }
      for (int i = 0; i < 4; ++i) {
        store8(acc + size_t(r + i) * D + d, c[i][0]);
        store8(acc + size_t(r + i) * D + d + 8, c[i][1]);
      }
    }
  }
  for (; r < rows; ++r) {  // one row: 4 chains over the keys per 8 columns, summed at the end
    float* a = acc + size_t(r) * D;
    const float* pr = p + size_t(r) * kKeyChunk;
    for (int d = 0; d < D; d += 8) {
      v8f c0 = load8(a + d) * splat8(alpha[r]), c1{}, c2{}, c3{};
      const T* vd = v + d;
      int j = 0;
      for (; j + 4 <= n; j += 4) {
        c0 += splat8(pr[j]) * load8(vd + j * v_stride);
        c1 += splat8(pr[j + 1]) * load8(vd + (j + 1) * v_stride);
        c2 += splat8(pr[j + 2]) * load8(vd + (j + 2) * v_stride);
        c3 += splat8(pr[j + 3]) * load8(vd + (j + 3) * v_stride);
      }
      for (; j < n; ++j) c0 += splat8(pr[j]) * load8(vd + j * v_stride);
      store8(a + d, (c0 + c1) + (c2 + c3));
    }
  }
}

template <typename T, int D>
class CpuAttention {
 public:
  explicit CpuAttention(const PagedAttentionParams& p)
      : p_(p),
        group_(p.H / p.Hkv),
        tile_kernel_(prefill_tile_avx512_available(p)),
        decode_kernel_(decode_avx512_available(p)) {
    q_tile_ = std::max(1, std::min(kRowsPerTile / group_, 64));
    prefill_q_tile_ = tile_kernel_ ? std::max(1, kPrefillTileMaxRows / group_) : q_tile_;
  }

  void run() {
    plan();
    partial_out_.resize(size_t(partial_rows_) * D);
    partial_lse_.resize(size_t(partial_rows_));
#pragma omp parallel
    {
      Scratch sc;
      sc.reserve(max_rows_, D);
#pragma omp for schedule(dynamic, 1)
      for (size_t i = 0; i < items_.size(); ++i) {
        if (on_tile_kernel(items_[i])) process_on_tile_kernel(items_[i]);
        else if (on_decode_kernel(items_[i])) process_on_decode_kernel(items_[i]);
        else process(items_[i], sc);
      }
    }
    merge_splits();
  }

 private:
  int q_len(int b) const { return p_.cu_seqlens_q[b + 1] - p_.cu_seqlens_q[b]; }
  static int rows_of(const WorkItem& it, int group) {
    return (it.q_end - it.q_begin) * group * (it.g1 - it.g0);
  }

  void plan() {
    const int threads = omp_get_max_threads();
    auto tiles_of = [&](int ql) {
      return ql <= kAllHeadsMaxQLen ? 1 : p_.Hkv * ((ql + prefill_q_tile_ - 1) / prefill_q_tile_);
    };
    int64_t base_items = 0;
    for (int b = 0; b < p_.B; ++b) base_items += q_len(b) > 0 ? tiles_of(q_len(b)) : 0;
    const int64_t target = 4LL * threads;
    for (int b = 0; b < p_.B; ++b) {
      const int ql = q_len(b);
      if (ql == 0) continue;
      int splits = 1;
      if (base_items < target) {
        const int by_len = std::max(1, p_.seq_lens[b] / kMinKeysPerSplit);
        splits = int(std::min<int64_t>(by_len, (target + base_items - 1) / base_items));
      }
      const bool all_heads = ql <= kAllHeadsMaxQLen;
      const int heads_per_item = all_heads ? p_.Hkv : 1;
      const int tile = all_heads ? ql : prefill_q_tile_;
      for (int g = 0; g < p_.Hkv; g += heads_per_item)
        for (int q0 = 0; q0 < ql; q0 += tile) {
          for (int sp = 0; sp < splits; ++sp) {
            WorkItem it{b, g, g + heads_per_item, q0, std::min(ql, q0 + tile), sp, splits, -1};
            const int rows = rows_of(it, group_);
            if (!on_tile_kernel(it) && !on_decode_kernel(it))  // the portable path's scratch
              max_rows_ = std::max(max_rows_, rows);
            if (splits > 1) { it.partial = partial_rows_; partial_rows_ += rows; }
            items_.push_back(it);
          }
        }
    }
  }

  // Row r of an item: kv head g0 + r / rows_per_head, then token, then head within group.
  struct RowId { int qi, h; };
  RowId row_id(const WorkItem& it, int r) const {
    const int rows_per_head = (it.q_end - it.q_begin) * group_;
    const int g = it.g0 + r / rows_per_head, rem = r % rows_per_head;
    return {it.q_begin + rem / group_, g * group_ + rem % group_};
  }

  // Prefill-shaped items go to the AVX-512 tile kernel where the build has it.
  bool on_tile_kernel(const WorkItem& it) const {
    return tile_kernel_ && q_len(it.b) > kAllHeadsMaxQLen &&
           rows_of(it, group_) >= kTileKernelMinRows;
  }

  // Decode-shaped items go to the AVX-512 decode kernel where the build has it.
  bool on_decode_kernel(const WorkItem& it) const {
    return decode_kernel_ && q_len(it.b) <= kAllHeadsMaxQLen &&
           (it.q_end - it.q_begin) * group_ <= kDecodeMaxRowsPerKvHead;
  }

  // Keys [k_begin, k_end) of the item: its split's range, without the keys past the last
  // query token's causal limit (never needed).
  void key_range(const WorkItem& it, int& k_begin, int& k_end) const {
    const int seq_len = p_.seq_lens[it.b];
    const int per_split = (seq_len + it.n_splits - 1) / it.n_splits;
    k_begin = std::min(seq_len, it.split * per_split);
    const int k_last = causal_key_count(seq_len, q_len(it.b), it.q_end - 1, p_.causal);
    k_end = std::min({seq_len, k_begin + per_split, k_last});
  }

  void process_on_tile_kernel(const WorkItem& it) {
    PrefillTile tile{it.b, it.g0, it.q_begin, it.q_end, 0, 0, nullptr, nullptr};
    key_range(it, tile.k_begin, tile.k_end);
    if (it.n_splits > 1) {
      tile.partial_out = partial_out_.data() + size_t(it.partial) * D;
      tile.partial_lse = partial_lse_.data() + it.partial;
    }
    prefill_tile_avx512(p_, tile);
  }

  void process_on_decode_kernel(const WorkItem& it) {
    DecodeItem item{it.b, it.g0, it.g1, it.q_begin, it.q_end, 0, 0, nullptr, nullptr};
    key_range(it, item.k_begin, item.k_end);
    if (it.n_splits > 1) {
      item.partial_out = partial_out_.data() + size_t(it.partial) * D;
      item.partial_lse = partial_lse_.data() + it.partial;
    }
    decode_avx512(p_, item);
  }

  void process(const WorkItem& it, Scratch& sc) {
    const int b = it.b;
    const int ql = q_len(b), seq_len = p_.seq_lens[b];
    const int rows = rows_of(it, group_);
    const int rows_per_head = (it.q_end - it.q_begin) * group_;
    const int t0 = p_.cu_seqlens_q[b];
    const T* q = static_cast<const T*>(p_.q);

    for (int r = 0; r < rows; ++r) {  // load the query rows, pre-scaled
      const RowId id = row_id(it, r);
      float* dst = sc.q.data() + size_t(r) * D;
      cpu::to_float_n(q + (t0 + id.qi) * p_.q_stride_t + id.h * p_.q_stride_h, dst, D);
      for (int d = 0; d < D; ++d) dst[d] *= p_.scale;
      sc.kmax[r] = causal_key_count(seq_len, ql, id.qi, p_.causal);
      sc.st[r] = softmax_state_init();
    }
    std::fill(sc.acc.begin(), sc.acc.begin() + size_t(rows) * D, 0.0f);

    int k_begin, k_end;
    key_range(it, k_begin, k_end);

    const T* kc = static_cast<const T*>(p_.k_cache);
    const T* vc = static_cast<const T*>(p_.v_cache);
    const int32_t* table = p_.block_tables + int64_t(b) * p_.block_table_stride;
    float* s = sc.s.data();
    const int64_t key_stride = int64_t(p_.Hkv) * D;  // between keys of one block
    const int item_row_bytes = (it.g1 - it.g0) * D * int(sizeof(T));
    auto chunk_len = [&](int j) { return std::min({kKeyChunk, p_.BS - j % p_.BS, k_end - j}); };
    // Element offset of key j, kv head g0, in the caches.
    auto key_offset = [&](int j) {
      return ((int64_t(table[j / p_.BS]) * p_.BS + j % p_.BS) * p_.Hkv + it.g0) * D;
    };

    for (int j0 = k_begin, n = 0; j0 < k_end; j0 += n) {
      // A chunk never crosses a page block, so its keys are key_stride apart in the cache.
      n = chunk_len(j0);
      const int64_t first = key_offset(j0);
      // Blocks are scattered: fetch the next chunk while this one computes.
      if (j0 + n < k_end) {
        const int64_t next = key_offset(j0 + n);
        prefetch_rows(kc + next, key_stride, chunk_len(j0 + n), item_row_bytes);
        prefetch_rows(vc + next, key_stride, chunk_len(j0 + n), item_row_bytes);
      }
      for (int g = it.g0; g < it.g1; ++g) {
        const int r0 = (g - it.g0) * rows_per_head;
        score_chunk<D>(sc.q.data() + size_t(r0) * D, rows_per_head,
                       kc + first + (g - it.g0) * D, key_stride, n, s + size_t(r0) * kKeyChunk);
      }
      for (int r = 0; r < rows; ++r) {
        float* sr = s + size_t(r) * kKeyChunk;
        const int valid = std::max(0, std::min(n, sc.kmax[r] - j0));  // causal mask
        float tile_max = -INFINITY;
        for (int jj = 0; jj < valid; ++jj) tile_max = std::max(tile_max, sr[jj]);
        sc.alpha[r] = softmax_update_max(sc.st[r], tile_max);
        // Weights exp(s - m) for valid keys, 0 for masked ones and the padding lanes.
        float sum = 0.0f;
        for (int j8 = 0; j8 < kKeyChunk; j8 += 8) {
          const cpu::v8i lane = cpu::v8i{0, 1, 2, 3, 4, 5, 6, 7} + j8;
          const cpu::v8i keep = lane < valid;
          // Masked lanes may hold anything (even -inf - -inf): select them to 0 afterwards.
          const v8f x = keep ? load8(sr + j8) - splat8(sc.st[r].m) : splat8(0.0f);
          const v8f w = keep ? cpu::exp8_nonpositive(x) : splat8(0.0f);
          store8(sr + j8, w);
          sum += cpu::hsum8(w);
        }
        sc.st[r].l += sum;
      }
      for (int g = it.g0; g < it.g1; ++g) {
        const int r0 = (g - it.g0) * rows_per_head;
        accumulate_chunk<D>(sc.acc.data() + size_t(r0) * D, rows_per_head, sc.alpha.data() + r0,
                            s + size_t(r0) * kKeyChunk, vc + first + (g - it.g0) * D,
                            key_stride, n);
      }
    }

    // Write the item: final rows directly, split partials to the merge buffer.
    T* out = static_cast<T*>(p_.out);
    for (int r = 0; r < rows; ++r) {
      const RowId id = row_id(it, r);
      const float inv = softmax_inv_sum(sc.st[r]);
      const float* a = sc.acc.data() + size_t(r) * D;
      if (it.n_splits == 1) {
        cpu::from_float_n(a, out + (t0 + id.qi) * p_.out_stride_t + id.h * p_.out_stride_h, D, inv);
        if (p_.lse) p_.lse[int64_t(t0 + id.qi) * p_.H + id.h] = softmax_lse(sc.st[r]);
      } else {
        float* dst = partial_out_.data() + size_t(it.partial + r) * D;
        for (int d = 0; d < D; ++d) dst[d] = a[d] * inv;
        partial_lse_[it.partial + r] = softmax_lse(sc.st[r]);
      }
    }
  }

  // Merge the n_splits partial results of each split item group (consecutive in items_).
  void merge_splits() {
    std::vector<size_t> firsts;
    for (size_t i = 0; i < items_.size(); ++i)
      if (items_[i].n_splits > 1 && items_[i].split == 0) firsts.push_back(i);
    T* out = static_cast<T*>(p_.out);
#pragma omp parallel for schedule(static)
    for (size_t f = 0; f < firsts.size(); ++f) {
      const WorkItem& it0 = items_[firsts[f]];
      const int rows = rows_of(it0, group_);
      const int t0 = p_.cu_seqlens_q[it0.b];
      std::vector<float> o(D);
      for (int r = 0; r < rows; ++r) {
        float lse = -INFINITY;
        std::fill(o.begin(), o.end(), 0.0f);
        for (int s = 0; s < it0.n_splits; ++s) {
          const WorkItem& it = items_[firsts[f] + s];
          const float* part = partial_out_.data() + size_t(it.partial + r) * D;
          float w_acc, w_new;
          lse = lse_merge_weights(lse, partial_lse_[it.partial + r], w_acc, w_new);
          for (int d = 0; d < D; ++d) o[d] = w_acc * o[d] + w_new * part[d];
        }
        const RowId id = row_id(it0, r);
        cpu::from_float_n(o.data(), out + (t0 + id.qi) * p_.out_stride_t + id.h * p_.out_stride_h,
                          D, 1.0f);
        if (p_.lse) p_.lse[int64_t(t0 + id.qi) * p_.H + id.h] = lse;
      }
    }
  }

  const PagedAttentionParams& p_;
  const int group_;
  const bool tile_kernel_;    // prefill_tile_avx512 is built and takes this shape
  const bool decode_kernel_;  // decode_avx512 is built and takes this shape
  int q_tile_;              // query tokens per item of the portable path
  int prefill_q_tile_;      // query tokens per prefill item
  int max_rows_ = 0;
  std::vector<WorkItem> items_;
  int64_t partial_rows_ = 0;
  std::vector<float> partial_out_, partial_lse_;
};

}  // namespace

void paged_attention_cpu(const PagedAttentionParams& p) {
  CM3RT_DISPATCH_FLOAT(p.dtype, "paged_attention", T, [&] {
    CM3RT_DISPATCH_HEAD_DIM(p.D, "paged_attention", kHeadDim, [&] {
      CpuAttention<T, kHeadDim>(p).run();
    });
  });
}

}  // namespace cm3rt
