// vq_nearest and vq_embed on the CPU (contract: vq.h).
//
// vq_nearest is a GEMM-shaped loop with the argmin fused in: a 3-row x 4-code register tile
// accumulates the dot products along C (both operands are contiguous along C, so nothing is
// packed or copied), a horizontal-add transpose turns the 12 accumulators into 12 dots, and the
// scores ||e||^2 - 2 z.e update each row's running (best score, best code) at once. Codes are
// swept in blocks that stay in L2 while every row of the thread passes over them. Threads
// split the rows; with fewer rows than that pays for, they split the codes and merge the
// per-thread winners in code order (ties stay with the lowest code). Extra memory: O(K) for
// the norms when the caller has none, O(threads * N) for a code split.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CM3RT_VQ_AVX2 1
#else
#define CM3RT_VQ_AVX2 0
#endif

#include "vq/vq.h"
#include "vq/vq_math.h"

namespace cm3rt {

namespace {

constexpr int kMR = 3;           // z rows per register tile
constexpr int kNR = 4;           // codes per register tile
constexpr int kCodeBlock = 128;  // codes kept in L2 while the rows pass (128 KiB at C = 256)

#if CM3RT_VQ_AVX2
// Sums of 4 accumulators -> one 128-bit vector (transpose-add).
inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
inline float sum1(__m256 a) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}
// Pins a loaded vector in a register: GCC otherwise folds the load into every FMA that uses
// it, and the duplicated loads, not the FMAs, become the bottleneck.
#define CM3RT_PIN(v) asm("" : "+x"(v))
#endif

// The hot tile: 3 rows x 4 codes, 12 accumulators + 3 z vectors + 1 code vector = 16 ymm.
inline void dot_tile_3x4(const float* z, int64_t zs, const float* e, int64_t es, int C,
                         float (&dots)[3][4]) {
  int c = 0;
#if CM3RT_VQ_AVX2
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
  const float *z0 = z, *z1 = z + zs, *z2 = z + 2 * zs;
  const float *e0 = e, *e1 = e + es, *e2 = e + 2 * es, *e3 = e + 3 * es;
  for (; c + 8 <= C; c += 8) {
    __m256 v0 = _mm256_loadu_ps(z0 + c), v1 = _mm256_loadu_ps(z1 + c),
           v2 = _mm256_loadu_ps(z2 + c);
    CM3RT_PIN(v0);
    CM3RT_PIN(v1);
    CM3RT_PIN(v2);
    __m256 w = _mm256_loadu_ps(e0 + c);
    CM3RT_PIN(w);
    a00 = _mm256_fmadd_ps(v0, w, a00); a10 = _mm256_fmadd_ps(v1, w, a10);
    a20 = _mm256_fmadd_ps(v2, w, a20);
    w = _mm256_loadu_ps(e1 + c);
    CM3RT_PIN(w);
    a01 = _mm256_fmadd_ps(v0, w, a01); a11 = _mm256_fmadd_ps(v1, w, a11);
    a21 = _mm256_fmadd_ps(v2, w, a21);
    w = _mm256_loadu_ps(e2 + c);
    CM3RT_PIN(w);
    a02 = _mm256_fmadd_ps(v0, w, a02); a12 = _mm256_fmadd_ps(v1, w, a12);
    a22 = _mm256_fmadd_ps(v2, w, a22);
    w = _mm256_loadu_ps(e3 + c);
    CM3RT_PIN(w);
    a03 = _mm256_fmadd_ps(v0, w, a03); a13 = _mm256_fmadd_ps(v1, w, a13);
    a23 = _mm256_fmadd_ps(v2, w, a23);
  }
  _mm_storeu_ps(dots[0], sum4(a00, a01, a02, a03));
  _mm_storeu_ps(dots[1], sum4(a10, a11, a12, a13));
  _mm_storeu_ps(dots[2], sum4(a20, a21, a22, a23));
#else
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) dots[i][j] = 0.0f;
#endif
  for (; c < C; ++c)
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 4; ++j) dots[i][j] = fmaf(z[i * zs + c], e[j * es + c], dots[i][j]);
}

// Edge tiles (fewer rows or codes): one row x one code at a time.
template <int MR, int NR>
inline void dot_tile(const float* z, int64_t zs, const float* e, int64_t es, int C,
                     float (&dots)[MR][NR]) {
  if constexpr (MR == 3 && NR == 4) {
    dot_tile_3x4(z, zs, e, es, C, dots);
  } else {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) {
        const float* zi = z + i * zs;
        const float* ej = e + j * es;
        int c = 0;
        float s = 0.0f;
#if CM3RT_VQ_AVX2
        __m256 acc = _mm256_setzero_ps();
        for (; c + 8 <= C; c += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(zi + c), _mm256_loadu_ps(ej + c), acc);
        s = sum1(acc);
#endif
        for (; c < C; ++c) s = fmaf(zi[c], ej[c], s);
        dots[i][j] = s;
      }
  }
}

struct RowBest {
  float* score;  // [rows] running best score
  int* code;     // [rows] its code (-1: none yet)
};

// Folds the scores of codes k .. k+NR-1 into one row's running best (ascending code order,
// strict "<": the lowest code keeps a tie).
template <int NR>
inline void fold_scores(const float* sq, int k, const float* dots, float& best, int& code) {
#if CM3RT_VQ_AVX2
  if constexpr (NR == 4) {
    // Nothing to do unless some score beats the best (the common case once it is good).
    const __m128 s = _mm_fmadd_ps(_mm_set1_ps(-2.0f), _mm_loadu_ps(dots), _mm_loadu_ps(sq + k));
    if (!_mm_movemask_ps(_mm_cmplt_ps(s, _mm_set1_ps(best)))) return;
  }
#endif
  for (int j = 0; j < NR; ++j) {
    const float sc = vq_score(sq[k + j], dots[j]);
    if (vq_better(sc, best)) { best = sc; code = k + j; }
  }
}

// MR rows against codes [k0, k1), the running bests held in registers meanwhile.
template <int MR>
void rows_over_codes(const VqNearestParams& p, const float* sq, int r, int k0, int k1,
                     RowBest b) {
  const auto* z = static_cast<const float*>(p.z) + int64_t(r) * p.z_stride;
  const auto* cb = static_cast<const float*>(p.codebook);
  float best[MR];
  int code[MR];
  for (int i = 0; i < MR; ++i) { best[i] = b.score[r + i]; code[i] = b.code[r + i]; }
  int k = k0;
  for (; k + kNR <= k1; k += kNR) {
    float dots[MR][kNR];
    dot_tile<MR, kNR>(z, p.z_stride, cb + int64_t(k) * p.cb_stride, p.cb_stride, p.C, dots);
    for (int i = 0; i < MR; ++i) fold_scores<kNR>(sq, k, dots[i], best[i], code[i]);
  }
  for (; k < k1; ++k) {
    float dots[MR][1];
    dot_tile<MR, 1>(z, p.z_stride, cb + int64_t(k) * p.cb_stride, p.cb_stride, p.C, dots);
    for (int i = 0; i < MR; ++i) fold_scores<1>(sq, k, dots[i], best[i], code[i]);
  }
  for (int i = 0; i < MR; ++i) { b.score[r + i] = best[i]; b.code[r + i] = code[i]; }
}

// Rows [r0, r1) against codes [k0, k1), folded into b (indexed by absolute row).
void nearest_range(const VqNearestParams& p, const float* sq, int r0, int r1, int k0, int k1,
                   RowBest b) {
  for (int kb = k0; kb < k1; kb += kCodeBlock) {
    const int kbe = std::min(k1, kb + kCodeBlock);
    int r = r0;
    for (; r + kMR <= r1; r += kMR) rows_over_codes<kMR>(p, sq, r, kb, kbe, b);
    for (; r < r1; ++r) rows_over_codes<1>(p, sq, r, kb, kbe, b);
  }
}

}  // namespace

void vq_nearest_cpu(const VqNearestParams& p) {
  if (p.dtype != DType::kFloat32)
    throw std::invalid_argument("vq_nearest: the CPU kernel takes float32 z and codebook");
  const int N = p.N, K = p.K, C = p.C;
  std::vector<float> sq_own;
  const float* sq = p.sqnorm;
  if (!sq) {
    sq_own.resize(size_t(K));
    const auto* cb = static_cast<const float*>(p.codebook);
#pragma omp parallel for schedule(static) if (int64_t(K) * C > (1 << 16))
    for (int k = 0; k < K; ++k) {
      float s = 0.0f;
      for (int c = 0; c < C; ++c) s = fmaf(cb[k * p.cb_stride + c], cb[k * p.cb_stride + c], s);
      sq_own[size_t(k)] = s;
    }
    sq = sq_own.data();
  }
  const int threads = omp_get_max_threads();
  const int64_t work = int64_t(N) * K * C;
  if (N >= 8 * threads || threads == 1 || work < (1 << 20)) {
    // Split rows: each thread owns whole rows (in blocks of kMR) and all codes.
    std::vector<float> score(size_t(N), INFINITY);
    std::vector<int> code(size_t(N), -1);
    const int tiles = (N + kMR - 1) / kMR;
#pragma omp parallel if (work >= (1 << 20))
    {
      // A contiguous run of rows per thread, so each code block is reused by all of them.
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int r0 = std::min(N, int(int64_t(tiles) * t / nt) * kMR);
      const int r1 = std::min(N, int(int64_t(tiles) * (t + 1) / nt) * kMR);
      if (r0 < r1) nearest_range(p, sq, r0, r1, 0, K, RowBest{score.data(), code.data()});
    }
    for (int r = 0; r < N; ++r) p.out[r] = code[size_t(r)];
    return;
  }
  // Few rows: split codes; merge the per-thread winners in code order.
  std::vector<float> score(size_t(threads) * N, INFINITY);
  std::vector<int> code(size_t(threads) * N, -1);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int k0 = int(int64_t(K) * t / nt), k1 = int(int64_t(K) * (t + 1) / nt);
    // RowBest is indexed by absolute row: offset this thread's slice.
    nearest_range(p, sq, 0, N, k0, k1,
                  RowBest{score.data() + size_t(t) * N, code.data() + size_t(t) * N});
  }
  for (int r = 0; r < N; ++r) {
    float best = INFINITY;
    int64_t c = -1;
    for (int t = 0; t < threads; ++t) {
      const size_t i = size_t(t) * N + r;
      if (code[i] >= 0 && vq_better(score[i], best)) { best = score[i]; c = code[i]; }
    }
    p.out[r] = c;
  }
}

void vq_embed_cpu(const VqEmbedParams& p) {
  const int64_t esize = dtype_size(p.dtype);
  const size_t row_bytes = size_t(p.C) * esize;
  const auto* cb = static_cast<const char*>(p.codebook);
  auto* out = static_cast<char*>(p.out);
#pragma omp parallel for schedule(static) if (p.n * p.C > (1 << 16))
  for (int64_t n = 0; n < p.n; ++n) {
    const int64_t j = p.idx_int64 ? static_cast<const int64_t*>(p.idx)[n]
                                  : static_cast<const int32_t*>(p.idx)[n];
    char* dst = out + n * int64_t(row_bytes);
    if (j < 0 || j >= p.K) std::memset(dst, 0, row_bytes);  // rejected earlier by the bindings
    else std::memcpy(dst, cb + j * p.cb_stride * esize, row_bytes);
  }
}

}  // namespace cm3rt
