"""``cm3rt serve --replicas N``: N engines as Ray Serve replicas behind Ray's HTTP proxy.

    client -> Ray HTTP proxy -> Front (one light replica, FastAPI catch-all)
           -> DeploymentHandle with PrefixAffinityRouter -> EngineReplica x N

* :class:`EngineReplica` holds one engine and runs the very app of ``cm3rt serve``
  (:func:`cm3rt.serve.app.create_app`) in process: the Front forwards each HTTP request
  (method, path, headers, body) and streams the response back, SSE included, so every
  route, status code and error body is the single-engine server's. Each response carries
  ``x-cm3rt-replica`` (the replica that served it).
* :class:`PrefixAffinityRouter` (a Ray Serve ``RequestRouter``) sends a request to the
  replica that served the longest prefix of its prompt before, since that replica's prefix
  cache holds those blocks (for text -> image the prompt also decides the retrieved
  documents, which sit first in the sequence). While the replicas' queues differ by more
  than ``imbalanced_threshold``, or no replica matched ``min_match_chars``, it falls back
  to Ray's power of two choices. The routing state lives in the Front's handle, so the
  Front has one replica.

Also a ``serve run`` application: ``serve run cm3rt.serve.replicas:app_builder replicas=2``
(arguments: the :class:`~cm3rt.serve.app.ServeConfig` fields, ``replicas``,
``imbalanced_threshold``).
"""

# No `from __future__ import annotations`: Ray pickles the Front class by value and FastAPI
# must see its real `Request` annotation, not a string to resolve in lost globals.
import asyncio
import json
import random
import signal
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from cm3rt.serve.app import ServeConfig, create_app

REPLICA_HEADER = "x-cm3rt-replica"
# Characters of a prompt the affinity index keeps (prefix-cache blocks beyond them are
# rarely shared by requests that agree this far).
KEY_CHARS = 512


# ------------------------------------------------------------------------ affinity index
class PrefixIndex:
    """Which replica served which prompt prefix: a character trie over the first
    :data:`KEY_CHARS` characters of recent prompts, oldest forgotten past ``max_prompts``."""

    def __init__(self, max_prompts: int = 4096) -> None:
        self.root: dict = {}
        self.recent: OrderedDict[tuple[str, Any], None] = OrderedDict()
        self.max_prompts = max_prompts

    def insert(self, key: str, replica: Any) -> None:
        key = key[:KEY_CHARS]
        if (key, replica) in self.recent:  # already counted once: only refresh its age
            self.recent.move_to_end((key, replica))
            return
        self.recent[(key, replica)] = None
        node = self.root
        for ch in key:
            node = node.setdefault(ch, {})
            node.setdefault(None, {})
            node[None][replica] = node[None].get(replica, 0) + 1
        while len(self.recent) > self.max_prompts:
            self._remove(*self.recent.popitem(last=False)[0])

    def _remove(self, key: str, replica: Any) -> None:
        node = self.root
        for ch in key:
            child = node.get(ch)
            if child is None:
                return
            counts = child[None]
            counts[replica] -= 1
            if counts[replica] == 0:
                del counts[replica]
            if not counts:
                del node[ch]
                return
            node = child

    def forget_replica(self, replica: Any) -> None:
        for key, r in [k for k in self.recent if k[1] == replica]:
            self.recent.pop((key, r))
            self._remove(key, r)

    def longest_match(self, key: str, among: set) -> tuple[Any, int]:
        """``(replica, matched characters)`` of the replica in ``among`` that served the
        longest prefix of ``key`` (``(None, 0)`` when none did)."""
        best, depth, node = None, 0, self.root
        for i, ch in enumerate(key[:KEY_CHARS]):
            node = node.get(ch)
            if node is None:
                break
            holders = [r for r in node[None] if r in among]
            if not holders:
                break
            best, depth = min(holders, key=str), i + 1
        return best, depth


def choose_by_affinity(key: str | None, candidates: list, queue_lens: dict, index: PrefixIndex,
                       imbalanced_threshold: float, min_match_chars: int) -> list:
    """The ranked replica ids for a request: the affine replica alone when the load is
    balanced and it matched enough of ``key``; else two at random (Ray probes their
    queues and takes the shorter: power of two choices)."""
    if key and candidates:
        lens = [queue_lens.get(c, 0) for c in candidates]
        if max(lens) - min(lens) <= imbalanced_threshold:
            replica, matched = index.longest_match(key, set(candidates))
            if replica is not None and matched >= min(min_match_chars, len(key)):
                return [replica]
    return random.sample(candidates, min(2, len(candidates)))


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, RequestRouter):
    """Ray Serve request router: prefix affinity, power of two choices when imbalanced.

    The affinity key is the first positional argument of the handle call (the Front
    passes the request's prompt text, or None)."""

    def initialize_state(self, imbalanced_threshold: float = 8, min_match_chars: int = 16,
                         max_prompts: int = 4096) -> None:
        self.imbalanced_threshold = imbalanced_threshold
        self.min_match_chars = min_match_chars
        self.index = PrefixIndex(max_prompts)

    @staticmethod
    def _key(pending_request: PendingRequest | None) -> str | None:
        if pending_request is None or not pending_request.args:
            return None
        key = pending_request.args[0]
        return key if isinstance(key, str) else None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        queue_lens = {rid: self.replica_queue_len_cache.get(rid) or 0 for rid in by_id}
        ranked = choose_by_affinity(self._key(pending_request), list(by_id), queue_lens,
                                    self.index, self.imbalanced_threshold,
                                    self.min_match_chars)
        return [[by_id[rid] for rid in ranked]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        key = self._key(pending_request)
        if key:
            self.index.insert(key, replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.forget_replica(replica_id)


def affinity_key(path: str, content_type: str, body: bytes) -> str | None:
    """The text whose prefix decides the replica: the prompt of an image request, the
    messages of a chat (None for anything else, e.g. GET routes and multipart edits)."""
    if not body or not content_type.startswith("application/json"):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if path.endswith("/images/generations") and isinstance(data.get("prompt"), str):
        return data["prompt"]
    if path.endswith("/chat/completions") and isinstance(data.get("messages"), list):
        return json.dumps(data["messages"], sort_keys=True)
    return None


# ------------------------------------------------------------------------ deployments
class EngineReplica:
    """One engine and the ``cm3rt serve`` app, driven in process by forwarded requests."""

    def __init__(self, config: dict[str, Any]) -> None:
        from cm3rt.api import load_engine

        self.config = ServeConfig(**config)
        # Load now, so the replica counts as started only with its engine; the app's
        # lifespan (started on the first request, in the replica's event loop) finds it in
        # load_engine's cache.
        load_engine(self.config.model, device=self.config.device, dtype=self.config.dtype,
                    tensor_parallel_size=self.config.tensor_parallel_size)
        self.app = create_app(self.config)
        self.name = serve.get_replica_context().replica_id.unique_id
        self._lifespan = None
        self._start_lock = asyncio.Lock()

    async def _started(self) -> None:
        async with self._start_lock:
            if self._lifespan is None:
                lifespan = self.app.router.lifespan_context(self.app)
                await lifespan.__aenter__()
                self._lifespan = lifespan

    async def handle(self, key: str | None, method: str, path: str, query: str,
                     headers: list[tuple[str, str]], body: bytes) -> AsyncIterator[dict]:
        """Run one HTTP request through the app: yields ``{"status", "headers"}`` first,
        then ``{"body": bytes}`` chunks as the app sends them (SSE events one by one)."""
        await self._started()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "path": path, "raw_path": path.encode(),
                 "query_string": query.encode(), "scheme": "http", "root_path": "",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
                 "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80), "state": {}}
        sent_body = False
        disconnected = asyncio.Event()

        async def receive():
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        queue: asyncio.Queue = asyncio.Queue()

        async def send(message):
            await queue.put(message)

        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (message := await queue.get()) is not None:
                if message["type"] == "http.response.start":
                    out = [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
                    yield {"status": message["status"],
                           "headers": [*out, (REPLICA_HEADER, self.name)]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield {"body": message["body"]}
                    if not message.get("more_body"):
                        break
            await task
        finally:  # the client went away (or the response is done): the app sees it
            disconnected.set()
            if not task.done():
                task.cancel()


_front = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(_front)
class Front:
    """Ray's HTTP proxy -> here -> the engine replica the router picks."""

    def __init__(self, engines) -> None:
        self.engines = engines.options(stream=True)
        self.app_name = serve.get_replica_context().app_name
        self.all_started = False

    async def _all_replicas_started(self) -> bool:
        """Whether Ray has the application RUNNING, i.e. every engine replica started.
        Checked until it first holds (a controller call), then remembered: a replica that
        dies later is restarted by Ray while the others keep serving."""
        if not self.all_started:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(self.app_name)
            self.all_started = app is not None and app.status == "RUNNING"
        return self.all_started

    @_front.get("/ready")
    async def ready(self, request: Request):
        # Ray's proxy takes requests while serve.run still waits for the other replicas,
        # and /ready from the first replica up would call a half-started server ready (a
        # client that then sends a burst finds one replica; seen in CI).
        if not await self._all_replicas_started():
            return JSONResponse({"status": "starting"}, status_code=503)
        return await self.forward(request, "ready")

    @_front.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def forward(self, request: Request, path: str):
        body = await request.body()
        key = affinity_key(request.url.path, request.headers.get("content-type", ""), body)
        stream = self.engines.handle.remote(
            key, request.method, request.url.path, request.url.query,
            [(k, v) for k, v in request.headers.items() if k != "host"], body)
        head = await stream.__anext__()
        headers = {k: v for k, v in head["headers"] if k.lower() != "content-length"}

        async def chunks():
            async for part in stream:
                yield part["body"]

        return StreamingResponse(chunks(), status_code=head["status"], headers=headers,
                                 media_type=headers.get("content-type"))


def build_app(config: ServeConfig, replicas: int, imbalanced_threshold: float = 8,
              num_cpus_per_replica: float = 1):
    """The Ray Serve application: the Front over ``replicas`` engine replicas."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"argument 'replicas' must be an int >= 1, got {replicas!r}")
    engines = serve.deployment(
        EngineReplica, name="EngineReplica", num_replicas=replicas,
        max_ongoing_requests=max(16, config.max_queued),
        ray_actor_options={"num_cpus": num_cpus_per_replica},
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"imbalanced_threshold": imbalanced_threshold}),
    ).bind(asdict(config))
    front = serve.deployment(Front, name="Front", num_replicas=1,
                             max_ongoing_requests=4 * max(16, config.max_queued),
                             ray_actor_options={"num_cpus": 0})
    return front.bind(engines)


def app_builder(args: dict[str, str]):
    """``serve run cm3rt.serve.replicas:app_builder replicas=2 model=DIR ...``."""
    args = dict(args)
    replicas = int(args.pop("replicas", 2))
    threshold = float(args.pop("imbalanced_threshold", 8))
    fields = ServeConfig.__dataclass_fields__
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; expected replicas, "
                         f"imbalanced_threshold or one of {sorted(fields)}")
    typed = {k: fields[k].type for k in args}
    config = ServeConfig(**{k: (int(v) if typed[k] == "int" else float(v)
                                if typed[k] == "float" else v) for k, v in args.items()})
    return build_app(config, replicas, threshold)


def serve_replicas(config: ServeConfig, replicas: int, host: str, port: int,
                   imbalanced_threshold: float = 8) -> None:
    """Start a local Ray cluster, deploy, and serve until SIGTERM / SIGINT."""
    import ray

    ray.init(include_dashboard=False, log_to_driver=True,
             object_store_memory=256 << 20, configure_logging=False)
    # Ours replace the handlers ray.init installed (which exit with status 15), before the
    # deployment: the proxy answers HTTP while serve.run still waits for the app to be
    # RUNNING, so a SIGTERM can come that early (seen in CI) and must still shut down.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(config, replicas, imbalanced_threshold), name="cm3rt",
                  route_prefix="/", blocking=False)
        print(f"cm3rt serve: {replicas} replicas on http://{host}:{port}", flush=True)
        stop.wait()
        serve.shutdown()
    finally:
        ray.shutdown()
