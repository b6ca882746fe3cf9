// Index arithmetic of the CUDA paged attention kernels, host-and-device so that it can be
// read (and exercised) apart from any thread mapping. Every value read from device memory
// (cu_seqlens_q, seq_lens, block ids) is clamped or checked here, so a bad index tensor can
// make a row wrong (NaN) but never send a kernel out of bounds.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace cm3rt {

// Query rows and keys of one sequence.
struct SeqSpan {
  int t0;       // first query row, in [0, T]
  int q_len;    // query rows, t0 + q_len <= T
  int seq_len;  // keys, in [0, MB * BS]
};

// From the raw device values cu_seqlens_q[b], cu_seqlens_q[b + 1] and seq_lens[b].
CM3RT_HD SeqSpan make_seq_span(int cu0, int cu1, int seq, int T, int MB, int BS) {
  const int t0 = cu0 < 0 ? 0 : (cu0 > T ? T : cu0);
  const int t1 = cu1 < t0 ? t0 : (cu1 > T ? T : cu1);
  const int64_t cap = int64_t(MB) * BS;
  const int s = seq < 0 ? 0 : (int64_t(seq) > cap ? int(cap) : seq);
  return {t0, t1 - t0, s};
}

// Element offset of key position j (0 <= j < seq_len <= MB * BS, so j / BS < MB) of kv
// head g in a contiguous [NB, BS, Hkv, D] cache; -1 when the block id is outside [0, NB).
CM3RT_HD int64_t paged_key_offset(const int32_t* table, int j, int BS, int NB, int Hkv, int g,
                                  int D) {
  const int32_t blk = table[j / BS];
  if (blk < 0 || blk >= NB) return -1;
  return ((int64_t(blk) * BS + j % BS) * Hkv + g) * D;
}

// Keys [begin, end) of split s out of n over the first `keys` keys: contiguous near-equal
// parts (the last ones may be empty, begin == end).
CM3RT_HD void split_key_range(int keys, int s, int n, int& begin, int& end) {
  const int per = (keys + n - 1) / n;
  const int64_t b = int64_t(s) * per;
  begin = b < keys ? int(b) : keys;
  end = begin + per < keys ? begin + per : keys;
}

}  // namespace cm3rt
