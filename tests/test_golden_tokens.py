"""Behaviour is unchanged: the tokens of a fixed table of requests (every task, every
guidance mode, n > 1, retrieval on) equal those recorded before the engine was restructured
(tests/golden_cases.py; tests/data/golden_tokens.json)."""

from __future__ import annotations

import json

import pytest
from golden_cases import GOLDEN_FILE, run_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOLDEN = json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))


def _first_difference(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"position {i}: {x} != recorded {y}"
    return f"length {len(a)} != recorded {len(b)}"


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_tokens_equal_the_recording(which, tmp_path):
    got = run_cases(which, tmp_path)
    want = GOLDEN[which]
    assert sorted(got) == sorted(want)
    wrong = []
    for name, rows in want.items():
        for i, (g, w) in enumerate(zip(got[name], rows)):
            if g != w:
                if name.endswith(":decoded"):
                    wrong.append(f"{name} sample {i}: {g!r} != recorded {w!r}")
                    continue
                what = "prompt" if i == 0 else f"sample {i - 1}"
                wrong.append(f"{name} {what}: {_first_difference(g, w)}")
        if len(got[name]) != len(rows):
            wrong.append(f"{name}: {len(got[name])} rows, recorded {len(rows)}")
    assert not wrong, "tokens differ from the recording:\n" + "\n".join(wrong)
