"""How one rank of a tensor-parallel group holds its part of a Chameleon model.

Megatron-style split, the one vLLM and gpt-fast use, over ``torch.distributed``:

* QKV and gate/up are column-parallel: rank r holds heads ``[r*H/N, (r+1)*H/N)`` of q, the
  same share of the kv heads, and channels ``[r*I/N, (r+1)*I/N)`` of gate and of up. The qk
  LayerNorm is per head, so each rank normalises its own heads (no collective).
* O and down are row-parallel (the matching input columns): each rank's product is a
  partial sum, added up with one all-reduce per sublayer.
* The embedding and lm_head are vocab-parallel: rank r holds rows ``[r*P, (r+1)*P)`` with
  ``P = ceil(V/N)`` (the last shard padded with zero rows). An embedding lookup is zero
  outside the local rows and summed by an all-reduce; logits are gathered along the vocab.
* Each rank's KV cache holds only its own kv heads.

``TensorParallel()`` (size 1) is the single-process model: every collective is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group.

    Attributes:
        rank: 0 .. size-1; rank 0 (the driver) schedules and samples.
        size: number of ranks.
        group: the ``torch.distributed`` process group of the model's collectives (NCCL on
            CUDA, gloo on the CPU); None with size 1.
        control: a gloo group over the same ranks for the driver's step broadcasts (host
            tensors), the split vLLM uses; equal to ``group`` on the CPU.
        timeout_s: the groups' collective timeout (a dead peer is an error after this).
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    control: Any = None
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"argument 'tensor_parallel_size' must be an int >= 1, got "
                             f"{self.size!r}")
        if not (0 <= self.rank < self.size):
            raise ValueError(f"tensor-parallel rank {self.rank} is outside [0, {self.size})")

    @property
    def enabled(self) -> bool:
        return self.size > 1

    # ----------------------------------------------------------------- the split
    def check(self, config) -> None:
        """ValueError naming the numbers unless ``config`` splits evenly over the ranks."""
        n = self.size
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(config, name)
            if value % n:
                raise ValueError(
                    f"tensor_parallel_size {n} does not divide the model's {name} ({value}): "
                    f"each rank must hold a whole share of the heads and MLP channels; use a "
                    f"tensor_parallel_size that divides {value}")

    def part(self, total: int) -> tuple[int, int]:
        """``(start, count)`` of this rank's share of ``total`` (heads, channels)."""
        count = total // self.size
        return self.rank * count, count

    def vocab_rows(self, vocab_size: int) -> tuple[int, int, int]:
        """``(start, end, padded)``: the vocab rows this rank holds, ``end - start`` of them
        real, ``padded = ceil(V/N)`` allocated (every rank the same, for the gather)."""
        padded = -(-vocab_size // self.size)
        start = min(self.rank * padded, vocab_size)
        return start, min(start + padded, vocab_size), padded

    # ----------------------------------------------------------------- collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (identity with one rank)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, k]`` on every rank -> ``[N, size*k]``, rank r's columns at ``r*k``."""
        if not self.enabled:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


# The single-process model (every collective a no-op): the default of every ``tp`` argument.
SINGLE_PROCESS = TensorParallel()
