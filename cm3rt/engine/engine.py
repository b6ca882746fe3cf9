"""The generation engine: requests in, tokens / images out, many requests per step.

One :meth:`Engine.step` reads top to bottom:

1. ``scheduler.schedule()``: the chunks (prefill pieces, decode tokens) that run, the
   groups that sample, the blocks copied on write;
2. ``runner.run(out)``: one varlen forward over every scheduled stream, one fused
   ``sample_logits`` call for every group (cond / [image-cond /] uncond rows adjacent);
3. ``scheduler.update(...)``: commit computed tokens, fork waiting samples, append each
   group's token to all its streams, retire finished requests;
4. outputs: finished requests become :class:`RequestOutput` (images decoded, best-of-n);
   a document sweep's candidates are folded into its one output (:mod:`.doc_sweep`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator

from cm3rt.engine.config import EngineConfig
from cm3rt.engine.doc_sweep import DocSweeps
from cm3rt.engine.kv_cache import BlockPool, CacheStats, KVCacheManager
from cm3rt.engine.outputs import build_output, failed_output
from cm3rt.engine.params import SamplingParams
from cm3rt.engine.request import Request, RequestOutput, TokenEvent, TokenPrompt
from cm3rt.engine.runner import ModelRunner, check_model_api
from cm3rt.engine.scheduler import SamplingError, Scheduler
from cm3rt.engine.sequence import build_prompt
from cm3rt.engine.state import RequestState, VocabInfo, new_request_state

__all__ = ["Engine", "SamplingError"]

log = logging.getLogger(__name__)

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


class Engine:
    """Continuous-batching generation over a paged KV cache.

    Args:
        model: a ChameleonModel (or anything with its step API, ``runner.MODEL_API``).
        processor: cm3rt Processor (text + image tokenizer) for text / image prompts and
            decoded outputs; without it requests must be :class:`TokenPrompt` ids.
        vocab: the special ids; read from ``processor`` (else the model config) if omitted.
        scorer: default best-of-n ranking, ``scorer(prompt_text, images) -> scores``.
        **config: :class:`EngineConfig` fields (block_size, num_blocks, kv_cache_bytes,
            max_num_seqs, max_num_batched_tokens, use_cuda_graphs, max_model_len ...).

    A step that raises fails only the requests it carried (logged with its traceback);
    ``raise_step_errors`` (``CM3RT_RAISE_STEP_ERRORS=1``, set by the tests) re-raises it.
    """

    def __init__(self, model, processor=None, *, vocab: VocabInfo | None = None,
                 scorer=None, **config):
        self.config = cfg = EngineConfig(**config)
        if scorer is not None and not callable(scorer):
            raise TypeError(f"argument 'scorer' must be callable, got {type(scorer).__name__}")
        check_model_api(model)
        vocab = VocabInfo.for_model(model, processor, cfg.tokens_per_image, vocab)
        self.model, self.processor, self.vocab, self.scorer = model, processor, vocab, scorer
        self.max_model_len = cfg.context_length(model)
        num_blocks = cfg.blocks_for(model, self.max_model_len)
        self.pool = BlockPool(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(KVCacheManager(self.pool), cfg.max_num_seqs,
                                   cfg.step_token_budget)
        self.runner = ModelRunner(model, vocab, cfg, num_blocks, self.max_model_len)
        self.raise_step_errors = os.environ.get("CM3RT_RAISE_STEP_ERRORS") == "1"
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._requests: dict[str, RequestState] = {}
        self._sweeps = DocSweeps()
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

    def request_ids(self) -> list[str]:
        """The unfinished requests (a document sweep counts once, by its own id)."""
        return [r for r in self._requests if not self._sweeps.is_candidate(r)] + self._sweeps.ids()

    def _is_unfinished(self, request_id: str) -> bool:
        return request_id in self._requests or request_id in self._sweeps

    def add_request(self, request: Request | str | TokenPrompt,
                    params: SamplingParams | None = None) -> str:
        """Validate and queue a request; returns its id. Bad input raises ValueError /
        TypeError naming the argument (nothing is queued then)."""
        request = Request.of(request, params)
        rid = request.request_id if request.request_id is not None else f"req-{next(self._ids)}"
        if self._is_unfinished(rid):
            raise ValueError(f"request_id {rid!r} is already in the engine")
        if request.doc_sweep:
            return self._add_sweep(request, rid)
        built = build_prompt(request, self.vocab, self.processor, self.max_model_len)
        req = new_request_state(rid, next(self._arrivals), request, built)
        self.scheduler.check_fits(req, self.max_model_len, self.vocab.tokens_per_image)
        self._requests[rid] = req
        self.scheduler.add(req)
        return rid

    def _add_sweep(self, request: Request, rid: str) -> str:
        """Queue a document sweep's candidates (all or none)."""
        added: list[str] = []
        try:
            for candidate in DocSweeps.candidates_of(request, rid):
                added.append(self.add_request(candidate))
        except BaseException:
            for c in added:
                self.abort(c)
            raise
        self._sweeps.start(request, rid, added)
        return rid

    def abort(self, request_id: str) -> RequestOutput:
        """Stop a request and free its blocks; -> its output (finish_reason "aborted")."""
        if request_id in self._sweeps:
            out = None
            for c in self._sweeps.unfinished_candidates(request_id):
                out = self._sweeps.record(self.abort(c))
            return out
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
            except Exception as exc:  # noqa: BLE001 - contained: see raise_step_errors
                # e.g. out of device memory: fail the requests of this step, keep the others.
                self._contain(exc, f"engine step {self.num_steps}")
                finished += self.scheduler.fail_step(out, exc)
            else:
                events, done = self.scheduler.update(out, tokens, logprobs, self.vocab,
                                                     self.max_model_len)
                finished += done
        for req in finished:
            events.append(TokenEvent(req.request_id, -1, -1, 0.0, output=self._finish(req)))
        return self._sweeps.collect(events)

    def close(self) -> None:
        """Release what outlives the engine object: under tensor parallelism, the worker
        ranks (they exit). Unfinished requests are aborted; the engine cannot step after."""
        for rid in self.request_ids():
            self.abort(rid)
        self.runner.close()

    def _finish(self, req: RequestState) -> RequestOutput:
        """The output of a finished request (decoding or scoring may fail it still)."""
        self._requests.pop(req.request_id, None)
        try:
            req.output = build_output(req, self.processor, self.scorer)
        except Exception as exc:  # noqa: BLE001 - e.g. a failing scorer fails its request
            self._contain(exc, f"output of request {req.request_id!r}")
            req.output = failed_output(req, exc)
        return req.output

    def _contain(self, exc: Exception, what: str) -> None:
        """Re-raise ``exc`` (``raise_step_errors``) or log it; the caller fails its requests."""
        if self.raise_step_errors:
            raise exc
        log.error("%s failed", what, exc_info=exc)

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
                if self._is_unfinished(rid):
                    self.abort(rid)

    def generate(self, requests: Iterable[Request | str | TokenPrompt],
                 params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run ``requests`` to completion, batched together; outputs in request order. A
        request with bad input comes back with ``.error`` set; the others are served."""
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
