"""CUDA graphs of decode steps, one per batch-size bucket.

A pure decode step (every scheduled stream computes exactly one token) is the steady state
of image generation: 1024 steps per image. Its launch overhead (dozens of kernels per layer)
dominates small batches, so the step - forward over the paged cache plus the lm_head - is
captured once per bucket of batch sizes and replayed. Inputs are copied into static
buffers; rows past the real batch are padding (slot -1: nothing written; seq_len 1 over
block 0: a harmless read whose output is ignored).
"""

from __future__ import annotations

import logging

import torch

from cm3rt.model.step import StepMetadata

log = logging.getLogger(__name__)


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to 64, then of 32, and ``max_batch`` itself."""
    out = [b for b in (1, 2, 4) if b < max_batch]
    b = 8
    while b < max_batch:
        out.append(b)
        b += 8 if b < 64 else 32
    out.append(max_batch)
    return out


class _Captured:
    def __init__(self, graph, ids, pos, slots, tables, seq_lens, logits, keep):
        self.graph = graph
        self.ids = ids
        self.pos = pos
        self.slots = slots
        self.tables = tables
        self.seq_lens = seq_lens
        self.logits = logits
        self.keep = keep  # buffers the graph reads by address (workspace, cu_seqlens)


class DecodeGraphRunner:
    """Captures and replays ``compute_logits(forward_step(...))`` for decode batches.

    Args:
        model: the model (``forward_step`` / ``compute_logits``).
        kv_layers: the engine's per-layer caches (captured by address: never reallocate).
        max_batch: the largest batch of decode streams.
        max_blocks_per_seq: block-table width (context length / block size, rounded up).
        max_seq_len: the context length (host bound the attention kernels plan with).
    """

    def __init__(self, model, kv_layers, max_batch: int, max_blocks_per_seq: int,
                 max_seq_len: int):
        self.model = model
        self.kv_layers = kv_layers
        self.device = kv_layers[0][0].device
        self.buckets = default_buckets(max_batch)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_seq_len = max_seq_len
        self.graphs: dict[int, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.disabled = False

    def bucket_for(self, batch: int) -> int | None:
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    def _capture(self, bsz: int) -> _Captured:
        dev = self.device
        ids = torch.zeros(bsz, dtype=torch.long, device=dev)
        pos = torch.zeros(bsz, dtype=torch.long, device=dev)
        slots = torch.full((bsz,), -1, dtype=torch.int32, device=dev)
        tables = torch.zeros(bsz, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        seq_lens = torch.ones(bsz, dtype=torch.int32, device=dev)
        cu = torch.arange(bsz + 1, dtype=torch.int32, device=dev)
        meta = StepMetadata(slots=slots, block_tables=tables, seq_lens=seq_lens,
                            cu_seqlens_q=cu, max_q_len=1, max_seq_len=self.max_seq_len)
        # The attention scratch is allocated once, outside the graph (split-KV decode).
        kw = {}
        if hasattr(self.model, "attention_workspace"):
            kw["workspace"] = self.model.attention_workspace(bsz, meta)

        def run():
            with torch.inference_mode():
                hidden = self.model.forward_step(ids, pos, meta, self.kv_layers, **kw)
                return self.model.compute_logits(hidden)

        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy inits and allocator state outside the capture
                run()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = run()
        return _Captured(graph, ids, pos, slots, tables, seq_lens, logits, (cu, kw, meta))

    def run(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
            tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor | None:
        """Logits ``[B, V]`` of a decode batch (host or device inputs), or None when no
        graph applies (too large a batch, or capture failed once: eager from then on)."""
        if self.disabled:
            return None
        B = int(ids.shape[0])
        mb = int(tables.shape[1])
        bsz = self.bucket_for(B)
        if bsz is None or mb > self.max_blocks_per_seq:
            return None
        cap = self.graphs.get(bsz)
        if cap is None:
            try:
                cap = self._capture(bsz)
            except RuntimeError:  # a capture-unsafe model (CUDA refuses an op): run eagerly
                log.warning("CUDA graph capture failed; decoding eagerly", exc_info=True)
                self.disabled = True
                return None
            self.graphs[bsz] = cap
        cap.ids[:B].copy_(ids, non_blocking=True)
        cap.pos[:B].copy_(pos, non_blocking=True)
        cap.slots[:B].copy_(slots, non_blocking=True)
        cap.slots[B:].fill_(-1)
        cap.tables[:B, :mb].copy_(tables, non_blocking=True)
        cap.seq_lens[:B].copy_(seq_lens, non_blocking=True)
        cap.seq_lens[B:].fill_(1)
        cap.graph.replay()
        return cap.logits[:B]
