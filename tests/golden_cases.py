"""A fixed table of requests whose generated tokens are recorded once and asserted forever
after: refactors of the engine, the prompt builder, retrieval or the sampler must not change
a single token.

Every task, every guidance mode, n > 1, sampling filters and retrieval, on the embedded
default model (with its bank) and on a tiny random model built by ``model_fixtures``.

    python tests/golden_cases.py --record     # rewrite tests/data/golden_tokens.json

Only record on purpose (a deliberate change of behaviour), and say so in the commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
GOLDEN_FILE = HERE / "data" / "golden_tokens.json"
DEFAULT_IMAGE = HERE.parent / "docs" / "quickstart.png"


def _picture(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _cases(image: Image.Image, retrieval: bool) -> dict[str, dict[str, Any]]:
    """name -> Request keyword arguments (params as a SamplingParams kwargs dict)."""
    prompt = "a red star above a blue circle"
    k = 2 if retrieval else 0
    return {
        "t2i_cfg": {"prompt": prompt, "task": "text_to_image", "k_docs": k,
                        "params": {"guidance": "cfg", "cfg_scale": 3.0, "seed": 0}},
        "t2i_none": {"prompt": "a green cross", "task": "text_to_image",
                         "params": {"guidance": "none", "seed": 1, "top_k": 50}},
        "t2i_cdk": {"prompt": prompt, "task": "text_to_image", "k_docs": k,
                        "params": {"guidance": "cdk", "cd_alpha": 0.1, "cd_k": 1, "seed": 2}},
        "t2i_cfg_n3": {"prompt": "a small yellow circle at the top left",
                           "task": "text_to_image", "k_docs": k,
                           "params": {"guidance": "cfg", "cfg_scale": 1.5, "n": 3, "seed": 3,
                                       "top_p": 0.9}},
        "caption_greedy": {"prompt": [image], "task": "image_to_text",
                               "params": {"guidance": "none", "temperature": 0.0,
                                           "max_new_tokens": 24}},
        "caption_sampled": {"prompt": [image, "Describe the image."], "task": "image_to_text",
                                "params": {"temperature": 1.0, "top_k": 8, "seed": 4, "n": 2,
                                            "max_new_tokens": 16}},
        "edit_cfg3": {"prompt": [image, "make it green"], "task": "edit",
                          "params": {"guidance": "cfg3", "cfg_scale": 3.0, "cfg_image_scale": 1.5,
                                      "seed": 5}},
        "infill": {"prompt": "a red", "task": "infill", "suffix": " above a blue circle",
                       "params": {"seed": 6, "max_new_tokens": 12}},
        "interleaved": {"prompt": "a small blue square", "task": "interleaved",
                            "params": {"guidance": "cfg", "seed": 7, "max_new_tokens": 40}},
    }


def _default_setup():
    from cm3rt.api.defaults import default_model_dir
    from cm3rt.model import load_pretrained
    from cm3rt.retrieval.bank import open_cached

    root = default_model_dir()
    model, proc = load_pretrained(root)
    bank = open_cached(root / "bank")
    with Image.open(DEFAULT_IMAGE) as im:
        image = im.convert("RGB")
    return model, proc, bank, image


def _tiny_setup(tmp: Path):
    sys.path.insert(0, str(HERE))
    from model_fixtures import make_tiny_model_dir

    from cm3rt.model import load_pretrained

    model_dir = make_tiny_model_dir(tmp, use_hf=False, seed=11)
    model, proc = load_pretrained(model_dir)
    return model, proc, None, _picture(0, 16)


def run_cases(which: str, tmp: Path) -> dict[str, list[list[int]]]:
    """Run the table on model ``which`` ("default" or "tiny"); -> name -> [the cond
    stream's prompt ids, then the generated ids of each sample in sample index order], and
    name + ":decoded" -> [text, number of images] of each sample."""
    import torch

    from cm3rt.engine import Engine, Request, SamplingParams

    torch.manual_seed(0)
    model, proc, bank, image = _default_setup() if which == "default" else _tiny_setup(tmp)
    engine = Engine(model, proc, num_blocks=512, block_size=16)
    cases = _cases(image, retrieval=bank is not None)
    requests = []
    for name, kw in cases.items():
        kw = dict(kw)
        params = SamplingParams(**kw.pop("params"))
        requests.append(Request(request_id=name, params=params, bank=bank, **kw))
    outs = engine.generate(requests)
    result = {}
    for name, out in zip(cases, outs):
        out.raise_for_error()
        samples = sorted(out.samples, key=lambda s: s.index)
        result[name] = [list(map(int, out.prompt_token_ids)),
                        *(list(map(int, s.token_ids)) for s in samples)]
        # What the output decodes to: each sample's text, and how many images it holds.
        result[name + ":decoded"] = [[s.text, len(s.images)] for s in samples]
    return result


def _dump(data: dict) -> str:
    """JSON with one line per sample (reviewable diffs)."""
    lines = ["{", f'"recorded_with": {json.dumps(data["recorded_with"])},']
    models = [k for k in data if k != "recorded_with"]
    for i, model in enumerate(models):
        lines.append(f'"{model}": {{')
        names = list(data[model])
        for j, name in enumerate(names):
            samples = ",\n  ".join(json.dumps(s) for s in data[model][name])
            lines.append(f'"{name}": [\n  {samples}\n]' + ("," if j < len(names) - 1 else ""))
        lines.append("}" + ("," if i < len(models) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> int:
    import tempfile

    import torch

    from cm3rt import ops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help="rewrite " + str(GOLDEN_FILE))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = {"recorded_with": ops.build_info()["summary"],
                "default": run_cases("default", Path(tmp)),
                "tiny": run_cases("tiny", Path(tmp))}
    if args.record:
        GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN_FILE.write_text(_dump(data), encoding="utf-8")
        print(f"wrote {GOLDEN_FILE}")
    else:
        print(json.dumps({k: {n: [len(s) for s in v] for n, v in d.items()}
                          for k, d in data.items() if k != "recorded_with"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
