"""The metadata of one batched forward step over the paged KV cache.

The engine builds one StepMetadata per scheduler step (prefill chunks and decode tokens of
every running stream packed together) and hands it to ``model.forward_step``; every layer
then writes its new keys/values with ``ops.kv_append(..., slots)`` and attends with
``ops.paged_attention(..., block_tables, seq_lens, cu_seqlens_q)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepMetadata:
    """Layout of the T packed tokens of one step (all tensors on the model's device).

    Attributes:
        slots: int32 [T], cache slot (block * block_size + offset) of each new token; -1 pads.
        block_tables: int32 [B, MB], the blocks of each of the B sequences in the step.
        seq_lens: int32 [B], keys of each sequence after this step's tokens are appended.
        cu_seqlens_q: int32 [B + 1], sequence b owns packed tokens cu[b]:cu[b+1].
        max_q_len: host-side max of the per-sequence new-token counts.
        max_seq_len: host-side max of seq_lens.
    """

    slots: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_q_len: int
    max_seq_len: int

    @property
    def num_tokens(self) -> int:
        return int(self.slots.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])
