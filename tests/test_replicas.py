"""``cm3rt serve --replicas 2``: two engines as Ray Serve replicas behind Ray's HTTP proxy,
driven by the official openai client; prefix-affine requests land on one replica."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from serve_fixtures import free_port  # after the skips: it needs httpx

import cm3rt
from cm3rt.serve.replicas import (
    REPLICA_HEADER,
    PrefixIndex,
    affinity_key,
    choose_by_affinity,
)

AFFINE = "a red circle above a blue square"


# ----------------------------------------------------------------------- routing policy
def test_prefix_index_finds_the_longest_served_prefix():
    index = PrefixIndex(max_prompts=3)
    index.insert("a red circle above a blue square", "A")
    index.insert("a red circle below a green star", "B")
    assert index.longest_match("a red circle above a blue square", {"A", "B"}) == ("A", 32)
    assert index.longest_match("a red circle below", {"A", "B"}) == ("B", 18)
    assert index.longest_match("a red circle above", {"B"}) == ("B", 13)  # among live ones
    assert index.longest_match("zebra", {"A", "B"}) == (None, 0)
    index.forget_replica("A")
    assert index.longest_match("a red circle above", {"A", "B"}) == ("B", 13)
    for i in range(4):  # past max_prompts the oldest prompt is forgotten
        index.insert(f"prompt {i} " * 3, "C")
    assert index.longest_match("a red circle below", {"B", "C"})[0] is None
    # A prompt served again is one entry: forgetting it once forgets it.
    again = PrefixIndex(max_prompts=1)
    for _ in range(3):
        again.insert("a blue square", "A")
    again.insert("zebra", "B")
    assert again.longest_match("a blue square", {"A", "B"}) == (None, 0)
    assert again.root.keys() == {"z"}


def test_choose_by_affinity_falls_back_to_two_choices_when_imbalanced():
    index = PrefixIndex()
    index.insert(AFFINE, "A")
    both = ["A", "B"]
    assert choose_by_affinity(AFFINE, both, {"A": 3, "B": 0}, index, 8, 16) == ["A"]
    # Queues 12 apart (> threshold 8): power of two choices over both replicas.
    assert sorted(choose_by_affinity(AFFINE, both, {"A": 12, "B": 0}, index, 8, 16)) == both
    # Too short a match, or no key: two choices as well.
    assert sorted(choose_by_affinity("a blue", both, {}, index, 8, 16)) == both
    assert sorted(choose_by_affinity(None, both, {}, index, 8, 16)) == both


def test_affinity_key_reads_prompts_and_chats_only():
    assert affinity_key("/v1/images/generations", "application/json",
                        b'{"prompt": "a red circle"}') == "a red circle"
    chat = affinity_key("/v1/chat/completions", "application/json",
                        b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert chat is not None and "hi" in chat
    assert affinity_key("/v1/models", "", b"") is None
    assert affinity_key("/v1/images/generations", "application/json", b"not json") is None
    assert affinity_key("/v1/images/edits", "multipart/form-data; boundary=x", b"--x") is None


# ----------------------------------------------------------------------- the real thing
@pytest.fixture(scope="module")
def replicas_server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("replicas") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive"}
    env.pop("CM3RT_RAISE_STEP_ERRORS", None)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cm3rt", "serve", "--replicas", "2", "--device", "cpu",
             "--port", str(port), "--imbalanced-threshold", "64"],
            stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)
    yield url, proc, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_32_concurrent_requests_prefix_affine_on_one_replica(replicas_server):
    url, _, _ = replicas_server
    client = _client(url)
    first = client.images.with_raw_response.generate(prompt=AFFINE, extra_body={"seed": 0})
    home = first.headers[REPLICA_HEADER]
    # The replica served what cm3rt.generate draws (same settings path, same pixels).
    want = cm3rt.generate(AFFINE, seed=0, device="cpu").images[0]
    with Image.open(io.BytesIO(base64.b64decode(first.parse().data[0].b64_json))) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(want.convert("RGB")))

    colours = ["green", "yellow", "purple", "orange", "white", "black", "pink", "brown"]
    others = [f"{c} {s}" for c in colours for s in ("star", "triangle")]

    def call(prompt_seed):
        prompt, seed = prompt_seed
        r = client.images.with_raw_response.generate(prompt=prompt, extra_body={"seed": seed})
        assert len(r.parse().data) == 1
        return prompt, r.headers[REPLICA_HEADER]

    jobs = [(AFFINE, s) for s in range(1, 17)] + [(p, 0) for p in others]
    with ThreadPoolExecutor(32) as pool:
        served = list(pool.map(call, jobs))
    assert len(served) == 32
    affine = Counter(rep for prompt, rep in served if prompt == AFFINE)
    assert affine == Counter({home: 16}), affine  # every prefix-affine request, one replica
    assert len({rep for _, rep in served}) == 2, served  # and both replicas served


def test_errors_and_sse_come_through_the_proxy(replicas_server):
    url, _, _ = replicas_server
    client = _client(url)
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.images.generate(prompt="a red circle", n=0)
    with httpx.stream("POST", url + "/v1/images/generations", timeout=120,
                      json={"prompt": "a blue square", "stream": True,
                            "partial_images": 1}) as r:
        assert r.status_code == 200
        events = [ln for ln in r.iter_lines() if ln.startswith("event: ")]
    assert events[0] == "event: image_generation.partial_image"
    assert events[-1] == "event: image_generation.completed"
    assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] == "cm3rt-default"
    assert httpx.get(url + "/ready", timeout=30).status_code == 200  # still serving


def test_sigterm_stops_ray_and_the_replicas(replicas_server):
    _, proc, log = replicas_server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, log.read_text()[-4000:]
    left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True,
                          check=False).stdout.split()
    deadline = time.monotonic() + 30
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True,
                              check=False).stdout.split()
    assert left == [], f"processes of the server's session still running: {left}"


def test_sigterm_as_soon_as_ready_still_exits_0(tmp_path):
    """Ray's proxy answers HTTP while serve.run still waits for the app to be RUNNING: a
    SIGTERM that early used to meet Ray's own handler (exit status 15, no shutdown). The
    first answer of any status (the Front's /ready says 503 until every replica started)."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive"}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cm3rt", "serve", "--replicas", "2", "--device", "cpu",
             "--port", str(port)],
            stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
                break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
