"""ModelRunner: one scheduled step on the device.

step inputs (three host -> device copies) -> forward over the paged KV cache (a CUDA graph
for pure decode steps, else eager with one attention workspace planned for the step) ->
logits of the rows that sample -> one fused ``sample_logits`` call for every group.
"""

from __future__ import annotations

import torch

from cm3rt import ops
from cm3rt.engine.config import EngineConfig
from cm3rt.engine.kv_cache import PagedKVCache
from cm3rt.engine.scheduler import SchedulerOutput
from cm3rt.engine.state import VocabInfo
from cm3rt.engine.step_inputs import build_step_inputs

# What the engine calls on a model (ChameleonModel's step API).
MODEL_API = ("config", "device", "forward_step", "compute_logits", "attention_workspace",
             "allocate_kv_cache", "kv_cache_bytes_per_block")


def check_model_api(model) -> None:
    """TypeError naming what is missing unless ``model`` has the step API."""
    missing = [a for a in MODEL_API if not hasattr(model, a)]
    if missing:
        raise TypeError(f"argument 'model' must be a ChameleonModel (or have its step API); "
                        f"{type(model).__name__} lacks {missing}")


class ModelRunner:
    """Runs scheduler steps of ``model`` over its paged KV cache.

    Args:
        model: a ChameleonModel (:data:`MODEL_API`).
        vocab: the special ids (the allowed-token table is built from them once).
        config: the engine's config (block size, CUDA graphs, max_num_seqs).
        num_blocks: KV-cache blocks to allocate.
        max_model_len: the context length.
    """

    def __init__(self, model, vocab: VocabInfo, config: EngineConfig, num_blocks: int,
                 max_model_len: int):
        self.model = model
        self.cache = PagedKVCache(model, num_blocks, config.block_size)
        self.device = torch.device(model.device)
        self.block_size = config.block_size
        # Packed int32 [3, ceil(V/32)]: 32x less mask traffic per sampled group than bools.
        self.allowed_bits = ops.pack_allowed_bits(vocab.allowed_table(self.device))
        # Image-span steps sample among the image codes only, in vocab-id order (so the
        # sampler's draw is the one over the full masked vocabulary).
        self.image_ids = sorted(vocab.image_token_ids)
        self.image_head = None
        if config.image_span_logits and hasattr(model, "lm_head_rows"):
            self.image_head = model.lm_head_rows(torch.tensor(self.image_ids))
        self.graphs = None
        if config.use_cuda_graphs and self.device.type == "cuda":
            from cm3rt.engine.cuda_graphs import DecodeGraphRunner

            self.graphs = DecodeGraphRunner(model, self.cache.layers, config.max_num_seqs,
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
        image_only = False
        if logits is None:
            # Every layer reuses one attention scratch, planned for this step's shape.
            workspace = self.model.attention_workspace(x.meta.num_tokens, x.meta)
            hidden = self.model.forward_step(x.ids, x.pos, x.meta, self.cache.layers,
                                             workspace=workspace)
            if not out.samples:
                return [], []  # a pure-prefill step (chunks that stop short of the end)
            image_only = self.image_head is not None and all(g.in_image for g in out.samples)
            # (self.image_head: lm_head rows of the image codes, int8 + scales on int8 models)
            logits = self.model.compute_logits(hidden.index_select(0, x.rows),
                                               self.image_head if image_only else None)
        tokens, logprobs = ops.sample_logits(
            logits, x.streams, mode=x.mode, temperature=x.temperature, top_k=x.top_k,
            top_p=x.top_p, cfg_scale=x.cfg_scale, cfg_image_scale=x.cfg_image_scale,
            cd_alpha=x.cd_alpha, cd_k=x.cd_k,
            allowed_bits=None if image_only else self.allowed_bits.index_select(0, x.mask_kind),
            seed=x.seed, step=x.step,
        )
        # The step's one synchronisation: the host needs the tokens to schedule the next.
        tokens_list = tokens.tolist()
        if image_only:  # column k of the image head is vocab id image_ids[k]
            tokens_list = [self.image_ids[t] if t >= 0 else t for t in tokens_list]
        return tokens_list, logprobs.tolist()
