"""Tensor parallelism on the CPU: gloo, two processes of one thread each.

TP = 2 must give the tokens of TP = 1 (greedy, sampled, CFG, CD-K, retrieval, n > 1,
batched) with logits equal within float32 tolerance; each rank reads only its slices of the
checkpoint; a split that does not divide fails on every rank with the numbers named, and
nothing waits longer than the collective timeout set here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from model_fixtures import make_tiny_model_dir
from serve_fixtures import free_port

from cm3rt.checkpoint import SafetensorsCheckpoint
from cm3rt.model import TensorParallel, load_model

SCRIPT = str(Path(__file__).with_name("tp_script.py"))
TIMEOUT_S = "30"  # every collective of the runs below (CM3RT_TP_TIMEOUT_S)
TP_MODEL = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 96}


def _env(**extra: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CM3RT_TP_TIMEOUT_S": TIMEOUT_S,
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.update(extra)
    return env


def _run(args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=_env(**env), capture_output=True,
                          text=True, timeout=timeout, check=False)


def _ranks(args: list[str], size: int = 2, timeout: float = 120) -> list[subprocess.Popen]:
    """``size`` processes with the env:// variables torchrun would set; waited for."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(size),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(size)]
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"a rank hung past {timeout} s") from None
    return procs


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory) -> Path:
    # Vocab 385: not a multiple of 2, so the last vocab shard is padded.
    return make_tiny_model_dir(tmp_path_factory.mktemp("tp"), use_hf=False, seed=5,
                               vocab_size=385, **TP_MODEL)


@pytest.mark.parametrize("model", ["tiny", "default"])
def test_tp2_tokens_equal_tp1(tmp_path, tp_model, model):
    name = str(tp_model) if model == "tiny" else "default"
    outs = []
    for tp in (1, 2):
        path = tmp_path / f"tp{tp}.json"
        r = _run([SCRIPT, "generate", name, str(tp), str(path)])
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(json.loads(path.read_text()))
    one, two = outs
    assert len(one) == len(two) and len(one) >= 5
    for req_1, req_2 in zip(one[:-1], two[:-1]):
        assert len(req_1) == len(req_2)
        for s1, s2 in zip(req_1, req_2):
            assert s1["tokens"] == s2["tokens"]
            assert len(s1["tokens"]) > 0
            torch.testing.assert_close(torch.tensor(s2["logprobs"]), torch.tensor(s1["logprobs"]),
                                       atol=2e-4, rtol=1e-4)
    assert one[-1] == two[-1]  # the same requests in one continuous batch


def test_tp2_logits_equal_tp1(tmp_path, tp_model):
    out = tmp_path / "logits.safetensors"
    procs = _ranks([SCRIPT, "logits", str(tp_model), str(out)])
    assert [p.returncode for p in procs] == [0, 0], [p.stdout.read()[-2000:] for p in procs]
    from safetensors.torch import load_file

    got = load_file(out)["logits"]
    ids = torch.randint(0, 385, (3, 17), generator=torch.Generator().manual_seed(0))
    want = load_model(tp_model).logits(ids)
    assert got.shape == want.shape == (3, 17, 385)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_idle_driver_keeps_the_group_alive(tmp_path, tp_model):
    # Idle for 3x the collective timeout between two requests: heartbeats keep it alive.
    path = tmp_path / "idle.json"
    r = _run([SCRIPT, "generate", str(tp_model), "2", str(path), "--idle", "9"],
             CM3RT_TP_TIMEOUT_S="3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads(path.read_text())) >= 5


def test_rank_reads_only_its_slices(tp_model, monkeypatch):
    full = load_model(tp_model, pack_weights=False)  # [N, K] weights, to compare slices

    read_whole: list[str] = []
    real_get = SafetensorsCheckpoint.get

    def get(self, name):
        read_whole.append(name)
        return real_get(self, name)

    # No process group: loading runs no collective, so one rank's share loads alone.
    monkeypatch.setattr(SafetensorsCheckpoint, "get", get)
    shard = load_model(tp_model, tp=TensorParallel(rank=1, size=2))
    monkeypatch.undo()
    # Only the replicated RMSNorm weights are read whole; everything else by slice.
    assert read_whole and all(n.endswith("layernorm.weight") or n == "model.norm.weight"
                              for n in read_whole), read_whole
    d, h = 32, 128
    layer, ref = shard.layers[1], full.layers[1]
    q_full, k_full, v_full = ref.qkv_proj.split([4 * d, 2 * d, 2 * d])
    q_mine, k_mine, v_mine = layer.qkv_proj.split([2 * d, d, d])
    assert torch.equal(q_mine, q_full[2 * d:]) and torch.equal(k_mine, k_full[d:])
    assert torch.equal(v_mine, v_full[d:])
    assert torch.equal(layer.o_proj, ref.o_proj[:, 2 * d:])
    assert torch.equal(layer.q_norm_weight, ref.q_norm_weight[2:])
    g_full, u_full = ref.gate_up_proj.split(96)
    assert torch.equal(layer.gate_up_proj, torch.cat([g_full[48:], u_full[48:]]))
    assert torch.equal(layer.down_proj, ref.down_proj[:, 48:])
    # Vocab rows [193, 385) and one zero padding row.
    assert shard.embed_tokens.shape == (193, h)
    assert torch.equal(shard.embed_tokens[:192], full.embed_tokens[193:])
    assert not shard.embed_tokens[192].any()
    assert shard.allocate_kv_cache(2, 4)[0][0].shape == (2, 4, 1, d)  # its own kv head


def test_bad_split_is_a_clear_error_before_any_process_starts(tmp_path):
    from cm3rt.api import load_engine

    path = make_tiny_model_dir(tmp_path, use_hf=False)  # 2 heads, 1 kv head
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 does not divide the "
                                         r"model's num_key_value_heads \(1\)"):
        load_engine(path, tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"num_attention_heads \(2\)"):
        load_engine(path, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size' must be an int >= 1"):
        load_engine(path, tensor_parallel_size=0)


def test_bad_split_fails_on_every_torchrun_rank(tmp_path):
    path = make_tiny_model_dir(tmp_path, use_hf=False)  # 1 kv head: no split over 2
    procs = _ranks(["-m", "cm3rt", "generate", "a red circle", "--model", str(path),
                    "--tp", "2", "--device", "cpu", "-o", str(tmp_path / "x.png")])
    for p in procs:
        text = p.stdout.read()
        assert p.returncode == 1, text
        assert "num_key_value_heads (1)" in text and "Traceback" not in text, text


def test_torchrun_cli_draws_what_one_process_draws(tmp_path):
    one = tmp_path / "one.png"
    r = _run(["-m", "cm3rt", "generate", "a red circle", "--seed", "3", "--device", "cpu",
              "--no-progress", "-o", str(one)])
    assert r.returncode == 0, r.stderr[-2000:]
    two = tmp_path / "two.png"
    procs = _ranks(["-m", "cm3rt", "generate", "a red circle", "--seed", "3", "--tp", "2",
                    "--device", "cpu", "--no-progress", "-o", str(two)], timeout=240)
    assert [p.returncode for p in procs] == [0, 0], [p.stdout.read()[-2000:] for p in procs]
    assert two.read_bytes() == one.read_bytes()


def test_serve_with_tp2_answers_like_one_process(tmp_path):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    import base64

    from serve_fixtures import start_server

    import cm3rt

    server = start_server(tmp_path, "--tp", "2", "--device", "cpu")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                               timeout=300)
        got = client.images.generate(prompt="a red circle", n=2, extra_body={"seed": 5})
        want = cm3rt.generate("a red circle", n=2, seed=5, device="cpu")
        import io

        import numpy as np
        from PIL import Image

        for item, image in zip(got.data, want.images, strict=True):
            with Image.open(io.BytesIO(base64.b64decode(item.b64_json))) as im:
                assert np.array_equal(np.asarray(im.convert("RGB")),
                                      np.asarray(image.convert("RGB")))
        chat = client.chat.completions.create(
            model="cm3rt-default", messages=[{"role": "user", "content": "a red circle"}],
            max_tokens=8, temperature=0)
        assert chat.choices[0].message.content is not None
        workers = subprocess.run(["pgrep", "-P", str(server.process.pid), "-f",
                                  "cm3rt.api.parallel"], capture_output=True, text=True,
                                 check=False).stdout.split()
        assert len(workers) == 1, workers  # rank 1, spawned by the server
    finally:
        code = server.stop()
    assert code == 0, server.log_text()
    # The worker rank exits with the server (the engine closes at exit).
    deadline = time.monotonic() + 30
    while Path(f"/proc/{workers[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{workers[0]}").exists()


def test_a_worker_that_dies_fails_the_driver_at_once():
    import threading

    from cm3rt.api.parallel import watching

    dead = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="worker rank 1 exited with code 3 during loading"):
        watching([dead], "loading", threading.Event().wait)  # a collective that never ends
    assert time.monotonic() - t0 < 10
    assert watching([], "loading", lambda: 7) == 7
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(ValueError, match="boom"):  # the driver's own error comes through
            watching([alive], "loading", lambda: (_ for _ in ()).throw(ValueError("boom")))
    finally:
        alive.kill()
        alive.wait()
