"""ops.CpuDecoder, the whole CPU forward step in one C++ call, against the per-op CPU path
(ChameleonModel.forward_step + compute_logits): logits and KV caches equal bit for bit for
float32 / bfloat16 / int8 weights, the plain and swin layouts, decode and chunked steps,
the whole lm_head and a row subset (image-span logits); an engine with it draws exactly
what one without it draws; bad steps get a ValueError naming what was wrong."""

from __future__ import annotations

import pytest
import torch

from cm3rt import ops
from cm3rt.model import ChameleonConfig, ChameleonModel
from cm3rt.model.chameleon import PROJECTIONS, packs_weights
from cm3rt.model.step import StepMetadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, BS = 512, 4


def _model(dtype: torch.dtype, int8: bool, swin: bool, seed: int = 0,
           packed: bool = False) -> ChameleonModel:
    cfg = ChameleonConfig.from_hf_dict({
        "model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"],
        "hidden_size": 128, "intermediate_size": 200, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "max_position_embeddings": 256, "swin_norm": swin,
        "vocabulary_map": {"<s>": 0, "<pad>": 1, "</s>": 2}, "bos_token_id": 0,
        "pad_token_id": 1, "eos_token_id": 2})
    g = torch.Generator().manual_seed(seed)
    model = ChameleonModel(cfg, dtype, "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
            else:  # norm weights near 1, qk-norm biases near 0
                p.copy_((0.0 if "bias" in name else 1.0) + 0.1 * torch.randn(p.shape, generator=g))
    model = model.quantize_int8_() if int8 else model
    return model.pack_weights_() if packed else model


def _prefill(model, caches, prompts: list[list[int]]) -> None:
    """The prompts' keys and values, by the per-op path; sequence b owns blocks 8b..8b+7."""
    lens = [len(p) for p in prompts]
    slots = [8 * b * BS + j for b, n in enumerate(lens) for j in range(n)]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    meta = StepMetadata(
        slots=torch.tensor(slots, dtype=torch.int32),
        block_tables=torch.tensor([[8 * b + j for j in range(8)] for b in range(len(lens))],
                                  dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32), max_q_len=max(lens),
        max_seq_len=max(lens))
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.tensor([j for n in lens for j in range(n)])
    model.forward_step(ids, pos, meta, caches)


def _step(prompt_lens: list[int], q_lens: list[int], seed: int):
    """A step of q_lens[b] new tokens after prompt_lens[b] cached ones, for every b."""
    g = torch.Generator().manual_seed(seed)
    ids, pos, slots, cu = [], [], [], [0]
    for b, (p, q) in enumerate(zip(prompt_lens, q_lens)):
        ids += torch.randint(3, VOCAB, (q,), generator=g).tolist()
        pos += list(range(p, p + q))
        slots += [8 * b * BS + j for j in range(p, p + q)]
        cu.append(cu[-1] + q)
    B = len(q_lens)
    lens = [p + q for p, q in zip(prompt_lens, q_lens)]
    meta = StepMetadata(
        slots=torch.tensor(slots, dtype=torch.int32),
        block_tables=torch.tensor([[8 * b + j for j in range(8)] for b in range(B)],
                                  dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32), max_q_len=max(q_lens),
        max_seq_len=max(lens))
    rows = torch.tensor(cu[1:], dtype=torch.int64) - 1  # each sequence's last token
    return torch.tensor(ids), torch.tensor(pos), meta, rows


def _call(dec, ids, pos, meta, rows, head):
    return dec.step(ids, pos, meta.slots, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q,
                    rows, meta.max_q_len, meta.max_seq_len, head)


@pytest.mark.parametrize("swin", [False, True], ids=["plain", "swin"])
@pytest.mark.parametrize("dtype,int8", [(torch.float32, False), (torch.bfloat16, False),
                                        (torch.float32, True), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "int8-fp32", "int8-bf16"])
@pytest.mark.parametrize("q_lens", [[1, 1, 1, 1, 1, 1], [2, 1, 3]], ids=["decode", "chunked"])
@pytest.mark.parametrize("packed", [False, True], ids=["nk", "packed"])
def test_logits_and_caches_equal_the_per_op_path(dtype, int8, swin, q_lens, packed):
    model = _model(dtype, int8, swin, packed=packed)
    if packed:
        want = packs_weights(model.dtype, model.layers[0].qkv_proj.dtype)
        assert model.weights_packed == want
        assert (model.layers[0].qkv_proj_packed is not None) == want
    B = len(q_lens)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in range(5, 5 + 3 * B, 3)]
    ours = model.allocate_kv_cache(8 * B, BS)
    for k, v in ours:  # uninitialised: zeroed so that whole caches compare
        k.zero_(), v.zero_()
    _prefill(model, ours, prompts)
    theirs = [(k.clone(), v.clone()) for k, v in ours]
    image_rows = torch.arange(7, VOCAB, 5)  # a subset of lm_head rows, as image-span logits
    heads = [None, model.lm_head_rows(image_rows)]
    dec = model.cpu_decoder(ours, heads)
    assert dec is not None
    ids, pos, meta, rows = _step([len(p) for p in prompts], q_lens, seed=2)
    for index, head in enumerate(heads):
        assert model.cpu_decoder_takes(ids.shape[0], rows.shape[0], head)
        got = _call(dec, ids, pos, meta, rows, index)
        want = model.compute_logits(model.forward_step(ids, pos, meta, theirs).index_select(0, rows),
                                    head)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got, want), (got - want).abs().max()
        for (k, v), (k2, v2) in zip(ours, theirs):
            assert torch.equal(k, k2) and torch.equal(v, v2)
    # R = 0 (a chunk that samples nothing) still writes its keys and values
    ids, pos, meta, _ = _step([n + q for n, q in zip((len(p) for p in prompts), q_lens)],
                              [1] * B, seed=3)
    assert _call(dec, ids, pos, meta, torch.zeros(0, dtype=torch.int64), 0) is None
    model.forward_step(ids, pos, meta, theirs)
    for (k, v), (k2, v2) in zip(ours, theirs):
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_takes_only_steps_whose_projections_all_use_the_kernel():
    fp32, bf16 = _model(torch.float32, False, False), _model(torch.bfloat16, False, False)
    from cm3rt.model.chameleon import KERNEL_ROWS

    lo, hi = KERNEL_ROWS[torch.float32]
    assert fp32.cpu_decoder_takes(hi, lo, None) and not fp32.cpu_decoder_takes(hi + 1, lo, None)
    assert not fp32.cpu_decoder_takes(lo, lo - 1, None)  # the lm_head rows decide too
    assert fp32.cpu_decoder_takes(hi, 0, None)  # nothing to sample: the layers decide
    lo, hi = KERNEL_ROWS[torch.bfloat16]
    assert bf16.cpu_decoder_takes(hi, hi, None) and not bf16.cpu_decoder_takes(hi + 1, 8, None)
    int8 = _model(torch.float32, True, False)
    assert int8.cpu_decoder_takes(500, 1, int8.lm_head_rows(torch.arange(8)))
    assert _model(torch.float16, False, False).cpu_decoder([], [None]) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_engine_draws_the_same_with_and_without_it(tmp_path, dtype):
    from model_fixtures import make_tiny_model_dir

    from cm3rt.engine import Engine, Request, SamplingParams
    from cm3rt.model import load_pretrained

    model, proc = load_pretrained(make_tiny_model_dir(tmp_path, use_hf=False, seed=5),
                                  dtype=dtype)

    def requests():
        p = SamplingParams
        return [Request("a red circle", params=p(guidance="cfg", seed=1, n=2)),
                Request("a blue square", params=p(guidance="cdk", seed=2, top_k=5)),
                Request("a cat", task="interleaved", params=p(seed=6, max_new_tokens=20))]

    per_op = Engine(model, proc, num_blocks=256, block_size=4, cpu_decoder=False)
    assert per_op.runner.cpu_decoder is None
    want = per_op.generate(requests())
    whole = Engine(model, proc, num_blocks=256, block_size=4)
    calls = []
    real = whole.runner.cpu_decoder.step_sample
    whole.runner.cpu_decoder.step_sample = lambda *a: calls.append(1) or real(*a)
    got = whole.generate(requests())
    assert len(calls) > 10  # the decode steps went through it
    for w, g in zip(want, got):
        assert w.ok and g.ok
        for ws, gs in zip(w.samples, g.samples):
            assert gs.token_ids == ws.token_ids
            assert gs.logprobs == ws.logprobs


def test_bad_steps_are_value_errors_naming_the_field():
    model = _model(torch.float32, False, False)
    caches = model.allocate_kv_cache(16, BS)
    dec = model.cpu_decoder(caches, [None])
    ids, pos, meta, rows = _step([0, 0], [1, 1], seed=0)
    good = {"ids": ids, "positions": pos, "slots": meta.slots,
            "block_tables": meta.block_tables, "seq_lens": meta.seq_lens,
            "cu_seqlens_q": meta.cu_seqlens_q, "rows": rows, "max_q_len": 1,
            "max_seq_len": 1, "head": 0}

    def bad(match, exc=ValueError, **change):
        with pytest.raises(exc, match=match):
            dec.step(**{**good, **change})

    bad(r"ids\[1\] = 512 is outside the embedding table", ids=torch.tensor([3, VOCAB]))
    bad(r"slots\[0\] = 64 is outside \[-1, 64\)",
        slots=torch.tensor([64, 1], dtype=torch.int32))
    bad(r"block_tables\[1, 0\] = 16 is outside",
        block_tables=torch.tensor([[0] * 8, [16] * 8], dtype=torch.int32))
    bad(r"rows\[0\] = 2 is not a token of the step", rows=torch.tensor([2]))
    bad(r"cu_seqlens_q must run from 0 to T = 2",
        cu_seqlens_q=torch.tensor([0, 1, 3], dtype=torch.int32))
    bad(r"seq_len 40 \(must be q_len <= seq_len <= MB \* BS = 32\)",
        seq_lens=torch.tensor([1, 40], dtype=torch.int32), max_seq_len=40)
    bad(r"max_q_len / max_seq_len", max_seq_len=0)
    bad(r"head 1 does not exist", head=1)
    bad(r"'ids' must be int64", TypeError, ids=ids.to(torch.int32))
    bad(r"'slots' must be contiguous", slots=torch.tensor([0, 0, 1, 1], dtype=torch.int32)[::2])
    bad(r"'positions' must be a tensor of shape \[2\]|'positions'.*\[T\]",
        positions=torch.zeros(3, dtype=torch.int64))
    # the decoder still works after the errors
    assert dec.step(**good).shape == (2, VOCAB)


def test_bad_construction_names_the_argument():
    model = _model(torch.float32, False, False)
    caches = model.allocate_kv_cache(16, BS)
    with pytest.raises(ValueError, match="2 layers but 1"):
        model.cpu_decoder(caches[:1], [None])
    small = model.allocate_kv_cache(16, BS)
    small[1] = (small[1][0][:, :2].contiguous(), small[1][1])
    with pytest.raises(ValueError, match=r"caches\[1\]\[0\]"):
        model.cpu_decoder(small, [None])
    with pytest.raises(TypeError, match=r"heads\[0\]"):
        ops.CpuDecoder({"rms_norm_eps": 1e-5, "qk_norm_eps": 1e-5, "swin_norm": False},
                       model.embed_tokens, model.norm, model.inv_freq, [], [], [("x", None, None)])
    with pytest.raises(ValueError, match="no layers"):
        ops.CpuDecoder({"rms_norm_eps": 1e-5, "qk_norm_eps": 1e-5, "swin_norm": False},
                       model.embed_tokens, model.norm, model.inv_freq, [], [],
                       [(model.lm_head, None, None)])
    with pytest.raises(ValueError, match="triples"):
        ops.CpuDecoder({"rms_norm_eps": 1e-5, "qk_norm_eps": 1e-5, "swin_norm": False},
                       model.embed_tokens, model.norm, model.inv_freq, [], [],
                       [(model.lm_head, None)])


def test_a_row_count_in_place_of_a_weight_needs_its_panels_and_the_right_count():
    """A packed model passes a projection's row count instead of its [N, K] weight: without
    the panels, or with a count that is not the layer's, construction is a ValueError."""
    model = _model(torch.float32, False, False)
    caches = model.allocate_kv_cache(16, BS)
    names = ("input_layernorm", "post_attention_layernorm", "q_norm_weight", "q_norm_bias",
             "k_norm_weight", "k_norm_bias") + PROJECTIONS + tuple(
                 f"{n}_scales" for n in PROJECTIONS)
    layers = [{n: getattr(layer, n) for n in names} for layer in model.layers]
    config = {"rms_norm_eps": 1e-5, "qk_norm_eps": 1e-5, "swin_norm": False}
    o_rows = model.layers[0].o_proj.shape[0]
    layers[0]["o_proj"] = o_rows
    with pytest.raises(ValueError, match=r"layers\[0\]\.o_proj.*needs the weight's panels"):
        ops.CpuDecoder(config, model.embed_tokens, model.norm, model.inv_freq, layers, caches,
                       [(model.lm_head, None, None)])
    layers[0]["o_proj_packed"] = ops.linear_pack(model.layers[0].o_proj)
    layers[0]["o_proj"] = o_rows + 16
    with pytest.raises(ValueError, match=f"row count {o_rows + 16} is not the {o_rows}"):
        ops.CpuDecoder(config, model.embed_tokens, model.norm, model.inv_freq, layers, caches,
                       [(model.lm_head, None, None)])
    layers[0]["o_proj"] = o_rows  # the right count builds (packed models step above)
    ops.CpuDecoder(config, model.embed_tokens, model.norm, model.inv_freq, layers, caches,
                   [(model.lm_head, None, None)])


def _packed(ids, pos, meta, rows, groups):
    """The engine's three packed buffers (engine/step_inputs.py) of a step and its sampling
    ``groups`` (dicts of the sampler's per-group arguments), with their dims."""
    T, B, R, G = ids.shape[0], meta.seq_lens.shape[0], rows.shape[0], len(groups)
    col = {k: [g[k] for g in groups] for k in groups[0]}
    i64 = torch.cat([ids, pos, rows, torch.tensor(col["seed"]), torch.tensor(col["step"])])
    i32 = torch.cat([meta.slots, meta.seq_lens, meta.cu_seqlens_q,
                     meta.block_tables.reshape(-1)] +
                    [torch.tensor(col[k], dtype=torch.int32)
                     for k in ("streams", "mode", "top_k", "cd_k", "mask_kind")])
    f32 = torch.tensor([v for k in ("temperature", "top_p", "cfg_scale", "cfg_image_scale",
                                    "cd_alpha") for v in col[k]], dtype=torch.float32)
    dims = (T, B, R, G, meta.block_tables.shape[1], meta.max_q_len, meta.max_seq_len)
    return i64, i32, f32, dims


def _groups():
    base = {"top_k": 0, "cd_k": 1, "top_p": 1.0, "cfg_scale": 3.0, "cfg_image_scale": 1.0,
            "cd_alpha": 0.1}
    return [  # cfg, cdk with top-k, one plain row at temperature 0 (6 rows in all)
        {**base, "streams": 2, "mode": ops.SAMPLE_MODES["cfg"], "temperature": 1.0,
         "seed": 11, "step": 3, "mask_kind": 0},
        {**base, "streams": 2, "mode": ops.SAMPLE_MODES["cdk"], "temperature": 0.7,
         "top_k": 9, "seed": 12, "step": 0, "mask_kind": 1},
        {**base, "streams": 1, "mode": 0, "temperature": 0.0, "seed": 13, "step": 5,
         "mask_kind": 2},
        {**base, "streams": 1, "mode": 0, "temperature": 1.2, "top_p": 0.8, "seed": 14,
         "step": 1, "mask_kind": 0}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", [0, 1], ids=["lm_head", "row-subset"])
def test_step_sample_draws_what_step_then_sample_logits_draw(dtype, head):
    model = _model(dtype, False, False)
    image_rows = model.lm_head_rows(torch.arange(100, 300))
    ids, pos, meta, rows = _step([5, 3, 6, 2, 4, 7], [1, 1, 1, 1, 1, 1], seed=3)
    groups = _groups()
    n_cols = VOCAB if head == 0 else 200
    g = torch.Generator().manual_seed(0)
    table = torch.rand((3, n_cols), generator=g) < 0.6  # three mask kinds
    bits = ops.pack_allowed_bits(table) if head == 0 else None
    results = []
    for fused in (False, True):
        caches = model.allocate_kv_cache(64, BS)
        _prefill(model, caches, [list(range(3, 3 + n)) for n in (5, 3, 6, 2, 4, 7)])
        dec = model.cpu_decoder(caches, [None, image_rows])
        if fused:
            results.append(dec.step_sample(*_packed(ids, pos, meta, rows, groups), head, bits))
            continue
        logits = _call(dec, ids, pos, meta, rows, head)
        col = {k: [gr[k] for gr in groups] for k in groups[0]}

        def i32(k, col=col):
            return torch.tensor(col[k], dtype=torch.int32)

        def f32(k, col=col):
            return torch.tensor(col[k], dtype=torch.float32)

        tokens, logprobs = ops.sample_logits(
            logits, i32("streams"), mode=i32("mode"), temperature=f32("temperature"),
            top_k=i32("top_k"), top_p=f32("top_p"), cfg_scale=f32("cfg_scale"),
            cfg_image_scale=f32("cfg_image_scale"), cd_alpha=f32("cd_alpha"), cd_k=i32("cd_k"),
            allowed_bits=None if bits is None else bits.index_select(
                0, torch.tensor(col["mask_kind"])),
            seed=torch.tensor(col["seed"]), step=torch.tensor(col["step"]))
        results.append((tokens.tolist(), logprobs.tolist()))
    assert results[1] == results[0]
    assert all(t >= 0 for t in results[1][0])
    if bits is not None:  # every drawn token is allowed by its group's mask kind
        for gr, t in zip(groups, results[1][0]):
            assert table[gr["mask_kind"], t]


def test_step_sample_rejects_bad_buffers_and_groups_by_name():
    model = _model(torch.float32, False, False)
    dec = model.cpu_decoder(model.allocate_kv_cache(64, BS), [None])
    ids, pos, meta, rows = _step([5, 3, 6, 2, 4, 7], [1] * 6, seed=3)
    bits = ops.pack_allowed_bits(torch.ones((3, VOCAB), dtype=torch.bool))

    def bad(match, groups=None, edit=None, allowed=bits):
        i64, i32, f32, dims = _packed(ids, pos, meta, rows, groups or _groups())
        args = [i64, i32, f32, dims]
        if edit:
            edit(args)
        with pytest.raises(ValueError, match=match):
            dec.step_sample(*args, 0, allowed)

    def with_group(g, **change):
        groups = _groups()
        groups[g] = {**groups[g], **change}
        return groups

    bad(r"'temperature'\[1\] must be finite and >= 0", with_group(1, temperature=-1.0))
    bad(r"mode 'cfg' of group 0 needs 2 streams, got 1", with_group(0, streams=1))
    bad(r"stream counts .* sum to 7 rows but 'logits' has R = 6",
        with_group(2, streams=2, mode=0))
    bad(r"mask_kind\[3\] = 3 is not a row of 'allowed_bits' \(3 rows\)",
        with_group(3, mask_kind=3))
    bad(r"'i32' must have shape \[T \+ 2 B \+ 1 \+ B MB \+ 5 G\] = \[87\], got \[86\]",
        edit=lambda a: a.__setitem__(1, a[1][:-1]))
    bad(r"dims .* do not describe a step",
        edit=lambda a: a.__setitem__(3, (0,) + tuple(a[3][1:])))
    bad(r"ids\[0\] = 512 is outside the embedding table",
        edit=lambda a: a[0].__setitem__(0, VOCAB))
    bad(r"'allowed_bits'", allowed=bits[:, :3])
    # the decoder still steps after the errors
    tokens, logprobs = dec.step_sample(*_packed(ids, pos, meta, rows, _groups()), 0, bits)
    assert len(tokens) == len(logprobs) == 4
