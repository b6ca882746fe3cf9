"""The driver -> worker protocol of tensor parallelism.

Rank 0 (the driver) runs the whole engine: scheduler, sampling, outputs. Every other rank
(a worker) holds its share of the model and its own KV cache (its kv heads) and runs
:func:`cm3rt.engine.runner.run_worker`: it receives each step's inputs from the driver and runs the same
forward, so that the model's collectives (all-reduce, logits gather) line up.

Messages go over the control group (gloo, host tensors) as a fixed int64 header and then
the packed step buffers (:class:`~cm3rt.engine.step_inputs.PackedStep`); nothing is
pickled. An idle driver sends a heartbeat every ``tp.timeout_s / 4`` so that a waiting
worker's receive never reaches the group's timeout, which stays short enough to turn a
dead peer into an error rather than a hang.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from cm3rt.engine.step_inputs import PackedStep
from cm3rt.model.tensor_parallel import TensorParallel

STOP, STEP, INIT, HEARTBEAT = range(4)
_HEADER = 16  # int64 slots of a message header


@dataclass
class StepMessage:
    kind: int
    packed: PackedStep | None = None
    copies: list[tuple[int, int]] | None = None
    has_samples: bool = False
    image_only: bool = False
    # INIT only
    num_blocks: int = 0
    block_size: int = 0
    image_ids: list[int] | None = None


class StepChannel:
    """Broadcasts of rank 0's step inputs to the other ranks of ``tp``.

    The driver holds :attr:`lock` for a whole step (send + forward), so a heartbeat can
    never fall between a step's broadcast and its collectives.
    """

    def __init__(self, tp: TensorParallel):
        self.tp = tp
        self.lock = threading.Lock()
        self._last_send = time.monotonic()
        self._closed = False
        self._heartbeat: threading.Thread | None = None

    # ----------------------------------------------------------------- primitives
    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.broadcast(t, src=0, group=self.tp.control)
        return t

    def _send_header(self, *values: int) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[:len(values)] = torch.tensor(values, dtype=torch.int64)
        self._bcast(header)
        self._last_send = time.monotonic()

    # ----------------------------------------------------------------- driver side
    def send_init(self, num_blocks: int, block_size: int, image_ids: list[int]) -> None:
        with self.lock:
            self._send_header(INIT, num_blocks, block_size, len(image_ids))
            if image_ids:
                self._bcast(torch.tensor(image_ids, dtype=torch.int64))
        self._start_heartbeat()

    def send_step(self, packed: PackedStep, copies: list[tuple[int, int]], has_samples: bool,
                  image_only: bool) -> None:
        """Send one step (call with :attr:`lock` held, around the driver's own forward)."""
        self._send_header(STEP, packed.i64.numel(), packed.i32.numel(), packed.f32.numel(),
                          len(copies), int(has_samples), int(image_only), *packed.dims)
        for buf in (packed.i64, packed.i32, packed.f32):
            if buf.numel():
                self._bcast(buf)
        if copies:
            self._bcast(torch.tensor(copies, dtype=torch.int64).view(-1))

    def send_stop(self) -> None:
        """Tell the workers to exit (idempotent)."""
        with self.lock:
            if not self._closed:
                self._closed = True
                self._send_header(STOP)

    def _start_heartbeat(self) -> None:
        interval = self.tp.timeout_s / 4

        def beat() -> None:
            while not self._closed:
                time.sleep(min(interval, 1.0))
                if time.monotonic() - self._last_send < interval:
                    continue
                with self.lock:
                    if not self._closed:
                        self._send_header(HEARTBEAT)

        self._heartbeat = threading.Thread(target=beat, name="cm3rt-tp-heartbeat", daemon=True)
        self._heartbeat.start()

    # ----------------------------------------------------------------- worker side
    def recv(self) -> StepMessage:
        header = self._bcast(torch.zeros(_HEADER, dtype=torch.int64)).tolist()
        kind = header[0]
        if kind == INIT:
            n = header[3]
            ids = self._bcast(torch.empty(n, dtype=torch.int64)).tolist() if n else []
            return StepMessage(INIT, num_blocks=header[1], block_size=header[2], image_ids=ids)
        if kind != STEP:
            return StepMessage(kind)
        n64, n32, nf32, n_copies, has_samples, image_only = header[1:7]
        bufs = [self._bcast(torch.empty(n, dtype=dt)) if n else torch.empty(0, dtype=dt)
                for n, dt in ((n64, torch.int64), (n32, torch.int32), (nf32, torch.float32))]
        copies: list[tuple[int, int]] = []
        if n_copies:
            flat = self._bcast(torch.empty(2 * n_copies, dtype=torch.int64)).tolist()
            copies = list(zip(flat[0::2], flat[1::2]))
        packed = PackedStep(*bufs, dims=tuple(header[7:14]))
        return StepMessage(STEP, packed, copies, bool(has_samples), bool(image_only))

