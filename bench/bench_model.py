"""Chameleon decoder step time: cm3rt (paged kernels) vs HF transformers, same weights, same run.

Run: python -m pytest bench/bench_model.py -q -s [--bench-device cuda]

Mid-size config: 8 layers, hidden 1024, 16 heads of 64, SwiGLU 2816, vocab 65536, qk-norm
(~235 M parameters). One random checkpoint is written with HF's save_pretrained and loaded
by both. Prints per step: milliseconds, tokens/s, GFLOP/s (2 x non-embedding parameters per
token, plus attention), for decode the weight-read GB/s and its ratio to the measured copy
bandwidth, and the speed-up over HF (``vs_hf`` > 1: cm3rt is faster). Both sides compute
the logits of the last token of each sequence only.
"""

from __future__ import annotations

import pytest
import torch
from _common import copy_bandwidth, record, time_fn

CONFIG = {
    "vocab_size": 65536, "hidden_size": 1024, "intermediate_size": 2816,
    "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
    "max_position_embeddings": 4096, "swin_norm": False,
}
TINY_VQ = {"resolution": 16, "base_channels": 32, "channel_multiplier": [1, 2],
           "num_res_blocks": 1, "latent_channels": 8, "embed_dim": 8, "num_embeddings": 64}
# (batch, prompt length) for prefill; (batch, context) for decode
SHAPES = {"cpu": {"prefill": (1, 128), "decode": (4, 128)},
          "cuda": {"prefill": (4, 1024), "decode": (16, 1024)}}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    path = tmp_path_factory.mktemp("bench_model") / "chameleon-mid"
    torch.manual_seed(0)
    cfg = ChameleonConfig(vq_config=TINY_VQ, vocabulary_map={}, **CONFIG)
    model = ChameleonForConditionalGeneration(cfg)
    with torch.no_grad():  # non-trivial norms so qk-norm and RMSNorm do real work
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    del model
    return path


def _models(path, dtype, device):
    from transformers import ChameleonForConditionalGeneration

    from cm3rt.model import load_model

    ours = load_model(path, dtype=dtype, device=device)
    hf = ChameleonForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    return ours, hf


def _flops_per_token(ctx: int) -> float:
    c = CONFIG
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    dense = layers * (4 * h * h + 3 * h * i)  # qkv + o + gate/up/down
    return 2 * dense + layers * 4 * ctx * h  # + QK^T and PV over ctx keys


def _step_meta(batch, start, q_len, blocks_per_seq, block_size, device):
    """Metadata + positions of `batch` sequences appending q_len tokens at positions
    start .. start + q_len - 1; sequence b owns blocks b * blocks_per_seq onwards."""
    from cm3rt.model import StepMetadata

    i32 = {"dtype": torch.int32, "device": device}
    seq = torch.arange(batch, **i32)
    pos = torch.arange(start, start + q_len, **i32)
    meta = StepMetadata(
        slots=(seq[:, None] * blocks_per_seq * block_size + pos[None]).reshape(-1),
        block_tables=seq[:, None] * blocks_per_seq + torch.arange(blocks_per_seq, **i32),
        seq_lens=torch.full((batch,), start + q_len, **i32),
        cu_seqlens_q=torch.arange(batch + 1, **i32) * q_len,
        max_q_len=q_len, max_seq_len=start + q_len)
    return meta, pos.long().repeat(batch)


def _dtypes(device):
    return [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_prefill(benchmark, bench_device, checkpoint, dtype_name):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    dev = bench_device
    if dtype not in _dtypes(dev):
        pytest.skip(f"{dtype_name} prefill not benchmarked on {dev}")
    batch, length = SHAPES[dev]["prefill"]
    ours, hf = _models(checkpoint, dtype, dev)
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, length),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    per_seq = -(-length // 16)
    meta, positions = _step_meta(batch, 0, length, per_seq, 16, dev)
    caches = ours.allocate_kv_cache(batch * per_seq, 16)
    last = meta.cu_seqlens_q[1:].long() - 1

    def run_ours():
        hidden = ours.forward_step(ids.reshape(-1), positions, meta, caches)
        return ours.compute_logits(hidden[last])

    @torch.inference_mode()
    def run_hf():
        return hf(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()

    benchmark.pedantic(run_ours, rounds=2, warmup_rounds=1, iterations=1)
    t_ours, t_hf = time_fn(run_ours, dev, min_reps=2), time_fn(run_hf, dev, min_reps=2)
    tokens = batch * length
    flops = tokens * _flops_per_token(length / 2)  # causal: on average half the keys
    record(bench="model_prefill", device=dev, dtype=dtype_name, batch=batch, len=length,
           ms=round(t_ours * 1e3, 1), hf_ms=round(t_hf * 1e3, 1),
           tok_per_s=round(tokens / t_ours), GFLOPs=round(flops / t_ours / 1e9, 1),
           vs_hf=round(t_hf / t_ours, 2))
    # The benchmarked configuration computes what HF computes (HF masks image tokens, and
    # this config has none).
    got, ref = run_ours(), run_hf()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    assert ((got - ref).abs().max() / ref.abs().max()).item() < tol


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_decode(benchmark, bench_device, checkpoint, dtype_name):
    from transformers import DynamicCache

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    dev = bench_device
    if dtype not in _dtypes(dev):
        pytest.skip(f"{dtype_name} decode not benchmarked on {dev}")
    batch, ctx = SHAPES[dev]["decode"]
    ours, hf = _models(checkpoint, dtype, dev)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, CONFIG["vocab_size"], (batch, ctx), generator=gen).to(dev)
    step_ids = torch.randint(0, CONFIG["vocab_size"], (batch, 1), generator=gen).to(dev)

    # cm3rt: prefill ctx tokens, then time one decode token per sequence at position ctx
    # (rewritten in place each time, so every timed step sees the same context).
    per_seq = -(-(ctx + 1) // 16)
    caches = ours.allocate_kv_cache(batch * per_seq, 16)
    pre_meta, pre_pos = _step_meta(batch, 0, ctx, per_seq, 16, dev)
    ours.forward_step(prompt.reshape(-1), pre_pos, pre_meta, caches)
    dec_meta, dec_pos = _step_meta(batch, ctx, 1, per_seq, 16, dev)

    def run_ours():
        hidden = ours.forward_step(step_ids.reshape(-1), dec_pos, dec_meta, caches)
        return ours.compute_logits(hidden)

    # HF: its DynamicCache after the same prompt, cropped back after every timed step.
    cache = DynamicCache(config=hf.config)
    with torch.inference_mode():
        hf(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def run_hf():
        out = hf(input_ids=step_ids, cache=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)  # drop the token just appended
        return out.logits[:, -1].float()

    benchmark.pedantic(run_ours, rounds=5, warmup_rounds=1, iterations=1)
    t_ours, t_hf = time_fn(run_ours, dev), time_fn(run_hf, dev)
    weight_bytes = sum(p.numel() * p.element_size() for name, p in ours.named_parameters()
                       if name != "embed_tokens")  # the embedding is gathered, not read
    kv_bytes = sum(2 * batch * (ctx + 1) * CONFIG["hidden_size"] * k.element_size()
                   for k, _ in caches)
    bw = copy_bandwidth(dev)
    moved = weight_bytes + kv_bytes
    record(bench="model_decode", device=dev, dtype=dtype_name, batch=batch, ctx=ctx,
           ms=round(t_ours * 1e3, 2), hf_ms=round(t_hf * 1e3, 2),
           tok_per_s=round(batch / t_ours), GBps=round(moved / t_ours / 1e9, 1),
           of_copy=round(moved / t_ours / bw, 2), vs_hf=round(t_hf / t_ours, 2))
    got, ref = run_ours(), run_hf()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    assert ((got - ref).abs().max() / ref.abs().max()).item() < tol
