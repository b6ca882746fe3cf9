#!/usr/bin/env python3
"""Step 7: assemble the embedded default model, ``cm3rt/assets/default/``.

    python tools/train/package_default.py --decoder data/runs/decoder/model \\
        --tokenizer data/runs/tokenizer --vqgan data/runs/vqgan/vqgan \\
        --clip data/runs/clip/clip --bank data/runs/banks/bank --runs data/runs

Writes one directory that ``cm3rt.model.load_pretrained`` reads whole and that
``cm3rt generate`` / ``cm3rt caption`` / ``cm3rt.generate`` use with no flags:

    config.json, model.safetensors   the decoder (HF Chameleon layout; bf16 by default)
    tokenizer.json, tokenizer_config.json
    vqgan.safetensors, vqgan_config.json   the VQGAN that encoded the bank's codes (as is)
    clip/                            the tiny CLIP (open_clip local-dir layout, as is)
    bank/                            the shipped memory bank (build_banks.py)
    defaults.json                    generation defaults (cm3rt.api.defaults)
    TRAINING.md                      commands, seeds, wall times, evaluation table

Everything is checked before the directory replaces the old one: the model loads, the
bank's manifest names exactly the copied CLIP and VQGAN (same digests), and the total
stays within ``--max-mb`` (40 MB), else it fails with the sizes of the largest files.
The bank's manifest is rewritten to name its encoder ``embedded`` (``cm3rt/assets/default/
clip``), so ``cm3rt bank search`` finds the encoder wherever the package is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from train_common import REPO, Timer

from cm3rt.api import defaults as dflt
from cm3rt.cli.generate import score_or_none
from cm3rt.retrieval.select import DEFAULT_MAX_SCORE

DEFAULT_OUT = REPO / "cm3rt" / "assets" / "default"
MAX_MB = 40.0
_DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# run_all.sh's log lines of a step: "== <step>: resumed after <s> s ..." when it continues an
# interrupted run, "== <step>: <s> s" when it finishes (its whole time, earlier runs included).
_LOG_LINE = re.compile(r"^== (\w+): (?:(resumed after )?([0-9]+) s\b.*|.*)$", re.MULTILINE)


@dataclass
class PackageOptions:
    """Inputs of :func:`package` (see the module docstring)."""

    decoder: Path
    tokenizer: Path
    vqgan: Path
    clip: Path
    bank: Path
    out: Path = DEFAULT_OUT
    runs: Path | None = None
    decoder_dtype: str = "bf16"
    eval_report: Path | None = None
    guidance: str = "cfg"
    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    k_docs: int = 2
    caption_temperature: float = 0.0
    caption_k_docs: int = 0
    caption_doc_sweep: bool = False  # captions: the best of 0..caption_k_docs documents
    uncond_docs: bool = False
    max_doc_score: float | None = DEFAULT_MAX_SCORE  # retrieval rule (Request.max_doc_score); None: off
    max_mb: float = MAX_MB


def _need(path: Path, what: str, arg: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{arg}: {what} {path} does not exist")
    return path


def _copy_decoder(src: Path, dst: Path, dtype_name: str) -> None:
    """config.json + the safetensors weights, floating tensors cast to ``dtype_name``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _need(src / "config.json", "decoder config", "--decoder")
    shutil.copy2(src / "config.json", dst / "config.json")
    files = sorted(src.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"--decoder: no model*.safetensors in {src}")
    if (src / "model.safetensors.index.json").is_file():
        shutil.copy2(src / "model.safetensors.index.json", dst / "model.safetensors.index.json")
    dtype = _DTYPES[dtype_name]
    for f in files:
        if dtype is None:
            shutil.copy2(f, dst / f.name)
            continue
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata()
        tensors = {name: t.to(dtype) if t.is_floating_point() else t
                   for name, t in load_file(str(f)).items()}
        save_file(tensors, str(dst / f.name), metadata=meta or {"format": "pt"})


def _copy_tokenizer(src: Path, decoder: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        f = src / name
        if not f.is_file():
            if name == "tokenizer.json":
                raise FileNotFoundError(f"--tokenizer: {f} does not exist")
            continue
        other = decoder / name
        if other.is_file() and other.read_bytes() != f.read_bytes():
            raise ValueError(f"--tokenizer: {f} differs from the decoder's own {other}; the "
                             "decoder must ship with the tokenizer it was trained with")
        shutil.copy2(f, dst / name)


def write_defaults(opts: PackageOptions, dst: Path) -> dict:
    """defaults.json (read by cm3rt.api.defaults)."""
    d = {"format": dflt.FORMAT, "version": dflt.VERSION, "guidance": opts.guidance,
         "cfg_scale": opts.cfg_scale, "temperature": opts.temperature, "top_k": opts.top_k,
         "top_p": opts.top_p,
         "uncond_docs": opts.uncond_docs, "k_docs": opts.k_docs, "bank": "bank",
         "max_doc_score": opts.max_doc_score,
         "caption": {"guidance": "none", "temperature": opts.caption_temperature,
                     "k_docs": opts.caption_k_docs, "doc_sweep": opts.caption_doc_sweep}}
    (dst / dflt.DEFAULTS_FILE).write_text(json.dumps(d, indent=1) + "\n")
    return d


def check_bank(dst: Path) -> dict:
    """The copied bank must name the copied CLIP and VQGAN; then point it at "embedded"."""
    from cm3rt.retrieval.clip import EMBEDDED, ClipEncoder, EncoderIdentity
    from cm3rt.retrieval.manifest import Manifest, TokenizerIdentity
    from cm3rt.tokenizer.vqgan import ImageTokenizer

    manifest = Manifest.read(dst / "bank")
    encoder = ClipEncoder(f"local-dir:{dst / dflt.CLIP_DIR}")
    manifest.check_encoder(encoder.identity, dst / "bank")  # ValueError when another CLIP
    tok = ImageTokenizer.from_pretrained(dst)
    if manifest.image_tokenizer is None:
        raise ValueError("--bank: the bank holds no image codes (built without a VQGAN)")
    manifest.check_tokenizer(TokenizerIdentity.of(tok), dst / "bank")
    ident = EncoderIdentity(arch=EMBEDDED, embed_dim=encoder.embed_dim,
                            digest=encoder.identity.digest, weights=None)
    Manifest(encoder=ident, image_tokenizer=manifest.image_tokenizer, index=manifest.index,
             nprobe=manifest.nprobe).write(dst / "bank")
    return {"clip_digest": ident.digest, "vqgan_identity": tok.identity()}


def check_sizes(dst: Path, max_mb: float) -> float:
    """Total size in MB; ValueError naming the largest files when above ``max_mb``."""
    files = sorted((p for p in dst.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    total = sum(p.stat().st_size for p in files) / 1e6
    if total > max_mb:
        top = ", ".join(f"{p.relative_to(dst)} {p.stat().st_size / 1e6:.1f} MB"
                        for p in files[:5])
        raise ValueError(f"default assets: {total:.1f} MB, above the {max_mb:g} MB limit "
                         f"(largest: {top})")
    return total


def wall_times(runs: Path | None) -> list[tuple[str, str]]:
    """(step, wall time) of each finished step in ``runs``/run_all.log, in pipeline order.

    A step resumed after an interruption counts its earlier runs (run_all.sh keeps them);
    a step run again after finishing keeps its last time.
    """
    log = runs / "run_all.log" if runs is not None else None
    if log is None or not log.is_file():
        return []
    found: dict[str, str] = {}
    resumed: dict[str, str] = {}  # of the step's current run only
    for m in _LOG_LINE.finditer(log.read_text(errors="replace")):
        step, is_resume, secs = m.groups()
        if secs is None:  # "== <step>: <command>": a run starts
            resumed.pop(step, None)
        elif is_resume:
            resumed[step] = secs
        else:
            found[step] = f"{secs} s" + (f" (resumed after {resumed[step]} s)"
                                         if step in resumed else "")
    return list(found.items())


def write_training_md(opts: PackageOptions, dst: Path, info: dict) -> None:
    """TRAINING.md: how the assets were made (the lead fills the evaluation table)."""
    rows = wall_times(opts.runs)
    times = "\n".join(f"| {s} | {t} |" for s, t in rows) or "| (no run_all.log in the runs folder) | |"
    seeds = []
    if opts.runs is not None:
        for f in sorted(opts.runs.glob("*/options.json")):
            if "abandoned" in f.parent.name:
                continue
            try:
                seed = json.loads(f.read_text()).get("seed")
            except (OSError, json.JSONDecodeError):
                continue
            if seed is not None:
                seeds.append(f"- `{f.parent.name}`: seed {seed}")
    evaluation = ("Not evaluated when packaged: run `cm3rt eval` (about 2-3 minutes on 2 cores)."
                  if opts.eval_report is None else opts.eval_report.read_text().strip())
    text = f"""# Embedded default model: how it was trained

Everything here was produced by the scripts in `tools/train/` (see its README) from the
procedural shapes world only, on a 2-core CPU machine. Every script is seeded.

## Commands

    tools/train/run_all.sh RUNS_DIR         # every step below, seeded, resumable, timed

which runs `make_dataset.py` (30,000 train / 4,000 bank / 400 eval / 12,000 novel scenes),
`train_tokenizer.py`, `train_vqgan.py` (+ `--eval`), `encode_images.py`, `train_clip.py`
(+ `--eval`), `build_banks.py`, `train_decoder.py` (+ `--select`), `package_default.py`,
`cm3rt eval` and `copy_diagnostic.py`; this directory was packaged from
`--decoder {opts.decoder}`.

## Seeds

{chr(10).join(seeds) or "- (no options.json found under the runs folder)"}

## Wall times (`run_all.log`)

| step | wall time |
| --- | --- |
{times}

## Contents

- decoder: `config.json` + `model.safetensors` ({opts.decoder_dtype})
- tokenizer: `tokenizer.json`, `tokenizer_config.json`
- VQGAN: `vqgan.safetensors` + `vqgan_config.json` (identity `{info['vqgan_identity'][:16]}`)
- CLIP: `clip/` (open_clip local-dir, digest `{info['clip_digest'][:16]}`)
- memory bank: `bank/` ({info['bank_docs']} documents of the bank split, flat inner-product
  index; holds every held-out colour x shape pair, which the decoder never saw in training)
- `defaults.json`: {json.dumps({k: v for k, v in info['defaults'].items()
                               if k not in ("format", "version")})}
- total size: {info['total_mb']:.1f} MB

## Evaluation (`cm3rt eval`, tools/train/README.md step 8)

{evaluation}
"""
    (dst / "TRAINING.md").write_text(text)


def package(opts: PackageOptions) -> dict:
    """Assemble, check and install the default directory; returns a summary."""
    from cm3rt.model import load_pretrained
    from cm3rt.retrieval.bank import MemoryBank

    if opts.decoder_dtype not in _DTYPES:
        raise ValueError(f"decoder_dtype: expected one of {list(_DTYPES)}, got "
                         f"{opts.decoder_dtype!r}")
    _need(opts.decoder, "decoder directory", "--decoder")
    _need(opts.vqgan / "vqgan.safetensors", "VQGAN weights", "--vqgan")
    _need(opts.clip / "open_clip_config.json", "CLIP export", "--clip")
    _need(opts.bank / "manifest.json", "memory bank", "--bank")
    out = opts.out
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _copy_decoder(opts.decoder, tmp, opts.decoder_dtype)
        _copy_tokenizer(opts.tokenizer, opts.decoder, tmp)
        for name in ("vqgan.safetensors", "vqgan_config.json"):
            shutil.copy2(_need(opts.vqgan / name, "VQGAN file", "--vqgan"), tmp / name)
        shutil.copytree(opts.clip, tmp / dflt.CLIP_DIR)
        shutil.copytree(opts.bank, tmp / "bank",
                        ignore=shutil.ignore_patterns("*.tmp", "*-journal"))
        info = check_bank(tmp)
        with MemoryBank.open(tmp / "bank") as bank:
            info["bank_docs"] = len(bank)
        model, proc = load_pretrained(tmp)  # loads exactly as the runtime will
        info["decoder_params"] = sum(p.numel() for p in model.parameters())
        del model, proc
        info["defaults"] = write_defaults(opts, tmp)
        dflt.load_defaults(tmp)  # the runtime's own reader accepts it
        info["total_mb"] = check_sizes(tmp, opts.max_mb)
        write_training_md(opts, tmp, info)
        info["total_mb"] = check_sizes(tmp, opts.max_mb)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder", type=Path, required=True,
                   help="decoder directory (config.json + model.safetensors, HF layout)")
    p.add_argument("--tokenizer", type=Path, default=Path("data/runs/tokenizer"))
    p.add_argument("--vqgan", type=Path, default=Path("data/runs/vqgan/vqgan"))
    p.add_argument("--clip", type=Path, default=Path("data/runs/clip/clip"))
    p.add_argument("--bank", type=Path, default=Path("data/runs/banks/bank"))
    p.add_argument("--runs", type=Path, default=Path("data/runs"),
                   help="run_all.sh's runs folder (TRAINING.md: run_all.log's wall times, the seeds)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--decoder-dtype", choices=list(_DTYPES), default="bf16")
    p.add_argument("--guidance", choices=("none", "cfg", "cdk"), default="cfg")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--k-docs", type=int, default=2)
    p.add_argument("--caption-temperature", type=float, default=0.0)
    p.add_argument("--caption-k-docs", type=int, default=0,
                   help="documents retrieved per caption (the image is the query; 0: none)")
    p.add_argument("--caption-doc-sweep", action="store_true",
                   help="defaults.json caption.doc_sweep: choose among the captions with "
                        "0..caption-k-docs documents by the bank's CLIP")
    p.add_argument("--uncond-docs", action="store_true",
                   help="retrieved documents in the unconditional guidance stream too")
    p.add_argument("--max-doc-score", type=score_or_none, default=DEFAULT_MAX_SCORE, metavar="S",
                   help="defaults.json max_doc_score: drop retrieved documents more similar "
                        "to the query than S, 'none' = keep them (default 0.9, RA-CM3's rule)")
    p.add_argument("--max-mb", type=float, default=MAX_MB)
    p.add_argument("--eval-report", type=Path, default=None,
                   help="markdown report of `cm3rt eval` to put in TRAINING.md")
    a = p.parse_args(argv)
    if a.eval_report is not None and not a.eval_report.is_file():
        p.error(f"--eval-report: no such file: {a.eval_report}")
    if a.max_doc_score == "defaults":
        p.error("--max-doc-score: give a number or 'none' (this writes the defaults)")
    if a.k_docs < 0 or a.caption_k_docs < 0 or a.top_k < 0 or a.temperature < 0:
        p.error("--k-docs, --caption-k-docs, --top-k and --temperature must be >= 0")
    if not 0.0 < a.top_p <= 1.0:
        p.error(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.caption_doc_sweep and a.caption_k_docs < 1:
        p.error("--caption-doc-sweep needs --caption-k-docs >= 1 (it sweeps 0..K documents)")
    timer = Timer("package_default")
    info = package(PackageOptions(
        a.decoder, a.tokenizer, a.vqgan, a.clip, a.bank, out=a.out, runs=a.runs,
        decoder_dtype=a.decoder_dtype, guidance=a.guidance, cfg_scale=a.cfg_scale,
        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, k_docs=a.k_docs,
        caption_temperature=a.caption_temperature, caption_k_docs=a.caption_k_docs,
        caption_doc_sweep=a.caption_doc_sweep,
        uncond_docs=a.uncond_docs, max_doc_score=a.max_doc_score, max_mb=a.max_mb,
        eval_report=a.eval_report))
    print(f"wrote {a.out}: {info['total_mb']:.1f} MB, decoder {info['decoder_params']:,} "
          f"parameters, bank {info['bank_docs']} documents", flush=True)
    timer.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
