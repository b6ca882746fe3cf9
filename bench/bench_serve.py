"""Serving throughput: `cm3rt serve` against the engine called directly, same model, one run.

Run: OMP_WAIT_POLICY=passive python -m pytest bench/bench_serve.py -q -s

On the embedded default model (text -> image with its defaults: retrieval + CFG), for each
concurrency c in 1, 4, 16: c clients each send ROUNDS[c] requests one after another to the
server over HTTP; then the same requests go to an in-process engine, c at a time, through
``Engine.generate`` (batched, no HTTP). Prints images/s and p50 / p99 latency of both, and
the server's overhead = 1 - server images/s / engine images/s. Both sides run torch on one
thread (the server is started with OMP_NUM_THREADS=1), so the comparison is like for like.
Targets: overhead <= 10% at c = 16; server images/s at c = 16 >= 3x at c = 1.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import record
from serve_fixtures import start_server

PROMPTS = ["a red star above a blue circle", "a small yellow circle at the top left",
           "a green cross", "a large purple square next to a white triangle"]
ROUNDS = {1: 4, 4: 3, 16: 2}


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _server_run(url: str, c: int) -> tuple[float, list[float]]:
    def client(i: int) -> list[float]:
        lat = []
        for r in range(ROUNDS[c]):
            t0 = time.perf_counter()
            resp = httpx.post(url + "/v1/images/generations", timeout=600,
                              json={"prompt": PROMPTS[(i + r) % len(PROMPTS)],
                                    "seed": 1000 * i + r})
            resp.raise_for_status()
            lat.append(time.perf_counter() - t0)
        return lat

    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        lats = [x for lat in pool.map(client, range(c)) for x in lat]
    return len(lats) / (time.perf_counter() - t0), lats


def _engine_run(c: int) -> tuple[float, list[float]]:
    from cm3rt.api import resolve_request

    lats, n = [], 0
    t0 = time.perf_counter()
    for r in range(ROUNDS[c]):
        requests = []
        for i in range(c):
            engine, req = resolve_request(PROMPTS[(i + r) % len(PROMPTS)], seed=1000 * i + r)
            requests.append(req)
        t1 = time.perf_counter()
        outs = engine.generate(requests)
        assert all(o.ok and o.image is not None for o in outs)
        lats += [time.perf_counter() - t1] * c
        n += c
    return n / (time.perf_counter() - t0), lats


def test_serve_vs_engine(tmp_path):
    import torch

    from cm3rt.api import load_engine

    torch.set_num_threads(1)  # as the server process (tests/serve_fixtures.py)
    server = start_server(tmp_path)
    try:
        httpx.post(server.url + "/v1/images/generations", timeout=600,
                   json={"prompt": PROMPTS[0]}).raise_for_status()  # warm-up
        served = {c: _server_run(server.url, c) for c in ROUNDS}
    finally:
        server.stop()
    load_engine().generate([PROMPTS[0]])  # warm-up (model load, bank open)
    direct = {c: _engine_run(c) for c in ROUNDS}
    for c in ROUNDS:
        (s_ips, s_lat), (e_ips, e_lat) = served[c], direct[c]
        record(bench="serve", concurrency=c, server_images_per_s=f"{s_ips:.2f}",
               engine_images_per_s=f"{e_ips:.2f}", overhead=f"{1 - s_ips / e_ips:+.1%}",
               server_p50_s=f"{statistics.median(s_lat):.2f}",
               server_p99_s=f"{_percentile(s_lat, 0.99):.2f}",
               engine_p50_s=f"{statistics.median(e_lat):.2f}")
    scale = served[16][0] / served[1][0]
    record(bench="serve", concurrency="16 vs 1", server_images_per_s=f"{scale:.2f}x",
           engine_images_per_s=f"{direct[16][0] / direct[1][0]:.2f}x",
           overhead="target <= 10% at 16", server_p50_s="target >= 3x", server_p99_s="",
           engine_p50_s="")
