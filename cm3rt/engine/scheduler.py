"""Continuous-batching scheduler.

Each step packs, oldest request first, every running stream's pending tokens under one token
budget: a decoding stream contributes its one new token, a prefilling (or recomputing)
stream a chunk of its prompt. The streams of a group advance in lockstep: a group samples
only in a step where *all* its streams reach their last token; until then its chunks stop
one token short of the end. New requests are admitted in arrival order (FIFO: the head
of the queue waits rather than being overtaken) when enough free blocks hold their prompt.
When a running stream needs a block and none is free, the newest running request is
preempted: all its blocks are freed and it is recomputed later from its tokens so far
(sampling is keyed by (seed, token index), so the recomputed request draws the same
tokens).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from cm3rt.engine.kv_cache import KVCacheManager
from cm3rt.engine.request import TokenEvent
from cm3rt.engine.state import (
    FINISHED,
    RUNNING,
    WAITING,
    Group,
    RequestState,
    Stream,
    VocabInfo,
)


class CacheTooSmallError(RuntimeError):
    """A request cannot run even alone in the KV cache."""


class SamplingError(RuntimeError):
    """The sampler found no valid token (NaN logits or an empty allowed set)."""


@dataclass
class Chunk:
    """Tokens ``start : start + n`` of ``stream`` are computed this step."""

    stream: Stream
    group: Group
    start: int
    n: int


@dataclass
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    samples: list[Group] = field(default_factory=list)  # groups that sample this step
    copies: list[tuple[int, int]] = field(default_factory=list)  # COW (src, dst) blocks
    failed: list[RequestState] = field(default_factory=list)
    preempted: list[RequestState] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.n for c in self.chunks)

    @property
    def is_pure_decode(self) -> bool:
        return bool(self.chunks) and all(c.n == 1 for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks


@dataclass
class _Plan:
    chunks: list[tuple[Stream, Group, int]]
    samples: list[Group]
    tokens: int


class Scheduler:
    """Admission, per-step packing and preemption over one :class:`KVCacheManager`.

    Args:
        kv: the block tables' manager.
        max_num_seqs: most live streams running at once.
        max_num_batched_tokens: token budget of one step (>= max_num_seqs).
        watermark_blocks: free blocks kept back at admission so running streams can grow.
    """

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark_blocks: int = 0):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < max(max_num_seqs, 3):
            raise ValueError(
                "max_num_batched_tokens must be >= max(max_num_seqs, 3) so every decoding "
                f"stream fits one step, got {max_num_batched_tokens} with max_num_seqs "
                f"{max_num_seqs}"
            )
        self.kv = kv
        self.pool = kv.pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = watermark_blocks
        self.waiting: list[RequestState] = []
        self.running: list[RequestState] = []
        self.num_preemptions = 0

    # --- queue --------------------------------------------------------------------------
    def add(self, req: RequestState) -> None:
        req.status = WAITING
        self._enqueue(req)

    def _enqueue(self, req: RequestState) -> None:
        keys = [r.arrival for r in self.waiting]
        self.waiting.insert(bisect.bisect(keys, req.arrival), req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, req: RequestState, error: Exception | None = None) -> None:
        """Stop ``req`` wherever it is, free its blocks, mark its groups finished."""
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self._free(req)
        for g in req.groups:
            if not g.finished:
                g.finished = True
                g.finish_reason = "error" if error is not None else "aborted"
        req.error = error
        req.status = FINISHED

    def _free(self, req: RequestState) -> None:
        for g in req.groups:
            for s in g.streams:
                self.kv.free(s)

    def _preempt(self, req: RequestState, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self._free(req)
        req.status = WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(req)
        out.preempted.append(req)

    # --- one step -----------------------------------------------------------------------
    def _plan(self, req: RequestState, budget: int) -> _Plan:
        chunks: list[tuple[Stream, Group, int]] = []
        samples: list[Group] = []
        used = 0
        for g in req.groups:
            if not g.active:
                continue
            left = budget - used
            if left <= 0:
                break
            rem = [s.remaining for s in g.streams]
            if sum(rem) <= left:
                for s, r in zip(g.streams, rem):
                    chunks.append((s, g, r))
                used += sum(rem)
                samples.append(g)
                # Samples waiting on this leader fork its prompt and draw from its logits.
                samples.extend(f for f in req.groups if f.leader is g and not f.finished)
            else:
                # Not all streams can reach their last token: prefill up to one short, so
                # that the group's final tokens land in one step together.
                for s, r in zip(g.streams, rem):
                    n = min(r - 1, left)
                    if n > 0:
                        chunks.append((s, g, n))
                        left -= n
                        used += n
        return _Plan(chunks, samples, used)

    def _blocks_needed(self, plan: _Plan) -> int:
        return sum(self.kv.blocks_needed(s, n) for s, _, n in plan.chunks)

    def _commit_plan(self, plan: _Plan, out: SchedulerOutput) -> None:
        for s, g, n in plan.chunks:
            out.copies.extend(self.kv.reserve(s, n))
            out.chunks.append(Chunk(s, g, s.num_computed, n))
        out.samples.extend(plan.samples)

    def _fail(self, req: RequestState, out: SchedulerOutput, error: Exception) -> None:
        self.abort(req, error)
        out.failed.append(req)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks and sampling groups; allocate (and COW) their blocks."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            plan = self._plan(req, budget)
            if not plan.chunks:
                i += 1
                continue
            need = self._blocks_needed(plan)
            while self.pool.num_free < need and self.running[-1] is not req:
                self._preempt(self.running[-1], out)
            if self.pool.num_free < need:
                if len(self.running) == 1:
                    self._fail(req, out, CacheTooSmallError(
                        f"request {req.request_id!r} needs {need} more KV-cache blocks but the "
                        f"whole cache of {self.pool.num_blocks} blocks of "
                        f"{self.pool.block_size} tokens is taken by it; raise kv_cache_bytes "
                        "or lower n / max_new_tokens"))
                else:
                    self._preempt(req, out)
                continue
            self._commit_plan(plan, out)
            budget -= plan.tokens
            i += 1
        self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        live = sum(r.num_live_streams for r in self.running)
        while self.waiting and budget > 0:
            req = self.waiting[0]
            nstreams = req.num_live_streams
            if live + nstreams > self.max_num_seqs and self.running:
                return
            fresh = [s for g in req.groups if g.active for s in g.streams]
            # Samples that will fork the leader need one block each for copy-on-write.
            extra = sum(len(g.streams) for g in req.groups if g.leader is not None
                        and not g.finished)
            cost = self.kv.admission_cost(fresh, extra)
            reserve = self.watermark_blocks if self.running else 0
            if cost > self.pool.num_free - reserve:
                if not self.running and cost > self.pool.num_blocks:
                    self.waiting.pop(0)
                    self._fail(req, out, CacheTooSmallError(
                        f"request {req.request_id!r} needs {cost} KV-cache blocks for its "
                        f"prompt, the cache has {self.pool.num_blocks}; raise kv_cache_bytes "
                        "or shorten the prompt"))
                    continue
                return
            self.waiting.pop(0)
            for s in fresh:
                self.kv.admit(s)
            req.status = RUNNING
            # Running stays in arrival order: the newest is always the preemption victim.
            keys = [r.arrival for r in self.running]
            self.running.insert(bisect.bisect(keys, req.arrival), req)
            live += nstreams
            plan = self._plan(req, budget)
            if not plan.chunks:
                return
            if self.pool.num_free < self._blocks_needed(plan):
                return  # cannot happen after the admission check; next step retries
            self._commit_plan(plan, out)
            budget -= plan.tokens

    # --- after the forward --------------------------------------------------------------
    def update(self, out: SchedulerOutput, tokens: list[int], logprobs: list[float],
               vocab: VocabInfo, max_model_len: int
               ) -> tuple[list[TokenEvent], list[RequestState]]:
        """Apply a step's results: mark its chunks computed, fork the samples that waited
        on a leader, append each group's sampled token (and the grammar's forced ones),
        fail a group whose sampler found no valid token, and retire finished requests.
        -> (the step's token events, the requests that finished)."""
        for c in out.chunks:
            if not c.group.finished:
                self.kv.commit(c.stream, c.n)
        for g in out.samples:  # before any token lands: a fork copies its leader's prompt
            if g.leader is not None and not g.finished:
                for fs, ls in zip(g.streams, g.leader.streams):
                    assert fs.tokens == ls.tokens, "a fork's prompt differs from its leader's"
                    self.kv.fork(ls, fs)
                g.leader = None
        events: list[TokenEvent] = []
        finished: list[RequestState] = []
        touched: dict[int, RequestState] = {}
        for g, tok, lp in zip(out.samples, tokens, logprobs):
            req = g.req
            if req.status == FINISHED:
                continue
            if tok < 0:
                self.abort(req, SamplingError(
                    f"request {req.request_id!r}, sample {g.index}: the sampler found no valid "
                    f"token at generated position {len(g.generated)} (NaN logits or no allowed "
                    "token)"))
                finished.append(req)
                continue
            for t, lp_, image_index, image_pos in g.accept(tok, lp, vocab, req.max_new_tokens,
                                                           max_model_len):
                events.append(TokenEvent(req.request_id, g.index, t, lp_, image_index,
                                         image_pos))
            touched[id(req)] = req
        for req in touched.values():
            if req.status != FINISHED and self._release_finished(req):
                finished.append(req)
        return events, finished

    def fail_step(self, out: SchedulerOutput, error: Exception) -> list[RequestState]:
        """A step whose forward raised: fail (abort) every request it carried."""
        failed = []
        for req in {id(c.group.req): c.group.req for c in out.chunks}.values():
            if req.status != FINISHED:
                self.abort(req, RuntimeError(
                    f"request {req.request_id!r} failed in a model step: {error}"))
                failed.append(req)
        return failed

    def _release_finished(self, req: RequestState) -> bool:
        """Free finished groups' blocks; retire the request when all are done."""
        for g in req.groups:
            if g.finished:
                for s in g.streams:
                    if s.blocks:
                        self.kv.free(s)
        if req.finished and req.status != FINISHED:
            if req in self.running:
                self.running.remove(req)
            req.status = FINISHED
            return True
        return False

    # --- admission checks ---------------------------------------------------------------
    def check_fits(self, req: RequestState, max_model_len: int, tokens_per_image: int) -> None:
        """ValueError unless ``req`` can ever run: its streams fit the context (with one
        image, for image tasks), its streams fit ``max_num_seqs``, its prompt the cache."""
        streams = req.groups[0].streams
        for s in streams:
            if len(s.tokens) >= max_model_len:
                raise ValueError(
                    f"prompt too long: the {s.role} stream has {len(s.tokens)} tokens, the "
                    f"context holds {max_model_len} (and at least one new token must fit)")
        if req.spec.stop_after_images and req.starts_in_image:
            longest = max(len(s.tokens) for s in streams)
            if longest + tokens_per_image + 1 > max_model_len:
                raise ValueError(
                    f"prompt too long: {longest} prompt tokens + one image ({tokens_per_image} "
                    f"codes + end-of-image) exceed the context of {max_model_len} tokens")
        total = len(req.groups) * len(streams)
        if total > self.max_num_seqs:
            raise ValueError(
                f"n={len(req.groups)} samples x {len(streams)} streams = {total} streams "
                f"exceed the engine's max_num_seqs={self.max_num_seqs}")
        need = sum(self.kv.blocks_for(len(s.tokens) + 1) for s in streams)
        if need > self.pool.num_blocks:
            raise ValueError(
                f"prompt too long for the KV cache: it needs {need} blocks, the cache has "
                f"{self.pool.num_blocks}; raise kv_cache_bytes")
