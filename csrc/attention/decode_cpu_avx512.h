// The AVX-512 decode kernel of the CPU paged attention (decode_cpu_avx512.cpp).
// paged_attention_cpu.cpp plans the work items and hands the decode-shaped ones here
// (q_len <= kAllHeadsMaxQLen there: decode and speculative verify).
#pragma once

#include "attention/paged_attention.h"

namespace cm3rt {

// Query rows per kv head (tokens x query heads of one kv head) an item may hold, as for the
// prefill tile kernel. Larger groups (more than 16 query heads per kv head with 4 tokens)
// are no shape of the models here; they stay on the portable path, which the tests thereby
// keep exercising on AVX-512 builds.
constexpr int kDecodeMaxRowsPerKvHead = 64;

// One work item of the decode kernel: query tokens [q_begin, q_end) of sequence b for kv
// heads [g0, g1), against keys [k_begin, k_end) of that sequence. With R = (q_end - q_begin)
// * group rows per kv head (R <= kDecodeMaxRowsPerKvHead), row r of the item is kv head
// g0 + r / R, token q_begin + (r % R) / group, query head (g0 + r / R) * group + r % group:
// the row order of paged_attention_cpu.cpp's items, so that split partials merge by row.
struct DecodeItem {
  int b;
  int g0, g1;
  int q_begin, q_end;
  int k_begin, k_end;   // the item's key split, already clipped to the causal limit
  float* partial_out;   // nullptr: write out (and lse) directly; else [rows, D] normalised
  float* partial_lse;   // [rows], with partial_out
};

// Whether this build has the decode kernel for p (AVX-512 F/BW/VL at build time, any dtype
// and supported head dim, group H / Hkv <= kDecodeMaxRowsPerKvHead).
bool decode_avx512_available(const PagedAttentionParams& p);

// Runs one item; only when decode_avx512_available(p).
void decode_avx512(const PagedAttentionParams& p, const DecodeItem& item);

}  // namespace cm3rt
