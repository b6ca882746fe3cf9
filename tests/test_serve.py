"""`cm3rt serve` as clients see it: the real server in a subprocess on 127.0.0.1, driven by
the official ``openai`` client and httpx, on the embedded default model."""

from __future__ import annotations

import base64
import io
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from door_cases import BAD, GOOD, IMAGE, PROMPT
from PIL import Image

import cm3rt

# The server's own packages (the "serve" extra) and its test clients; skipped where they are
# not installed (a bare GPU machine), installed by CI through the "test" extra.
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from serve_fixtures import start_server  # after the skips: it needs httpx

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("serve"))
    yield s
    assert s.stop() == 0, s.log_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def decode_png(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def wait_idle(server, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["cm3rt:num_requests_running"] == 0 and m["cm3rt:num_requests_waiting"] == 0 \
                and m["cm3rt:kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, f"server not idle: {m}"
        time.sleep(0.2)


# ----------------------------------------------------------------------- same tokens
def test_images_generate_equals_cm3rt_generate(client):
    got = client.images.generate(prompt=PROMPT, n=2, extra_body={"seed": 5})
    want = cm3rt.generate(PROMPT, n=2, seed=5)
    assert len(got.data) == 2
    for item, image in zip(got.data, want.images):
        assert np.array_equal(decode_png(item.b64_json), pixels(image))
    assert got.usage.output_tokens == sum(len(s.token_ids) for s in want.samples)


DEFAULT_GOOD = [c for c in GOOD if c[1] == "default"]


@pytest.mark.parametrize("name,model,api_kwargs,cli_args", DEFAULT_GOOD,
                         ids=[c[0] for c in DEFAULT_GOOD])
def test_front_door_table_through_the_server(client, name, model, api_kwargs, cli_args):
    """The front doors' table of good calls (tests/door_cases.py) gives the server's
    output equal to cm3rt.generate's."""
    if api_kwargs.get("task") == "image_to_text":
        image = cm3rt.generate(PROMPT, seed=8).image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        kwargs = {k: v for k, v in api_kwargs.items() if k not in ("task", "images")}
        got = client.chat.completions.create(
            model="cm3rt-default", extra_body=kwargs,
            messages=[{"role": "user", "content": [{"type": "image_url",
                                                    "image_url": {"url": uri}}]}])
        want = cm3rt.generate([], images=[image], task="image_to_text", **kwargs)
        assert got.choices[0].message.content == want.text
        return
    assert IMAGE not in api_kwargs.values()
    got = client.images.generate(prompt=PROMPT, extra_body=dict(api_kwargs))
    want = cm3rt.generate(PROMPT, **api_kwargs)
    assert np.array_equal(decode_png(got.data[0].b64_json), pixels(want.image))


def test_stream_sends_partial_images_then_the_same_image(client):
    events = list(client.images.generate(prompt=PROMPT, stream=True, partial_images=3,
                                         extra_body={"seed": 6}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]
    final = decode_png(events[-1].b64_json)
    assert np.array_equal(final, pixels(cm3rt.generate(PROMPT, seed=6).image))
    # A partial image is the rows drawn so far, the rest plain grey; later ones show more.
    grey = [int((decode_png(e.b64_json) == 128).all(axis=(1, 2)).sum()) for e in events[:3]]
    assert grey[0] > grey[1] > grey[2] > 0


def test_edit_equals_cm3rt_generate(client, tmp_path):
    src = cm3rt.generate("a green cross", seed=1).image
    path = tmp_path / "in.png"
    src.save(path)
    with open(path, "rb") as f:
        got = client.images.edit(image=f, prompt="make it blue", extra_body={"seed": 2})
    with Image.open(path) as im:
        want = cm3rt.generate("make it blue", images=[im.convert("RGB")], task="edit", seed=2)
    assert np.array_equal(decode_png(got.data[0].b64_json), pixels(want.image))


def test_chat_captions_equal_cm3rt_generate(client):
    image = cm3rt.generate(PROMPT, seed=3).image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]
    got = client.chat.completions.create(model="cm3rt-default", messages=messages,
                                         max_tokens=20)
    want = cm3rt.generate([], images=[image], task="image_to_text", max_new_tokens=20)
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.samples[0].token_ids)
    chunks = list(client.chat.completions.create(model="cm3rt-default", messages=messages,
                                                 max_tokens=20, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == want.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_models_health_ready_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["cm3rt-default"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    m = server.metrics()
    for name in ("cm3rt:num_requests_running", "cm3rt:num_requests_waiting",
                 "cm3rt:kv_cache_usage_perc", "cm3rt:prefix_cache_hits_total",
                 "cm3rt:prefix_cache_queries_total", "cm3rt:num_preemptions_total",
                 "cm3rt:generation_tokens_total", "cm3rt:prompt_tokens_total",
                 "cm3rt:time_to_first_token_seconds_count",
                 "cm3rt:e2e_request_latency_seconds_count", "cm3rt:request_success_total"):
        assert name in m, name
    assert m["cm3rt:generation_tokens_total"] > 0


# ----------------------------------------------------------------------- batching, load
def _generate(server, seed: int) -> float:
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/images/generations", timeout=600,
                   json={"prompt": PROMPT, "seed": seed, "k_docs": 0})
    assert r.status_code == 200, r.text
    return time.monotonic() - t0


def test_concurrent_requests_share_engine_steps(server):
    wait_idle(server)
    before = server.metrics()["cm3rt:engine_steps_total"]
    for seed in range(8):
        _generate(server, 100 + seed)
    sequential = server.metrics()["cm3rt:engine_steps_total"] - before
    before = server.metrics()["cm3rt:engine_steps_total"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: _generate(server, 200 + s), range(8)))
    concurrent = server.metrics()["cm3rt:engine_steps_total"] - before
    assert concurrent < sequential / 2, (concurrent, sequential)


def test_load_64_concurrent_requests(server):
    wait_idle(server)
    with ThreadPoolExecutor(64) as pool:
        latencies = sorted(pool.map(lambda s: _generate(server, 300 + s), range(64)))
    p50 = statistics.median(latencies)
    p99 = latencies[min(63, int(0.99 * 64))]
    print(f"\n64 concurrent image requests: p50 {p50:.2f} s, p99 {p99:.2f} s")
    m = wait_idle(server)  # every KV block back in the pool
    assert m["cm3rt:kv_cache_usage_perc"] == 0


def test_disconnect_mid_stream_frees_blocks(server):
    wait_idle(server)
    with httpx.stream("POST", server.url + "/v1/images/generations", timeout=300,
                      json={"prompt": PROMPT, "stream": True, "partial_images": 3}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["type"] == "image_generation.partial_image"
                break  # leave after the first partial image
    m = wait_idle(server, timeout=30)
    assert m["cm3rt:kv_cache_usage_perc"] == 0
    # a non-streaming client that goes away (long before its 10 images are drawn) is
    # aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/images/generations", timeout=0.05,
                   json={"prompt": PROMPT, "n": 10})
    wait_idle(server, timeout=30)


# ----------------------------------------------------------------------- bad input
_SERVER_FIELDS = {"prompt", "n", "seed", "guidance", "cfg_scale", "cfg_image_scale",
                  "cd_alpha", "cd_k", "temperature", "top_k", "top_p", "k_docs",
                  "max_doc_score"}
# The shared table's API calls that are expressible as a JSON body of
# /v1/images/generations (device, model directory, bank ... are the server's, not a
# client's, to choose).
SHARED = [(name, kw, pattern) for name, kw, _, _, pattern in BAD
          if kw is not None and set(kw) <= _SERVER_FIELDS
          and all(isinstance(v, (str, int, float)) for v in kw.values())
          and not (isinstance(kw.get("cfg_scale"), float) and kw["cfg_scale"] == float("inf"))]


@pytest.mark.parametrize("name,fields,pattern", SHARED, ids=[c[0] for c in SHARED])
def test_shared_bad_inputs_are_400s_naming_the_field(server, name, fields, pattern):
    body = json.dumps({"prompt": PROMPT, **fields})  # ASCII: a lone surrogate as \\udcff
    r = httpx.post(server.url + "/v1/images/generations", content=body, timeout=60,
                   headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    field = next(iter(fields))
    assert field in err["message"] or field == "prompt" and "prompt" in err["message"], err


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


GEN = "/v1/images/generations"
CHAT = "/v1/chat/completions"
EDIT = "/v1/images/edits"
SERVER_BAD = [
    ("malformed_json", GEN, {"content": b'{"prompt": "a red', "headers":
                             {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("body_not_an_object", GEN, {"json": ["a", "list"]}, 400, "valid dictionary"),
    ("prompt_wrong_type", GEN, {"json": {"prompt": 42}}, 400, "'prompt'"),
    ("prompt_missing", GEN, {"json": {"n": 1}}, 400, "'prompt'"),
    ("n_eleven", GEN, {"json": {"prompt": PROMPT, "n": 11}}, 400, "'n'"),
    ("n_string", GEN, {"json": {"prompt": PROMPT, "n": "2"}}, 400, "'n'"),
    ("size_unknown", GEN, {"json": {"prompt": PROMPT, "size": "1024x1024"}}, 400, "'size'"),
    ("response_format_url", GEN, {"json": {"prompt": PROMPT, "response_format": "url"}},
     400, "'response_format'"),
    ("partial_images_four", GEN, {"json": {"prompt": PROMPT, "stream": True,
                                           "partial_images": 4}}, 400, "'partial_images'"),
    ("stream_with_n_two", GEN, {"json": {"prompt": PROMPT, "stream": True, "n": 2}}, 400,
     "'n' must be 1"),
    ("unknown_field", GEN, {"json": {"prompt": PROMPT, "quality_boost": True}}, 400,
     "quality_boost"),
    ("unknown_model", GEN, {"json": {"prompt": PROMPT, "model": "dall-e-3"}}, 404,
     "dall-e-3"),
    ("prompt_too_long_for_json", GEN, {"json": {"prompt": "a" * 40_000}}, 400, "'prompt'"),
    ("prompt_ten_megabytes", GEN, {"json": {"prompt": "a" * (10 << 20)}}, 413, "exceeds"),
    ("prompt_too_long_for_context", GEN, {"json": {"prompt": "a red star " * 2000}}, 400,
     "prompt too long"),
    ("chat_no_messages", CHAT, {"json": {"messages": []}}, 400, "'messages'"),
    ("chat_bad_role", CHAT, {"json": {"messages": [{"role": "robot", "content": "hi"}]}},
     400, "role"),
    ("chat_http_image_url", CHAT, {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}},
     400, "data:image"),
    ("chat_broken_base64", CHAT, {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}},
     400, "broken base64"),
    ("chat_base64_not_an_image", CHAT, {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}]}]}},
     400, "not a readable image"),
    ("chat_max_tokens_zero", CHAT, {"json": {"messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 0}}, 400, "max_tokens"),
    ("edit_no_image", EDIT, {"data": {"prompt": "make it blue"}}, 400, "'image'"),
    ("edit_not_an_image", EDIT, {"data": {"prompt": "make it blue"},
                                 "files": {"image": ("x.png", b"not a png", "image/png")}},
     400, "not a readable image"),
    ("edit_mask", EDIT, {"data": {"prompt": "make it blue", "mask": "x"},
                         "files": {"image": ("x.png", _png_bytes(), "image/png")}}, 400,
     "'mask'"),
    ("edit_n_not_a_number", EDIT, {"data": {"prompt": "make it blue", "n": "many"},
                                   "files": {"image": ("x.png", _png_bytes(), "image/png")}},
     400, "'n'"),
    ("edit_json_body", EDIT, {"json": {"prompt": "make it blue"}}, 400, "multipart"),
    ("wrong_method", "/v1/models", {"method": "DELETE"}, 405, ""),
]


@pytest.mark.parametrize("name,path,kwargs,status,needle", SERVER_BAD,
                         ids=[c[0] for c in SERVER_BAD])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, name, path, kwargs,
                                                             status, needle):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "POST")
    r = httpx.request(method, server.url + path, timeout=120, **kwargs)
    assert r.status_code == status, (r.status_code, r.text[:500])
    if needle:
        assert needle in r.json()["error"]["message"], r.text[:500]
    assert httpx.get(server.url + "/health").status_code == 200


def test_bad_input_tables_are_broad():
    assert len(SHARED) + len(SERVER_BAD) >= 25


def test_still_serving_after_bad_input(server):
    assert _generate(server, 7) > 0
    wait_idle(server)


# ----------------------------------------------------------------------- production
def test_api_key_and_bounded_queue(tmp_path):
    s = start_server(tmp_path, "--api-key", "sekrit", "--max-queued", "2")
    try:
        body = {"prompt": PROMPT, "k_docs": 0}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(s.url + GEN, json=body, headers=headers, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200  # not a /v1 route
        key = {"Authorization": "Bearer sekrit"}
        r = httpx.post(s.url + GEN, json={**body, "n": 3}, headers=key, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"  # n counts 3 > 2
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert len(ok.images.generate(prompt=PROMPT, n=2).data) == 2
        assert s.metrics()["cm3rt:requests_rejected_total"] == 1
    finally:
        assert s.stop() == 0


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    s = start_server(tmp_path, "--shutdown-timeout", "120")
    results: list[httpx.Response] = []

    def slow():  # 6 x 10 images: several seconds of work on the default model
        results.append(httpx.post(s.url + GEN, json={"prompt": PROMPT, "n": 10}, timeout=300))

    threads = [threading.Thread(target=slow) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while s.metrics()["cm3rt:num_requests_running"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    s.process.terminate()  # SIGTERM
    time.sleep(0.1)
    late = httpx.post(s.url + GEN, json={"prompt": PROMPT}, timeout=30)
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert httpx.get(s.url + "/ready").status_code == 503
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 6
    assert all(r.status_code == 200 and len(r.json()["data"]) == 10 for r in results)
    assert s.process.wait(timeout=60) == 0


def test_max_doc_score_passes_through_only_when_given():
    """A body's max_doc_score reaches resolve_request only when the client sent it: absent
    means the model's default (defaults.json), null turns the rule off."""
    from cm3rt.serve.protocol import ChatCompletionRequest, ImageGenerationRequest

    absent = ImageGenerationRequest.model_validate({"prompt": PROMPT, "k_docs": 1})
    assert absent.retrieval() == {"k_docs": 1}
    off = ImageGenerationRequest.model_validate({"prompt": PROMPT, "max_doc_score": None})
    assert off.retrieval() == {"k_docs": None, "max_doc_score": None}
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_doc_score": 0.95})
    assert chat.retrieval() == {"k_docs": None, "max_doc_score": 0.95}
