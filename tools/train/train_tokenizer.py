#!/usr/bin/env python3
"""Step 1: the text tokenizer (HF ``tokenizers`` byte-level BPE) of the default model.

    python tools/train/train_tokenizer.py --data data/shapes --out data/runs/tokenizer

Vocabulary layout (ids in this order): the special tokens of docs/DESIGN.md (``<s>``, ``</s>``,
``<pad>``, ``<unk>``, ``<mask>``, ``<infill>``, ``<racm3:break>`` = begin-image, ``<eoss>``
= end-image), the byte alphabet and BPE merges learnt from every caption of the train and
bank splits, then one token per VQ code spelled the Chameleon way (``IMGIMG`` + digits as
letters + ``Z``). Writes ``tokenizer.json`` (read by ``cm3rt.tokenizer.TextTokenizer`` and
by HF ``PreTrainedTokenizerFast``) and ``tokenizer_config.json`` (bos/eos/pad names for
both, and the class open_clip's ``HFTokenizer`` loads for the tiny CLIP). The
post-processor appends ``</s>`` (the CLIP pools its text at that token); cm3rt encodes
without special tokens, so the decoder never sees it implicitly.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from train_common import Timer, split_records

from cm3rt.demo.shapes.cells import NUM_CELL_CODES
from cm3rt.tokenizer.image_vocab import image_token_name

SPECIALS = ("<s>", "</s>", "<pad>", "<unk>", "<mask>", "<infill>", "<racm3:break>", "<eoss>")
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "model_max_length": 4096,
    "clean_up_tokenization_spaces": False,
}


@dataclass(frozen=True)
class TokenizerOptions:
    """What to train.

    Attributes:
        data: folder written by make_dataset.py.
        out: output folder (tokenizer.json, tokenizer_config.json).
        merges: upper bound on BPE merges (the trainer stops when no pair is left).
        num_codes: VQ codebook size (image tokens).
        limit: use only the first ``limit`` records of each split (None: all).
    """

    data: Path
    out: Path
    merges: int = 400
    num_codes: int = NUM_CELL_CODES
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("merges", "num_codes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")


def captions_of(opts: TokenizerOptions) -> list[str]:
    """Every caption (all templates) of the train and bank splits, plus a line per nonce
    word of the decoder's novel-concept episodes (so each is one or two tokens)."""
    from cm3rt.demo.shapes.vocab import NONCE_WORDS

    out: list[str] = []
    for split in ("train", "bank"):
        for rec in split_records(opts.data, split, opts.limit):
            out.extend(rec.get("captions") or [rec["text"]])
    for word in NONCE_WORDS:
        out.extend([f"a {word} and a small {word}s at the top"] * 50)
    return out


def train_tokenizer(opts: TokenizerOptions) -> dict:
    """Train, write the files; returns statistics (vocab size, tokens per caption ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = captions_of(opts)
    if not texts:
        raise ValueError(f"no captions found under {opts.data}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIALS) + len(alphabet) + opts.merges,
        special_tokens=list(SPECIALS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    text_vocab = tok.get_vocab_size(with_added_tokens=True)
    # Image tokens after the text vocabulary; ordinary (not special) entries, as in
    # Chameleon, so decode() of image ids is not silently dropped.
    tok.add_tokens([image_token_name(c) for c in range(opts.num_codes)])
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    opts.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(opts.out / "tokenizer.json"))
    (opts.out / "tokenizer_config.json").write_text(
        json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")

    lengths = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
    words = sorted({w for t in texts for w in t.split()})
    multi = [w for w in words if len(tok.encode(" " + w, add_special_tokens=False).ids) > 1]
    return {
        "captions": len(texts),
        "text_vocab": text_vocab,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "max_tokens": max(lengths),
        "mean_tokens": sum(lengths) / len(lengths),
        "words": len(words),
        "words_split": multi,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/shapes"))
    p.add_argument("--out", type=Path, default=Path("data/runs/tokenizer"))
    p.add_argument("--merges", type=int, default=TokenizerOptions.merges)
    p.add_argument("--num-codes", type=int, default=TokenizerOptions.num_codes)
    p.add_argument("--quick", action="store_true", help="first 200 records of each split")
    a = p.parse_args(argv)
    timer = Timer("train_tokenizer")
    try:
        opts = TokenizerOptions(a.data, a.out, a.merges, a.num_codes, 200 if a.quick else None)
    except ValueError as exc:
        p.error(str(exc))
    stats = train_tokenizer(opts)
    print(f"{stats['captions']} captions, {stats['words']} distinct words "
          f"({len(stats['words_split'])} split into several tokens: {stats['words_split'][:8]})")
    print(f"vocab {stats['vocab_size']} (text {stats['text_vocab']} + {opts.num_codes} image), "
          f"tokens per caption: max {stats['max_tokens']}, mean {stats['mean_tokens']:.1f}")
    print(f"wrote {opts.out / 'tokenizer.json'}")
    timer.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
