"""Starting a tensor-parallel engine: worker ranks spawned by cm3rt, or launched by torchrun.

    engine = load_engine("path/to/chameleon", tensor_parallel_size=2)     # spawns rank 1
    torchrun --nproc-per-node 2 -m cm3rt generate "..." --tensor-parallel-size 2

Either way rank 0 runs the engine (:class:`~cm3rt.engine.Engine`) and every other rank runs
:func:`cm3rt.engine.runner.run_worker` over its share of the weights; see
:mod:`cm3rt.model.tensor_parallel` for the split. The group is ``torch.distributed``: gloo
on the CPU; on CUDA, NCCL for the model's collectives and gloo for the step broadcasts
(rank r uses ``cuda:r``, under torchrun ``cuda:LOCAL_RANK``).

Startup is checked on every rank before anything waits on a peer: the split (heads, kv
heads, MLP channels divisible by N) from config.json alone, then, after each rank loaded
its weights, one all-reduce of "did loading fail" so a rank that cannot load makes all of
them raise rather than leaving the others blocked.
"""

from __future__ import annotations

import argparse
import atexit
import os
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import torch

from cm3rt.model.config import ChameleonConfig
from cm3rt.model.tensor_parallel import TensorParallel

# Collective timeout (seconds): a dead or stuck peer becomes an error after this long. An
# idle driver sends heartbeats well inside it (cm3rt.engine.tensor_parallel).
DEFAULT_TIMEOUT_S = float(os.environ.get("CM3RT_TP_TIMEOUT_S", "1800"))
# Rendezvous timeout (seconds), at least the collective one: the ranks are starting up
# (Python and torch imports take several seconds on a loaded machine), and a rank that dies
# on the way is caught at once by watching(), not by this timeout.
RENDEZVOUS_TIMEOUT_S = 300.0
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """True in a process torchrun (or any ``env://`` launcher) started."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def check_split(path: Path, size: int) -> None:
    """ValueError naming the numbers unless the model in ``path`` splits over ``size``."""
    TensorParallel(0, size).check(ChameleonConfig.from_json(path / "config.json"))


def rank_device(device: torch.device, rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank))
    return torch.device("cuda", local)


def join_group(rank: int, size: int, device: torch.device, init_method: str,
               timeout_s: float) -> TensorParallel:
    """``torch.distributed.init_process_group`` for this rank -> its TensorParallel."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("a torch.distributed group is already initialised in this process: "
                           "cm3rt runs one tensor-parallel engine per process")
    timeout = timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rendezvous = timedelta(seconds=max(timeout_s, RENDEZVOUS_TIMEOUT_S))
    store, rank, size = next(dist.rendezvous(init_method, rank, size, timeout=rendezvous))
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return TensorParallel(rank, size, group=None, control=control, timeout_s=timeout_s)


def agree_loaded(tp: TensorParallel, error: BaseException | None) -> None:
    """Every rank says whether it loaded; raise on all of them if any did not."""
    import torch.distributed as dist

    failed = torch.tensor([0 if error is None else 1 << tp.rank], dtype=torch.int64)
    dist.all_reduce(failed, group=tp.control)
    if error is not None:
        raise error
    bad = [r for r in range(tp.size) if int(failed) >> r & 1]
    if bad:
        raise RuntimeError(f"tensor parallelism: rank(s) {bad} failed to load the model "
                           "(their error is in their own output)")


def watching(workers: list[subprocess.Popen], what: str, fn):
    """``fn()`` (a rendezvous or collective the spawned ``workers`` must join), raising as
    soon as one of them has exited instead of waiting out the group timeout."""
    if not workers:
        return fn()
    result: dict = {}

    def call() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=call, name=f"cm3rt-tp-{what}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        for rank, w in enumerate(workers, start=1):
            if thread.is_alive() and w.poll() is not None:
                raise RuntimeError(f"tensor parallelism: worker rank {rank} exited with code "
                                   f"{w.returncode} during {what} (its error is in its own "
                                   "output)")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_sharded(path: Path, dtype, int8: bool, device: torch.device, tp: TensorParallel,
                 with_processor: bool):
    """This rank's model (and, on rank 0, the processor), then the all-ranks load check."""
    from cm3rt.model import load_model, load_pretrained

    model = processor = error = None
    try:
        dt = "int8" if int8 else dtype
        if with_processor:
            model, processor = load_pretrained(path, dtype=dt, device=device, tp=tp)
        else:
            model = load_model(path, dtype=dt, device=device, tp=tp)
    except Exception as exc:  # noqa: BLE001 - reported to the other ranks, then re-raised
        error = exc
    agree_loaded(tp, error)
    return model, processor


def start_engine(path: Path, size: int, device: torch.device, dtype, int8: bool,
                 engine_kwargs: dict, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Rank 0's Engine over a tensor-parallel group of ``size`` ranks.

    Under torchrun this process is one of the ranks: on rank 0 it returns the engine; on
    any other it serves as a worker until the driver stops, then raises ``SystemExit(0)``
    (the rest of the launched script is rank 0's alone). Otherwise ranks 1..N-1 are
    spawned here (``python -m cm3rt.api.parallel``) and stopped when the engine closes or
    the process exits.
    """
    from cm3rt.engine import Engine
    from cm3rt.engine.runner import run_worker

    check_split(path, size)
    workers: list[subprocess.Popen] = []
    if under_torchrun():
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world != size:
            raise ValueError(f"argument 'tensor_parallel_size' is {size} but torchrun "
                             f"started {world} processes (WORLD_SIZE)")
        device = rank_device(device, rank)
        tp = join_group(rank, size, device, "env://", timeout_s)
        if rank > 0:
            model, _ = load_sharded(path, dtype, int8, device, tp, with_processor=False)
            run_worker(model)
            _leave_group()
            raise SystemExit(0)
    else:
        init = f"tcp://127.0.0.1:{_free_port()}"
        for rank in range(1, size):
            cmd = [sys.executable, "-m", "cm3rt.api.parallel", "--model", str(path),
                   "--dtype", "int8" if int8 else str(dtype).removeprefix("torch."),
                   "--device", str(rank_device(device, rank)), "--rank", str(rank),
                   "--size", str(size), "--init-method", init, "--timeout", str(timeout_s)]
            workers.append(subprocess.Popen(cmd))
        try:
            tp = watching(workers, "the group rendezvous",
                          lambda: join_group(0, size, device, init, timeout_s))
        except BaseException:
            _stop_workers(workers, None)
            raise
    try:
        model, processor = watching(workers, "loading", lambda: load_sharded(
            path, dtype, int8, device, tp, with_processor=True))
        engine = watching(workers, "engine start", lambda: Engine(model, processor,
                                                                  **engine_kwargs))
    except BaseException:
        _stop_workers(workers, None)
        raise
    atexit.register(_stop_workers, workers, engine)
    return engine


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _stop_workers(workers: list[subprocess.Popen], engine) -> None:
    """Stop the workers (engine closed: they exit; otherwise killed after a grace time)."""
    if engine is not None:
        engine.close()
    for w in workers:
        try:
            w.wait(timeout=30 if engine is not None else 0.5)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
    if engine is not None:
        _leave_group()


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of a spawned worker rank (``python -m cm3rt.api.parallel ...``)."""
    from cm3rt.devices import resolve_weight_dtype
    from cm3rt.engine.runner import run_worker

    ap = argparse.ArgumentParser(prog="python -m cm3rt.api.parallel",
                                 description="one worker rank of a tensor-parallel engine")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--init-method", required=True)
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype, int8 = resolve_weight_dtype(args.dtype, device)
    tp = join_group(args.rank, args.size, device, args.init_method, args.timeout)
    try:
        model, _ = load_sharded(Path(args.model), dtype, int8, device, tp,
                                with_processor=False)
        run_worker(model)
    finally:
        _leave_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
