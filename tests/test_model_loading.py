"""load_model on broken inputs (clear errors, nothing half-loaded) and its memory use."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from model_fixtures import make_tiny_model_dir
from safetensors.torch import load_file, save_file

from cm3rt.checkpoint import SafetensorsCheckpoint
from cm3rt.model import StepMetadata, load_model


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("good"))


@pytest.fixture
def broken(good_dir, tmp_path, monkeypatch):
    """A fresh copy of the good directory to break, and a spy proving that a failed load
    never starts copying weights."""
    path = tmp_path / "model"
    shutil.copytree(good_dir, path)
    copies = []
    real = SafetensorsCheckpoint.copy_into
    monkeypatch.setattr(SafetensorsCheckpoint, "copy_into",
                        lambda self, specs: (copies.append(1), real(self, specs)))
    return path, copies


def _edit_weights(path: Path, fn) -> None:
    f = path / "model.safetensors"
    tensors = dict(load_file(f))
    fn(tensors)
    save_file(tensors, f)


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory_and_files(broken, tmp_path):
    path, copies = broken
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_model(tmp_path / "no_such_dir")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(path)
    assert not copies


def test_missing_shard(good_dir, tmp_path):
    sharded = make_tiny_model_dir(tmp_path, name="sharded", max_shard_size="40KB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-"):
        load_model(sharded)


def test_wrong_shape_names_tensor_and_file(broken):
    path, copies = broken
    name = "model.layers.1.self_attn.k_proj.weight"
    _edit_weights(path, lambda t: t.__setitem__(name, torch.zeros(7, t[name].shape[1])))
    with pytest.raises(ValueError, match=r"k_proj\.weight.*model\.safetensors.*shape \[7, 64\]"):
        load_model(path)
    assert not copies


def test_wrong_dtype_names_tensor(broken):
    path, copies = broken
    name = "model.norm.weight"
    _edit_weights(path, lambda t: t.__setitem__(name, torch.ones(t[name].shape,
                                                                 dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*dtype I32"):
        load_model(path)
    assert not copies


def test_missing_tensor_is_named(broken):
    path, copies = broken
    _edit_weights(path, lambda t: t.pop("model.layers.0.self_attn.q_norm.bias"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.0\.self_attn\.q_norm\.bias"):
        load_model(path)
    assert not copies


def test_more_layers_than_config(broken):
    path, copies = broken
    _edit_config(path, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"model\.layers\.1\."):
        load_model(path)
    assert not copies


def test_unknown_architecture_and_unsupported_options(broken):
    path, copies = broken
    _edit_config(path, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="unknown architecture.*LlamaForCausalLM"):
        load_model(path)
    _edit_config(path, model_type="chameleon", architectures=["ChameleonForConditionalGeneration"],
                 hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        load_model(path)
    _edit_config(path, hidden_act="silu", rope_parameters={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="yarn"):
        load_model(path)
    _edit_config(path, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                 num_attention_heads=4)  # head_dim 16: no attention kernel for it
    with pytest.raises(ValueError, match="head_dim 16"):
        load_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(path)
    assert not copies


def test_bad_arguments(good_dir):
    with pytest.raises(TypeError, match="dtype"):
        load_model(good_dir, dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype"):
        load_model(good_dir, dtype="float8")
    with pytest.raises(ValueError, match="device"):
        load_model(good_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            load_model(good_dir, device="cuda")


def test_token_ids_outside_vocabulary(good_dir):
    model = load_model(good_dir)
    v = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"input_ids.*\[0, {v}\).*{v}\]"):
        model.logits(torch.tensor([[1, 2, v]]))
    with pytest.raises(ValueError, match="input_ids"):
        model.logits(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        model.logits(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="int64"):
        model.logits(torch.tensor([[1.0, 2.0]]))
    meta = StepMetadata(slots=torch.zeros(1, dtype=torch.int32),
                        block_tables=torch.zeros(1, 1, dtype=torch.int32),
                        seq_lens=torch.ones(1, dtype=torch.int32),
                        cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32),
                        max_q_len=1, max_seq_len=1)
    caches = model.allocate_kv_cache(1, 16)
    pos = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="input_ids"):  # forward_step checks on CPU too
        model.forward_step(torch.tensor([v + 5]), pos, meta, caches)
    with pytest.raises(TypeError, match="meta"):
        model.forward_step(torch.tensor([3]), pos, None, caches)
    with pytest.raises(ValueError, match="meta"):
        model.forward_step(torch.tensor([3, 4]), torch.zeros(2, dtype=torch.int64), meta, caches)
    with pytest.raises(ValueError, match="kv_caches"):
        model.forward_step(torch.tensor([3]), pos, meta, caches[:1])


def test_tied_embeddings_without_lm_head(broken):
    """A config with tie_word_embeddings uses the embedding as lm_head (no lm_head tensor)."""
    path, _ = broken
    _edit_config(path, tie_word_embeddings=True)
    _edit_weights(path, lambda t: t.pop("lm_head.weight"))
    model = load_model(path)
    assert model.lm_head is model.embed_tokens
    emb = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
    hidden = torch.randn(3, model.config.hidden_size)
    from cm3rt.model.layers import rms_norm

    ref = rms_norm(hidden, model.norm, model.config.rms_norm_eps) @ emb.T
    torch.testing.assert_close(model.compute_logits(hidden), ref)


# ---------------------------------------------------------------------------- memory
_MEMORY_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    import torch
    from cm3rt.model import StepMetadata, load_model

    def anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    torch.empty(1) + 1  # warm up torch's allocator and kernels before the baseline
    base, peak, done = anon_kb(), [0], [False]

    def poll():
        while not done[0]:
            peak[0] = max(peak[0], anon_kb())
            time.sleep(0.0005)

    t = threading.Thread(target=poll)
    t.start()
    model = load_model(path, dtype=dtype)
    done[0] = True
    t.join()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print((max(peak[0], anon_kb()) - base) * 1024, weights)
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_keeps_one_copy_in_memory(tmp_path_factory, dtype):
    """Peak anonymous memory while loading stays ~ the model's own size: no state dict, no
    second copy of a layer (the fused QKV / gate-up are filled in place)."""
    path = tmp_path_factory.getbasetemp() / "mem_model"
    if not path.exists():
        path.mkdir()
        h, inter, layers, vocab = 512, 1408, 4, 16384
        gen = torch.Generator().manual_seed(0)
        t = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=gen),
             "lm_head.weight": torch.randn(vocab, h, generator=gen),
             "model.norm.weight": torch.ones(h)}
        for i in range(layers):
            p = f"model.layers.{i}."
            for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)),
                                ("self_attn.v_proj", (h, h)), ("self_attn.o_proj", (h, h)),
                                ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                                ("mlp.down_proj", (h, inter))):
                t[p + name + ".weight"] = torch.randn(shape, generator=gen)
            for name in ("input_layernorm", "post_attention_layernorm"):
                t[p + name + ".weight"] = torch.ones(h)
            for name in ("q_norm", "k_norm"):
                t[p + f"self_attn.{name}.weight"] = torch.ones(8, 64)
                t[p + f"self_attn.{name}.bias"] = torch.zeros(8, 64)
        save_file(t, path / "model.safetensors")
        del t
        (path / "config.json").write_text(json.dumps({
            "model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"],
            "vocab_size": vocab, "hidden_size": h, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8}))
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path), dtype],
                         check=False, capture_output=True, text=True, cwd=root, timeout=300,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin",
                              "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    peak, weights = map(int, res.stdout.split()[-2:])
    assert weights > 100 * 2**20 / (2 if dtype == "bfloat16" else 1)
    # the weights once, plus slack for one transient tensor (largest: 32 MiB) and noise
    assert peak < weights + 48 * 2**20, (peak / 2**20, weights / 2**20)
