"""Prometheus metrics of the server, with vLLM's names under a ``cm3rt:`` prefix.

    cm3rt:num_requests_running / cm3rt:num_requests_waiting     gauges (requests)
    cm3rt:kv_cache_usage_perc                                   gauge, 0..1 of KV blocks in use
    cm3rt:prefix_cache_queries_total / cm3rt:prefix_cache_hits_total   counters (blocks)
    cm3rt:num_preemptions_total                                 counter
    cm3rt:prompt_tokens_total / cm3rt:generation_tokens_total   counters
    cm3rt:time_to_first_token_seconds / cm3rt:e2e_request_latency_seconds   histograms
    cm3rt:request_success_total{finished_reason}                counter
    cm3rt:engine_steps_total                                    counter (batching: steps per request)
    cm3rt:requests_rejected_total                               counter (503: queue full)

Each server has its own registry (several servers may live in one test process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "cm3rt:"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The collectors, updated by the engine loop thread."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labelnames=list(labels), registry=r).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labelnames=list(labels), registry=r
                           ).labels(**labels)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, labelnames=list(labels), registry=r,
                             buckets=_LATENCY_BUCKETS).labels(**labels)

        self.running = gauge("num_requests_running", "Requests in the engine's running set.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for admission.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use.")
        self.prefix_queries = counter("prefix_cache_queries", "Prefix-cache blocks queried.")
        self.prefix_hits = counter("prefix_cache_hits", "Prefix-cache blocks hit.")
        self.preemptions = counter("num_preemptions", "Preempted (recomputed) requests.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.steps = counter("engine_steps", "Engine steps run.")
        self.rejected = counter("requests_rejected", "Requests refused: the queue was full.")
        self.ttft = histogram("time_to_first_token_seconds", "Submit to first token.")
        self.e2e = histogram("e2e_request_latency_seconds", "Submit to final output.")
        self._success = Counter(PREFIX + "request_success", "Finished requests.",
                                labelnames=[*labels, "finished_reason"], registry=r)
        self._labels = labels
        self._seen = {"queried": 0, "hits": 0, "preemptions": 0}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- updates (engine loop thread) ------------------------------------------------------
    def on_finished(self, ticket, output, aborted: bool = False) -> None:
        import time

        self.e2e.observe(time.monotonic() - ticket.submitted_at)
        reason = "abort" if aborted else ("error" if output.error is not None else "stop")
        if output.error is None and any(s.finish_reason == "length" for s in output.samples):
            reason = "length"
        self._success.labels(**self._labels, finished_reason=reason).inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))

    def on_step(self, engine) -> None:
        self.steps.inc()
        self.on_idle(engine)

    def on_idle(self, engine) -> None:
        sched, pool = engine.scheduler, engine.pool
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_usage.set(pool.num_used / pool.num_blocks)
        stats = engine.stats
        for key, now, counter in (("queried", stats.prefix_queried_blocks, self.prefix_queries),
                                  ("hits", stats.prefix_hit_blocks, self.prefix_hits),
                                  ("preemptions", engine.num_preemptions, self.preemptions)):
            if now > self._seen[key]:
                counter.inc(now - self._seen[key])
                self._seen[key] = now
