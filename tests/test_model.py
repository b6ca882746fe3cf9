"""cm3rt.model against HF transformers' Chameleon on tiny random checkpoints.

Every directory is written by HF's own ``save_pretrained`` (tests/model_fixtures.py), so the
real loading path runs, and the reference logits are HF's lm_head on HF's final hidden
states (before HF masks the image tokens).
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import hf_logits, load_hf_model, make_tiny_model_dir

from cm3rt.model import ChameleonModel, StepMetadata, load_model

# Four architectures: plain / swin_norm, GQA (2 q heads per kv head) / MHA.
VARIANTS = {
    "plain-gqa": {"swin_norm": False, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "hidden_size": 128},
    "swin-gqa": {"swin_norm": True, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "hidden_size": 128},
    "plain-mha": {"swin_norm": False, "num_attention_heads": 2, "num_key_value_heads": 2},
    "swin-mha": {"swin_norm": True, "num_attention_heads": 2, "num_key_value_heads": 2,
                 "rope_theta": 500000.0},
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: make_tiny_model_dir(root, name=name, seed=i, **kw)
            for i, (name, kw) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def hf_models(model_dirs):
    return {name: load_hf_model(path) for name, path in model_dirs.items()}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (the error relative to the logits' scale)."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def random_ids(vocab: int, shape, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf_float32(model_dirs, hf_models, variant):
    model = load_model(model_dirs[variant])
    hf = hf_models[variant]
    for i, (b, length) in enumerate([(1, 1), (2, 7), (3, 33)]):  # odd lengths, > one block
        ids = random_ids(model.config.vocab_size, (b, length), seed=i)
        got = model.logits(ids)
        ref = hf_logits(hf, ids)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert rel_err(got, ref) <= 1e-4, (variant, b, length)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["plain-gqa", "swin-mha"])
def test_logits_half_precision(model_dirs, hf_models, variant, dtype):
    """Half-precision logits are as close to the float32 reference as HF's own run in that
    dtype is (HF's error bounds ours, with a 2x margin and a floor of one ulp-ish step)."""
    path = model_dirs[variant]
    model = load_model(path, dtype=dtype)
    assert model.dtype == dtype
    hf_half = load_hf_model(path, dtype=dtype)
    ids = random_ids(model.config.vocab_size, (2, 19), seed=3)
    ref = hf_logits(hf_models[variant], ids)
    got = model.logits(ids)
    assert got.dtype == torch.float32
    eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    ours, theirs = rel_err(got, ref), rel_err(hf_logits(hf_half, ids), ref)
    assert ours <= max(2 * theirs, 8 * eps), (ours, theirs)
    assert ours <= 64 * eps  # and within the dtype's tolerance in absolute terms


def test_sharded_and_half_precision_checkpoint(tmp_path):
    """A sharded index, with bf16 tensors on disk, loads into float32 exactly."""
    sharded = make_tiny_model_dir(tmp_path, name="sharded", max_shard_size="40KB",
                                  save_dtype=torch.bfloat16)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    model = load_model(sharded, dtype=torch.float32)
    hf = load_hf_model(sharded, dtype=torch.float32)  # HF upcasts the bf16 tensors too
    ids = random_ids(model.config.vocab_size, (2, 11), seed=5)
    assert rel_err(model.logits(ids), hf_logits(hf, ids)) <= 1e-4


def _meta(seq_lens, q_lens, tables, block_size) -> tuple[StepMetadata, torch.Tensor]:
    """StepMetadata and positions of a step where sequence b appends q_lens[b] tokens."""
    i32 = torch.int32
    slots, positions = [], []
    for s, q, table in zip(seq_lens, q_lens, tables):
        for p in range(s - q, s):
            slots.append(table[p // block_size] * block_size + p % block_size)
            positions.append(p)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=i32)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=i32)
    meta = StepMetadata(slots=torch.tensor(slots, dtype=i32), block_tables=bt,
                        seq_lens=torch.tensor(seq_lens, dtype=i32), cu_seqlens_q=cu,
                        max_q_len=max(q_lens), max_seq_len=max(seq_lens))
    return meta, torch.tensor(positions, dtype=torch.int64)


@pytest.mark.parametrize("variant", ["plain-gqa", "swin-mha"])
def test_incremental_decoding_matches_full_forward(model_dirs, variant):
    """Chunked prefill, then token-by-token decode of three sequences of different lengths
    in one batch, through scattered cache blocks, equals the one-shot forward."""
    model = load_model(model_dirs[variant])
    vocab, bs = model.config.vocab_size, 4
    prompts = [13, 5, 1]
    steps = 6
    seqs = [random_ids(vocab, (n + steps,), seed=10 + n) for n in prompts]
    full = [model.logits(s[None])[0] for s in seqs]

    # Blocks handed out in a shuffled order, so a sequence's blocks are not contiguous.
    pool = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
    tables = [[pool.pop() for _ in range(-(-(n + steps) // bs))] for n in prompts]
    caches = model.allocate_kv_cache(40, bs)
    for k, v in caches:  # poison: a read of an unwritten slot would surface as NaN
        k.fill_(float("nan"))
        v.fill_(float("nan"))

    def run(lens, q_lens, seq_idx):
        meta, pos = _meta([lens[i] for i in seq_idx], [q_lens[i] for i in seq_idx],
                          [tables[i] for i in seq_idx], bs)
        ids = torch.cat([seqs[i][lens[i] - q_lens[i]:lens[i]] for i in seq_idx])
        hidden = model.forward_step(ids, pos, meta, caches)
        return model.compute_logits(hidden), meta

    # Step 1: the long prompt's first chunk (8 tokens) and the whole short prompts.
    lens, q = [8, 5, 1], [8, 5, 1]
    logits, meta = run(lens, q, [0, 1, 2])
    rows = meta.cu_seqlens_q.tolist()
    for i in range(3):
        torch.testing.assert_close(logits[rows[i]:rows[i + 1]], full[i][:lens[i]],
                                   rtol=1e-4, atol=1e-4)
    # Step 2: the rest of the long prompt (chunked prefill) next to decode tokens.
    lens, q = [13, 6, 2], [5, 1, 1]
    logits, meta = run(lens, q, [0, 1, 2])
    rows = meta.cu_seqlens_q.tolist()
    for i in range(3):
        torch.testing.assert_close(logits[rows[i]:rows[i + 1]], full[i][lens[i] - q[i]:lens[i]],
                                   rtol=1e-4, atol=1e-4)
    # Then decode steps, one token per unfinished sequence (the batch shrinks at the end).
    target = [n + steps for n in prompts]
    while lens != target:
        active = [i for i in range(3) if lens[i] < target[i]]
        lens = [n + (i in active) for i, n in enumerate(lens)]
        logits, _ = run(lens, [1, 1, 1], active)
        for row, i in enumerate(active):
            torch.testing.assert_close(logits[row], full[i][lens[i] - 1], rtol=1e-4, atol=1e-4)
    assert lens == [n + steps for n in prompts]


def test_engine_contract(model_dirs):
    model = load_model(model_dirs["plain-gqa"], dtype="bf16")
    cfg = model.config
    assert isinstance(model, ChameleonModel) and isinstance(model, torch.nn.Module)
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    caches = model.allocate_kv_cache(num_blocks=3, block_size=16)
    assert len(caches) == cfg.num_hidden_layers
    for k, v in caches:
        assert k.shape == v.shape == (3, 16, cfg.num_key_value_heads, cfg.head_dim)
        assert k.dtype == v.dtype == torch.bfloat16
    total = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in caches)
    assert model.kv_cache_bytes_per_block(16) * 3 == total
    # fused projections: one QKV and one gate/up weight per layer
    layer = model.layers[0]
    assert layer.qkv_proj.shape == ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
                                    * cfg.head_dim, cfg.hidden_size)
    assert layer.gate_up_proj.shape == (2 * cfg.intermediate_size, cfg.hidden_size)
    assert not any(p.requires_grad for p in model.parameters())
    assert cfg.image_token_ids and len(cfg.image_token_ids) == 64
    assert cfg.boi_token_id is not None and cfg.eoi_token_id is not None
    meta, _ = _meta([5], [5], [[0]], 16)
    assert model.attention_workspace(5, meta) is None  # only the CUDA kernel needs scratch
    hidden = torch.randn(5, cfg.hidden_size, dtype=torch.bfloat16)
    out = model.compute_logits(hidden)
    assert out.shape == (5, cfg.vocab_size) and out.dtype == torch.float32


def test_hf_config_values_are_read(model_dirs):
    from transformers import ChameleonConfig as HFConfig

    from cm3rt.model import ChameleonConfig

    path = model_dirs["swin-mha"]
    ours = ChameleonConfig.from_json(path)
    theirs = HFConfig.from_pretrained(path)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "swin_norm",
                  "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 500000.0
    assert ours.head_dim == theirs.hidden_size // theirs.num_attention_heads
    # the image vocabulary: HF's mapping, code -> bpe id
    from transformers.models.chameleon.modeling_chameleon import (
        ChameleonImageVocabularyMapping,
    )

    img2bpe = ChameleonImageVocabularyMapping(theirs.vocabulary_map).img2bpe
    assert list(ours.image_token_ids) == [img2bpe[c] for c in range(len(img2bpe))]


def test_fixture_without_transformers_is_hf_layout(tmp_path):
    """make_tiny_model_dir(use_hf=False) writes what HF itself loads without a missing or
    unexpected key, and the two implementations agree on it."""
    from transformers import ChameleonForConditionalGeneration

    path = make_tiny_model_dir(tmp_path, use_hf=False, swin_norm=True)
    hf, info = ChameleonForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model = load_model(path)
    ids = random_ids(model.config.vocab_size, (2, 9), seed=8)
    assert rel_err(model.logits(ids), hf_logits(hf.eval(), ids)) <= 1e-4
