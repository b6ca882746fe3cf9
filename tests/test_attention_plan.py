"""The CUDA paged-attention launch planner, checked on any machine through
``cm3rt._C.paged_attention_workspace_bytes`` (pure host arithmetic).

The rule under test (csrc/attention/paged_attention_plan.h): only the decode path (every
sequence at most one query row, i.e. max_q_len clamped to T equals 1) uses scratch. Its CTAs
are (sequence, kv head, chunk of up to 4 query heads); when they are fewer than 4 per SM,
each sequence's keys are split so the CTAs reach 4 per SM, with at least 256 keys per split
and at most 32 splits. The workspace holds float32 partial outputs [splits, B, H, D] and
partial lse [splits, B, H], sized for the kv-head count that needs the most splits (the
signature does not carry Hkv, and fewer CTAs mean more splits).
"""

from __future__ import annotations

import math

import pytest

from cm3rt._ext import _C

MAX_HEADS, CTAS_PER_SM, MIN_KEYS, MAX_SPLITS = 4, 4, 256, 32


def spec_splits(B: int, H: int, Hkv: int, max_seq_len: int, sm: int) -> int:
    """Splits the documented rule gives for one kv-head count."""
    ctas = B * Hkv * math.ceil((H // Hkv) / MAX_HEADS)
    target = CTAS_PER_SM * sm
    if sm <= 0 or ctas >= target:
        return 1
    return max(1, min(math.ceil(target / ctas), math.ceil(max_seq_len / MIN_KEYS), MAX_SPLITS))


def spec_bytes(T, B, H, D, max_q_len, max_seq_len, sm) -> int:
    mq = max_q_len if 0 < max_q_len < T else T
    if T == 0 or B == 0 or mq != 1:
        return 0
    best = 0
    for hkv in (d for d in range(1, H + 1) if H % d == 0):
        s = spec_splits(B, H, hkv, max_seq_len, sm)
        best = max(best, 0 if s == 1 else s * B * H * (D + 1) * 4)
    return best


def ws(T, B, H, D, max_q_len, max_seq_len, sm):
    return _C.paged_attention_workspace_bytes(T, B, H, D, max_q_len, max_seq_len, sm)


@pytest.mark.parametrize("max_q_len", [2, 17, -1])
def test_prefill_needs_no_workspace(max_q_len):
    # T = 40 rows: unknown or > 1 max_q_len means the prefill kernels, which need no scratch
    assert ws(40, 3, 8, 128, max_q_len, 4096, 132) == 0


def test_single_decode_row_long_sequence_splits():
    # one sequence, 8 heads, 1056 keys (the shape of tests/test_attention.py's decode case):
    # with Hkv = 1 there are 2 head chunks -> 2 CTAs on 132 SMs; keys allow ceil(1056/256) = 5
    assert ws(1, 1, 8, 128, 1, 1056, 132) == 5 * 1 * 8 * 129 * 4
    assert ws(1, 1, 8, 64, -1, 1056, 132) == 5 * 1 * 8 * 65 * 4  # max_q_len unknown: T = 1


def test_max_q_len_is_clamped_to_T():
    assert ws(1, 1, 8, 128, 7, 4096, 132) == ws(1, 1, 8, 128, 1, 4096, 132) > 0
    assert ws(3, 3, 8, 128, 1, 4096, 132) > 0  # a decode batch, bound given
    assert ws(3, 3, 8, 128, -1, 4096, 132) == 0  # bound unknown: T = 3 rows -> prefill path


@pytest.mark.parametrize(
    "B,H,D,msl,sm",
    [(1, 8, 128, 1056, 132), (4, 32, 128, 4096, 132), (7, 12, 80, 3000, 108), (2, 1, 256, 10**6, 16),
     (64, 64, 128, 8192, 132), (1, 6, 96, 300, 132), (3, 40, 64, 20000, 132)],
)
def test_matches_documented_rule(B, H, D, msl, sm):
    assert ws(B, B, H, D, 1, msl, sm) == spec_bytes(B, B, H, D, 1, msl, sm)


def test_layout_multiple_of_rows_and_bounded_splits():
    for B, H, D in [(1, 8, 128), (5, 12, 80), (2, 64, 256)]:
        n = ws(B, B, H, D, 1, 1 << 20, 1000)
        assert n % (B * H * (D + 1) * 4) == 0
        assert 2 <= n // (B * H * (D + 1) * 4) <= MAX_SPLITS


def test_no_split_when_ctas_fill_the_gpu_or_keys_are_few():
    assert ws(512, 512, 32, 128, 1, 8192, 132) == 0  # 512 * 8 CTAs even at Hkv = 1
    assert ws(1, 1, 8, 128, 1, 256, 132) == 0  # one split's worth of keys
    assert ws(1, 1, 8, 128, 1, 4096, 0) == 0  # SM count unknown
    assert ws(0, 0, 8, 128, 1, 4096, 132) == 0  # empty batch


def test_monotone_in_keys_and_sms():
    # ops.paged_attention sizes the workspace with bounds >= the ones the launch clamps to:
    # more keys or SMs must never mean less scratch
    prev = 0
    for msl in [1, 255, 256, 257, 600, 1024, 5000, 10**5, 10**7]:
        cur = ws(2, 2, 16, 64, 1, msl, 132)
        assert cur >= prev
        prev = cur
    prev = 0
    for sm in [0, 1, 8, 16, 108, 132, 1000]:
        cur = ws(2, 2, 16, 64, 1, 8192, sm)
        assert cur >= prev
        prev = cur


@pytest.mark.parametrize("name,args", [
    ("T", (-1, 1, 8, 64, 1, 100, 132)), ("B", (1, -2, 8, 64, 1, 100, 132)),
    ("H", (1, 1, -8, 64, 1, 100, 132)), ("D", (1, 1, 8, -64, 1, 100, 132)),
])
def test_negative_sizes_raise(name, args):
    with pytest.raises(ValueError, match=f"'{name}' must be >= 0, got -"):
        ws(*args)
