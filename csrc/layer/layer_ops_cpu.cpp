// CPU fused layer ops (see layer_ops.h). Rows are independent: OpenMP over rows once there
// are enough of them to pay for the threads (a prefill); a decode step's few rows run on the
// calling thread.
#include <omp.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "cpu/scratch.h"
#include "cpu/vec.h"
#include "layer/layer_ops.h"

namespace cm3rt {

namespace {

// Rows x elements below which the op stays on one thread.
constexpr int64_t kParallelElements = 1 << 16;

using cpu::v8f;

template <typename T>
inline T round_to(float v) { return from_float<T>(v); }
inline v8f load8(const float* p) { return cpu::load8(p); }
inline v8f load8(const bf16_t* p) { return cpu::load8(p); }
inline v8f load8(const half_t* p) { return cpu::load8(p); }
inline void store8(float* p, v8f v) { cpu::store8(p, v); }
inline void store8(bf16_t* p, v8f v) { cpu::store8(p, v); }
inline void store8(half_t* p, v8f v) { cpu::store8(p, v); }

template <typename T>
void rms_norm_impl(const RmsNormParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* res = static_cast<T*>(p.residual);
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out);
  const int H = p.H, H8 = H / 8 * 8;
#pragma omp parallel for schedule(static) if (int64_t(p.T) * H >= kParallelElements)
  for (int t = 0; t < p.T; ++t) {
    const T* xr = x + int64_t(t) * p.x_stride;
    T* o = out + int64_t(t) * H;
    const T* src = xr;
    if (res) {  // residual += x, rounded as HF's add
      T* r = res + int64_t(t) * H;
      for (int h = 0; h < H8; h += 8) store8(r + h, load8(r + h) + load8(xr + h));
      for (int h = H8; h < H; ++h) r[h] = round_to<T>(to_float(r[h]) + to_float(xr[h]));
      src = r;
    }
    v8f acc = cpu::splat8(0.0f);
    for (int h = 0; h < H8; h += 8) {
      const v8f v = load8(src + h);
      acc += v * v;
    }
    float ss = cpu::hsum8(acc);
    for (int h = H8; h < H; ++h) ss += to_float(src[h]) * to_float(src[h]);
    const float inv = 1.0f / std::sqrt(ss / float(H) + p.eps);
    const v8f vinv = cpu::splat8(inv);
    for (int h = 0; h < H8; h += 8)
      store8(o + h, load8(w + h) * cpu::round8<T>(load8(src + h) * vinv));
    for (int h = H8; h < H; ++h)
      o[h] = round_to<T>(to_float(w[h]) * to_float(round_to<T>(to_float(src[h]) * inv)));
  }
}

// LayerNorm + affine of one head v[0, D) into y (fp32 values of the rounded result).
template <typename T>
inline void head_norm(const T* v, const T* gw, const T* gb, int D, float eps, float* y) {
  if (D % 8 == 0) {
    v8f s = cpu::splat8(0.0f);
    for (int d = 0; d < D; d += 8) s += load8(v + d);
    const float mean = cpu::hsum8(s) / float(D);
    const v8f vm = cpu::splat8(mean);
    v8f q = cpu::splat8(0.0f);
    for (int d = 0; d < D; d += 8) {
      const v8f c = load8(v + d) - vm;
      q += c * c;
    }
    const v8f rstd = cpu::splat8(1.0f / std::sqrt(cpu::hsum8(q) / float(D) + eps));
    for (int d = 0; d < D; d += 8) {
      const v8f n = cpu::round8<T>((load8(v + d) - vm) * rstd);
      const v8f scaled = cpu::round8<T>(n * load8(gw + d));
      cpu::store8(y + d, cpu::round8<T>(scaled + load8(gb + d)));
    }
    return;
  }
  float mean = 0.0f;
  for (int d = 0; d < D; ++d) mean += to_float(v[d]);
  mean /= float(D);
  float var = 0.0f;
  for (int d = 0; d < D; ++d) {
    const float c = to_float(v[d]) - mean;
    var += c * c;
  }
  const float rstd = 1.0f / std::sqrt(var / float(D) + eps);
  for (int d = 0; d < D; ++d) {
    const T n = round_to<T>((to_float(v[d]) - mean) * rstd);
    const T scaled = round_to<T>(to_float(n) * to_float(gw[d]));
    y[d] = to_float(round_to<T>(to_float(scaled) + to_float(gb[d])));
  }
}

template <typename T>
void qk_norm_rope_impl(const QkNormRopeParams& p) {
  T* qkv = static_cast<T*>(p.qkv);
  const int D = p.D, half = D / 2, heads = p.Hq + p.Hkv;
#pragma omp parallel if (int64_t(p.T) * heads * D >= kParallelElements)
  {
    float* y = cpu::thread_scratch<float>(2 * size_t(D));  // the normed head, then
    float* cs = y + D;                                      // cos | sin of the position
#pragma omp for schedule(static)
    for (int t = 0; t < p.T; ++t) {
      const float pos = float(p.positions[t]);
      for (int i = 0; i < half; ++i) {
        const float a = pos * p.inv_freq[i];
        cs[i] = std::cos(a);
        cs[half + i] = std::sin(a);
      }
      T* row = qkv + int64_t(t) * p.qkv_stride;
      for (int h = 0; h < heads; ++h) {
        T* v = row + int64_t(h) * D;
        const bool is_q = h < p.Hq;
        const int hh = is_q ? h : h - p.Hq;
        const T* gw = static_cast<const T*>(is_q ? p.q_weight : p.k_weight) + int64_t(hh) * D;
        const T* gb = static_cast<const T*>(is_q ? p.q_bias : p.k_bias) + int64_t(hh) * D;
        head_norm(v, gw, gb, D, p.eps, y);
        int i = 0;
        if (half % 8 == 0) {
          for (; i < half; i += 8) {
            const v8f c = cpu::load8(&cs[i]), s = cpu::load8(&cs[half + i]);
            const v8f x1 = cpu::load8(&y[i]), x2 = cpu::load8(&y[half + i]);
            store8(v + i, x1 * c - x2 * s);
            store8(v + half + i, x2 * c + x1 * s);
          }
        }
        for (; i < half; ++i) {
          const float c = cs[i], s = cs[half + i], x1 = y[i], x2 = y[half + i];
          v[i] = round_to<T>(x1 * c - x2 * s);
          v[half + i] = round_to<T>(x2 * c + x1 * s);
        }
      }
    }
  }
}

template <typename T>
void swiglu_impl(const SwigluParams& p) {
  const T* gu = static_cast<const T*>(p.gate_up);
  T* out = static_cast<T*>(p.out);
  const int I = p.I, I8 = I / 8 * 8;
#pragma omp parallel for schedule(static) if (int64_t(p.T) * I >= kParallelElements)
  for (int t = 0; t < p.T; ++t) {
    const T* g = gu + int64_t(t) * p.gate_up_stride;
    const T* u = g + I;
    T* o = out + int64_t(t) * I;
    for (int i = 0; i < I8; i += 8) {
      // silu(g) = g / (1 + e^-g); through e^-|g| (<= 1, no overflow) for either sign
      const v8f gv = load8(g + i);
      const v8f e = cpu::exp8_nonpositive(gv > 0.0f ? -gv : gv);
      const v8f act = cpu::round8<T>(gv > 0.0f ? gv / (1.0f + e) : gv * e / (1.0f + e));
      store8(o + i, act * load8(u + i));
    }
    for (int i = I8; i < I; ++i) {
      const float gv = to_float(g[i]);
      const T act = round_to<T>(gv / (1.0f + std::exp(-gv)));
      o[i] = round_to<T>(to_float(act) * to_float(u[i]));
    }
  }
}

#define CM3RT_LAYER_DISPATCH(dtype, fn, p, op)                                        \
  switch (dtype) {                                                                    \
    case DType::kFloat32: return fn<float>(p);                                        \
    case DType::kBFloat16: return fn<bf16_t>(p);                                      \
    case DType::kFloat16: return fn<half_t>(p);                                       \
    default: throw std::invalid_argument(std::string(op) + ": unsupported dtype");    \
  }

}  // namespace

void rms_norm_cpu(const RmsNormParams& p) {
  if (p.T == 0) return;
  CM3RT_LAYER_DISPATCH(p.dtype, rms_norm_impl, p, "rms_norm")
}

void qk_norm_rope_cpu(const QkNormRopeParams& p) {
  if (p.T == 0) return;
  CM3RT_LAYER_DISPATCH(p.dtype, qk_norm_rope_impl, p, "qk_norm_rope")
}

void swiglu_cpu(const SwigluParams& p) {
  if (p.T == 0) return;
  CM3RT_LAYER_DISPATCH(p.dtype, swiglu_impl, p, "swiglu")
}

}  // namespace cm3rt
