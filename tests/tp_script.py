"""Subprocess entry points of tests/test_tensor_parallel.py (a torch.distributed group can
be set up once per process, so every tensor-parallel run is its own process).

    python tests/tp_script.py generate MODEL TP OUT.json [--idle S]
    RANK=r WORLD_SIZE=2 MASTER_ADDR=.. MASTER_PORT=.. python tests/tp_script.py logits MODEL OUT
"""

from __future__ import annotations

import json
import sys
import time

import torch


def requests(default_model: bool):
    from cm3rt.engine import Request, SamplingParams

    p = SamplingParams
    out = [
        Request("a red circle", task="text_to_image", params=p(temperature=0.0)),
        Request("a blue square", task="text_to_image",
                params=p(guidance="cfg", cfg_scale=3.0, seed=1, n=2)),
        Request("a green star", task="text_to_image",
                params=p(guidance="cdk", cd_alpha=0.1, cd_k=2, seed=2, top_k=20)),
        Request("hello", task="interleaved", params=p(seed=3, max_new_tokens=20, top_p=0.9)),
    ]
    if default_model:  # retrieval from the default model's own bank (its defaults.json k)
        from cm3rt.api import load_defaults, open_default_bank

        assets = load_defaults()
        bank = open_default_bank(assets)
        out += [Request("a yellow triangle", task="text_to_image", bank=bank, k_docs=2,
                        params=p(guidance="cfg", cfg_scale=3.0, seed=4)),
                Request("a purple circle", task="text_to_image", bank=bank, k_docs=2,
                        params=p(guidance="cdk", seed=5))]
    return out


def generate(model: str, tp: int, out_path: str, idle: float) -> None:
    from cm3rt.api import load_engine

    engine = load_engine(None if model == "default" else model, device="cpu",
                         tensor_parallel_size=tp, num_blocks=512, block_size=8)
    reqs = requests(model == "default")
    result = []
    for i, r in enumerate(reqs):
        if idle and i == 1:
            time.sleep(idle)  # longer than the collective timeout: heartbeats keep it up
        (o,) = engine.generate([r])
        if o.error is not None:
            raise o.error
        result.append([{"tokens": s.token_ids, "logprobs": s.logprobs}
                       for s in o.samples])
    # Batched too: the same requests in one continuous batch.
    batched = engine.generate(requests(model == "default"))
    result.append([[s.token_ids for s in o.samples] for o in batched])
    with open(out_path, "w") as f:
        json.dump(result, f)


def logits(model: str, out_path: str) -> None:
    import os

    from safetensors.torch import save_file

    from cm3rt.api.parallel import join_group
    from cm3rt.model import load_model

    size = int(os.environ["WORLD_SIZE"])
    tp = join_group(int(os.environ["RANK"]), size, torch.device("cpu"), "env://", 60.0)
    m = load_model(model, tp=tp)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.config.vocab_size, (3, 17), generator=gen)
    out = m.logits(ids)  # SPMD: every rank runs it, the collectives line up
    if tp.rank == 0:
        save_file({"logits": out.contiguous()}, out_path)
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "generate":
        idle = float(sys.argv[sys.argv.index("--idle") + 1]) if "--idle" in sys.argv else 0.0
        generate(sys.argv[2], int(sys.argv[3]), sys.argv[4], idle)
    elif sys.argv[1] == "logits":
        logits(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
