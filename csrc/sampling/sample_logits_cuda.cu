// sample_logits on CUDA (contract: sample_logits.h): one thread block per group.
//
// The block re-reads its group's input rows for every pass (they stay in L2) and never writes
// anything row-sized: combine -> max, the top-k radix passes, the weight pass (total mass +
// first top-p histogram), the remaining top-p radix passes, then the draw, a block-wide
// integer prefix scan over the kept weights in token order. Per-token math, the radix bucket
// rule and the fixed-point weights are those of sampling_math.h, shared with the CPU kernel,
// so both pick the same token. Only thread mapping, 16-byte loads, shared-memory histograms
// and warp-level scans / reductions are CUDA-specific.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

#include "common/cuda_launch.cuh"
#include "common/device.h"
#include "sampling/philox.h"
#include "sampling/sample_logits.h"

namespace cm3rt {

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

struct SharedState {
  uint64_t hist[kRadixBins];
  uint64_t red[kWarps];
  RadixState radix;
  int flag;
};

// ---- block-wide reductions (all threads call; result broadcast) ------------------------------
__device__ __forceinline__ uint64_t warp_sum(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(kFull, v, o);
    v = w > v ? w : v;
  }
  return v;
}

template <bool kMax>
__device__ uint64_t block_reduce(uint64_t v, SharedState& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) sh.red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? sh.red[lane] : 0;
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) sh.red[0] = v;
  }
  __syncthreads();
  const uint64_t out = sh.red[0];
  __syncthreads();
  return out;
}

// Exclusive prefix sum over the block in thread order; *total gets the block sum.
__device__ uint64_t block_exclusive_scan(uint64_t v, SharedState& sh, uint64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t n = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += n;
  }
  if (lane == 31) sh.red[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const uint64_t x = lane < kWarps ? sh.red[lane] : 0;
    uint64_t wi = x;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint64_t n = __shfl_up_sync(kFull, wi, o);
      if (lane >= o) wi += n;
    }
    if (lane < kWarps) sh.red[lane] = wi - x;  // exclusive warp offsets
    if (lane == kWarps - 1) sh.hist[0] = wi;   // block total (hist is free during the draw)
  }
  __syncthreads();
  const uint64_t out = sh.red[warp] + incl - v;
  *total = sh.hist[0];
  __syncthreads();
  return out;
}

// ---- radix search pieces ---------------------------------------------------------------------
// uint64_t is unsigned long here; CUDA's 64-bit atomicAdd takes unsigned long long.
__device__ __forceinline__ void hist_add(uint64_t* bin, uint64_t w) {
  atomicAdd(reinterpret_cast<unsigned long long*>(bin), static_cast<unsigned long long>(w));
}

__device__ __forceinline__ void hist_clear(SharedState& sh) {
  for (int b = threadIdx.x; b < kRadixBins; b += kThreads) sh.hist[b] = 0;
  __syncthreads();
}

// Warp 0 applies radix_choose's rule to sh.hist: lane L holds bins 255-8L .. 255-8L-7, a warp
// scan gives each bin the mass above it, and the lowest qualifying bin wins. Same result as
// the serial loop in sampling_math.h (the qualifying bins are a contiguous top range).
__device__ void radix_choose_block(SharedState& sh, double limit, int pass) {
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    uint64_t local[8], sum = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      local[j] = sh.hist[kRadixBins - 1 - 8 * lane - j];
      sum += local[j];
    }
    uint64_t incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint64_t n = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += n;
    }
    RadixState s = sh.radix;
    uint64_t cum = s.above + (incl - sum);
    int chosen = -1;
    uint64_t chosen_above = 0, chosen_at = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (local[j] == 0) continue;
      if (!(double(cum) < limit)) break;
      chosen = kRadixBins - 1 - 8 * lane - j;
      chosen_above = cum;
      chosen_at = local[j];
      cum += local[j];
    }
    const unsigned has = __ballot_sync(kFull, chosen >= 0);
    if (has) {
      const int src = 31 - __clz(int(has));
      chosen = __shfl_sync(kFull, chosen, src);
      chosen_above = __shfl_sync(kFull, chosen_above, src);
      chosen_at = __shfl_sync(kFull, chosen_at, src);
      // Every lane read sh.radix above; lane 0 overwrites it. Shuffles and votes order
      // execution but not memory: __syncwarp orders the reads before the write (found by
      // the emulator's racecheck).
      __syncwarp();
      if (lane == 0) {
        const int shift = radix_shift(pass);
        s.prefix |= uint32_t(chosen) << shift;
        s.mask |= uint32_t(kRadixBins - 1) << shift;
        s.above = chosen_above;
        s.at = chosen_at;
        sh.radix = s;
      }
    }
    if (lane == 0) sh.flag = has ? 1 : 0;
  }
  __syncthreads();
}

// ---- row access ------------------------------------------------------------------------------
template <typename T, int VEC>
__device__ __forceinline__ void load_row(const T* row, int t, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const int4 raw = *reinterpret_cast<const int4*>(row + t);
    T vals[VEC];
    memcpy(vals, &raw, 16);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_float(vals[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_float(row[t + k]);
  }
}

template <typename T>
struct DevRows {
  const T* c;
  const T* i;
  const T* u;
  const uint8_t* allowed;
  const uint32_t* bits;
  int32_t mode;
  float s_txt, s_img, cd_min, inv_t;
};

// The scores z of this thread's VEC tokens starting at `base` (-inf past the row end).
template <typename T, int VEC>
__device__ __forceinline__ void scores(const DevRows<T>& r, int V, int base, float (&z)[VEC],
                                       bool& bad) {
  if (base >= V) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = -INFINITY;
    return;
  }
  float c[VEC], iv[VEC], u[VEC];
  load_row<T, VEC>(r.c, base, c);
#pragma unroll
  for (int k = 0; k < VEC; ++k) { iv[k] = 0.0f; u[k] = 0.0f; }
  if (r.i) load_row<T, VEC>(r.i, base, iv);
  if (r.u) load_row<T, VEC>(r.u, base, u);
#pragma unroll
  for (int k = 0; k < VEC; ++k)
    z[k] = token_allowed(r.allowed, r.bits, base + k)
               ? token_score(r.mode, c[k], iv[k], u[k], r.s_txt, r.s_img, r.cd_min, r.inv_t, bad)
               : -INFINITY;
}

// cdk: k-th largest finite allowed cond logit (or -inf when there are fewer than k).
template <typename T, int VEC>
__device__ float cdk_kth(const DevRows<T>& r, int V, int k, SharedState& sh) {
  if (threadIdx.x == 0) sh.radix = radix_init();
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    hist_clear(sh);
    const RadixState s = sh.radix;
    for (int base = threadIdx.x * VEC; base < V; base += kThreads * VEC) {
      float c[VEC];
      load_row<T, VEC>(r.c, base, c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (!token_allowed(r.allowed, r.bits, base + j) || !(fabsf(c[j]) < INFINITY)) continue;
        const uint32_t key = float_key(c[j]);
        if (radix_matches(s, key)) hist_add(&sh.hist[radix_bin(key, pass)], 1ull);
      }
    }
    __syncthreads();
    if (pass == 0) {
      const uint64_t mine = threadIdx.x < kRadixBins ? sh.hist[threadIdx.x] : 0;
      if (block_reduce<false>(mine, sh) < uint64_t(k)) return -INFINITY;
    }
    radix_choose_block(sh, double(k), pass);
    if (!sh.flag) return -INFINITY;
  }
  return key_float(sh.radix.prefix);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) sample_logits_kernel(SampleLogitsParams p) {
  __shared__ SharedState sh;
  const int g = blockIdx.x;
  const int tid = threadIdx.x;
  const GroupConfig cfg = group_config(p, g);
  const int V = p.V;

  // First row of the group: the sum of the stream counts before it.
  int64_t row0 = int64_t(g) * p.streams.scalar;
  if (p.streams.values) {
    uint64_t part = 0;
    for (int j = tid; j < g; j += kThreads) part += uint64_t(int64_t(p.streams.values[j]));
    row0 = int64_t(block_reduce<false>(part, sh));
  }
  if (!group_config_valid(cfg) || row0 < 0 || row0 + cfg.streams > p.R) {
    if (tid == 0) { p.tokens[g] = -1; p.logprobs[g] = NAN; }
    return;
  }

  DevRows<T> r;
  const T* base_row = static_cast<const T*>(p.logits) + row0 * p.row_stride;
  r.c = base_row;
  r.i = cfg.mode == kModeCfg3 ? base_row + p.row_stride : nullptr;
  r.u = cfg.mode == kModeNone ? nullptr : base_row + (rows_used(cfg.mode) - 1) * p.row_stride;
  r.allowed = p.allowed ? p.allowed + g * p.allowed_stride : nullptr;
  r.bits = p.allowed_bits ? p.allowed_bits + g * p.allowed_bits_stride : nullptr;
  r.mode = cfg.mode;
  r.s_txt = cfg.cfg_scale;
  r.s_img = cfg.cfg_image_scale;
  const bool greedy = cfg.temperature == 0.0f;
  r.inv_t = greedy ? 1.0f : 1.0f / cfg.temperature;
  r.cd_min = -INFINITY;
  if (cfg.mode == kModeCdk)
    r.cd_min = cdk_min_logit(cdk_kth<T, VEC>(r, V, cfg.cd_k, sh), cfg.cd_alpha);

  // Pass 1: max z (lowest id on ties, packed as key << 32 | ~id) and the bad-input flag.
  bool bad = false;
  uint64_t best = 0;
  for (int base = tid * VEC; base < V; base += kThreads * VEC) {
    float z[VEC];
    scores<T, VEC>(r, V, base, z, bad);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const uint64_t packed = (uint64_t(float_key(z[k])) << 32) | uint32_t(~uint32_t(base + k));
      best = packed > best ? packed : best;
    }
  }
  const bool any_bad = __syncthreads_or(bad);
  best = block_reduce<true>(best, sh);
  const uint32_t best_key = uint32_t(best >> 32);
  if (any_bad || best_key <= kKeyNegInf) {
    if (tid == 0) { p.tokens[g] = -1; p.logprobs[g] = NAN; }
    return;
  }
  if (greedy) {
    if (tid == 0) { p.tokens[g] = int64_t(~uint32_t(best)); p.logprobs[g] = 0.0f; }
    return;
  }
  const float zmax = key_float(best_key);

  // Top-k threshold on z (counts).
  uint32_t k_min_key = kKeyNegInf + 1;
  if (cfg.top_k > 0 && cfg.top_k < V) {
    if (tid == 0) sh.radix = radix_init();
    for (int pass = 0; pass < kRadixPasses; ++pass) {
      hist_clear(sh);
      const RadixState s = sh.radix;
      for (int base = tid * VEC; base < V; base += kThreads * VEC) {
        float z[VEC];
        scores<T, VEC>(r, V, base, z, bad);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const uint32_t key = float_key(z[k]);
          if (key > kKeyNegInf && radix_matches(s, key))
            hist_add(&sh.hist[radix_bin(key, pass)], 1ull);
        }
      }
      radix_choose_block(sh, double(cfg.top_k), pass);
    }
    k_min_key = sh.radix.prefix;
  }

  // Weight pass: total mass of the top-k set, and the first top-p histogram.
  const bool use_top_p = cfg.top_p < 1.0f;
  auto weight_of = [&](float z) {
    return float_key(z) >= k_min_key ? exp_nonpos(z - zmax) : 0.0f;
  };
  hist_clear(sh);
  uint64_t mass = 0;
  for (int base = tid * VEC; base < V; base += kThreads * VEC) {
    float z[VEC];
    scores<T, VEC>(r, V, base, z, bad);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float w = weight_of(z[k]);
      const uint64_t wf = weight_fixed(w);
      mass += wf;
      if (use_top_p && wf) hist_add(&sh.hist[radix_bin(float_bits(w), 0)], wf);
    }
  }
  const uint64_t total = block_reduce<false>(mass, sh);

  // Top-p threshold on w (mass).
  uint32_t p_min_bits = 1;
  uint64_t kept_mass = total;
  if (use_top_p) {
    const double limit = double(cfg.top_p) * double(total);
    if (tid == 0) sh.radix = radix_init();
    for (int pass = 0; pass < kRadixPasses; ++pass) {
      if (pass > 0) {
        hist_clear(sh);
        const RadixState s = sh.radix;
        for (int base = tid * VEC; base < V; base += kThreads * VEC) {
          float z[VEC];
          scores<T, VEC>(r, V, base, z, bad);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float w = weight_of(z[k]);
            const uint32_t key = float_bits(w);
            const uint64_t wf = weight_fixed(w);
            if (wf && radix_matches(s, key)) hist_add(&sh.hist[radix_bin(key, pass)], wf);
          }
        }
      }
      radix_choose_block(sh, limit, pass);
    }
    p_min_bits = sh.radix.prefix;
    kept_mass = sh.radix.above + sh.radix.at;
  }

  // Draw: first token (id order) whose running kept mass exceeds target. Tiles of
  // kThreads * VEC tokens in order; each thread owns VEC consecutive tokens of a tile.
  const uint64_t target = mulhi64(philox_u64(cfg.seed, cfg.step, kSampleDrawLane), kept_mass);
  uint64_t run = 0;
  if (tid == 0) sh.flag = 0;
  __syncthreads();
  for (int tile = 0; tile < V; tile += kThreads * VEC) {
    const int base = tile + tid * VEC;
    float z[VEC];
    uint64_t wk[VEC];
    uint64_t mine = 0;
    scores<T, VEC>(r, V, base, z, bad);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float w = weight_of(z[k]);
      wk[k] = float_bits(w) >= p_min_bits ? weight_fixed(w) : 0;
      mine += wk[k];
    }
    uint64_t tile_total;
    const uint64_t before = run + block_exclusive_scan(mine, sh, &tile_total);
    if (target >= before && target < before + mine) {  // exactly one thread
      uint64_t acc = before;
      for (int k = 0; k < VEC; ++k) {
        acc += wk[k];
        if (acc > target) {
          p.tokens[g] = base + k;
          p.logprobs[g] = (z[k] - zmax) - logf(float(kept_mass) * (1.0f / kWeightScale));
          sh.flag = 1;
          break;
        }
      }
    }
    __syncthreads();
    if (sh.flag) return;
    run += tile_total;
  }
  if (tid == 0) { p.tokens[g] = -1; p.logprobs[g] = NAN; }  // unreachable: target < kept_mass
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
void launch(const SampleLogitsParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / int(sizeof(T));
  const bool vec = p.V % kVec == 0 && aligned16(p.logits) &&
                   (p.row_stride * int64_t(sizeof(T))) % 16 == 0;
  if (vec)
    cuda::launch<sample_logits_kernel<T, kVec>>(dim3(p.G), dim3(kThreads), 0, stream, p);
  else
    cuda::launch<sample_logits_kernel<T, 1>>(dim3(p.G), dim3(kThreads), 0, stream, p);
}

}  // namespace

void sample_logits_cuda(const SampleLogitsParams& p, void* stream) {
  if (p.G == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: launch<float>(p, s); break;
    case DType::kFloat16: launch<half_t>(p, s); break;
    case DType::kBFloat16: launch<bf16_t>(p, s); break;
    default: throw std::invalid_argument("sample_logits: logits must be float32/float16/bfloat16");
  }
  check_cuda_launch("sample_logits");
}

}  // namespace cm3rt
