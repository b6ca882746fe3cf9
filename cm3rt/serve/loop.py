"""EngineLoop: one thread owns the Engine and steps it continuously; HTTP handlers only
submit requests and read their events.

Every in-flight request of every client is batched into the same engine steps (continuous
batching across clients). The engine is not thread-safe, so it is touched by the loop
thread alone: handlers hand it commands (add / abort) through a queue, and events come back
to each request's asyncio queue with ``call_soon_threadsafe``.

Admission is bounded: :meth:`EngineLoop.admit` counts a request's ``n`` samples against
``max_queued`` before the handler does any image decoding or retrieval work.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from cm3rt.engine import Engine, Request, TokenEvent
from cm3rt.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


class QueueFull(Exception):
    """More requests in flight than ``max_queued`` (the server answers 503)."""


class Draining(Exception):
    """The server is shutting down and admits nothing new (503)."""


@dataclass
class Ticket:
    """A request's place in the loop: ``accepted`` resolves once the engine queued it (or
    holds the error that rejected it); then its events arrive on ``events``."""

    request_id: str
    weight: int  # samples it counts against max_queued
    accepted: asyncio.Future
    tokens: bool  # deliver every token event (streaming); else only the final output
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    done: bool = False


class EngineLoop:
    """Runs ``engine`` in a background thread for an asyncio server."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, *, max_queued: int = 256):
        if max_queued < 1:
            raise ValueError(f"argument 'max_queued' must be >= 1, got {max_queued}")
        self.engine = engine
        self.metrics = metrics
        self.max_queued = max_queued
        self._commands: queue.Queue = queue.Queue()
        self._tickets: dict[str, Ticket] = {}
        self._in_flight = 0  # samples admitted and not finished
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._aio: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.draining = False
        self.last_step_at = time.monotonic()

    # --- lifecycle ------------------------------------------------------------------------
    def start(self, aio_loop: asyncio.AbstractEventLoop) -> None:
        self._aio = aio_loop
        self._thread = threading.Thread(target=self._run, name="cm3rt-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    # --- handler side (event loop thread) ---------------------------------------------------
    def admit(self, weight: int, tokens: bool) -> Ticket:
        """Reserve ``weight`` samples of the queue, or raise QueueFull / Draining.
        ``tokens``: the handler streams, so it gets every token event (else only the
        final one: fewer wake-ups of the event loop)."""
        with self._lock:
            if self.draining:
                raise Draining("the server is shutting down")
            if self._in_flight + weight > self.max_queued:
                self.metrics.rejected.inc()
                raise QueueFull(f"{self._in_flight} samples in flight, the queue holds "
                                f"{self.max_queued}")
            self._in_flight += weight
        return Ticket(request_id=f"req-{uuid.uuid4().hex}", weight=weight,
                      accepted=asyncio.get_running_loop().create_future(), tokens=tokens)

    def release(self, ticket: Ticket) -> None:
        """Give back a ticket that was never submitted (the request failed validation)."""
        self._finish_ticket(ticket)

    def submit(self, ticket: Ticket, request: Request) -> None:
        request.request_id = ticket.request_id
        self._tickets[ticket.request_id] = ticket
        self._commands.put(("add", request))
        self._wake.set()

    def abort(self, ticket: Ticket) -> None:
        """The client went away: stop its request and free its blocks."""
        if not ticket.done:
            self._commands.put(("abort", ticket.request_id))
            self._wake.set()

    # --- loop thread -------------------------------------------------------------------------
    def _deliver(self, ticket: Ticket, event: TokenEvent) -> None:
        assert self._aio is not None
        self._aio.call_soon_threadsafe(ticket.events.put_nowait, event)

    def _accept(self, ticket: Ticket, error: BaseException | None) -> None:
        def settle() -> None:
            if not ticket.accepted.done():
                if error is None:
                    ticket.accepted.set_result(None)
                else:
                    ticket.accepted.set_exception(error)

        assert self._aio is not None
        self._aio.call_soon_threadsafe(settle)

    def _finish_ticket(self, ticket: Ticket) -> None:
        with self._lock:
            if not ticket.done:
                ticket.done = True
                self._in_flight -= ticket.weight
        self._tickets.pop(ticket.request_id, None)

    def _run_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                ticket = self._tickets.get(arg.request_id)
                if ticket is None:
                    continue
                try:
                    self.engine.add_request(arg)
                except USER_ERRORS as exc:  # e.g. a prompt too long for the context
                    self._finish_ticket(ticket)
                    self._accept(ticket, exc)
                else:
                    self._accept(ticket, None)
            elif kind == "abort":
                ticket = self._tickets.get(arg)
                if ticket is not None and arg in self.engine.request_ids():
                    out = self.engine.abort(arg)
                    self._finish_ticket(ticket)
                    self.metrics.on_finished(ticket, out, aborted=True)
                    self._deliver(ticket, TokenEvent(arg, -1, -1, 0.0, output=out))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._run_commands()
            if not self.engine.has_unfinished():
                self.metrics.on_idle(self.engine)
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception:
                log.exception("engine step raised; failing its requests")
                for rid in self.engine.request_ids():
                    self._commands.put(("abort", rid))
                continue
            now = time.monotonic()
            self.last_step_at = now
            tokens = 0
            for ev in events:
                ticket = self._tickets.get(ev.request_id)
                if ticket is None:
                    continue
                if ev.output is None:
                    tokens += 1
                    if ticket.first_token_at is None:
                        ticket.first_token_at = now
                        self.metrics.ttft.observe(now - ticket.submitted_at)
                    if not ticket.tokens:
                        continue
                else:
                    self._finish_ticket(ticket)
                    self.metrics.on_finished(ticket, ev.output)
                self._deliver(ticket, ev)
            self.metrics.generation_tokens.inc(tokens)
            self.metrics.on_step(self.engine)
