#!/usr/bin/env python3
"""Step 6: the default model's decoder (Chameleon layout), trained on a mixture of tasks.

    python tools/train/train_decoder.py --data data/shapes --out data/runs/decoder    # train
    python tools/train/train_decoder.py --out data/runs/decoder --eval                # check

Reads the train split (captions), its image codes (``encode_images.py``: uint16 [N, 9])
and its retrieval lists (``build_banks.py``: int32 [N, 2], -1 = none), and the tokenizer.
Every step draws one kind of sequence (so a batch pads little), by the mixture

    kind       share  sequence (ids; loss on every token but bos, pads and retrieved docs)
    t2i        22%    <s> caption <racm3:break> 9 codes <eoss>     (caption -> <mask> 10%)
    i2t        11%    <s> [docs] <racm3:break> codes <eoss> canonical caption </s>
                      (docs: ``--i2t-docs`` of them, the record's retrieved documents or
                      near misses; with docs the loss is on the caption only)
    infill      5%    <s> <racm3:break> codes <eoss> pre <mask> post <infill> span </s>
    ra         17%    <s> doc [doc] caption <racm3:break> codes <eoss>, doc = caption
                      <racm3:break> codes <eoss> (``--near-miss`` of them with near-miss
                      documents: a shared colour or shape word, none of the target's pairs)
    novel      25%    as ra, but the object's look is renamed (``novel_context``)
    edit        8%    <s> <racm3:break> codes <eoss> "make the star blue" <racm3:break> edited codes <eoss>
    novel_i2t  12%    <s> docs <racm3:break> codes <eoss> renamed canonical caption </s>

after a first ``binding_steps`` (1,000) that draw only t2i 50%, i2t 40%, infill 10%. That
curriculum is measured: with the full mixture from step 0, the decoder's code embeddings
carried no shape at all after 2,200 steps (i2t loss on shape words 1.79 nats = chance,
colour 0.3-1.0); with t2i + i2t alone, shape fell to 0.08 nats and colour to 0.12 within
500 steps of 2,048 tokens, and with the full mixture over those 500 steps neither moved.
Sequences whose image can be copied (documents, the edit's source) or whose object is
renamed (novel) teach the decoder that codes need not follow the caption's words before it
has learnt what they mean. The mixture is exactly what cm3rt's engine builds at inference (``cm3rt/engine/sequence.py``:
text -> image prompts end in <racm3:break>; the unconditional CFG stream is
``<s> <mask> <racm3:break>``; an edit's image-conditional stream replaces the instruction
by <mask>, as 10% of the edit sequences do; retrieved documents come first, best first, as
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
import re
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

from cm3rt.cli.generate import score_or_none
from cm3rt.demo.evaluation.prompts import recolour
from cm3rt.demo.shapes import SceneObject
from cm3rt.demo.shapes.cells import CODES_PER_IMAGE, cell_code
from cm3rt.demo.shapes.vocab import (
    COLOURS,
    GRID,
    HELD_OUT_PAIRS,
    NONCE_WORDS,
    SHAPE_PLURALS,
    SHAPES,
    article,
)
from cm3rt.retrieval.select import DEFAULT_MAX_SCORE
from cm3rt.tokenizer.text import TextTokenizer
from cm3rt.tokenizer.vqgan_config import VQGANConfig

EXPORT = "model"
TRAIN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS)
KINDS = ("t2i", "i2t", "infill", "ra", "novel", "edit", "novel_i2t")
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
        lr: peak AdamW learning rate.  mixture: shares of ``KINDS``.
        binding_steps, binding_mixture: the first ``binding_steps`` steps draw by
            ``binding_mixture`` instead (captions and images only; see the module doc).
        p_uncond: share of t2i captions and edit instructions replaced by <mask> (the CFG
            unconditional and image-conditional prompts).
        novel_alias: share of novel episodes that name their looks by ordinary colour x
            shape pairs instead of nonce words (``SequenceSource.alias_names``).
        novel_i2t_alias: the same share for the novel_i2t (captioning) episodes.
        novel_shape_only: share of the other (nonce-named) novel episodes that rename the
            shape only and keep the true colour word ("a red dax").
        near_miss: share of ra episodes whose documents are near misses: scenes sharing a
            colour or a shape word with the target but showing none of its colour x shape
            pairs (``SequenceSource.near_miss_docs``).
        i2t_docs: share of i2t episodes with the record's retrieved documents in front
            (captioning with retrieval, as ``novel_i2t`` episodes need it).
        held_out_alias: share of the ordinary-named (alias) novel_i2t episodes whose target
            look is named by a held-out pair's words ("a red diamond" for, say, a green
            cross): the caption then has to copy a pair of words that no other training
            text puts together (``SequenceSource.alias_names``).
        init: a cm3rt model directory whose ``model.safetensors`` starts the decoder (a
            fine-tune; fresh optimizer), or None for a random start.
        warmup: learning-rate warmup steps.
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
    threads: int = 1
    steps: int = 2400
    tokens_per_step: int = 4096
    lr: float = 2e-3
    mixture: tuple[float, ...] = (0.22, 0.11, 0.05, 0.17, 0.25, 0.08, 0.12)
    binding_steps: int = 1000
    binding_mixture: tuple[float, ...] = (0.50, 0.40, 0.10, 0.0, 0.0, 0.0, 0.0)
    p_uncond: float = 0.10
    novel_alias: float = 0.0
    novel_shape_only: float = 0.0
    novel_i2t_alias: float = 0.8
    near_miss: float = 0.0
    i2t_docs: float = 0.0
    held_out_alias: float = 0.0
    init: Path | None = None
    warmup: int = 100
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    kv_heads: int = 2
    ffn: int = 512
    ckpt_every: int = 100
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("mixture", "binding_mixture"):
            m = getattr(self, name)
            if len(m) != len(KINDS) or min(m) < 0 or sum(m) <= 0:
                raise ValueError(f"{name} must be {len(KINDS)} shares >= 0 ({KINDS}), "
                                 f"got {m!r}")
        if not isinstance(self.binding_steps, int) or self.binding_steps < 0:
            raise ValueError(f"binding_steps must be an int >= 0, got {self.binding_steps!r}")
        for name in ("steps", "tokens_per_step", "ckpt_every", "threads", "warmup"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("novel_alias", "novel_shape_only", "novel_i2t_alias", "near_miss",
                     "i2t_docs", "held_out_alias"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond!r}")


def rename_look(text: str, look: tuple[str, str], name: str, plural: str | None = None
                ) -> str:
    """``text`` with every mention of the colour x shape ``look`` ("a small red star",
    "two red stars", "red star") renamed to ``name`` ("a small dax", "two daxs"; or an
    ordinary pair's name, "a small green cross", with its ``plural`` "green crosses")."""
    colour, shape = look
    text = re.sub(rf"\b{colour} {SHAPE_PLURALS[shape]}\b", plural or name + "s", text)

    def with_article(m: re.Match) -> str:
        size = m.group(2) or ""
        return f"{article(size or name)} {size}{name}"

    text = re.sub(rf"\b(an?) ((?:small |large )?){colour} {shape}\b", with_article, text)
    return re.sub(rf"\b{colour} {shape}\b", name, text)


class NovelLooks:
    """The novel split indexed by look, for the novel-concept episodes.

    Scene ``i`` can show look L = (colour, shape) when one of its objects is L and every
    other object is L or a train pair: after renaming L to a nonce word, no held-out pair's
    name is left in its captions."""

    def __init__(self, recs: list[dict]) -> None:
        self.recs = recs
        self.by_look: dict[tuple[str, str], list[int]] = {}
        self.by_key: dict[tuple, list[int]] = {}
        self.targets: list[tuple[int, tuple[str, str]]] = []
        for i, r in enumerate(recs):
            objs = r["scene"]["objects"]
            for o in objs[:1]:  # the first object is the episode's look
                look = (o["colour"], o["shape"])
                if any((p["colour"], p["shape"]) != look
                       and (p["colour"], p["shape"]) in HELD_OUT_PAIRS for p in objs):
                    continue
                self.targets.append((i, look))
                self.by_look.setdefault(look, []).append(i)
                key = (look, o["size"], r["scene"]["background"])
                self.by_key.setdefault(key, []).append(i)
        # a target needs another scene of its look for the documents
        self.targets = [(i, lk) for i, lk in self.targets if len(self.by_look[lk]) >= 2]
        self.looks = sorted(lk for lk, rows in self.by_look.items() if len(rows) >= 2)
        if not self.targets:
            raise ValueError("the novel split has no look shown in two scenes")

    def key(self, i: int) -> tuple:
        r = self.recs[i]
        o = r["scene"]["objects"][0]
        return ((o["colour"], o["shape"]), o["size"], r["scene"]["background"])


class SequenceSource:
    """Builds the training sequences of the mixture from the train split (and the novel
    split, for the novel-concept episodes)."""

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
        if opts.mixture[KINDS.index("edit")] > 0 and codes.shape[1] != CODES_PER_IMAGE:
            raise ValueError(f"edit episodes edit cell codes (cells.py, {CODES_PER_IMAGE} an "
                             f"image); {opts.codes} has {codes.shape[1]} codes an image")
        self.images = table[codes.astype(np.int64)]  # [N, tokens] vocabulary ids
        self.code_ids = table
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
        self.novel = None
        self.novel_alias, self.novel_shape_only = opts.novel_alias, opts.novel_shape_only
        self.novel_i2t_alias, self.held_out_alias = opts.novel_i2t_alias, opts.held_out_alias
        if opts.mixture[KINDS.index("novel")] > 0 or opts.mixture[KINDS.index("novel_i2t")] > 0:
            # every novel record that has codes (``limit`` applies to the train split)
            ncodes = np.load(opts.codes / "novel_codes.npy", allow_pickle=False)
            nrecs = split_records(opts.data, "novel")[:ncodes.shape[0]]
            ncodes = ncodes[:len(nrecs)]
            if len(nrecs) < 2:
                raise ValueError(f"novel episodes need the novel split and its codes "
                                 f"({opts.codes}/novel_codes.npy)")
            self.novel = NovelLooks(nrecs)
            self.novel_images = table[ncodes.astype(np.int64)]
        self.canonical_words = [r["canonical"].split(" ") for r in self.recs]
        # near-miss documents (``near_miss_docs``): train records by colour and by shape
        self.near_miss, self.i2t_docs = opts.near_miss, opts.i2t_docs
        self.pairs = [{(o["colour"], o["shape"]) for o in r["scene"]["objects"]}
                      for r in self.recs]
        self.by_colour: dict[str, list[int]] = {}
        self.by_shape: dict[str, list[int]] = {}
        for j, pairs in enumerate(self.pairs):
            for c, sh in pairs:
                self.by_colour.setdefault(c, []).append(j)
                self.by_shape.setdefault(sh, []).append(j)
        ntok = self.images.shape[1]
        self.typical = {"t2i": ntok + 20, "i2t": ntok + 25, "infill": ntok + 30,
                        "ra": 3 * ntok + 60, "novel": 3 * ntok + 60, "edit": 2 * ntok + 12,
                        "novel_i2t": 3 * ntok + 60}

    def __len__(self) -> int:
        return len(self.recs)

    def image(self, i: int) -> list[int]:
        return [self.boi, *self.images[i].tolist(), self.eoi]

    def documents(self, rows: list[int]) -> list[int]:
        """Train records ``rows`` laid out as retrieved documents (``caption <boi> codes
        <eoi>`` each, as ``Processor.document_ids`` does at inference)."""
        return [t for d in rows for t in (*self.doc_text[d], *self.image(d))]

    def novel_image(self, j: int) -> list[int]:
        return [self.boi, *self.novel_images[j].tolist(), self.eoi]

    def novel_context(self, rng: np.random.Generator, alias_share: float | None = None,
                      held_out_share: float = 0.0
                      ) -> tuple[list[int], int, tuple[str, str], dict]:
        """The documents of a novel-concept episode: a look (any colour x shape, held-out
        pairs included) is renamed to a nonce word drawn for this sequence; 1-2 documents
        show it under that word (the first matches the target's size and background 60% of
        the time), sometimes next to a distractor document (another look, another nonce
        word). A ``novel_alias`` share of the episodes names the looks by ordinary colour x
        shape pairs instead (``alias_names``) and always has a distractor; ``alias_share``
        overrides that share, and ``held_out_share`` of those name the target by a held-out
        pair's words.

        Returns (document ids, after <s>; the target scene's row in the novel split; its
        look; the names: look -> (name, plural or None))."""
        nv = self.novel
        i, look = nv.targets[int(rng.integers(len(nv.targets)))]
        words = rng.choice(len(NONCE_WORDS), size=2, replace=False)
        word, other_word = NONCE_WORDS[int(words[0])], NONCE_WORDS[int(words[1])]

        def pick(pool: list[int]) -> int | None:
            pool = [j for j in pool if j != i]
            return pool[int(rng.integers(len(pool)))] if pool else None

        same = pick(nv.by_key.get(nv.key(i), [])) if rng.random() < 0.6 else None
        first = same if same is not None else pick(nv.by_look[look])
        if first is None:
            raise ValueError(f"the novel split shows {look} only once")
        share = self.novel_alias if alias_share is None else alias_share
        alias = share > 0 and rng.random() < share
        docs = [(first, look)]
        r = rng.random()
        if r < 0.45:
            second = pick(nv.by_look[look])
            if second is not None:
                docs.append((second, look))
        # An alias episode always has a distractor: its target's name must be matched
        # against the documents' captions, or copying "whatever the documents show" would
        # pay, and that habit copies wrong looks into ordinary prompts (measured: a
        # fine-tune with single-look alias episodes took train-concept adherence with
        # retrieval from 77.5% to 47.5%; without retrieval it stayed at 76%).
        if (alias or 0.45 <= r < 0.75) and len(nv.looks) > 1:
            others = [lk for lk in nv.looks if lk != look]
            other = others[int(rng.integers(len(others)))]
            docs.append((pick(nv.by_look[other]), other))
        names = {lk: (w, None) for lk, w in zip(dict.fromkeys(lk for _, lk in docs),
                                                 (word, other_word))}
        if not alias and rng.random() < self.novel_shape_only:
            # Keep the true colour and rename the shape only ("a red dax"): the name to copy
            # then follows a real colour word, as "diamond" follows "red" in a held-out
            # caption, a pair of words no training text has.
            names = {lk: (f"{lk[0]} {w}", f"{lk[0]} {w}s") for lk, (w, _) in names.items()}
        if alias:
            # No draw at share 0: runs without held-out aliases keep their random stream.
            held_out = held_out_share > 0 and rng.random() < held_out_share
            names = self.alias_names(rng, [i, *(j for j, _ in docs)], list(names), held_out)
        ids: list[int] = []
        for k in rng.permutation(len(docs)):
            j, lk = docs[int(k)]
            ids += [*self.tok.encode(rename_look(nv.recs[j]["text"], lk, *names[lk])),
                    *self.novel_image(j)]
        return ids, i, look, names

    def build_novel(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """A novel-concept text -> image episode (``novel_context``): the target names its
        look only by the episode's name for it, so its codes can only come from the
        documents."""
        docs, i, look, names = self.novel_context(rng)
        rec = self.novel.recs[i]
        texts = rec["captions"] + [rec["canonical"]]
        caption = rename_look(texts[int(rng.integers(len(texts)))], look, *names[look])
        body = [*self.tok.encode(caption), *self.novel_image(i)]
        return [self.bos, *docs, *body], [0] * (1 + len(docs)) + [1] * len(body)

    def build_novel_i2t(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """A novel-concept captioning episode: the documents of ``novel_context``, then the
        target's image and its canonical caption with the look renamed. The look's name can
        only come from the document that shows it, which is how a held-out pair gets its
        words at inference (``cm3rt caption`` with retrieval). Loss on the caption only:
        the image is the prompt. A ``novel_i2t_alias`` share uses ordinary names: a 600-step
        probe learnt to copy nonce names (exact captions 15/40) but not ordinary ones, and a
        held-out caption needs ordinary words the weights would not say for that image."""
        docs, i, look, names = self.novel_context(rng, self.novel_i2t_alias,
                                                  self.held_out_alias)
        prompt = [self.bos, *docs, *self.novel_image(i)]
        caption = rename_look(self.novel.recs[i]["canonical"], look, *names[look])
        body = [*self.tok.encode(caption), self.eos]
        return prompt + body, [0] * len(prompt) + [1] * len(body)

    def near_miss_docs(self, i: int, rng: np.random.Generator, n: int) -> list[int]:
        """Up to ``n`` train records that share a colour or a shape word with an object of
        record ``i`` but show none of its colour x shape pairs ("a cyan triangle" for "a
        cyan star"): the documents of an ordinary prompt are often like that at inference,
        and copying them is then wrong (seen-concept adherence fell from 95% to 79.5% with
        retrieval on, the decoder drawing the document's shape or colour)."""
        objs = self.recs[i]["scene"]["objects"]
        wanted = {(o["colour"], o["shape"]) for o in objs}
        out: list[int] = []
        for _ in range(8 * n):
            if len(out) == n:
                break
            o = objs[int(rng.integers(len(objs)))]
            pool = (self.by_colour[o["colour"]] if rng.random() < 0.5
                    else self.by_shape[o["shape"]])
            j = pool[int(rng.integers(len(pool)))]
            if j != i and j not in out and not self.pairs[j] & wanted:
                out.append(j)
        return out

    def alias_names(self, rng: np.random.Generator, scenes: list[int],
                    looks: list[tuple[str, str]], held_out: bool = False
                    ) -> dict[tuple[str, str], tuple[str, str]]:
        """Ordinary names for this episode's ``looks``: distinct train pairs ("a green
        cross") that no object of the episode's novel ``scenes`` is, so each name means one
        look here and that look is not the one its words mean everywhere else. This is
        what a held-out prompt is at inference: familiar words whose look the weights do
        not hold and only the documents show.

        ``held_out``: the first look (the target) is named by a held-out pair instead, never
        its own, so the name-look pair of a held-out concept still never occurs in training;
        only its two words do, and only as a name copied from a document. A caption of a
        held-out render needs exactly that: without it the decoder gives the pair's second
        word about 1e-4 after the first, even when the document spells the pair out."""
        shown = {(o["colour"], o["shape"]) for j in scenes
                 for o in self.novel.recs[j]["scene"]["objects"]}
        free = [p for p in TRAIN_PAIRS if p not in shown and p not in looks]
        held = sorted(p for p in HELD_OUT_PAIRS if p not in shown and p not in looks) \
            if held_out else []
        pairs = [held[int(rng.integers(len(held)))] if held
                 else free.pop(int(rng.integers(len(free))))]
        for _ in looks[1:]:
            # Half the time a distractor's name shares a word with the target's ("green
            # star" next to "green cross"): the whole name must match, not one word.
            near = [k for k, p in enumerate(free) if p[0] == pairs[0][0] or p[1] == pairs[0][1]]
            pool = near if near and rng.random() < 0.5 else range(len(free))
            pairs.append(free.pop(int(list(pool)[int(rng.integers(len(pool)))])))
        return {lk: (f"{c} {s}", f"{c} {SHAPE_PLURALS[s]}") for lk, (c, s) in zip(looks, pairs)}

    def build_edit(self, i: int, rng: np.random.Generator, p_uncond: float
                   ) -> tuple[list[int], list[int]]:
        """A text-guided edit of train record ``i``: ``recolour`` (the edit ``cm3rt eval``
        scores) an object whose shape is the only one of its kind in the scene, so the
        instruction names one object; a scene with no such object gives a t2i sequence.
        The target codes are the source codes with that cell's code replaced
        (``cells.cell_code``: the tokenizer codes each cell by its content)."""
        scene = self.recs[i]["scene"]
        shapes = [o["shape"] for o in scene["objects"]]
        objs = [o for o in scene["objects"] if shapes.count(o["shape"]) == 1]
        if not objs:
            return self.build("t2i", i, rng, p_uncond)
        o = objs[int(rng.integers(len(objs)))]
        new, instruction = recolour(SceneObject(o["shape"], o["colour"], o["size"],
                                                tuple(o["cell"])), rng)
        source = self.images[i].tolist()
        target = list(source)
        row, col = new.cell
        target[row * GRID + col] = int(self.code_ids[cell_code(scene["background"], new)])
        text = [self.mask] if rng.random() < p_uncond else self.tok.encode(instruction)
        prompt = [self.bos, self.boi, *source, self.eoi, *text]
        body = [self.boi, *target, self.eoi]
        return prompt + body, [0] * len(prompt) + [1] * len(body)

    def build(self, kind: str, i: int, rng: np.random.Generator, p_uncond: float
              ) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of one sequence of ``kind`` about record ``i`` (a novel
        episode draws its own scenes from the novel split)."""
        if kind == "novel":
            return self.build_novel(rng)
        if kind == "novel_i2t":
            return self.build_novel_i2t(rng)
        if kind == "edit":
            return self.build_edit(i, rng, p_uncond)
        caption = self.captions[i][rng.integers(len(self.captions[i]))]
        if kind == "t2i":
            text = [self.mask] if rng.random() < p_uncond else caption
            ids = [self.bos, *text, *self.image(i)]
            return ids, [0] + [1] * (len(ids) - 1)
        if kind == "i2t":
            body = [*self.captions[i][-1], self.eos]
            if rng.random() < self.i2t_docs:
                # captioning with retrieval: the documents and the image are the prompt
                # (near misses where the record's retrieval list is empty)
                docs = [int(d) for d in self.retrieval[i] if d >= 0]
                docs = docs[:int(rng.integers(1, 3))] or self.near_miss_docs(i, rng, 1)
                prompt = [self.bos, *self.documents(docs), *self.image(i)]
                return prompt + body, [0] * len(prompt) + [1] * len(body)
            ids = [self.bos, *self.image(i), *body]
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
            if rng.random() < self.near_miss:
                near = self.near_miss_docs(i, rng, max(1, len(docs)))
                # all near misses, or one next to a retrieved document, in either order
                docs = near if rng.random() < 0.5 or not docs else [docs[0], *near[:1]]
                docs = [docs[int(k)] for k in rng.permutation(len(docs))]
            context = [self.bos, *self.documents(docs)]  # context, not a target
            body = [*caption, *self.image(i)]
            return context + body, [0] * len(context) + [1] * len(body)
        raise ValueError(f"unknown sequence kind {kind!r}")

    def batch(self, rng: np.random.Generator, opts: DecoderOptions, step: int
              ) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Step ``step``'s batch: (kind, ids [B, T], loss mask [B, T]); pads at the end."""
        mix = opts.binding_mixture if step < opts.binding_steps else opts.mixture
        p = np.asarray(mix, dtype=np.float64)
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


def init_from(model: TrainableChameleon, model_dir: Path) -> None:
    """Load ``model_dir``'s decoder weights (HF names, as ``export`` writes them) into
    ``model``; every tensor must be there with the same shape."""
    from safetensors.torch import load_file

    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--init {model_dir}: no model.safetensors there")
    tensors = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    wrong = sorted(k for k in own if k in tensors and tensors[k].shape != own[k].shape)
    if missing or wrong:
        raise ValueError(f"--init {model_dir} does not fit this decoder: missing {missing[:4]}, "
                         f"other shapes {wrong[:4]} (set --hidden etc. as it was trained)")
    model.load_state_dict({k: tensors[k].float() for k in own})


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
    elif opts.init is not None:
        init_from(model, opts.init)
        print(f"fine-tuning {opts.init}", flush=True)
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
        kind, ids, mask = src.batch(step_rng(opts.seed, 6, step), opts, step)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, opts.steps, opts.lr, warmup=opts.warmup)
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
            exported = export(model, opts, src)
            snap = opts.out / "exports" / f"step_{step + 1:06d}"
            if snap.exists():
                shutil.rmtree(snap)
            shutil.copytree(exported, snap)  # candidates of --select
    log.close()
    if start >= end:
        export(model, opts, src)
    timer.report()
    return stats


# ---------------------------------------------------------------------- check
def evaluate(model_dir: Path, n: int = 32, seed: int = 0, guidance: str = "cdk",
             cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0,
             bank: Path | None = None, k_docs: int = 2, uncond_docs: bool = False,
             max_doc_score: float | None = DEFAULT_MAX_SCORE) -> dict:
    """A quick adherence check of an export (the full table is ``cm3rt eval``): the first
    ``n`` of ``cm3rt eval``'s train-concept prompts and held-out prompts, one image each,
    sampled with ``guidance`` (default CD-K, what ``package_default.py`` ships; ``cfg_scale``
    applies to "cfg") and, with ``bank``, retrieval on for both sets (``k_docs`` documents),
    as in the default row of ``cm3rt eval`` (``uncond_docs``: the documents in the
    unconditional stream too; ``max_doc_score``: the retrieval rule); scored by the same
    ``adheres`` rule. ``score`` is their mean (what ``--select`` ranks by)."""
    from cm3rt.demo.evaluation import adheres, held_out_prompts, train_prompts
    from cm3rt.engine import Engine, Request, SamplingParams
    from cm3rt.model import load_pretrained

    model, proc = load_pretrained(model_dir)
    engine = Engine(model, proc)
    mem = None
    if bank is not None:
        from cm3rt.retrieval.bank import open_cached

        mem = open_cached(bank)
    out: dict = {"n": n, "guidance": guidance, "cfg_scale": cfg_scale,
                 "temperature": temperature, "top_k": top_k, "retrieval": mem is not None,
                 "uncond_docs": uncond_docs, "max_doc_score": max_doc_score}
    for name, prompts in (("train_concepts", train_prompts(n, seed)),
                          ("held_out", held_out_prompts(n, seed))):
        reqs = [Request(prompt=[p.text], task="text_to_image",
                        params=SamplingParams(guidance=guidance, cfg_scale=cfg_scale, seed=k,
                                              temperature=temperature, top_k=top_k,
                                              uncond_docs=uncond_docs),
                        bank=mem, k_docs=k_docs if mem is not None else 0,
                        max_doc_score=max_doc_score)
                for k, p in enumerate(prompts)]
        results = engine.generate(reqs)
        out[name] = sum(bool(r.images) and adheres(p.text, r.images[0])
                        for p, r in zip(prompts, results)) / n
    out["score"] = (out["train_concepts"] + out["held_out"]) / 2
    return out


def select(out: Path, n: int, bank: Path | None, guidance: str, cfg_scale: float,
           keep: int = 4, k_docs: int = 2, uncond_docs: bool = False,
           max_doc_score: float | None = DEFAULT_MAX_SCORE) -> dict:
    """Checkpoint selection by a quick eval, not by loss: scores the last ``keep`` exports
    under ``<out>/exports/`` (``evaluate``, ``n`` prompts a set, seed 1 so the selection
    prompts are not the first ones of ``cm3rt eval``'s sets) and copies the best to
    ``<out>/best``."""
    steps = sorted((int(d.name.split("_")[1]), d) for d in (out / "exports").glob("step_*"))
    if not steps:
        raise FileNotFoundError(f"no exports under {out}/exports (train first)")
    scores = {}
    for step, d in steps[-keep:]:
        r = evaluate(d, n, seed=1, guidance=guidance, cfg_scale=cfg_scale, bank=bank,
                     k_docs=k_docs, uncond_docs=uncond_docs, max_doc_score=max_doc_score)
        scores[step] = r
        print(json.dumps({"step": step, **r}), flush=True)
    best = max(scores, key=lambda k: (scores[k]["score"], k))
    dest = out / "best"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(dict(steps)[best], dest)
    result = {"best_step": best, "scores": scores}
    (out / "selection.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"selected step {best} -> {dest}", flush=True)
    return result


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
    p.add_argument("--novel-alias", type=float, default=DecoderOptions.novel_alias)
    p.add_argument("--novel-shape-only", type=float, default=DecoderOptions.novel_shape_only)
    p.add_argument("--novel-i2t-alias", type=float, default=DecoderOptions.novel_i2t_alias)
    p.add_argument("--near-miss", type=float, default=DecoderOptions.near_miss)
    p.add_argument("--i2t-docs", type=float, default=DecoderOptions.i2t_docs)
    p.add_argument("--held-out-alias", type=float, default=DecoderOptions.held_out_alias)
    p.add_argument("--init", type=Path, default=None,
                   help="fine-tune: start from this model directory's decoder weights")
    p.add_argument("--binding-steps", type=int, default=DecoderOptions.binding_steps)
    p.add_argument("--mixture", type=float, nargs=len(KINDS), default=DecoderOptions.mixture,
                   metavar="SHARE", help=f"shares of {', '.join(KINDS)}")
    p.add_argument("--warmup", type=int, default=DecoderOptions.warmup)
    p.add_argument("--ckpt-every", type=int, default=DecoderOptions.ckpt_every)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps of this call (with a checkpoint)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny model, 40 records, 4 steps")
    p.add_argument("--eval", action="store_true", help="quick adherence check of <out>/model")
    p.add_argument("--eval-n", type=int, default=32)
    p.add_argument("--eval-guidance", default="cdk", choices=("none", "cfg", "cdk"))
    p.add_argument("--eval-cfg-scale", type=float, default=3.0)
    p.add_argument("--eval-temperature", type=float, default=1.0)
    p.add_argument("--eval-top-k", type=int, default=0)
    p.add_argument("--eval-bank", type=Path, default=None,
                   help="memory bank: the prompts of --eval / --select use retrieval")
    p.add_argument("--eval-k-docs", type=int, default=2,
                   help="documents retrieved per prompt with --eval-bank")
    p.add_argument("--eval-uncond-docs", action="store_true",
                   help="with --eval-bank: the documents in the unconditional stream too")
    p.add_argument("--eval-max-doc-score", type=score_or_none, default=DEFAULT_MAX_SCORE, metavar="S",
                   help="with --eval-bank: drop documents more similar to the query than S "
                        "('none': keep them)")
    p.add_argument("--select", action="store_true",
                   help="score the last --select-keep exports by the quick eval; best -> "
                        "<out>/best")
    p.add_argument("--select-keep", type=int, default=4)
    a = p.parse_args(argv)
    if a.eval or a.select:
        torch.set_num_threads(max(1, a.threads))
        timer = Timer("train_decoder --select" if a.select else "train_decoder --eval")
        if a.select:
            select(a.out, a.eval_n, a.eval_bank, a.eval_guidance, a.eval_cfg_scale,
                   a.select_keep, a.eval_k_docs, a.eval_uncond_docs, a.eval_max_doc_score)
        else:
            print(json.dumps(evaluate(a.out / EXPORT, a.eval_n, guidance=a.eval_guidance,
                                      cfg_scale=a.eval_cfg_scale,
                                      temperature=a.eval_temperature, top_k=a.eval_top_k,
                                      bank=a.eval_bank, k_docs=a.eval_k_docs,
                                      uncond_docs=a.eval_uncond_docs,
                                      max_doc_score=a.eval_max_doc_score)))
        timer.report()
        return 0
    opts = DecoderOptions(data=a.data, codes=a.codes, retrieval=a.retrieval,
                          tokenizer=a.tokenizer, vqgan=a.vqgan, out=a.out, seed=a.seed,
                          threads=a.threads, steps=a.steps, tokens_per_step=a.tokens_per_step,
                          lr=a.lr, ckpt_every=a.ckpt_every,
                          novel_alias=a.novel_alias, novel_shape_only=a.novel_shape_only,
                          near_miss=a.near_miss, i2t_docs=a.i2t_docs,
                          novel_i2t_alias=a.novel_i2t_alias, held_out_alias=a.held_out_alias,
                          init=a.init, binding_steps=a.binding_steps, warmup=a.warmup,
                          mixture=tuple(a.mixture))
    if a.quick:
        opts = DecoderOptions(**{**asdict(opts), "steps": 4, "tokens_per_step": 1200,
                                 "hidden": 64, "layers": 2, "heads": 2, "kv_heads": 1,
                                 "ffn": 96, "ckpt_every": 2, "limit": 40})
    train(opts, quiet=a.quick, max_steps=a.max_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
