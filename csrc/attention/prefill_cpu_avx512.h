// The AVX-512 prefill tile of the CPU paged attention (prefill_cpu_avx512.cpp).
// paged_attention_cpu.cpp plans the work items and hands the prefill-shaped ones here.
#pragma once

#include "attention/paged_attention.h"

namespace cm3rt {

// Query rows one tile holds at most (tokens x query heads of one kv head).
constexpr int kPrefillTileMaxRows = 64;

// One work item of the prefill kernel: the query rows of kv head g for tokens
// [q_begin, q_end) of sequence b, against keys [k_begin, k_end) of that sequence.
// Row r of the tile is token q_begin + r / group, query head g * group + r % group
// (group = H / Hkv): the row order of paged_attention_cpu.cpp's items, so that split
// partials merge by row. rows = (q_end - q_begin) * group <= kPrefillTileMaxRows.
struct PrefillTile {
  int b, g;
  int q_begin, q_end;
  int k_begin, k_end;   // the item's key split, already clipped to the causal limit
  float* partial_out;   // nullptr: write out (and lse) directly; else [rows, D] normalised
  float* partial_lse;   // [rows], with partial_out
};

// Whether this build has the tile kernel for p (AVX-512 at build time, any dtype and
// supported head dim, group H / Hkv <= kPrefillTileMaxRows).
bool prefill_tile_avx512_available(const PagedAttentionParams& p);

// Runs one tile; only when prefill_tile_avx512_available(p).
void prefill_tile_avx512(const PagedAttentionParams& p, const PrefillTile& tile);

}  // namespace cm3rt
