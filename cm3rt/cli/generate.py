"""`cm3rt generate` and `cm3rt caption`.

    cm3rt generate "a red star above a blue circle" -o out.png [--guidance cfg --cfg-scale 3]
    cm3rt generate "make it blue" --image in.png --guidance cfg3 -o edited.png
    cm3rt caption photo.png [--prompt "Describe the image."]

Both resolve their settings through :func:`cm3rt.api.resolve_request`, exactly as
``cm3rt.generate`` does: a flag left out is "not given", so the embedded default model's
defaults.json (without --model) or the built-in defaults (with --model) fill it. The
progress bar follows the request's token events (:func:`cm3rt.api.run_request`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

# Flags whose values are SamplingParams fields (dest -> field): passed only when given.
SAMPLING_FLAGS = ("guidance", "cfg_scale", "cfg_image_scale", "cd_alpha", "cd_k", "uncond_docs",
                  "temperature", "top_k", "top_p", "n", "seed", "max_new_tokens")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` and ``caption`` commands."""
    g = subparsers.add_parser(
        "generate", help="generate an image (or text) from a prompt",
        description="Generate an image from a text prompt (text -> image), edit an input "
                    "image (--image with --guidance cfg3), or continue interleaved text and "
                    "images (--task interleaved).")
    g.add_argument("prompt", help="the text prompt")
    g.add_argument("-o", "--out", default="out.png", metavar="PNG",
                   help="output image file (default out.png); with -n > 1 and --all, further "
                        "samples go to NAME-2.png, NAME-3.png ... (best first)")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="input image placed before the prompt (repeatable)")
    g.add_argument("--task", default="auto",
                   help="auto (default: text_to_image, or edit with --image and --guidance "
                        "cfg3), text_to_image, edit, interleaved or infill")
    g.add_argument("--suffix", default=None, help="infill: the text after the masked span")
    g.add_argument("--all", action="store_true", help="save every sample, not just the best")
    _common_args(g)
    _retrieval_args(g, "the prompt", "k_docs", "2 with --bank")
    g.add_argument("--rerank", default=None, metavar="ARCH",
                   help="best-of-n: rank the n samples with this CLIP encoder (open_clip "
                        "architecture, config .json, local-dir:DIR or 'embedded')")
    g.add_argument("--rerank-weights", default=None, metavar="FILE",
                   help="local CLIP weights for --rerank")
    g.set_defaults(handler=_generate)

    c = subparsers.add_parser("caption", help="describe an image",
                              description="Generate text about an image (image -> text).")
    c.add_argument("image", help="the image file")
    c.add_argument("--prompt", default="", help="text after the image, e.g. a question")
    _common_args(c)
    _retrieval_args(c, "the image", "caption.k_docs", "else 0")
    c.add_argument("--doc-sweep", action=argparse.BooleanOptionalAction, default=None,
                   help="caption with 0, 1, ..., K retrieved documents and print the caption "
                        "the bank's CLIP scores best against the image (default: the "
                        "embedded model's defaults.json caption.doc_sweep without --model, "
                        "else off)")
    c.set_defaults(handler=_caption)


def _retrieval_args(p: argparse.ArgumentParser, query: str, default_key: str,
                    with_model: str) -> None:
    """--bank and -k / --k-docs; ``default_key`` names the defaults.json setting."""
    p.add_argument("--bank", default=None, metavar="DIR",
                   help=f"retrieval memory bank, queried with {query}: prepend retrieved "
                        "documents (default: the embedded model's bank without --model, "
                        "none with --model)")
    p.add_argument("-k", "--k-docs", type=int, default=None,
                   help=f"documents to retrieve, 0 = no retrieval (default: the embedded "
                        f"model's defaults.json {default_key} without --model, {with_model})")
    p.add_argument("--max-doc-score", type=score_or_none, default="defaults", metavar="S",
                   help="drop retrieved documents more similar to the query than S (cosine), "
                        "'none' = keep them (default: the embedded model's defaults.json "
                        "max_doc_score without --model, else 0.9)")


def score_or_none(text: str) -> float | str | None:
    """argparse type of --max-doc-score: a number, 'none' (the rule off) or 'defaults' (the
    embedded model's defaults.json, else 0.9)."""
    if text.lower() == "none":
        return None
    if text.lower() == "defaults":
        return "defaults"  # cm3rt.api.FROM_DEFAULTS
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'none' or 'defaults', got "
                                         f"{text!r}") from None


def _common_args(p: argparse.ArgumentParser) -> None:
    # Help only: values are validated by cm3rt.api like every other door's.
    from cm3rt.devices import DTYPE_CHOICES
    from cm3rt.engine.params import GUIDANCE_MODES, SamplingParams

    default = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model directory (HF Chameleon layout + tokenizer + VQGAN); default: "
                        "the embedded model")
    p.add_argument("--guidance", default=None,
                   help=f"guidance inside image spans, one of {', '.join(GUIDANCE_MODES)} "
                        "(default: cfg3 for edits; else the embedded model's defaults.json "
                        "without --model, or with --model cfg for images and none for text)")
    for flag, dest, kind, what in (
            ("--cfg-scale", "cfg_scale", float, "text guidance scale"),
            ("--cfg-image-scale", "cfg_image_scale", float, "image guidance scale of cfg3"),
            ("--cd-alpha", "cd_alpha", float, "CD-K plausibility alpha"),
            ("--cd-k", "cd_k", int, "CD-K: k-th largest probability"),
            ("--temperature", "temperature", float, "0 = greedy"),
            ("--top-k", "top_k", int, "0 = off"),
            ("--top-p", "top_p", float, "1 = off"),
            ("--seed", "seed", int, "sampling seed")):
        p.add_argument(flag, type=kind, default=None,
                       help=f"{what} (default {default[dest]}, or defaults.json's)")
    p.add_argument("--uncond-docs", action=argparse.BooleanOptionalAction, default=None,
                   help="with retrieval, retrieved documents in the unconditional guidance "
                        f"stream too (default {default['uncond_docs']}, or defaults.json's)")
    p.add_argument("-n", "--num-samples", type=int, default=None, dest="n",
                   help=f"samples to draw (default {default['n']}; best-of-n with --rerank)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generated-token limit (default: one image for image tasks)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if "
                                                  "usable)")
    p.add_argument("--dtype", default=None,
                   help=f"one of {', '.join(DTYPE_CHOICES)}, or int8 (weight-only, quantised at "
                        "load; activations bfloat16, float32 on CPUs without AVX512_BF16) "
                        "(default bfloat16 on CUDA, float32 on the CPU)")
    add_tensor_parallel_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_tensor_parallel_argument(p: argparse.ArgumentParser) -> None:
    """``--tensor-parallel-size N`` (``--tp``), for every command that loads a model."""
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, metavar="N",
                   help="shard the model over N processes (spawned here, or the ranks torchrun "
                        "started; gloo on the CPU, NCCL on CUDA)")


def sampling_of(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags the command line gave (None = not given)."""
    return {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}


def open_image(path: str, flag: str = "--image"):
    """A PIL image from ``path`` (RGB / RGBA), with errors that name the flag and file."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag}: image file not found: {path}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB") if im.mode not in ("RGB", "RGBA") else im.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{flag}: cannot read {path} as an image: {exc}") from exc


def _out_paths(out: str, count: int) -> list[Path]:
    p = Path(out)
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"-o/--out must name an image file (.png, .jpg ...), got {out!r}")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"-o/--out: directory {str(p.parent)!r} does not exist")
    return [p] + [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(2, count + 1)]


def _run_with_progress(engine, request, quiet: bool):
    """Run ``request``; a progress bar counts its image codes (image tasks) or tokens."""
    from tqdm import tqdm

    from cm3rt.api import run_request

    image_task = request.task in ("text_to_image", "edit")
    p = request.params
    per_sample = engine.vocab.tokens_per_image if image_task else (p.max_new_tokens or 64)
    bar = tqdm(total=p.n * per_sample, unit="tok", disable=quiet, leave=False,
               file=sys.stderr, desc="generating")

    def tick(event) -> None:
        if event.output is None and (not image_task or event.image_pos is not None):
            bar.update(1)

    try:
        return run_request(engine, request, tick)
    finally:
        bar.close()


def _generate(args: argparse.Namespace) -> int:
    from cm3rt.api import resolve_request

    images = [open_image(p) for p in args.image]
    _out_paths(args.out, 1)  # fail on a bad path before minutes of generation
    scorer = None
    if args.rerank:
        from cm3rt.retrieval import ClipEncoder

        scorer = ClipEncoder(args.rerank, args.rerank_weights).score
    engine, request = resolve_request(
        args.prompt, args.model, images, task=args.task, suffix=args.suffix, bank=args.bank,
        k_docs=args.k_docs, max_doc_score=args.max_doc_score, device=args.device,
        dtype=args.dtype, scorer=scorer,
        tensor_parallel_size=args.tensor_parallel_size, **sampling_of(args))
    out = _run_with_progress(engine, request, args.no_progress)
    saved = _save(out, args.out, args.all)
    if out.text.strip():
        print(out.text)
    for path in saved:
        print(f"wrote {path}", file=sys.stderr)
    if request.task in ("text_to_image", "edit") and not saved:
        raise ValueError("generation ended before a complete image: raise --max-new-tokens")
    return 0


def _save(out, dest: str, save_all: bool) -> list[Path]:
    images: list[Any] = out.images if save_all else out.images[:1]
    paths = _out_paths(dest, len(images)) if images else []
    for im, path in zip(images, paths):
        im.save(path)
    return paths[:len(images)]


def _caption(args: argparse.Namespace) -> int:
    from cm3rt.api import resolve_request

    image = open_image(args.image, "image")
    engine, request = resolve_request(
        [image, args.prompt] if args.prompt else [image], args.model, task="image_to_text",
        bank=args.bank, k_docs=args.k_docs, max_doc_score=args.max_doc_score,
        device=args.device, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
        doc_sweep=args.doc_sweep, **sampling_of(args))
    out = _run_with_progress(engine, request, args.no_progress)
    for s in out.samples:
        print(s.text.strip())
    return 0
