"""The generation engine: requests in, tokens / images out, many requests per step.

One :meth:`Engine.step` = one scheduler decision, one varlen ``forward_step`` over every
scheduled stream (prefill chunks and decode tokens together), one ``compute_logits`` over
the rows that sample, and one ``sample_logits`` call for every sampling group (guided
groups with their cond / [image-cond /] uncond rows adjacent). The sampled token of a
group is appended to all its streams.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator

import torch

from cm3rt import ops
from cm3rt.engine.kv_cache import (
    BlockPool,
    CacheStats,
    KVCacheManager,
    PagedKVCache,
    num_blocks_for_budget,
)
from cm3rt.engine.params import SamplingParams
from cm3rt.engine.request import Request, RequestOutput, SampleOutput, TokenEvent, TokenPrompt
from cm3rt.engine.scheduler import Scheduler, SchedulerOutput
from cm3rt.engine.sequence import build_prompt, default_max_new_tokens
from cm3rt.engine.state import (
    FINISHED,
    RequestState,
    VocabInfo,
    new_request_state,
    processor_parts,
    stream_roles,
)
from cm3rt.engine.step_inputs import build_step_inputs

log = logging.getLogger(__name__)

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


class SamplingError(RuntimeError):
    """The sampler found no valid token (NaN logits or an empty allowed set)."""


class Engine:
    """Continuous-batching generation over a paged KV cache.

    Args:
        model: a ChameleonModel (or anything with its ``forward_step`` / ``compute_logits``
            / ``allocate_kv_cache`` / ``kv_cache_bytes_per_block`` / ``config`` contract).
        processor: cm3rt Processor (text + image tokenizer) for text / image prompts and
            decoded outputs; without it requests must be :class:`TokenPrompt` ids.
        vocab: the special ids; read from ``processor`` (else the model config) when
            omitted.
        block_size: tokens per KV-cache block.
        num_blocks: KV-cache blocks (overrides the memory budget).
        kv_cache_bytes: KV-cache memory budget in bytes ...
        kv_cache_fraction: ... or as a fraction of the device's free memory (default 0.5,
            capped at what ``max_num_seqs`` full-length streams could use).
        max_num_seqs: most streams (cond / uncond / image-cond) running at once.
        max_num_batched_tokens: token budget of one step (raised to max_num_seqs if lower,
            so every decoding stream fits one step).
        enable_prefix_caching: reuse cached full blocks of equal prefixes.
        scorer: best-of-n: ``scorer(prompt_text, images) -> scores``; samples are ranked by
            the score of their first image, best first.
        use_cuda_graphs: replay decode steps from CUDA graphs (CUDA only).
        max_model_len: context length (default the model's max_position_embeddings).
        tokens_per_image: image codes per image (default the image tokenizer's).
    """

    def __init__(self, model, processor=None, *, vocab: VocabInfo | None = None,
                 block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, kv_cache_fraction: float | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, scorer=None,
                 use_cuda_graphs: bool = True, max_model_len: int | None = None,
                 tokens_per_image: int | None = None):
        for name, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"argument '{name}' must be an int >= 1, got {v!r}")
        if scorer is not None and not callable(scorer):
            raise TypeError(f"argument 'scorer' must be callable, got {type(scorer).__name__}")
        missing = [a for a in ("config", "device", "forward_step", "compute_logits",
                               "allocate_kv_cache", "kv_cache_bytes_per_block")
                   if not hasattr(model, a)]
        if missing:
            raise TypeError(f"argument 'model' must be a ChameleonModel (or have its step "
                            f"API); {type(model).__name__} lacks {missing}")
        self.model = model
        self.processor = processor
        cfg = model.config
        if vocab is None:
            if processor is not None:
                vocab = VocabInfo.from_processor(processor, cfg.vocab_size, tokens_per_image)
            else:
                vocab = VocabInfo.from_model_config(cfg, tokens_per_image)
        if vocab.vocab_size != cfg.vocab_size:
            raise ValueError(f"vocab.vocab_size {vocab.vocab_size} != model vocab_size "
                             f"{cfg.vocab_size}")
        self.vocab = vocab
        ctx = int(cfg.max_position_embeddings)
        if max_model_len is not None:
            if not isinstance(max_model_len, int) or not (2 <= max_model_len <= ctx):
                raise ValueError(f"argument 'max_model_len' must be an int in [2, {ctx}], "
                                 f"got {max_model_len!r}")
            ctx = max_model_len
        self.max_model_len = ctx
        self.device = torch.device(model.device)
        self.block_size = block_size
        self.max_blocks_per_seq = -(-ctx // block_size)
        if num_blocks is None:
            num_blocks = num_blocks_for_budget(
                model.kv_cache_bytes_per_block(block_size), self.device,
                budget_bytes=kv_cache_bytes, fraction=kv_cache_fraction,
                max_useful_blocks=max_num_seqs * self.max_blocks_per_seq,
            )
        elif isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"argument 'num_blocks' must be an int >= 1, got {num_blocks!r}")
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.kv = KVCacheManager(self.pool)
        self.cache = PagedKVCache(model, num_blocks, block_size)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max(max_num_batched_tokens, 3,
                                                               max_num_seqs))
        self.scorer = scorer
        # Packed int32 [3, ceil(V/32)]: 32x less mask traffic per sampled group than bools.
        self.allowed_bits = ops.pack_allowed_bits(vocab.allowed_table(self.device))
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._requests: dict[str, RequestState] = {}
        self._outputs: dict[str, RequestOutput] = {}  # finished, for run_until_done callers
        self._awaited: set[str] = set()
        self.graphs = None
        if use_cuda_graphs and self.device.type == "cuda":
            from cm3rt.engine.cuda_graphs import DecodeGraphRunner

            self.graphs = DecodeGraphRunner(model, self.cache.layers, max_num_seqs,
                                            self.max_blocks_per_seq, ctx)
        self.num_steps = 0

    # --- public API ---------------------------------------------------------------------
    @property
    def stats(self) -> CacheStats:
        """KV-cache counters (prefix hits, forks, copy-on-write copies, evictions)."""
        return self.pool.stats

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def add_request(self, request: Request | str | TokenPrompt,
                    params: SamplingParams | None = None) -> str:
        """Validate and queue a request; returns its id. Bad input raises ValueError /
        TypeError naming the argument (nothing is queued then)."""
        if isinstance(request, (str, TokenPrompt)):
            request = Request(prompt=request, params=params or SamplingParams())
        elif not isinstance(request, Request):
            raise TypeError(f"argument 'request' must be a Request, str or TokenPrompt, got "
                            f"{type(request).__name__}")
        elif params is not None:
            raise ValueError("give the SamplingParams inside the Request or as 'params', "
                             "not both")
        p = request.params
        if not isinstance(p, SamplingParams):
            raise TypeError(f"argument 'params' must be a SamplingParams, got "
                            f"{type(p).__name__}")
        rid = request.request_id if request.request_id is not None else f"req-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in the engine")
        task = "interleaved" if isinstance(request.prompt, TokenPrompt) else request.task
        max_new = p.max_new_tokens or default_max_new_tokens(task, self.vocab)
        built = build_prompt(request, self.vocab, self.processor, self.max_model_len, max_new)
        spec = built.spec
        if isinstance(request.prompt, TokenPrompt) and p.max_new_tokens is None:
            max_new = default_max_new_tokens(
                "text_to_image" if spec.cond[-1] == self.vocab.boi_id else "interleaved",
                self.vocab)
        roles = stream_roles(spec, p)
        self._check_fits(roles, spec, p, max_new)
        req = new_request_state(rid, next(self._arrivals), request, spec, p, max_new,
                                self.vocab, prompt_text=built.prompt_text, docs=built.docs)
        self._requests[rid] = req
        self.scheduler.add(req)
        return rid

    def _check_fits(self, roles, spec: TokenPrompt, p: SamplingParams, max_new: int) -> None:
        ctx = self.max_model_len
        for role, ids in roles:
            if len(ids) >= ctx:
                raise ValueError(
                    f"prompt too long: the {role} stream has {len(ids)} tokens, the context "
                    f"holds {ctx} (and at least one new token must fit)"
                )
        n_img = self.vocab.tokens_per_image
        if spec.stop_after_images and spec.cond[-1] == self.vocab.boi_id:
            longest = max(len(ids) for _, ids in roles)
            if longest + n_img + 1 > ctx:
                raise ValueError(
                    f"prompt too long: {longest} prompt tokens + one image ({n_img} codes + "
                    f"end-of-image) exceed the context of {ctx} tokens"
                )
        streams = p.n * len(roles)
        if streams > self.scheduler.max_num_seqs:
            raise ValueError(
                f"n={p.n} samples x {len(roles)} streams = {streams} streams exceed the "
                f"engine's max_num_seqs={self.scheduler.max_num_seqs}"
            )
        need = sum(self.kv.blocks_for(len(ids) + 1) for _, ids in roles)
        if need > self.pool.num_blocks:
            raise ValueError(
                f"prompt too long for the KV cache: it needs {need} blocks, the cache has "
                f"{self.pool.num_blocks}; raise kv_cache_bytes"
            )

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (its output has finish_reason "aborted")."""
        req = self._requests.get(request_id)
        if req is None:
            raise ValueError(f"unknown request_id {request_id!r}")
        self.scheduler.abort(req)
        self._finalize(req)

    def step(self) -> list[TokenEvent]:
        """Run one scheduler step; returns the tokens it produced (and final outputs)."""
        out = self.scheduler.schedule()
        events: list[TokenEvent] = []
        for req in out.failed:
            events.append(self._final_event(req))
        if out.empty:
            return events
        self.num_steps += 1
        try:
            self.cache.copy_blocks(out.copies)
            tokens, logprobs = self._run_model(out)
        except (RuntimeError, ValueError, TypeError) as exc:
            # The step failed as a whole (e.g. out of device memory): fail the requests it
            # carried, free their blocks, keep the engine consistent for the others.
            for req in {id(c.group.req): c.group.req for c in out.chunks}.values():
                if req.status != FINISHED:
                    self.scheduler.abort(req, RuntimeError(
                        f"request {req.request_id!r} failed in a model step: {exc}"))
                    events.append(self._final_event(req))
            log.warning("engine step failed: %s", exc)
            return events
        self.scheduler.commit(out)
        touched: list[RequestState] = []
        for g, tok, lp in zip(out.samples, tokens, logprobs):
            req = g.req
            if req.status == FINISHED:
                continue
            if tok < 0:
                self.scheduler.abort(req, SamplingError(
                    f"request {req.request_id!r}, sample {g.index}: the sampler found no valid "
                    f"token at generated position {len(g.generated)} (NaN logits or no allowed "
                    "token)"))
                events.append(self._final_event(req))
                continue
            for t, l, ii, ip in g.accept(tok, lp, self.vocab, req.max_new_tokens,
                                         self.max_model_len):
                events.append(TokenEvent(req.request_id, g.index, t, l, ii, ip))
            if req not in touched:
                touched.append(req)
        for req in touched:
            if req.status != FINISHED and self.scheduler.release_finished(req):
                events.append(self._final_event(req))
        return events

    def _final_event(self, req: RequestState) -> TokenEvent:
        out = self._finalize(req)
        return TokenEvent(req.request_id, -1, -1, 0.0, output=out)

    def run_until_done(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        """Step until the given requests finished; returns their outputs in order."""
        ids = list(request_ids)
        unknown = [i for i in ids if i not in self._requests and i not in self._outputs]
        if unknown:
            raise ValueError(f"unknown (or already collected) request ids: {unknown}")
        self._awaited.update(ids)
        try:
            while any(i not in self._outputs for i in ids):
                if not self.scheduler.has_work:
                    raise RuntimeError("engine idle while requests are unfinished "
                                       "(internal error)")
                self.step()
            return [self._outputs.pop(i) for i in ids]
        finally:
            self._awaited.difference_update(ids)

    def generate(self, requests: Iterable[Request | str | TokenPrompt],
                 params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run ``requests`` to completion, batched together; outputs in request order.

        A request with bad input comes back with ``.error`` set (a ValueError / TypeError
        naming the problem) and the others are served as usual.
        """
        slots: list[str | RequestOutput] = []
        for r in requests:
            try:
                slots.append(self.add_request(r, params))
            except _USER_ERRORS as exc:
                rid = getattr(r, "request_id", None) or f"rejected-{next(self._ids)}"
                slots.append(RequestOutput(request_id=rid, prompt_token_ids=[], error=exc))
        done = iter(self.run_until_done([s for s in slots if isinstance(s, str)]))
        return [next(done) if isinstance(s, str) else s for s in slots]

    def stream(self, requests: Iterable[Request | str | TokenPrompt],
               params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Yield every generated token of ``requests`` as it is produced; the last event of
        each request carries its :class:`RequestOutput` (``event.output``). Bad input
        raises before anything is queued."""
        ids = []
        try:
            for r in requests:
                ids.append(self.add_request(r, params))
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        pending = set(ids)
        while pending:
            if not self.scheduler.has_work:
                raise RuntimeError("engine idle while requests are unfinished (internal error)")
            for ev in self.step():
                if ev.request_id in pending:
                    if ev.output is not None:
                        pending.discard(ev.request_id)
                    yield ev

    # --- one forward + sample -----------------------------------------------------------
    def _run_model(self, out: SchedulerOutput) -> tuple[list[int], list[float]]:
        x = build_step_inputs(out, self.block_size, self.device)
        if not out.samples:
            # A pure-prefill step (chunks that stop short of the end): no sampling.
            with torch.inference_mode():
                self.model.forward_step(x.ids, x.pos, x.meta, self.cache.layers)
            return [], []
        logits = None
        if self.graphs is not None and out.is_pure_decode:
            logits_all = self.graphs.run(x.ids, x.pos, x.meta.slots, x.meta.block_tables,
                                         x.meta.seq_lens)
            if logits_all is not None:
                logits = logits_all.index_select(0, x.rows)
        if logits is None:
            with torch.inference_mode():
                hidden = self.model.forward_step(x.ids, x.pos, x.meta, self.cache.layers)
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

    # --- outputs ------------------------------------------------------------------------
    def _finalize(self, req: RequestState) -> RequestOutput:
        out = RequestOutput(request_id=req.request_id, prompt_token_ids=list(req.spec.cond),
                            error=req.error, docs=req.docs)
        if req.error is None:
            try:
                out.samples = self._samples_of(req)
            except (RuntimeError, ValueError, TypeError, OSError) as exc:  # report, keep serving
                out.error = exc
        if req.request_id in self._awaited:
            self._outputs[req.request_id] = out  # others get it from the step's events
        req.output = out
        self._requests.pop(req.request_id, None)
        return out

    def _samples_of(self, req: RequestState) -> list[SampleOutput]:
        samples = [SampleOutput(index=g.index, token_ids=list(g.generated),
                                logprobs=list(g.logprobs), finish_reason=g.finish_reason or "")
                   for g in req.groups]
        if self.processor is not None:
            starts_in_image = req.spec.cond[-1] == self.vocab.boi_id
            self._decode_segments(samples, starts_in_image)
        if self.scorer is not None and len(samples) > 1:
            firsts = [s.images[0] if s.images else None for s in samples]
            scored = [i for i, im in enumerate(firsts) if im is not None]
            if scored:
                scores = list(self.scorer(req.prompt_text, [firsts[i] for i in scored]))
                if len(scores) != len(scored):
                    raise ValueError(f"scorer returned {len(scores)} scores for "
                                     f"{len(scored)} images")
                for i, sc in zip(scored, scores):
                    samples[i].score = float(sc)
            samples.sort(key=lambda s: (s.score is None, -(s.score or 0.0), s.index))
        return samples

    def _decode_segments(self, samples: list[SampleOutput], starts_in_image: bool) -> None:
        """Split each sample into text runs and complete image spans; decode all images of
        the request in one batch."""
        v = self.vocab
        tt, it = processor_parts(self.processor)
        pieces: list[list] = []
        codes: list[list[int]] = []
        for s in samples:
            segs: list = []
            text: list[int] = []
            img: list[int] | None = [] if starts_in_image else None
            for t in s.token_ids:
                if img is not None:
                    if t == v.eoi_id:
                        if len(img) == v.tokens_per_image:
                            segs.append(("img", len(codes)))
                            codes.append(img)
                        img = None
                    else:
                        img.append(t)
                elif t == v.boi_id:
                    if text:
                        segs.append(("txt", text))
                        text = []
                    img = []
                elif t != v.eos_id:
                    text.append(t)
            if img is not None and len(img) == v.tokens_per_image:
                segs.append(("img", len(codes)))  # complete but cut before its end-of-image
                codes.append(img)
            if text:
                segs.append(("txt", text))
            pieces.append(segs)
        images: list = []
        if codes:
            code_idx = tt.id_to_code(torch.tensor(codes, dtype=torch.long))
            images = list(it.decode(code_idx))
        for s, segs in zip(samples, pieces):
            s.segments = [tt.decode(x) if kind == "txt" else images[x] for kind, x in segs]

