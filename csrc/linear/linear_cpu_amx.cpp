// AMX linear for bf16 and int8 weights (see linear.h), compiled when the build CPU has
// AMX-TILE / AMX-BF16 / AMX-INT8 (-march=native) and used when the OS grants the tile state.
//
// One tile instruction multiplies a 16 x 64-byte tile A by a 64-byte-row tile B into 16 x 16
// sums (TDPBF16PS: 32 bf16 pairs per row, fp32 sums; TDPBSSD: 64 int8 quads, exact int32
// sums), far above the rate the weights can be read at, so a decode step is left with
// reading the weights. The weights are A, read as they lie ([N, K]: 16 channels x 64 bytes of
// K per tile, straight from memory with the row stride); x is B, packed once per call into
// the pair (bf16) or quad (int8) layout, 16 rows of x per tile (unused columns are zero: a
// tile op costs the same for 1 row as for 16). Result tiles hold [channel][row of x].
//
// * bf16 weights with bf16 x: exact products, fp32 sums.
// * int8 weights (fp32 or bf16 x): x is written as two int8 digits per row,
//   x ~= s (q1 + q2 / 254) with s = max|x_row| / 127 and q2 the rounded remainder of q1
//   (error <= s / 508: 1.6e-5 of the row's largest element). Each digit is an exact int32
//   dot product with the raw int8 weights, and the two are combined in fp32 with the row
//   and channel scales, so int8 weights are never widened. The digits' error in the output
//   is about 1% of the int8 weights' own (measured: max error against float64 below the
//   AVX-512 FMA kernel's). A third digit would need tiles the double buffering uses.
// Each thread takes blocks of two channel tiles (32 channels) sharing each x tile; the
// channels past the last multiple of 16 go to the AVX-512 kernel.
// Prefetch: a tile load reads 16 lines from 16 weight rows, so a block is 32 interleaved
// streams, more than the hardware prefetchers follow. While a block multiplies, the next
// block's rows go into L2 (prefetcht1), one 64-byte column of them per block of K, so they
// arrive a whole block ahead. Measured on a Xeon with AMX (48 weights of 2816 x 1024, 8 rows,
// DRAM-resident, on and off alternated in one process): bf16 median 5.2 -> 7.1 GB/s at one
// thread and 8.1 -> 10.7 at two, int8 3.6 -> 5.3 and 5.9 -> 7.8, the best runs level; at
// 1024 x 2816 level at one thread, +15-30% at two. (Session 10 prefetched only the next
// tile's rows, too close to help: level or slower.) Prefetching the next block in address
// order instead of a column of lines at a time (rows back to back, as the model's weights
// lie), alternated in one process, 12 rounds, x bf16 M = 8, DRAM-resident: int8 3072 x 1024
// 4.96 -> 5.89 GB/s median at one thread, 8.61 -> 9.73 at two; 5632 x 1024 4.83 -> 5.61 and
// 9.04 -> 10.27; 1024 x 2816 level (5.75 / 5.58, 9.12 / 8.97); bf16 +4-11%. Two blocks
// ahead instead of one: level.
#include "linear/linear_cpu_amx.h"

#include "linear/linear_cpu_avx512.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && \
    defined(__AVX512BW__) && defined(__AVX512VL__)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* values.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/scratch.h"
#include "cpu/vec512.h"

namespace cm3rt {

namespace {

constexpr int kTile = 16;        // tile rows: channels of A, K groups of B, rows of C
constexpr int kTileBytes = 64;   // bytes per tile row
constexpr int kDigits = 2;       // int8 digits per element of x (int8 weights)

// Tile registers are not renamed: a load into a tile waits for the last instruction that
// read it. So the weight tiles alternate between two sets from one block of K to the next,
// and the next block's weights load (from memory) while this block's products run.
// Tile numbers are literals, since the tile intrinsics paste them into the instruction.
// bf16: sums C0, C1 of two channel tiles; weights A0, A1 (even blocks of K) or A2, A3
//       (odd); x in B0 (even) or B1 (odd).
// int8: the same, with both digits of 8 rows of x in each B.

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the configuration every kernel here uses: all 8 tiles 16 rows x 64 bytes.
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTile;
    cfg.colsb[t] = kTileBytes;
  }
  _tile_loadconfig(&cfg);
}

bool amx_usable() {
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool bf16 = (d >> 22) & 1u, tile = (d >> 24) & 1u, int8 = (d >> 25) & 1u;
    if (!tile || !bf16 || !int8) return false;
    // Linux hands out the 8 KB tile state only on request (once per process).
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

// 16 rows of A at column byte offset `col` (of `row_bytes` per row): straight from memory,
// or through the zero-padded buf for the last block of K (no read past a row's end).
template <typename T>
inline const void* a_rows(const T* w, int64_t ws, int col, int row_bytes, uint8_t* buf) {
  const char* base = reinterpret_cast<const char*>(w) + col;
  if (col + kTileBytes <= row_bytes) return base;
  const int n = row_bytes - col;
  for (int r = 0; r < kTile; ++r) {
    std::memset(buf + r * kTileBytes, 0, kTileBytes);
    std::memcpy(buf + r * kTileBytes, base + r * ws * int64_t(sizeof(T)), n);
  }
  return buf;
}


// ---- bf16 weights, bf16 x ----------------------------------------------------------------

// B tiles of x rows [0, rows) (at most 16): b[kb][r][m][j] = x[m][32 kb + 2r + j], zero past
// the rows or K. Each 32 elements of a row are 16 pairs (dwords) scattered down a column.
void pack_x_bf16(const bf16_t* x, int64_t xs, int rows, int K, uint16_t* b) {
  const int kb_count = (K + 31) / 32;
  std::memset(b, 0, size_t(kb_count) * kTile * kTileBytes);
  const __m512i down = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                           5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(kTile));
  for (int m = 0; m < rows; ++m) {
    const bf16_t* row = x + int64_t(m) * xs;
    const __m512i at = _mm512_add_epi32(down, _mm512_set1_epi32(m));  // dword (r, m)
    for (int kb = 0; kb < kb_count; ++kb) {
      const int n = std::min(32, K - kb * 32);
      const __mmask32 mask = n == 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1);
      const __m512i pairs = _mm512_maskz_loadu_epi16(mask, row + kb * 32);
      _mm512_i32scatter_epi32(b + size_t(kb) * kTile * 32, at, pairs, 4);
    }
  }
}

// The tile loop of both paths. Each thread takes blocks of two channel tiles (32 channels);
// per group of x rows (the packed B tiles at x_tiles + g * group_bytes, 1 KB per block of
// K) it zeroes C0, C1, runs the blocks of K alternating the tile sets (x in B = 6 / 7,
// weights in A = 2, 3 / 4, 5: a tile load waits for the last instruction that read the
// tile), stores C and calls emit(channel0, group, c) with c = the 16 x 16 sums
// ([channel][column]; fp32 for bf16, int32 for int8).
template <typename TW, typename Emit>
void run_tiles(const LinearParams& p, int n_tiles, int groups, const uint8_t* x_tiles,
               size_t group_bytes, Emit emit) {
  constexpr bool kInt8 = std::is_same_v<TW, int8_t>;
  const TW* w = static_cast<const TW*>(p.w);
  const int64_t ws_bytes = p.w_stride * int64_t(sizeof(TW));
  const int row_bytes = p.K * int(sizeof(TW));
  const int kb_count = (row_bytes + kTileBytes - 1) / kTileBytes, blocks = (n_tiles + 1) / 2;
#pragma omp parallel
  {
    configure_tiles();
    alignas(64) uint8_t abuf[2][kTile * kTileBytes];
    alignas(64) uint8_t cbuf[kTile * kTileBytes];
#pragma omp for schedule(static)
    for (int blk = 0; blk < blocks; ++blk) {
      const int n0 = blk * 2 * kTile;
      const bool two = 2 * blk + 1 < n_tiles;
      const TW* w0 = w + int64_t(n0) * p.w_stride;
      const TW* w1 = w0 + int64_t(kTile) * p.w_stride;
      // The next block's rows (this thread's, under the static schedule) go into L2 while
      // this block multiplies, next_rows 64-byte lines per block of K. Where the rows lie
      // back to back the next block is one span, prefetched in address order (its first
      // next_rows lines, then the next ones, ...), which the L2 streamer follows; otherwise
      // a column of lines, one per row.
      const char* next = blk + 1 < blocks
          ? reinterpret_cast<const char*>(w0 + int64_t(2 * kTile) * p.w_stride) : nullptr;
      const int next_rows = std::min(2 * kTile, p.N - (n0 + 2 * kTile));
      const bool next_is_span = ws_bytes == row_bytes;
      for (int g = 0; g < groups; ++g) {
        const uint8_t* bg = x_tiles + size_t(g) * group_bytes;
        _tile_zero(0);
        _tile_zero(1);
        // One block of K: x into tile B, channel tiles into A / A2 (A2 only with `two`).
#define CM3RT_TILE_PRODUCT(C, A, B)            \
  do {                                         \
    if constexpr (kInt8) _tile_dpbssd(C, A, B); \
    else _tile_dpbf16ps(C, A, B);              \
  } while (0)
#define CM3RT_K_BLOCK(kb, B, A, A2)                                                 \
  do {                                                                              \
    const int col = (kb) * kTileBytes;                                              \
    if (next && g == 0) {                                                           \
      if (next_is_span)                                                             \
        for (int r = 0; r < next_rows; ++r)                                         \
          _mm_prefetch(next + (int64_t(kb) * next_rows + r) * kTileBytes, _MM_HINT_T1); \
      else                                                                          \
        for (int r = 0; r < next_rows; ++r)                                         \
          _mm_prefetch(next + r * ws_bytes + col, _MM_HINT_T1);                     \
    }                                                                               \
    _tile_loadd(B, bg + size_t(kb) * kTile * kTileBytes, kTileBytes);               \
    const void* a0 = a_rows(w0, p.w_stride, col, row_bytes, abuf[0]);               \
    _tile_loadd(A, a0, a0 == abuf[0] ? kTileBytes : ws_bytes);                      \
    CM3RT_TILE_PRODUCT(0, A, B);                                                    \
    if (two) {                                                                      \
      const void* a1 = a_rows(w1, p.w_stride, col, row_bytes, abuf[1]);             \
      _tile_loadd(A2, a1, a1 == abuf[1] ? kTileBytes : ws_bytes);                   \
      CM3RT_TILE_PRODUCT(1, A2, B);                                                 \
    }                                                                               \
  } while (0)
        int kb = 0;
        for (; kb + 2 <= kb_count; kb += 2) {
          CM3RT_K_BLOCK(kb, 6, 2, 3);
          CM3RT_K_BLOCK(kb + 1, 7, 4, 5);
        }
        if (kb < kb_count) CM3RT_K_BLOCK(kb, 6, 2, 3);
#undef CM3RT_K_BLOCK
#undef CM3RT_TILE_PRODUCT
        _tile_stored(0, cbuf, kTileBytes);
        emit(n0, g, cbuf);
        if (two) {
          _tile_stored(1, cbuf, kTileBytes);
          emit(n0 + kTile, g, cbuf);
        }
      }
    }
    _tile_release();
  }
}

void linear_bf16(const LinearParams& p, int n_tiles) {
  const bf16_t* x = static_cast<const bf16_t*>(p.x);
  bf16_t* out = static_cast<bf16_t*>(p.out);
  const int kb_count = (p.K + 31) / 32, groups = (p.M + kTile - 1) / kTile;
  const size_t group_elems = size_t(kb_count) * kTile * 32;
  uint16_t* b = cpu::thread_scratch<uint16_t>(size_t(groups) * group_elems);
  for (int g = 0; g < groups; ++g)
    pack_x_bf16(x + int64_t(g) * kTile * p.x_stride, p.x_stride, std::min(kTile, p.M - g * kTile),
                p.K, b + size_t(g) * group_elems);
  run_tiles<bf16_t>(p, n_tiles, groups, reinterpret_cast<const uint8_t*>(b),
                    group_elems * 2, [&](int c0, int g, const uint8_t* c) {
    const float* sums = reinterpret_cast<const float*>(c);
    for (int m = 0; m < std::min(kTile, p.M - g * kTile); ++m) {
      bf16_t* o = out + int64_t(g * kTile + m) * p.out_stride + c0;
      for (int ch = 0; ch < kTile; ++ch) o[ch] = from_float<bf16_t>(sums[ch * kTile + m]);
    }
  });
}

// ---- int8 weights, fp32 / bf16 x -------------------------------------------------------

// Rows of x per int8 B tile: its 16 columns hold both digits of 8 rows, so one tile
// instruction gives both digits' sums (digit j of row m in column 8 j + m).
constexpr int kRowsPerDigitTile = kTile / kDigits;

// The B tiles of x rows [0, rows) (at most 8): d[kb][r][8 j + m][i] = digit j of
// x[m][64 kb + 4 r + i] (zero past the rows or K), and each row's scale s[m]
// (x ~= s (q1 + q2 / 254)). Each 16 elements of a row give 4 quads (dwords) per digit,
// scattered down a column.
template <typename TX>
void pack_x_digits(const TX* x, int64_t xs, int rows, int K, int8_t* d, float* s) {
  const int kb_count = (K + 63) / 64;
  std::memset(d, 0, size_t(kb_count) * kTile * kTileBytes);
  for (int m = 0; m < kRowsPerDigitTile; ++m) s[m] = 0.0f;
  const __m128i down = _mm_set_epi32(3 * kTile, 2 * kTile, kTile, 0);
  for (int m = 0; m < rows; ++m) {
    const TX* row = x + int64_t(m) * xs;
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 non_finite = 0;  // lanes that met a NaN or infinity (x - x is NaN for them)
    for (int k = 0; k < K; k += 16) {
      const __mmask16 mask = cpu::first_lanes(K - k);
      const __m512 v = cpu::load16(row + k, mask);
      const __m512 d = _mm512_sub_ps(v, v);
      non_finite |= _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    // A row with NaN or infinity gets zero digits and a NaN scale, so all its outputs are
    // NaN (as fp32 math would make them non-finite) and the other rows are untouched; max
    // alone would drop a NaN, and digits of infinity are no numbers.
    const bool finite = non_finite == 0;
    const float scale = !finite ? std::numeric_limits<float>::quiet_NaN()
                                : amax > 0.0f ? amax / 127.0f : 1.0f;
    s[m] = scale;
    if (!finite) continue;
    const __m512 inv = _mm512_set1_ps(1.0f / scale), radix = _mm512_set1_ps(254.0f);
    for (int k = 0; k < K; k += 16) {
      const __mmask16 mask = cpu::first_lanes(K - k);
      // quads r0 .. r0 + 3 of block k / 64, in row m's column of each digit
      const __m128i at = _mm_add_epi32(down, _mm_set1_epi32(((k % 64) / 4) * kTile + m));
      int8_t* base = d + size_t(k / 64) * kTile * kTileBytes;
      __m512 rest = _mm512_mul_ps(cpu::load16(row + k, mask), inv);  // in [-127, 127]
      for (int j = 0; j < kDigits; ++j) {
        const __m512 q = _mm512_roundscale_ps(rest, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_i32scatter_epi32(base + 4 * j * kRowsPerDigitTile, at,
                             _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)), 4);
        rest = _mm512_mul_ps(_mm512_sub_ps(rest, q), radix);  // |rest - q| <= 1/2
      }
    }
  }
}

template <typename TX>
void linear_int8(const LinearParams& p, int n_tiles) {
  const TX* x = static_cast<const TX*>(p.x);
  TX* out = static_cast<TX*>(p.out);
  constexpr int R = kRowsPerDigitTile;
  const int kb_count = (p.K + 63) / 64, groups = (p.M + R - 1) / R;
  const size_t group_bytes = size_t(kb_count) * kTile * kTileBytes;
  int8_t* digits = cpu::thread_scratch<int8_t>(size_t(groups) * group_bytes);
  float* row_scales = cpu::thread_scratch<float>(size_t(groups) * R);
  for (int g = 0; g < groups; ++g)
    pack_x_digits(x + int64_t(g) * R * p.x_stride, p.x_stride, std::min(R, p.M - g * R), p.K,
                  digits + size_t(g) * group_bytes, row_scales + g * R);
  run_tiles<int8_t>(p, n_tiles, groups, reinterpret_cast<const uint8_t*>(digits),
                    group_bytes, [&](int c0, int g, const uint8_t* c) {
    const int32_t* sums = reinterpret_cast<const int32_t*>(c);
    const float* sx = row_scales + g * R;
    for (int m = 0; m < std::min(R, p.M - g * R); ++m) {
      TX* o = out + int64_t(g * R + m) * p.out_stride + c0;
      for (int ch = 0; ch < kTile; ++ch) {
        const int32_t* row = sums + ch * kTile;  // both digits of every row of x
        const float dot = float(row[m]) + float(row[R + m]) * (1.0f / 254.0f);
        o[ch] = from_float<TX>(dot * sx[m] * p.scales[c0 + ch]);
      }
    }
  });
}

// The AMX kernel over the channels that fill whole tiles, the AVX-512 kernel over the rest.
template <typename Run>
void with_channel_tail(const LinearParams& p, int elem_out, Run run) {
  const int n_tiles = p.N / kTile;
  if (n_tiles > 0) run(n_tiles);
  const int done = n_tiles * kTile;
  if (done == p.N) return;
  LinearParams tail = p;  // the last N % 16 channels
  tail.w = static_cast<const char*>(p.w) + int64_t(done) * p.w_stride * dtype_size(p.w_dtype);
  tail.scales = p.scales ? p.scales + done : nullptr;
  tail.out = static_cast<char*>(p.out) + int64_t(done) * elem_out;
  tail.N = p.N - done;
  linear_cpu_avx512(tail);
}

}  // namespace

bool linear_cpu_amx_available() { return amx_usable(); }

bool linear_cpu_amx(const LinearParams& p) {
  if (!amx_usable()) return false;
  if (p.w_dtype == DType::kInt8 && p.x_dtype == DType::kFloat32) {
    with_channel_tail(p, 4, [&](int n_tiles) { linear_int8<float>(p, n_tiles); });
    return true;
  }
  if (p.w_dtype == DType::kInt8 && p.x_dtype == DType::kBFloat16) {
    with_channel_tail(p, 2, [&](int n_tiles) { linear_int8<bf16_t>(p, n_tiles); });
    return true;
  }
  if (p.w_dtype == DType::kBFloat16 && p.x_dtype == DType::kBFloat16) {
    with_channel_tail(p, 2, [&](int n_tiles) { linear_bf16(p, n_tiles); });
    return true;
  }
  return false;
}

}  // namespace cm3rt

#else  // no AMX at build time

namespace cm3rt {
bool linear_cpu_amx_available() { return false; }
bool linear_cpu_amx(const LinearParams&) { return false; }
}  // namespace cm3rt

#endif
