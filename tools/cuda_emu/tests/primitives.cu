// Unit tests of the emulator's warp primitives and PTX models against their definitions in
// the PTX ISA (shfl.sync, vote.ballot.sync, bar.red.or, atom, ldmatrix, mma.m16n8k16,
// cp.async). Each expectation is written from the ISA's own formulation (its pseudo-code or
// fragment tables, lane -> element), independently of the emulator's implementation (which
// maps element -> lane). Every kernel is launched through the production cuda::launch.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention/cuda_primitives.cuh"
#include "common/dtype.h"
#include "tests/registry.h"

namespace emu::ptx {
float f16_bits_to_float(uint32_t h);  // runtime.cpp
}

namespace emu::selftest {

namespace cuda = cm3rt::cuda;
using cm3rt::bf16_t;
using cm3rt::from_float;
using cm3rt::half_t;
using cm3rt::to_float;

void fail(const std::string& msg) { throw std::runtime_error("primitive test failed: " + msg); }

namespace {

#define EXPECT_EQ(a, b, what)                                                           \
  do {                                                                                  \
    if (!((a) == (b)))                                                                  \
      fail(std::string(what) + ": got " + std::to_string(a) + ", want " + std::to_string(b)); \
  } while (0)

// ---- shfl.sync: the ISA's pseudo-code --------------------------------------------------------
// c = ((32 - w) << 8) | cval (cval 0 for up, 31 otherwise); segmask = c[12:8];
// maxLane = (lane & segmask) | (cval & ~segmask); minLane = lane & segmask;
// up: j = lane - b, pval = j >= maxLane; down: j = lane + b, pval = j <= maxLane;
// bfly: j = lane ^ b, pval = j <= maxLane; idx: j = minLane | (b[4:0] & ~segmask), pval = j <= maxLane;
// !pval: j = lane.
int isa_shfl_src(int mode, int lane, int b, int w) {
  const int segmask = (32 - w) & 31, cval = mode == 1 ? 0 : 31;
  const int maxLane = (lane & segmask) | (cval & ~segmask), minLane = lane & segmask;
  int j = lane;
  bool pval = true;
  switch (mode) {
    case 0: j = minLane | (b & 31 & ~segmask); pval = j <= maxLane; break;
    case 1: j = lane - b; pval = j >= maxLane; break;
    case 2: j = lane + b; pval = j <= maxLane; break;
    case 3: j = lane ^ b; pval = j <= maxLane; break;
  }
  return pval ? j : lane;
}

struct ShflArgs {
  int* out;  // [4 modes][widths 32, 16, 8, 4][64 threads]
  int b;
};

__global__ void shfl_kernel(ShflArgs a) {
  const int t = threadIdx.x;
  const int v = 1000 + t;  // each lane's value names its lane
  const int widths[4] = {32, 16, 8, 4};
  for (int wi = 0; wi < 4; ++wi) {
    const int w = widths[wi];
    a.out[(0 * 4 + wi) * 64 + t] = __shfl_sync(0xffffffffu, v, a.b, w);
    a.out[(1 * 4 + wi) * 64 + t] = __shfl_up_sync(0xffffffffu, v, a.b, w);
    a.out[(2 * 4 + wi) * 64 + t] = __shfl_down_sync(0xffffffffu, v, a.b, w);
    a.out[(3 * 4 + wi) * 64 + t] = __shfl_xor_sync(0xffffffffu, v, a.b, w);
  }
}

EMU_SELFTEST(shfl_sync_modes) {
  std::vector<int> out(4 * 4 * 64);
  Buffer buf(out.data(), out.size() * 4, "out");
  int checked = 0;
  for (int b : {0, 1, 3, 5, 9, 17, 31}) {
    cuda::launch<shfl_kernel>(dim3(1), dim3(64), 0, nullptr, ShflArgs{out.data(), b});
    const int widths[4] = {32, 16, 8, 4};
    for (int mode = 0; mode < 4; ++mode)
      for (int wi = 0; wi < 4; ++wi)
        for (int t = 0; t < 64; ++t) {
          const int lane = t % 32, warp = t / 32;
          const int want = 1000 + warp * 32 + isa_shfl_src(mode, lane, b, widths[wi]);
          EXPECT_EQ(out[(mode * 4 + wi) * 64 + t], want,
                    "shfl mode " + std::to_string(mode) + " width " + std::to_string(widths[wi]) +
                        " b " + std::to_string(b) + " lane " + std::to_string(lane));
          ++checked;
        }
  }
  return std::to_string(checked) + " shuffle results match the ISA pseudo-code";
}

// ---- vote.ballot.sync, bar.red.or (__syncthreads_or), 64-bit shuffles, atomics, clz ----------
struct VoteArgs {
  unsigned* ballots;        // [3 warps]
  int* ors;                 // [2]
  unsigned long long* u64;  // [96] shuffled 64-bit values
  unsigned long long* gmin; // [1]
  int* gsum;                // [1]
};

__global__ void vote_kernel(VoteArgs a) {
  __shared__ int ssum;
  __shared__ unsigned long long smin;
  const int t = threadIdx.x;
  if (t == 0) { ssum = 0; smin = ~0ull; }
  __syncthreads();
  const unsigned b = __ballot_sync(0xffffffffu, (t * 7) % 5 == 0);
  if (t % 32 == 0) a.ballots[t / 32] = b;
  const int none = __syncthreads_or(0);
  const int one = __syncthreads_or(t == 77);
  if (t == 0) { a.ors[0] = none; a.ors[1] = one; }
  const unsigned long long big = (0x123456789ull << 20) + t;
  a.u64[t] = __shfl_xor_sync(0xffffffffu, big, 1);
  atomicAdd(&ssum, t);
  atomicMin(&smin, 1000ull - t);
  atomicMin(a.gmin, 5000ull + ((t * 37) % 96));
  __syncthreads();
  if (t == 0) *a.gsum = ssum + int(smin) + __clz(1 << 12) * 100000;
}

EMU_SELFTEST(vote_reduce_atomic) {
  std::vector<unsigned> ballots(3);
  std::vector<int> ors(2), gsum(1);
  std::vector<unsigned long long> u64(96), gmin(1, ~0ull);
  Buffer b0(ballots.data(), 12, "ballots"), b1(ors.data(), 8, "ors"), b2(u64.data(), 96 * 8, "u64"),
      b3(gmin.data(), 8, "gmin"), b4(gsum.data(), 4, "gsum");
  cuda::launch<vote_kernel>(dim3(1), dim3(96), 0, nullptr,
                            VoteArgs{ballots.data(), ors.data(), u64.data(), gmin.data(), gsum.data()});
  for (int w = 0; w < 3; ++w) {
    unsigned want = 0;  // vote.ballot: bit l set iff lane l's predicate is true
    for (int l = 0; l < 32; ++l)
      if (((w * 32 + l) * 7) % 5 == 0) want |= 1u << l;
    EXPECT_EQ(ballots[w], want, "ballot of warp " + std::to_string(w));
  }
  EXPECT_EQ(ors[0], 0, "__syncthreads_or of no predicate");
  EXPECT_EQ(ors[1], 1, "__syncthreads_or of one thread's predicate");
  for (int t = 0; t < 96; ++t)
    EXPECT_EQ(u64[t], (0x123456789ull << 20) + (t ^ 1), "64-bit shfl of thread " + std::to_string(t));
  EXPECT_EQ(gmin[0], 5000ull, "global 64-bit atomicMin");
  // ssum = 0 + ... + 95 = 4560; smin = 1000 - 95 = 905; __clz(1 << 12) = 19
  EXPECT_EQ(gsum[0], 4560 + 905 + 19 * 100000, "shared atomicAdd / atomicMin / __clz");
  return "ballot, __syncthreads_or, 64-bit shfl, atomics and __clz match their definitions";
}

// ---- ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 -----------------------------------------
// ISA: threads 8i..8i+7 supply the row addresses of matrix i; without .trans thread t
// receives, in register i, the elements (row t/4, cols 2(t%4), 2(t%4)+1) of matrix i, the
// lower column in the lower half; with .trans, elements (rows 2(t%4), 2(t%4)+1; col t/4).
constexpr int kLdStride = 24;  // halves per shared row (48 bytes: rows 16-byte aligned, not packed)

struct LdArgs {
  const uint16_t* src;  // [4 matrices][8 rows][8 cols] codes
  uint32_t* out;        // [2 (plain, trans)][32 lanes][4 regs]
};

__global__ void ldmatrix_kernel(LdArgs a) {
  uint16_t* s = cuda::dynamic_smem<uint16_t>();  // [32 rows][kLdStride]
  const int t = threadIdx.x;
  for (int i = t; i < 32 * 8; i += 32) s[(i / 8) * kLdStride + i % 8] = a.src[i];
  __syncwarp();
  const int m = t / 8, r = t % 8;  // this lane gives row r of matrix m
  uint32_t reg[4];
  cuda::ldmatrix_x4(reg, s + (m * 8 + r) * kLdStride);
  for (int i = 0; i < 4; ++i) a.out[(0 * 32 + t) * 4 + i] = reg[i];
  cuda::ldmatrix_x4_trans(reg, s + (m * 8 + r) * kLdStride);
  for (int i = 0; i < 4; ++i) a.out[(1 * 32 + t) * 4 + i] = reg[i];
}

EMU_SELFTEST(ldmatrix_x4) {
  std::vector<uint16_t> src(4 * 8 * 8);
  for (int m = 0; m < 4; ++m)
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 8; ++c) src[(m * 8 + r) * 8 + c] = uint16_t(m * 1000 + r * 10 + c);
  std::vector<uint32_t> out(2 * 32 * 4);
  Buffer b0(src.data(), src.size() * 2, "src"), b1(out.data(), out.size() * 4, "out");
  cuda::launch<ldmatrix_kernel>(dim3(1), dim3(32), 32 * kLdStride * 2, nullptr,
                                LdArgs{src.data(), out.data()});
  for (int t = 0; t < 32; ++t)
    for (int i = 0; i < 4; ++i) {
      auto code = [&](int r, int c) { return uint32_t(i * 1000 + r * 10 + c); };
      const uint32_t plain = code(t / 4, 2 * (t % 4)) | (code(t / 4, 2 * (t % 4) + 1) << 16);
      const uint32_t trans = code(2 * (t % 4), t / 4) | (code(2 * (t % 4) + 1, t / 4) << 16);
      EXPECT_EQ(out[(0 * 32 + t) * 4 + i], plain, "ldmatrix lane " + std::to_string(t) + " reg " + std::to_string(i));
      EXPECT_EQ(out[(1 * 32 + t) * 4 + i], trans, "ldmatrix.trans lane " + std::to_string(t) + " reg " + std::to_string(i));
    }
  return "ldmatrix .x4 and .x4.trans fragments match the ISA for all 32 lanes";
}

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} ------------------------------------------
// ISA fragment tables (groupID g = lane >> 2, threadID_in_group t = lane % 4), element index e:
//   A (8 halves a0..a7, two per register): row = g for e in {0,1,4,5}, else g + 8;
//       col = 2t + (e & 1) for e < 4, else 2t + (e & 1) + 8.
//   B (4 halves b0..b3): row (k) = 2t + (e & 1) for e < 2, else 2t + (e & 1) + 8; col (n) = g.
//   C, D (4 floats c0..c3): row = g for e < 2, else g + 8; col = 2t + (e & 1).
struct MmaArgs {
  const uint32_t* a;  // [32 lanes][4 regs]
  const uint32_t* b;  // [32][2]
  const float* c;     // [32][4]
  float* d;           // [32][4]
  int bf16;
};

__global__ void mma_kernel(MmaArgs p) {
  const int l = threadIdx.x;
  float d[4] = {p.c[l * 4], p.c[l * 4 + 1], p.c[l * 4 + 2], p.c[l * 4 + 3]};
  const uint32_t a[4] = {p.a[l * 4], p.a[l * 4 + 1], p.a[l * 4 + 2], p.a[l * 4 + 3]};
  if (p.bf16) cuda::Mma<bf16_t>::run(d, a, p.b[l * 2], p.b[l * 2 + 1]);
  else cuda::Mma<half_t>::run(d, a, p.b[l * 2], p.b[l * 2 + 1]);
  for (int i = 0; i < 4; ++i) p.d[l * 4 + i] = d[i];
}

template <typename T>
std::string mma_case(bool bf16, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> small(-8, 8);
  // Small integers: exact in 16 bits, products and 16-term sums exact in fp32, so the
  // result must match the integer reference exactly.
  float A[16][16], B[16][8], Cm[16][8];
  for (auto& r : A) for (float& x : r) x = float(small(rng));
  for (auto& r : B) for (float& x : r) x = float(small(rng));
  for (auto& r : Cm) for (float& x : r) x = float(small(rng) * 3);
  std::vector<uint32_t> a(32 * 4, 0), b(32 * 2, 0);
  std::vector<float> c(32 * 4), d(32 * 4);
  auto bits = [](float x) { return uint32_t(from_float<T>(x).bits); };
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane % 4;
    for (int e = 0; e < 8; ++e) {
      const int row = (e == 0 || e == 1 || e == 4 || e == 5) ? g : g + 8;
      const int col = e < 4 ? 2 * t + (e & 1) : 2 * t + (e & 1) + 8;
      a[lane * 4 + e / 2] |= bits(A[row][col]) << (16 * (e % 2));
    }
    for (int e = 0; e < 4; ++e) {
      const int k = e < 2 ? 2 * t + (e & 1) : 2 * t + (e & 1) + 8;
      b[lane * 2 + e / 2] |= bits(B[k][g]) << (16 * (e % 2));
    }
    for (int e = 0; e < 4; ++e) c[lane * 4 + e] = Cm[e < 2 ? g : g + 8][2 * t + (e & 1)];
  }
  Buffer b0(a.data(), a.size() * 4, "a"), b1(b.data(), b.size() * 4, "b"),
      b2(c.data(), c.size() * 4, "c"), b3(d.data(), d.size() * 4, "d");
  cuda::launch<mma_kernel>(dim3(1), dim3(32), 0, nullptr,
                           MmaArgs{a.data(), b.data(), c.data(), d.data(), bf16 ? 1 : 0});
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = e < 2 ? g : g + 8, col = 2 * t + (e & 1);
      float want = Cm[row][col];
      for (int k = 0; k < 16; ++k) want += A[row][k] * B[k][col];
      if (d[lane * 4 + e] != want)
        fail(std::string(bf16 ? "bf16" : "f16") + " mma D[" + std::to_string(row) + "][" +
             std::to_string(col) + "] (lane " + std::to_string(lane) + " c" + std::to_string(e) +
             "): got " + std::to_string(d[lane * 4 + e]) + ", want " + std::to_string(want));
    }
  }
  return "";
}

EMU_SELFTEST(mma_m16n8k16) {
  for (unsigned seed = 1; seed <= 4; ++seed) {
    mma_case<half_t>(false, seed);
    mma_case<bf16_t>(true, seed);
  }
  return "mma.m16n8k16 f16 and bf16: D = A B + C exact for 8 random integer cases, fragments per the ISA";
}

// ---- cp.async.cg.shared.global, commit_group, wait_group -------------------------------------
struct CpArgs {
  const float* src;  // [64 floats]
  float* out;        // [64 floats]
};

__global__ void cp_async_kernel(CpArgs p) {
  float* s = cuda::dynamic_smem<float>();  // 2 groups of 32 floats
  const int t = threadIdx.x;                // 16 threads: one 16-byte chunk each
  const bool valid = t % 4 != 3;            // every 4th chunk zero-filled (src-size 0)
  cuda::cp_async_16(s + 4 * t, p.src + 4 * t, valid);
  cuda::cp_async_commit();
  cuda::cp_async_wait<0>();
  __syncthreads();
  for (int i = t; i < 64; i += 16) p.out[i] = s[i];
}

EMU_SELFTEST(cp_async) {
  std::vector<float> src(64), out(64, -1.0f);
  for (int i = 0; i < 64; ++i) src[i] = float(i) + 0.5f;
  Buffer b0(src.data(), 256, "src"), b1(out.data(), 256, "out");
  cuda::launch<cp_async_kernel>(dim3(1), dim3(16), 256, nullptr, CpArgs{src.data(), out.data()});
  for (int i = 0; i < 64; ++i) {
    const bool valid = (i / 4) % 4 != 3;
    if (out[i] != (valid ? src[i] : 0.0f))
      fail("cp.async element " + std::to_string(i) + ": got " + std::to_string(out[i]));
  }
  return "cp.async copies 16 bytes, zero-fills with src-size 0, lands by wait_group";
}

// ---- float16 decoding of the mma model vs common/dtype.h, every bit pattern ------------------
EMU_SELFTEST(f16_decode) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = ptx::f16_bits_to_float(h), b = to_float(half_t{uint16_t(h)});
    if (!(a == b || (std::isnan(a) && std::isnan(b))))
      fail("f16 bits " + std::to_string(h) + ": mma model " + std::to_string(a) + ", dtype.h " +
           std::to_string(b));
  }
  return "the mma model decodes all 65536 float16 patterns as common/dtype.h does";
}

}  // namespace
}  // namespace emu::selftest
