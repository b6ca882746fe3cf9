"""Tensor parallelism: decode step time of TP = 1 vs TP = 2 on the same weights.

Run: python -m pytest bench/bench_tp.py -q -s [--bench-device cuda]

The mid-size Chameleon of bench_engine.py (the ``mid_model_dir`` fixture; 8 layers, hidden 1024, vocab 65536, random
weights), 4 prompts with CFG (8 streams), 64 image codes each. TP = 2 runs as two ranks (the
env:// variables torchrun sets; gloo on the CPU, NCCL + gloo on CUDA): rank 0 runs the
engine, rank 1 :func:`cm3rt.engine.runner.run_worker`. Rows: TP = 1 on 1 and on 2 threads,
TP = 2 with 1 thread per rank (CPU); on CUDA TP = 2 needs two GPUs. No target: the CPU
numbers say what the all-reduces and the step broadcast cost against the halved weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import record, result_of
from bench_engine import BOI, BOS, PROMPTS, prompts

NEW_TOKENS = 64


def rank_main(model_dir: str, device: str) -> None:
    """One rank (or the single process): prints ``RESULT {...}`` on rank 0."""
    from cm3rt.api.parallel import join_group
    from cm3rt.engine import Engine, Request, SamplingParams, TokenPrompt, VocabInfo
    from cm3rt.engine.runner import run_worker
    from cm3rt.model import TensorParallel, load_model

    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device(device if device == "cpu" else f"cuda:{rank}")
    tp = join_group(rank, size, dev, "env://", 300.0) if size > 1 else TensorParallel()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = load_model(model_dir, dtype=dtype, device=dev, tp=tp)
    if rank > 0:
        run_worker(model)
        torch.distributed.destroy_process_group()
        return
    vocab = VocabInfo.from_model_config(model.config, tokens_per_image=NEW_TOKENS)
    ctx = 16 + NEW_TOKENS + 8
    eng = Engine(model, vocab=vocab, block_size=16, num_blocks=8 * (-(-ctx // 16)) + 8,
                 max_num_seqs=8, max_model_len=ctx)

    def requests(n_new: int):
        return [Request(TokenPrompt(cond=p + [BOI], uncond=[BOS, BOI]),
                        params=SamplingParams(guidance="cfg", cfg_scale=3.0,
                                              max_new_tokens=n_new, seed=i))
                for i, p in enumerate(prompts())]

    eng.generate(requests(4))  # warm-up
    for r in requests(NEW_TOKENS):
        eng.add_request(r)
    steps = []
    while eng.has_unfinished():
        prefill = bool(eng.scheduler.waiting)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        eng.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if not prefill:
            steps.append(time.perf_counter() - t0)
    eng.close()
    if size > 1:
        torch.distributed.destroy_process_group()
    steps = sorted(steps)[: max(1, int(len(steps) * 0.9))]  # drop the slowest 10%
    step = sum(steps) / len(steps)
    print("RESULT " + json.dumps({"step_ms": step * 1e3,
                                  "tok_s": PROMPTS / step, "steps": len(steps)}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model_dir: Path, device: str, size: int, threads: int) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "passive",
           "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, str(model_dir), device]
    if size == 1:
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)]
    else:
        port = str(_free_port())
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r),
                                       "WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": port})
                 for r in range(size)]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    result = result_of(outs[0])
    if any(p.returncode for p in procs) or result is None:
        raise RuntimeError(f"TP={size} run failed: {[p.returncode for p in procs]}")
    return result


def test_tp_step_time(bench_device, mid_model_dir):
    if bench_device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("TP = 2 on CUDA needs two GPUs")
    configs = [(1, 1), (1, 2), (2, 1)] if bench_device == "cpu" else [(1, 0), (2, 0)]
    base = None
    for size, threads in configs:
        r = run(mid_model_dir, bench_device, size, threads)
        base = base or r["step_ms"]
        record(bench="tp_decode_step", device=bench_device, tp=size,
               threads_per_rank=threads or "", streams=2 * PROMPTS,
               step_ms=round(r["step_ms"], 2), tok_s=round(r["tok_s"], 1),
               vs_tp1=round(base / r["step_ms"], 2))


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2])
