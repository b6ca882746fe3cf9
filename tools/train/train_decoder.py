#!/usr/bin/env python3
"""Step 6: the default model's decoder (Chameleon layout), trained on a mixture of tasks.

    python tools/train/train_decoder.py --data data/shapes --out data/runs/decoder    # train
    python tools/train/train_decoder.py --out data/runs/decoder --eval                # check

Reads the train split (captions), its image codes (``encode_images.py``: uint16 [N, 256])
and its retrieval lists (``build_banks.py``: int32 [N, 2], -1 = none), and the tokenizer.
Every step draws one kind of sequence (so a batch pads little), by the mixture

    kind    share  sequence (ids; loss on every token but bos, pads and retrieved docs)
    t2i     40%    <s> caption <racm3:break> 256 codes <eoss>     (caption -> <mask> 10%)
    i2t     15%    <s> <racm3:break> codes <eoss> canonical caption </s>
    infill  10%    <s> <racm3:break> codes <eoss> pre <mask> post <infill> span </s>
    ra      35%    <s> doc [doc] caption <racm3:break> codes <eoss>, doc = caption <racm3:break> codes <eoss>

which is exactly what cm3rt's engine builds at inference (``cm3rt/engine/sequence.py``:
text -> image prompts end in <racm3:break>; the unconditional CFG stream is
``<s> <mask> <racm3:break>``; retrieved documents come first, best first, as
``cm3rt.tokenizer.Processor.document_ids`` lays them out). The retrieved documents are train
scenes (held-out colour x shape pairs never occur in them), so the decoder never sees a
held-out pair; the shipped bank (``build_banks.py``) has them.

The module is ``decoder_model.TrainableChameleon`` (HF weight names). Each checkpoint
exports ``<out>/model/``: config.json + model.safetensors + tokenizer + VQGAN files, a
complete cm3rt model directory (``cm3rt.model.load_pretrained``). Resumable like the other
scripts: rerun the same command; batches are a pure function of (seed, step).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from decoder_model import DecoderConfig, TrainableChameleon
from train_common import (
    Timer,
    cosine_lr,
    load_checkpoint,
    progress,
    save_checkpoint,
    setup_torch,
    split_records,
    step_rng,
)

from cm3rt.tokenizer.text import TextTokenizer
from cm3rt.tokenizer.vqgan_config import VQGANConfig

EXPORT = "model"
KINDS = ("t2i", "i2t", "infill", "ra")
VQGAN_FILES = ("vqgan.safetensors", "vqgan_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class DecoderOptions:
    """A training run.

    Attributes:
        data: make_dataset.py folder.  codes: encode_images.py folder.
        retrieval: build_banks.py's train_retrieval.npy.  tokenizer: train_tokenizer.py
        folder.  vqgan: the VQGAN export (copied into the model directory).  out: run folder.
        seed, threads: as in the other scripts.  steps: optimizer steps.
        tokens_per_step: padded tokens per batch (batch size = this // the kind's length).
        lr: peak AdamW learning rate.  mixture: shares of t2i, i2t, infill, ra.
        p_uncond: share of t2i captions replaced by <mask> (the CFG unconditional prompt).
        hidden, layers, heads, kv_heads, ffn: decoder size.
        ckpt_every: steps between checkpoints.  limit: first N train records only.
    """

    data: Path
    codes: Path
    retrieval: Path
    tokenizer: Path
    vqgan: Path
    out: Path
    seed: int = 0
    threads: int = 2
    steps: int = 1400
    tokens_per_step: int = 6144
    lr: float = 2e-3
    mixture: tuple[float, float, float, float] = (0.40, 0.15, 0.10, 0.35)
    p_uncond: float = 0.10
    hidden: int = 192
    layers: int = 6
    heads: int = 6
    kv_heads: int = 2
    ffn: int = 512
    ckpt_every: int = 100
    limit: int | None = None

    def __post_init__(self) -> None:
        if len(self.mixture) != len(KINDS) or min(self.mixture) < 0 or sum(self.mixture) <= 0:
            raise ValueError(f"mixture must be {len(KINDS)} shares >= 0 ({KINDS}), "
                             f"got {self.mixture!r}")
        for name in ("steps", "tokens_per_step", "ckpt_every", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond!r}")


class SequenceSource:
    """Builds the training sequences of the mixture from the train split."""

    def __init__(self, opts: DecoderOptions) -> None:
        self.recs = split_records(opts.data, "train", opts.limit)
        n = len(self.recs)
        if n < 2:
            raise ValueError(f"need >= 2 train records in {opts.data}, got {n}")
        codes = np.load(opts.codes / "train_codes.npy", allow_pickle=False)
        retr = np.load(opts.retrieval, allow_pickle=False)
        if codes.shape[0] < n or retr.shape[0] < n:
            raise ValueError(f"{opts.codes}/train_codes.npy ({codes.shape[0]} rows) and "
                             f"{opts.retrieval} ({retr.shape[0]} rows) must cover the {n} "
                             f"train records")
        codes, retr = codes[:n], retr[:n]
        self.tok = TextTokenizer.from_file(opts.tokenizer)
        table = self.tok.image_token_ids.numpy()
        if int(codes.max()) >= len(table):
            raise ValueError(f"codes reach {int(codes.max())}, the tokenizer spells "
                             f"{len(table)} image codes")
        self.images = table[codes.astype(np.int64)]  # [N, tokens] vocabulary ids
        # Retrieval lists may only point inside the records used (limit), never at self.
        self.retrieval = np.where((retr >= 0) & (retr < n) & (retr != np.arange(n)[:, None]),
                                  retr, -1)
        t = self.tok
        self.bos, self.eos, self.pad = t.bos_id, t.eos_id, t.pad_id
        self.boi, self.eoi, self.mask, self.infill = t.boi_id, t.eoi_id, t.mask_id, t.infill_id
        if self.mask is None or self.infill is None:
            raise ValueError("the tokenizer needs <mask> and <infill> tokens")
        # Captions: the record's templates plus the canonical one (t2i draws any; i2t
        # targets the canonical, fully specified one; docs use "text", as the bank does).
        self.captions = [[t.encode(c) for c in r["captions"]] + [t.encode(r["canonical"])]
                         for r in self.recs]
        self.doc_text = [t.encode(r["text"]) for r in self.recs]
        self.canonical_words = [r["canonical"].split(" ") for r in self.recs]
        ntok = self.images.shape[1]
        self.typical = {"t2i": ntok + 20, "i2t": ntok + 25, "infill": ntok + 30,
                        "ra": 3 * ntok + 60}

    def __len__(self) -> int:
        return len(self.recs)

    def image(self, i: int) -> list[int]:
        return [self.boi, *self.images[i].tolist(), self.eoi]

    def build(self, kind: str, i: int, rng: np.random.Generator, p_uncond: float
              ) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of one sequence of ``kind`` about record ``i``."""
        caption = self.captions[i][rng.integers(len(self.captions[i]))]
        if kind == "t2i":
            text = [self.mask] if rng.random() < p_uncond else caption
            ids = [self.bos, *text, *self.image(i)]
            return ids, [0] + [1] * (len(ids) - 1)
        if kind == "i2t":
            ids = [self.bos, *self.image(i), *self.captions[i][-1], self.eos]
            return ids, [0] + [1] * (len(ids) - 1)
        if kind == "infill":
            words = self.canonical_words[i]
            span = int(rng.integers(1, min(3, len(words)) + 1))
            start = int(rng.integers(0, len(words) - span + 1))
            pre = " ".join(words[:start]) + (" " if start else "")
            post = (" " if start + span < len(words) else "") + " ".join(words[start + span:])
            mid = " ".join(words[start:start + span])
            enc = self.tok.encode
            ids = [self.bos, *self.image(i), *(enc(pre) if pre else []), self.mask,
                   *(enc(post) if post else []), self.infill, *enc(mid), self.eos]
            return ids, [0] + [1] * (len(ids) - 1)
        if kind == "ra":
            docs = [int(d) for d in self.retrieval[i] if d >= 0]
            if len(docs) > 1 and rng.random() < 0.5:
                docs = docs[:1]  # 1 or 2 docs, as k_docs 1 or 2 at inference
            ids, mask = [self.bos], [0]
            for d in docs:
                doc = [*self.doc_text[d], *self.image(d)]
                ids += doc
                mask += [0] * len(doc)  # context, not a target
            body = [*caption, *self.image(i)]
            return ids + body, mask + [1] * len(body)
        raise ValueError(f"unknown sequence kind {kind!r}")

    def batch(self, rng: np.random.Generator, opts: DecoderOptions
              ) -> tuple[str, torch.Tensor, torch.Tensor]:
        """One step's batch: (kind, ids [B, T], loss mask [B, T]); pads at the end."""
        p = np.asarray(opts.mixture, dtype=np.float64)
        kind = KINDS[int(rng.choice(len(KINDS), p=p / p.sum()))]
        b = max(1, opts.tokens_per_step // self.typical[kind])
        rows = [self.build(kind, int(i), rng, opts.p_uncond)
                for i in rng.integers(0, len(self), b)]
        t = max(len(ids) for ids, _ in rows)
        ids = torch.full((b, t), self.pad, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.bool)
        for r, (x, m) in enumerate(rows):
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(m)] = torch.tensor(m, dtype=torch.bool)
        return kind, ids, mask


def model_config(opts: DecoderOptions, vocab_size: int) -> DecoderConfig:
    return DecoderConfig(vocab_size=vocab_size, hidden_size=opts.hidden,
                         intermediate_size=opts.ffn, num_hidden_layers=opts.layers,
                         num_attention_heads=opts.heads, num_key_value_heads=opts.kv_heads)


def padded_vocab(tok: TextTokenizer) -> int:
    """Tokenizer size rounded up to a multiple of 64 (GEMM-friendly lm_head)."""
    return -(-tok.vocab_size // 64) * 64


def export(model: TrainableChameleon, opts: DecoderOptions, src: SequenceSource) -> Path:
    """Write the cm3rt model directory ``<out>/model`` (decoder + tokenizer + VQGAN)."""
    out = opts.out / EXPORT
    out.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((opts.tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    vmap = dict(vocab["model"]["vocab"])
    vmap.update({t["content"]: t["id"] for t in vocab.get("added_tokens", [])})
    vq = VQGANConfig.from_json(opts.vqgan / "vqgan_config.json").to_dict()
    cfg = model.hf_config(vmap, vq, {"bos": src.bos, "eos": src.eos, "pad": src.pad})
    model.save_hf(out, cfg)
    for name in TOKENIZER_FILES:
        shutil.copyfile(opts.tokenizer / name, out / name)
    for name in VQGAN_FILES:
        shutil.copyfile(opts.vqgan / name, out / name)
    return out


def train(opts: DecoderOptions, quiet: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) training to ``opts.steps`` (at most ``max_steps`` more in this call)."""
    setup_torch(opts.seed, opts.threads)
    timer = Timer("train_decoder")
    src = SequenceSource(opts)
    model = TrainableChameleon(model_config(opts, padded_vocab(src.tok)))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=opts.lr, betas=(0.9, 0.95))
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "options.json").write_text(json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}, indent=1))
    resumed = load_checkpoint(opts.out, model, opt)
    start = 0
    if resumed is not None:
        start = resumed[0]
        print(f"resumed from {opts.out} at step {start}/{opts.steps}", flush=True)
    print(f"decoder: {n_params / 1e6:.2f} M parameters, {opts.steps} steps of "
          f"~{opts.tokens_per_step} tokens, {len(src)} train records", flush=True)
    log = (opts.out / "log.jsonl").open("a", encoding="utf-8")
    end = opts.steps if max_steps is None else min(opts.steps, start + max_steps)
    sums: dict[str, list[float]] = {k: [0.0, 0.0] for k in KINDS}
    tokens = 0
    t_last = timer.seconds()
    model.train()
    stats: dict = {}
    for step in progress(start, end, "decoder", quiet):
        kind, ids, mask = src.batch(step_rng(opts.seed, 6, step), opts)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, opts.steps, opts.lr, warmup=100)
        logits = model(ids[:, :-1])
        target_mask = mask[:, 1:]
        loss = F.cross_entropy(logits[target_mask], ids[:, 1:][target_mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sums[kind][0] += loss.item()
        sums[kind][1] += 1
        tokens += ids.numel()
        if (step + 1) % 50 == 0 or step + 1 == end:
            now = timer.seconds()
            stats = {"step": step + 1, "lr": opt.param_groups[0]["lr"],
                     **{f"loss_{k}": round(s / c, 4) for k, (s, c) in sums.items() if c},
                     "tokens_per_s": round(tokens / max(1e-9, now - t_last)),
                     "elapsed_s": round(now, 1)}
            log.write(json.dumps(stats) + "\n")
            log.flush()
            if not quiet:
                print(json.dumps(stats), flush=True)
            sums = {k: [0.0, 0.0] for k in KINDS}
            tokens, t_last = 0, now
        if (step + 1) % opts.ckpt_every == 0 or step + 1 == end:
            save_checkpoint(opts.out, step + 1, model, opt)
            export(model, opts, src)
    log.close()
    if start >= end:
        export(model, opts, src)
    timer.report()
    return stats


# ---------------------------------------------------------------------- check
def evaluate(model_dir: Path, n: int = 32, seed: int = 0, cfg_scale: float = 3.0,
             temperature: float = 1.0, top_k: int = 0) -> dict:
    """A quick adherence check of an export (the full table is ``cm3rt eval``): the first
    ``n`` of ``cm3rt eval``'s train-concept and held-out prompts, CFG, no retrieval, one image
    each, scored by the same ``adheres`` rule."""
    from cm3rt.demo.evaluation import adheres, held_out_prompts, train_prompts
    from cm3rt.engine import Engine, Request, SamplingParams
    from cm3rt.model import load_pretrained

    model, proc = load_pretrained(model_dir)
    engine = Engine(model, proc)
    out: dict = {"n": n, "cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k}
    for name, prompts in (("train_concepts", train_prompts(n, seed)),
                          ("held_out", held_out_prompts(n, seed))):
        reqs = [Request(prompt=[p.text], task="text_to_image",
                        params=SamplingParams(guidance="cfg", cfg_scale=cfg_scale, seed=k,
                                              temperature=temperature, top_k=top_k))
                for k, p in enumerate(prompts)]
        results = engine.generate(reqs)
        out[name] = sum(bool(r.images) and adheres(p.text, r.images[0])
                        for p, r in zip(prompts, results)) / n
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/shapes"))
    p.add_argument("--codes", type=Path, default=Path("data/runs/codes"))
    p.add_argument("--retrieval", type=Path, default=Path("data/runs/banks/train_retrieval.npy"))
    p.add_argument("--tokenizer", type=Path, default=Path("data/runs/tokenizer"))
    p.add_argument("--vqgan", type=Path, default=Path("data/runs/vqgan/vqgan"))
    p.add_argument("--out", type=Path, default=Path("data/runs/decoder"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=DecoderOptions.threads)
    p.add_argument("--steps", type=int, default=DecoderOptions.steps)
    p.add_argument("--tokens-per-step", type=int, default=DecoderOptions.tokens_per_step)
    p.add_argument("--lr", type=float, default=DecoderOptions.lr)
    p.add_argument("--ckpt-every", type=int, default=DecoderOptions.ckpt_every)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps of this call (with a checkpoint)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny model, 40 records, 4 steps")
    p.add_argument("--eval", action="store_true", help="quick adherence check of <out>/model")
    p.add_argument("--eval-n", type=int, default=32)
    p.add_argument("--eval-cfg-scale", type=float, default=3.0)
    p.add_argument("--eval-temperature", type=float, default=1.0)
    p.add_argument("--eval-top-k", type=int, default=0)
    a = p.parse_args(argv)
    if a.eval:
        torch.set_num_threads(max(1, a.threads))
        print(json.dumps(evaluate(a.out / EXPORT, a.eval_n, cfg_scale=a.eval_cfg_scale,
                                  temperature=a.eval_temperature, top_k=a.eval_top_k)))
        return 0
    opts = DecoderOptions(data=a.data, codes=a.codes, retrieval=a.retrieval,
                          tokenizer=a.tokenizer, vqgan=a.vqgan, out=a.out, seed=a.seed,
                          threads=a.threads, steps=a.steps, tokens_per_step=a.tokens_per_step,
                          lr=a.lr, ckpt_every=a.ckpt_every)
    if a.quick:
        opts = DecoderOptions(**{**asdict(opts), "steps": 4, "tokens_per_step": 1200,
                                 "hidden": 64, "layers": 2, "heads": 2, "kv_heads": 1,
                                 "ffn": 96, "ckpt_every": 2, "limit": 40})
    train(opts, quiet=a.quick, max_steps=a.max_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
