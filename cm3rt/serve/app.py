"""The OpenAI-compatible HTTP app: FastAPI routes over one :class:`EngineLoop`.

Handlers never run the model: they validate the body, take a place in the bounded queue,
resolve settings through :func:`cm3rt.api.resolve_request` (the same path as
``cm3rt.generate`` and the CLI), submit, and turn the request's token events into a JSON
response or an SSE stream. See docs/DESIGN.md, "Serving".
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from cm3rt.api import load_engine, resolve_request
from cm3rt.engine import RequestOutput
from cm3rt.serve.images import open_data_uri, open_upload, partial_image, png_b64
from cm3rt.serve.loop import Draining, EngineLoop, QueueFull, Ticket
from cm3rt.serve.metrics import ServerMetrics
from cm3rt.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ImageEditForm,
    ImageGenerationRequest,
    user_error,
    validation_message,
)

USER_ERRORS = (ValueError, TypeError, FileNotFoundError)
PLAYGROUND = Path(__file__).with_name("playground.html")
POLL_S = 0.25  # how often a non-streaming handler checks that its client is still there


@dataclass(frozen=True)
class ServeConfig:
    """What ``cm3rt serve`` was started with."""

    model: str | None = None  # None: the embedded default model
    device: str | None = None
    dtype: str | None = None
    api_key: str | None = None
    max_queued: int = 256  # samples (an n > 1 request counts n) in flight at most
    max_body_bytes: int = 8 << 20
    served_model_name: str | None = None
    shutdown_timeout: float = 30.0
    tensor_parallel_size: int = 1

    @property
    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if self.model else "cm3rt-default"


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is a 413 (checked on Content-Length and
    while the body streams in)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = APIError(413, f"the request body exceeds {self.limit} bytes", code="too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, too_big)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _send_error(send, too_big)


class _BodyTooLarge(Exception):
    pass


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def create_app(config: ServeConfig) -> FastAPI:
    """The app; the engine loads (and its loop starts) when the server starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = await asyncio.to_thread(load_engine, config.model, device=config.device,
                                         dtype=config.dtype,
                                         tensor_parallel_size=config.tensor_parallel_size)
        loop = EngineLoop(engine, ServerMetrics(config.model_id), max_queued=config.max_queued)
        loop.start(asyncio.get_running_loop())
        app.state.loop = loop
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="cm3rt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    def loop_of(request: Request) -> EngineLoop:
        return request.app.state.loop

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer "
                           "<key>'", type="authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_id:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                           f"{config.model_id!r}", param="model", code="model_not_found")

    def admit(loop: EngineLoop, n: int, stream: bool) -> Ticket:
        try:
            return loop.admit(n, stream)
        except QueueFull as exc:
            raise APIError(503, f"the server is busy ({exc}); retry later", type="server_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except Draining:
            raise APIError(503, "the server is shutting down", type="server_error",
                           code="shutting_down", headers={"Retry-After": "5"}) from None

    async def resolve_and_submit(loop: EngineLoop, ticket: Ticket, prompt, **kwargs):
        """resolve_request (the one settings path) and hand the request to the loop."""
        try:
            engine, request = await asyncio.to_thread(
                resolve_request, prompt, config.model, device=config.device,
                dtype=config.dtype, tensor_parallel_size=config.tensor_parallel_size, **kwargs)
        except USER_ERRORS as exc:
            loop.release(ticket)
            raise user_error(exc) from None
        except BaseException:
            loop.release(ticket)
            raise
        assert engine is loop.engine, "resolve_request must give the served engine"
        loop.submit(ticket, request)
        try:  # the loop builds the prompt (retrieval, image encoding) and checks it fits
            await ticket.accepted
        except USER_ERRORS as exc:
            raise user_error(exc) from None
        return engine, request

    async def next_event(loop: EngineLoop, ticket: Ticket, http: Request | None):
        """The request's next event; aborts it when a non-streaming client went away."""
        while True:
            try:
                ev = await asyncio.wait_for(ticket.events.get(), timeout=POLL_S)
            except TimeoutError:
                if http is not None and await http.is_disconnected():
                    loop.abort(ticket)
                continue
            return ev

    async def final_output(loop: EngineLoop, ticket: Ticket, http: Request) -> RequestOutput:
        while True:
            ev = await next_event(loop, ticket, http)
            if ev.output is not None:
                out = ev.output
                if out.error is not None:
                    raise APIError(500, f"generation failed: {out.error}", type="server_error")
                return out

    def image_size(engine) -> str:
        side = engine.processor.image.image_size
        return f"{side}x{side}"

    def check_size(engine, size: str | None) -> None:
        if size not in (None, "auto", image_size(engine)):
            raise APIError(400, f"'size' must be {image_size(engine)!r} (the model's image "
                           f"size) or 'auto', got {size!r}", param="size")

    def usage_of(out: RequestOutput) -> dict[str, int]:
        generated = sum(len(s.token_ids) for s in out.samples)
        prompt = len(out.prompt_token_ids)
        return {"input_tokens": prompt, "output_tokens": generated,
                "total_tokens": prompt + generated}

    def retrieved(out: RequestOutput) -> list[dict[str, Any]]:
        return [{"id": d.id, "caption": d.caption, "score": d.score} for d in out.docs]

    async def images_response(engine, out: RequestOutput) -> dict[str, Any]:
        if not out.images:
            raise APIError(500, "generation ended before a complete image",
                           type="server_error")
        data = [{"b64_json": b} for b in
                await asyncio.to_thread(lambda: [png_b64(im) for im in out.images])]
        return {"created": int(time.time()), "data": data, "size": image_size(engine),
                "output_format": "png", "usage": usage_of(out), "retrieved": retrieved(out)}

    async def image_stream(loop: EngineLoop, ticket: Ticket, engine, partials: int,
                           kind: str) -> AsyncIterator[str]:
        """SSE: ``<kind>.partial_image`` events at evenly spaced rows, then
        ``<kind>.completed`` (OpenAI's image streaming events)."""
        n_codes = engine.vocab.tokens_per_image
        marks = [n_codes * (i + 1) // (partials + 1) for i in range(partials)]
        drawn: list[int] = []
        base = {"size": image_size(engine), "output_format": "png", "quality": "auto",
                "background": "opaque"}
        try:
            while True:
                ev = await next_event(loop, ticket, None)
                if ev.output is None:
                    if ev.sample != 0 or ev.image_pos is None or ev.image_index != 0:
                        continue
                    drawn.append(ev.token)
                    if marks and len(drawn) == marks[0]:
                        marks.pop(0)
                        image = await asyncio.to_thread(partial_image, engine.processor,
                                                        list(drawn))
                        yield _sse(f"{kind}.partial_image", {
                            "type": f"{kind}.partial_image", **base,
                            "b64_json": await asyncio.to_thread(png_b64, image),
                            "created_at": int(time.time()),
                            "partial_image_index": partials - len(marks) - 1})
                    continue
                out = ev.output
                if out.error is not None or not out.images:
                    err = APIError(500, f"generation failed: {out.error or 'no image'}",
                                   type="server_error")
                    yield _sse("error", err.body())
                    return
                yield _sse(f"{kind}.completed", {
                    "type": f"{kind}.completed", **base,
                    "b64_json": await asyncio.to_thread(png_b64, out.images[0]),
                    "created_at": int(time.time()), "usage": usage_of(out),
                    "retrieved": retrieved(out)})
                return
        except APIError as exc:
            yield _sse("error", exc.body())
        finally:
            loop.abort(ticket)  # a client gone mid-stream: free its blocks (no-op when done)

    v1 = [Depends(check_key)]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request):
        loop = loop_of(request)
        if not loop.alive or loop.draining:
            return JSONResponse({"status": "draining" if loop.draining else "down"},
                                status_code=503)
        return {"status": "ready", "model": config.model_id}

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(loop_of(request).metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return PLAYGROUND.read_text(encoding="utf-8")

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return {"object": "list", "data": [{"id": config.model_id, "object": "model",
                                            "created": 0, "owned_by": "cm3rt"}]}

    @app.post("/v1/images/generations", dependencies=v1)
    async def images_generations(body: ImageGenerationRequest, request: Request):
        loop = loop_of(request)
        check_model(body.model)
        check_size(loop.engine, body.size)
        if body.stream and body.n != 1:
            raise APIError(400, "'n' must be 1 with 'stream': true", param="n")
        ticket = admit(loop, body.n, body.stream)
        engine, _ = await resolve_and_submit(loop, ticket, body.prompt, task="text_to_image",
                                             n=body.n, **body.retrieval(), **body.given())
        if body.stream:
            return StreamingResponse(image_stream(loop, ticket, engine, body.partial_images,
                                                  "image_generation"),
                                     media_type="text/event-stream")
        return await images_response(engine, await final_output(loop, ticket, request))

    @app.post("/v1/images/edits", dependencies=v1)
    async def images_edits(request: Request):
        loop = loop_of(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "the body must be multipart/form-data (an 'image' file and "
                           "a 'prompt' field)")
        try:
            form = await request.form()
        except Exception as exc:  # noqa: BLE001 - whatever the multipart parser says is a 400
            raise APIError(400, f"the body must be multipart/form-data: {exc}") from None
        uploads = [v for k in ("image", "image[]") for v in form.getlist(k)]
        fields = {k: v for k, v in form.items() if k not in ("image", "image[]")}
        if "mask" in fields:
            raise APIError(400, "'mask' is not supported: edits are text-guided (cfg3)",
                           param="mask")
        try:
            body = ImageEditForm(**fields)
        except ValidationError as exc:
            message, param = validation_message(exc.errors())
            raise APIError(400, message, param=param) from None
        if len(uploads) != 1 or not hasattr(uploads[0], "read"):
            raise APIError(400, "'image' must be exactly one uploaded image file",
                           param="image")
        check_model(body.model)
        check_size(loop.engine, body.size)
        if body.stream and body.n != 1:
            raise APIError(400, "'n' must be 1 with 'stream': true", param="n")
        ticket = admit(loop, body.n, body.stream)  # before any image decoding
        try:
            image = open_upload(await uploads[0].read(), "image")
        except APIError:
            loop.release(ticket)
            raise
        engine, _ = await resolve_and_submit(loop, ticket, body.prompt, images=[image],
                                             task="edit", n=body.n, **body.retrieval(),
                                             **body.given())
        if body.stream:
            return StreamingResponse(image_stream(loop, ticket, engine, body.partial_images,
                                                  "image_edit"),
                                     media_type="text/event-stream")
        return await images_response(engine, await final_output(loop, ticket, request))

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        loop = loop_of(request)
        check_model(body.model)
        ticket = admit(loop, body.n, body.stream)  # before any image decoding
        try:
            items = chat_items(body)
        except APIError:
            loop.release(ticket)
            raise
        has_images = any(not isinstance(x, str) for x in items)
        limit = {} if body.max_new_tokens is None else {"max_new_tokens": body.max_new_tokens}
        engine, _ = await resolve_and_submit(
            loop, ticket, items, task="image_to_text" if has_images else "interleaved",
            n=body.n, **body.retrieval(), **limit, **body.given())
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(chat_stream(loop, ticket, engine, chat_id, body.n, usage),
                                     media_type="text/event-stream")
        out = await final_output(loop, ticket, request)
        contents = await asyncio.to_thread(lambda: [chat_content(s) for s in out.samples])
        choices = [{"index": s.index, "message": {"role": "assistant", "content": c},
                    "finish_reason": _finish_reason(s.finish_reason), "logprobs": None}
                   for s, c in zip(out.samples, contents)]
        u = usage_of(out)
        return {"id": chat_id, "object": "chat.completion", "created": int(time.time()),
                "model": config.model_id, "choices": choices,
                "usage": {"prompt_tokens": u["input_tokens"],
                          "completion_tokens": u["output_tokens"],
                          "total_tokens": u["total_tokens"]},
                "retrieved": retrieved(out)}

    def chat_items(body: ChatCompletionRequest) -> list[Any]:
        """The interleaved prompt: every message's text and image parts, in order."""
        items: list[Any] = []
        for i, message in enumerate(body.messages):
            parts = [message.content] if isinstance(message.content, str) else message.content
            for j, part in enumerate(parts):
                if isinstance(part, str):
                    items.append(part)
                elif part.type == "text":
                    items.append(part.text)
                else:
                    items.append(open_data_uri(part.image_url.url,
                                               f"messages.{i}.content.{j}.image_url.url"))
        return items

    def chat_content(sample) -> str:
        """A sample as chat text: its text, and its images as markdown data URIs."""
        pieces = [seg if isinstance(seg, str) else
                  f"![image](data:image/png;base64,{png_b64(seg)})" for seg in sample.segments]
        return "".join(pieces)

    async def chat_stream(loop: EngineLoop, ticket: Ticket, engine, chat_id: str, n: int,
                          include_usage: bool) -> AsyncIterator[str]:
        """chat.completion.chunk SSE: text deltas as they are generated."""
        text = engine.processor.text
        ids: list[list[int]] = [[] for _ in range(n)]
        sent = [""] * n
        created = int(time.time())

        def chunk(choices, usage=None) -> str:
            payload = {"id": chat_id, "object": "chat.completion.chunk", "created": created,
                       "model": config.model_id, "choices": choices}
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "finish_reason": None} for i in range(n)])
            while True:
                ev = await next_event(loop, ticket, None)
                if ev.output is None:
                    if ev.image_pos is not None or ev.image_index is not None:
                        continue  # image codes: sent as a whole image at the end
                    ids[ev.sample].append(ev.token)
                    now = text.decode(ids[ev.sample])
                    if len(now) > len(sent[ev.sample]) and now.startswith(sent[ev.sample]):
                        delta, sent[ev.sample] = now[len(sent[ev.sample]):], now
                        yield chunk([{"index": ev.sample, "delta": {"content": delta},
                                      "finish_reason": None}])
                    continue
                out = ev.output
                if out.error is not None:
                    yield _sse("error", APIError(500, f"generation failed: {out.error}",
                                                 type="server_error").body())
                    return
                for s in out.samples:
                    images = "".join(f"![image](data:image/png;base64,{png_b64(im)})"
                                     for im in s.images)
                    final = s.text
                    rest = final[len(sent[s.index]):] if final.startswith(sent[s.index]) else ""
                    delta = {"content": rest + images} if rest or images else {}
                    yield chunk([{"index": s.index, "delta": delta,
                                  "finish_reason": _finish_reason(s.finish_reason)}])
                if include_usage:
                    u = usage_of(out)
                    yield chunk([], {"prompt_tokens": u["input_tokens"],
                                     "completion_tokens": u["output_tokens"],
                                     "total_tokens": u["total_tokens"]})
                yield "data: [DONE]\n\n"
                return
        except APIError as exc:
            yield _sse("error", exc.body())
        finally:
            loop.abort(ticket)

    return app


def _finish_reason(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, reason or "stop")
