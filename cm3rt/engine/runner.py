"""ModelRunner: one scheduled step on the device.

step inputs (three host -> device copies) -> forward over the paged KV cache (a CUDA graph
for pure decode steps, else eager with one attention workspace planned for the step) ->
logits of the rows that sample -> one fused ``sample_logits`` call for every group.
"""

from __future__ import annotations

import torch

from cm3rt import ops
from cm3rt.engine.kv_cache import PagedKVCache
from cm3rt.engine.scheduler import SchedulerOutput
from cm3rt.engine.state import VocabInfo
from cm3rt.engine.step_inputs import build_step_inputs


class ModelRunner:
    """Runs scheduler steps of ``model`` over its paged KV cache.

    Args:
        model: a ChameleonModel (``forward_step`` / ``compute_logits`` /
            ``attention_workspace``).
        cache: the engine's paged KV cache.
        vocab: the special ids (the allowed-token table is built from them once).
        max_num_seqs, max_model_len: bounds of a decode batch (CUDA graph buckets).
        use_cuda_graphs: replay pure decode steps from CUDA graphs (CUDA only).
    """

    def __init__(self, model, cache: PagedKVCache, vocab: VocabInfo, *, max_num_seqs: int,
                 max_model_len: int, use_cuda_graphs: bool = True):
        self.model = model
        self.cache = cache
        self.device = torch.device(model.device)
        self.block_size = cache.block_size
        # Packed int32 [3, ceil(V/32)]: 32x less mask traffic per sampled group than bools.
        self.allowed_bits = ops.pack_allowed_bits(vocab.allowed_table(self.device))
        self.graphs = None
        if use_cuda_graphs and self.device.type == "cuda":
            from cm3rt.engine.cuda_graphs import DecodeGraphRunner

            self.graphs = DecodeGraphRunner(model, cache.layers, max_num_seqs,
                                            -(-max_model_len // self.block_size),
                                            max_model_len)

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> tuple[list[int], list[float]]:
        """Forward the step's chunks and sample its groups: -> (token, logprob) per group
        of ``out.samples`` (token -1: the sampler found no valid token)."""
        self.cache.copy_blocks(out.copies)
        x = build_step_inputs(out, self.block_size, self.device)
        logits = None
        if self.graphs is not None and out.is_pure_decode and out.samples:
            logits_all = self.graphs.run(x.ids, x.pos, x.meta.slots, x.meta.block_tables,
                                         x.meta.seq_lens)
            if logits_all is not None:
                logits = logits_all.index_select(0, x.rows)
        if logits is None:
            # Every layer reuses one attention scratch, planned for this step's shape.
            workspace = self.model.attention_workspace(x.meta.num_tokens, x.meta)
            hidden = self.model.forward_step(x.ids, x.pos, x.meta, self.cache.layers,
                                             workspace=workspace)
            if not out.samples:
                return [], []  # a pure-prefill step (chunks that stop short of the end)
            logits = self.model.compute_logits(hidden.index_select(0, x.rows))
        tokens, logprobs = ops.sample_logits(
            logits, x.streams, mode=x.mode, temperature=x.temperature, top_k=x.top_k,
            top_p=x.top_p, cfg_scale=x.cfg_scale, cfg_image_scale=x.cfg_image_scale,
            cd_alpha=x.cd_alpha, cd_k=x.cd_k,
            allowed_bits=self.allowed_bits.index_select(0, x.mask_kind),
            seed=x.seed, step=x.step,
        )
        # The step's one synchronisation: the host needs the tokens to schedule the next.
        return tokens.tolist(), logprobs.tolist()
