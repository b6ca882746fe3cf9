"""Per-step host overhead of the CPU engine: Python, bindings and scheduling, measured on a
model whose arithmetic is negligible (1 layer, hidden 64, 2 heads, a vocabulary of 1,024 with
512 image codes), so the step time is what every decode step pays on top of its kernels.

Run: OMP_WAIT_POLICY=passive python -m pytest bench/bench_host_overhead.py -q -s

4 CFG prompts (8 streams) decode 128 image tokens each on one thread, through both CPU paths
of a step (per-op: forward_step + compute_logits + sample_logits; whole-step: one
ops.CpuDecoder.step_sample call on the packed buffers, the default), in interleaved rounds;
prints each path's median step and its parts (schedule, pack_step, forward, logits,
sampling; step_sample = the whole-step call: forward, logits and sampling; "rest" = engine
bookkeeping). The step time includes the kernels' own arithmetic (8 rows x
~74k weights, ~1.2 MFLOP), which on this model is not nothing. The projections are packed
in panels, as load_model leaves a CPU model. Target: <= 150 us.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record

CODES, VOCAB = 512, 1024
BOS, PAD, EOS, BOI, EOI = 0, 1, 2, 4, 5


def tiny_model():
    from cm3rt.model import ChameleonConfig, ChameleonModel
    from cm3rt.tokenizer.image_vocab import image_token_name

    vmap = {"<s>": BOS, "<pad>": PAD, "</s>": EOS, "<unk>": 3, "<racm3:break>": BOI,
            "<eoss>": EOI, "<image>": 6}
    vmap.update({image_token_name(c): 7 + c for c in range(CODES)})
    vmap.update({f"t{i}": i for i in range(7 + CODES, VOCAB)})
    cfg = ChameleonConfig.from_hf_dict({
        "model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "max_position_embeddings": 512, "vocabulary_map": vmap, "bos_token_id": BOS,
        "pad_token_id": PAD, "eos_token_id": EOS})
    torch.manual_seed(0)
    model = ChameleonModel(cfg, torch.float32, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() >= 2 else p.normal_(1.0, 0.1)
    return model.pack_weights_()  # as load_model leaves a CPU model


def test_host_overhead_per_step():
    import cm3rt.engine.runner as runner_module
    from cm3rt.engine import Engine, Request, SamplingParams, TokenPrompt, VocabInfo

    torch.set_num_threads(1)
    model = tiny_model()
    new_tokens, ctx = 128, 16 + 128 + 8
    vocab = VocabInfo.from_model_config(model.config, tokens_per_image=new_tokens)

    def engine(cpu_decoder):
        return Engine(model, vocab=vocab, block_size=16, num_blocks=8 * (-(-ctx // 16)) + 8,
                      max_num_seqs=8, max_model_len=ctx, cpu_decoder=cpu_decoder)

    def requests(n, seed):
        g = torch.Generator().manual_seed(seed)
        return [Request(TokenPrompt(cond=[BOS] + torch.randint(7 + CODES, VOCAB, (12,),
                                                                generator=g).tolist() + [BOI],
                                    uncond=[BOS, BOI]),
                        params=SamplingParams(guidance="cfg", cfg_scale=3.0, max_new_tokens=n,
                                              seed=seed + i))
                for i in range(4)]

    # The two CPU paths of a step, same model, same requests, rounds interleaved (the
    # machine's speed drifts): "per-op" (forward_step + compute_logits, ~10 kernel calls a
    # layer from Python) and "whole-step" (the default: one ops.CpuDecoder call).
    paths = {"per-op": engine(False), "whole-step": engine(True)}
    assert paths["whole-step"].runner.cpu_decoder is not None
    parts = {name: {} for name in paths}
    steps = {name: [] for name in paths}
    originals = []
    current: dict[str, list[float]] = {}  # the parts of the round being timed

    def timed(owner, attr, key):
        fn = getattr(owner, attr)
        originals.append((owner, attr, fn))

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            current.setdefault(key, []).append(time.perf_counter() - t0)
            return out
        setattr(owner, attr, wrapper)

    timed(runner_module, "pack_step", "pack_step")
    timed(model, "forward_step", "forward")
    timed(model, "compute_logits", "logits")
    timed(runner_module.ops, "sample_logits", "sampling")
    for eng in paths.values():
        timed(eng.scheduler, "schedule", "schedule")  # (instance attributes shadow methods)
        if eng.runner.cpu_decoder is not None:
            timed(eng.runner.cpu_decoder, "step_sample", "step_sample")
    try:
        for eng in paths.values():
            eng.generate(requests(8, 100))  # warm-up
        for _round in range(3):
            for name, eng in paths.items():
                for r in requests(new_tokens, 0):
                    eng.add_request(r)
                eng.step()  # the prefill
                current.clear()
                while eng.has_unfinished():
                    t0 = time.perf_counter()
                    eng.step()
                    steps[name].append(time.perf_counter() - t0)
                for key, v in current.items():
                    parts[name].setdefault(key, []).extend(v)
    finally:
        for owner, attr, fn in reversed(originals):
            setattr(owner, attr, fn)
        del model.forward_step, model.compute_logits  # the instance wrappers; methods again
    for name in paths:
        median = {k: statistics.median(v) * 1e6 for k, v in parts[name].items()}
        step = statistics.median(steps[name]) * 1e6
        record(bench="host_overhead", model="1 layer, hidden 64, vocab 1024", streams=8,
               path=name, step_us=round(step),
               **{f"{k}_us": round(median.get(k, 0.0)) for k in
                  ("schedule", "pack_step", "forward", "logits", "sampling", "step_sample")},
               rest_us=round(step - sum(median.values())),
               target="<= 150 us" if name == "whole-step" else "")
