"""ModelRunner: one scheduled step on the device.

step inputs (three host -> device copies) -> forward over the paged KV cache (a CUDA graph
for pure decode steps, else eager with one attention workspace planned for the step) ->
logits of the rows that sample -> one fused ``sample_logits`` call for every group.
A CPU step that the whole-step decoder takes is instead one ``CpuDecoder.step_sample``
call on the three packed host buffers: forward, logits and sampling in C++.
"""

from __future__ import annotations

import torch

from cm3rt import ops
from cm3rt.engine.config import EngineConfig
from cm3rt.engine.kv_cache import PagedKVCache
from cm3rt.engine.scheduler import SchedulerOutput
from cm3rt.engine.state import VocabInfo
from cm3rt.engine.step_inputs import StepInputs, pack_step
from cm3rt.engine.tensor_parallel import HEARTBEAT, INIT, STOP, StepChannel

# What the engine calls on a model (ChameleonModel's step API).
MODEL_API = ("config", "device", "forward_step", "compute_logits", "attention_workspace",
             "allocate_kv_cache", "kv_cache_bytes_per_block")


def check_model_api(model) -> None:
    """TypeError naming what is missing unless ``model`` has the step API."""
    missing = [a for a in MODEL_API if not hasattr(model, a)]
    if missing:
        raise TypeError(f"argument 'model' must be a ChameleonModel (or have its step API); "
                        f"{type(model).__name__} lacks {missing}")


def forward_logits(model, cache: PagedKVCache, copies: list[tuple[int, int]], x: StepInputs,
                   has_samples: bool, head=None) -> torch.Tensor | None:
    """The eager step every rank runs: copy-on-write blocks, forward, then the logits of
    the sampling rows (only the ``head`` rows when given); None for a pure-prefill step."""
    cache.copy_blocks(copies)
    # Every layer reuses one attention scratch, planned for this step's shape.
    workspace = model.attention_workspace(x.meta.num_tokens, x.meta)
    # No range check of the ids: a request's prompt ids are checked when it is added
    # (engine/sequence.py) and sampled ids come from the vocabulary; on the CPU the check
    # would be two reductions a step.
    hidden = model.forward_step(x.ids, x.pos, x.meta, cache.layers, validate=False,
                                workspace=workspace)
    if not has_samples:
        return None  # chunks that stop short of the end sample nothing
    return model.compute_logits(hidden.index_select(0, x.rows), head)


class ModelRunner:
    """Runs scheduler steps of ``model`` over its paged KV cache.

    Args:
        model: a ChameleonModel (:data:`MODEL_API`).
        vocab: the special ids (the allowed-token table is built from them once).
        config: the engine's config (block size, CUDA graphs, max_num_seqs).
        num_blocks: KV-cache blocks to allocate.
        max_model_len: the context length.

    With a tensor-parallel model (``model.tp.size > 1``; this is rank 0) every step's
    inputs are first broadcast to the worker ranks (:mod:`.tensor_parallel`), which run
    the same forward; sampling stays here.
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
        tp = getattr(model, "tp", None)
        self.channel = None
        if tp is not None and tp.enabled:
            self.channel = StepChannel(tp)
            self.channel.send_init(num_blocks, self.block_size,
                                   self.image_ids if self.image_head is not None else [])
        # CPU steps whose projections all go to cm3rt's linear kernel run as one C++ call.
        self.cpu_decoder = None
        if config.cpu_decoder and self.channel is None and hasattr(model, "cpu_decoder"):
            heads = [None] if self.image_head is None else [None, self.image_head]
            self.cpu_decoder = model.cpu_decoder(self.cache.layers, heads)  # head 1: images
        self.graphs = None
        if config.use_cuda_graphs and self.device.type == "cuda" and self.channel is None:
            from cm3rt.engine.cuda_graphs import DecodeGraphRunner

            self.graphs = DecodeGraphRunner(model, self.cache.layers, config.max_num_seqs,
                                            -(-max_model_len // self.block_size),
                                            max_model_len)

    def close(self) -> None:
        """Release the worker ranks (tensor parallelism); the runner cannot step after."""
        if self.channel is not None:
            self.channel.send_stop()

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> tuple[list[int], list[float]]:
        """Forward the step's chunks and sample its groups: -> (token, logprob) per group
        of ``out.samples`` (token -1: the sampler found no valid token)."""
        packed = pack_step(out, self.block_size)
        image_only = self.image_head is not None and bool(out.samples) and \
            all(g.in_image for g in out.samples)
        if self.cpu_decoder is not None and not ops.emulating() and \
                self.model.cpu_decoder_takes(packed.dims[0], packed.dims[2],
                                             self.image_head if image_only else None):
            # The whole step, sampling included, in one C++ call on the packed buffers.
            self.cache.copy_blocks(out.copies)
            tokens_list, logprobs_list = self.cpu_decoder.step_sample(
                packed.i64, packed.i32, packed.f32, packed.dims, int(image_only),
                None if image_only else self.allowed_bits)
            if image_only:  # column k of the image head is vocab id image_ids[k]
                tokens_list = [self.image_ids[t] if t >= 0 else t for t in tokens_list]
            return tokens_list, logprobs_list
        x = packed.to_device(self.device)
        logits, copies = None, out.copies
        if self.graphs is not None and out.is_pure_decode and out.samples:
            self.cache.copy_blocks(copies)
            copies = []  # copied: the eager fallback below must not copy again
            logits_all = self.graphs.run(x.ids, x.pos, x.meta.slots, x.meta.block_tables,
                                         x.meta.seq_lens)
            if logits_all is not None:
                logits, image_only = logits_all.index_select(0, x.rows), False
        if logits is None:
            head = self.image_head if image_only else None
            if self.channel is None:
                logits = forward_logits(self.model, self.cache, copies, x, bool(out.samples),
                                        head)
            else:
                with self.channel.lock:  # the broadcast and its collectives, atomically
                    self.channel.send_step(packed, copies, bool(out.samples), image_only)
                    logits = forward_logits(self.model, self.cache, copies, x,
                                            bool(out.samples), head)
            if logits is None:
                return [], []
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


def run_worker(model) -> int:
    """A worker rank's loop under tensor parallelism: mirror every step of the driver's
    :class:`ModelRunner` until it stops; -> the steps run. ``model`` is this rank's share
    (``model.tp.rank > 0``); it needs no scheduler, tokenizer or sampler."""
    channel = StepChannel(model.tp)
    init = channel.recv()
    if init.kind != INIT:
        raise RuntimeError(f"tensor-parallel worker {model.tp.rank}: expected the driver's "
                           f"init message, got kind {init.kind}")
    cache = PagedKVCache(model, init.num_blocks, init.block_size)
    head = model.lm_head_rows(torch.tensor(init.image_ids)) if init.image_ids else None
    device = torch.device(model.device)
    steps = 0
    with torch.inference_mode():
        while True:
            msg = channel.recv()
            if msg.kind == STOP:
                return steps
            if msg.kind == HEARTBEAT:
                continue
            forward_logits(model, cache, msg.copies, msg.packed.to_device(device),
                           msg.has_samples, head if msg.image_only else None)
            steps += 1
