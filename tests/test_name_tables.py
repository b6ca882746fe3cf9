"""Each name table is written once in Python; where the C++ side keeps its own (the
sampler's combine-mode enum), a test checks the two agree."""

from __future__ import annotations

import torch

from cm3rt import ops
from cm3rt._ext import _C
from cm3rt.devices import DTYPE_ALIASES, DTYPE_CHOICES, resolve_dtype
from cm3rt.engine.params import GUIDANCE_MODES


def test_guidance_modes_are_the_kernel_combine_modes_in_id_order():
    assert tuple(_C.SAMPLE_MODE_NAMES) == GUIDANCE_MODES
    assert ops.SAMPLE_MODES == {name: i for i, name in enumerate(GUIDANCE_MODES)}


def test_every_dtype_name_resolves_to_a_supported_dtype():
    for name in (*DTYPE_CHOICES, *DTYPE_ALIASES):
        assert resolve_dtype(name) in (torch.float32, torch.bfloat16, torch.float16)
    assert resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype(None, "cuda") is torch.bfloat16
