"""The generation engine: requests in, tokens / images out, many requests per step.

One :meth:`Engine.step` reads top to bottom:

1. ``scheduler.schedule()``: which chunks (prefill pieces, decode tokens) of which streams
   run, which groups sample, which blocks are copied on write;
2. ``runner.run(out)``: one varlen forward over every scheduled stream and one fused
   ``sample_logits`` call for every sampling group (cond / [image-cond /] uncond rows
   adjacent);
3. ``scheduler.update(...)``: commit computed tokens, fork waiting samples, append each
   group's token to all its streams, retire finished requests;
4. outputs: finished requests become :class:`RequestOutput` (images decoded, best-of-n).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator

from cm3rt.engine.kv_cache import BlockPool, CacheStats, KVCacheManager, PagedKVCache
from cm3rt.engine.kv_cache import num_blocks_for_budget as _num_blocks_for_budget
from cm3rt.engine.outputs import build_output
from cm3rt.engine.params import SamplingParams
from cm3rt.engine.request import Request, RequestOutput, TokenEvent, TokenPrompt
from cm3rt.engine.runner import ModelRunner
from cm3rt.engine.scheduler import Scheduler, SamplingError
from cm3rt.engine.sequence import build_prompt
from cm3rt.engine.state import FINISHED, RequestState, VocabInfo, new_request_state

__all__ = ["Engine", "SamplingError"]

log = logging.getLogger(__name__)

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError)
_MODEL_API = ("config", "device", "forward_step", "compute_logits", "attention_workspace",
              "allocate_kv_cache", "kv_cache_bytes_per_block")


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"argument '{name}' must be an int >= 1, got {v!r}")
    return v


class Engine:
    """Continuous-batching generation over a paged KV cache.

    Args:
        model: a ChameleonModel (or anything with its step API, ``_MODEL_API``).
        processor: cm3rt Processor (text + image tokenizer) for text / image prompts and
            decoded outputs; without it requests must be :class:`TokenPrompt` ids.
        vocab: the special ids; read from ``processor`` (else the model config) if omitted.
        block_size: tokens per KV-cache block.
        num_blocks: KV-cache blocks (overrides the memory budget).
        kv_cache_bytes / kv_cache_fraction: KV-cache budget in bytes, or as a fraction of
            the device's free memory (default 0.5, capped at what ``max_num_seqs``
            full-length streams could use).
        max_num_seqs: most streams (cond / uncond / image-cond) running at once.
        max_num_batched_tokens: token budget of one step (raised to max_num_seqs if lower).
        enable_prefix_caching: reuse cached full blocks of equal prefixes.
        scorer: default best-of-n ranking, ``scorer(prompt_text, images) -> scores``.
        use_cuda_graphs: replay decode steps from CUDA graphs (CUDA only).
        max_model_len: context length (default the model's max_position_embeddings).
        tokens_per_image: image codes per image (default the image tokenizer's).

    ``raise_step_errors``: a step that raises fails only the requests it carried (logged
    with its traceback) and the engine serves on; with this True (the environment variable
    ``CM3RT_RAISE_STEP_ERRORS=1``, set by the test suite) the exception propagates, so a
    programming error never hides behind a failed request.
    """

    def __init__(self, model, processor=None, *, vocab: VocabInfo | None = None,
                 block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, kv_cache_fraction: float | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, scorer=None,
                 use_cuda_graphs: bool = True, max_model_len: int | None = None,
                 tokens_per_image: int | None = None):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _positive_int(name, locals()[name])
        if scorer is not None and not callable(scorer):
            raise TypeError(f"argument 'scorer' must be callable, got {type(scorer).__name__}")
        missing = [a for a in _MODEL_API if not hasattr(model, a)]
        if missing:
            raise TypeError(f"argument 'model' must be a ChameleonModel (or have its step "
                            f"API); {type(model).__name__} lacks {missing}")
        cfg = model.config
        if vocab is None:
            vocab = (VocabInfo.from_processor(processor, cfg.vocab_size, tokens_per_image)
                     if processor is not None
                     else VocabInfo.from_model_config(cfg, tokens_per_image))
        if vocab.vocab_size != cfg.vocab_size:
            raise ValueError(f"vocab.vocab_size {vocab.vocab_size} != model vocab_size "
                             f"{cfg.vocab_size}")
        ctx = int(cfg.max_position_embeddings)
        if max_model_len is not None:
            if not isinstance(max_model_len, int) or not (2 <= max_model_len <= ctx):
                raise ValueError(f"argument 'max_model_len' must be an int in [2, {ctx}], "
                                 f"got {max_model_len!r}")
            ctx = max_model_len
        self.model, self.processor, self.vocab, self.scorer = model, processor, vocab, scorer
        self.max_model_len = ctx
        self.block_size = block_size
        if num_blocks is None:
            num_blocks = _num_blocks_for_budget(
                model.kv_cache_bytes_per_block(block_size), model.device,
                budget_bytes=kv_cache_bytes, fraction=kv_cache_fraction,
                max_useful_blocks=max_num_seqs * -(-ctx // block_size))
        _positive_int("num_blocks", num_blocks)
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(KVCacheManager(self.pool), max_num_seqs,
                                   max(max_num_batched_tokens, 3, max_num_seqs))
        self.runner = ModelRunner(model, PagedKVCache(model, num_blocks, block_size), vocab,
                                  max_num_seqs=max_num_seqs, max_model_len=ctx,
                                  use_cuda_graphs=use_cuda_graphs)
        self.raise_step_errors = os.environ.get("CM3RT_RAISE_STEP_ERRORS") == "1"
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._requests: dict[str, RequestState] = {}
        self.num_steps = 0

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
        if not isinstance(request.params, SamplingParams):
            raise TypeError(f"argument 'params' must be a SamplingParams, got "
                            f"{type(request.params).__name__}")
        if request.scorer is not None and not callable(request.scorer):
            raise TypeError(f"argument 'scorer' must be callable, got "
                            f"{type(request.scorer).__name__}")
        rid = request.request_id if request.request_id is not None else f"req-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in the engine")
        built = build_prompt(request, self.vocab, self.processor, self.max_model_len)
        req = new_request_state(rid, next(self._arrivals), request, built)
        self.scheduler.check_fits(req, self.max_model_len, self.vocab.tokens_per_image)
        self._requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> RequestOutput:
        """Stop a request and free its blocks; -> its output (finish_reason "aborted")."""
        req = self._requests.get(request_id)
        if req is None:
            raise ValueError(f"unknown request_id {request_id!r}")
        self.scheduler.abort(req)
        return self._finish(req)

    def step(self) -> list[TokenEvent]:
        """Run one scheduler step; returns the tokens it produced (and final outputs)."""
        out = self.scheduler.schedule()
        finished = list(out.failed)
        events: list[TokenEvent] = []
        if not out.empty:
            self.num_steps += 1
            try:
                tokens, logprobs = self.runner.run(out)
            except Exception as exc:
                if self.raise_step_errors:
                    raise
                # e.g. out of device memory: fail the requests of this step, keep the others.
                log.exception("engine step %d failed", self.num_steps)
                for req in {id(c.group.req): c.group.req for c in out.chunks}.values():
                    if req.status != FINISHED:
                        self.scheduler.abort(req, RuntimeError(
                            f"request {req.request_id!r} failed in a model step: {exc}"))
                        finished.append(req)
            else:
                events, done = self.scheduler.update(out, tokens, logprobs, self.vocab,
                                                     self.max_model_len)
                finished += done
        for req in finished:
            events.append(TokenEvent(req.request_id, -1, -1, 0.0, output=self._finish(req)))
        return events

    def _finish(self, req: RequestState) -> RequestOutput:
        """The output of a finished request (decoding or scoring may fail it still)."""
        self._requests.pop(req.request_id, None)
        try:
            req.output = build_output(req, self.processor, self.scorer)
        except Exception as exc:
            if self.raise_step_errors:
                raise
            log.exception("output of request %r failed", req.request_id)
            req.output = RequestOutput(request_id=req.request_id,
                                       prompt_token_ids=list(req.spec.cond), error=exc,
                                       docs=req.docs)
        return req.output

    def stream(self, requests: Iterable[Request | str | TokenPrompt],
               params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Yield every generated token of ``requests`` as it is produced; the last event of
        each request carries its :class:`RequestOutput` (``event.output``). Bad input
        raises before anything is queued; closing the iterator early aborts the rest."""
        ids: list[str] = []
        try:
            for r in requests:
                ids.append(self.add_request(r, params))
            yield from self._run(ids)
        finally:
            for rid in ids:
                if rid in self._requests:
                    self.abort(rid)

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
        ids = [s for s in slots if isinstance(s, str)]
        done = {ev.request_id: ev.output for ev in self._run(ids) if ev.output is not None}
        return [done[s] if isinstance(s, str) else s for s in slots]

    def _run(self, ids: list[str]) -> Iterator[TokenEvent]:
        """Step until the queued requests ``ids`` finished, yielding their events."""
        pending = set(ids)
        while pending:
            if not self.scheduler.has_work:
                raise RuntimeError("engine idle while requests are unfinished (internal error)")
            for ev in self.step():
                if ev.request_id in pending:
                    if ev.output is not None:
                        pending.discard(ev.request_id)
                    yield ev
