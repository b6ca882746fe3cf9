"""`cm3rt generate` and `cm3rt caption`.

    cm3rt generate "a red star above a blue circle" -o out.png [--guidance cfg --cfg-scale 3]
    cm3rt generate "make it blue" --image in.png --guidance cfg3 -o edited.png
    cm3rt caption photo.png [--prompt "Describe the image."]

Without --model both use the embedded default model (cm3rt/assets/default) and its
defaults.json: `generate` retrieves from the default bank and uses classifier-free guidance
unless --k-docs 0 / --guidance none / --bank DIR / --cfg-scale ... say otherwise.

cm3rt/cli.py calls :func:`register_cli`; handlers return the exit status and raise
ValueError / TypeError / FileNotFoundError / RuntimeError for problems a person can fix
(cm3rt/cli.py prints those as one line). Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

_GUIDANCE = ("none", "cfg", "cfg3", "cdk")
_DTYPES = ("float32", "bfloat16", "float16")


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
                   choices=("auto", "text_to_image", "edit", "interleaved", "infill"),
                   help="default: text_to_image, or edit with --image and --guidance cfg3")
    g.add_argument("--suffix", default=None, help="infill: the text after the masked span")
    g.add_argument("--all", action="store_true", help="save every sample, not just the best")
    _common_args(g, default_guidance="cfg")
    g.add_argument("--bank", default=None, metavar="DIR",
                   help="retrieval memory bank: prepend retrieved documents (default: the "
                        "embedded model's bank without --model, none with --model)")
    g.add_argument("-k", "--k-docs", type=int, default=None,
                   help="documents to retrieve, 0 = no retrieval (default: the embedded "
                        "model's defaults.json without --model, 2 with --bank)")
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
    _common_args(c, default_guidance="none")
    c.set_defaults(handler=_caption)


def _common_args(p: argparse.ArgumentParser, default_guidance: str) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model directory (HF Chameleon layout + tokenizer + VQGAN); default: "
                        "the embedded model")
    p.add_argument("--guidance", default=None, choices=_GUIDANCE,
                   help=f"guidance inside image spans (default: the embedded model's "
                        f"defaults.json without --model, else {default_guidance})")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="text guidance scale (default: defaults.json, else 3.0)")
    p.add_argument("--cfg-image-scale", type=float, default=1.5,
                   help="image guidance scale (cfg3)")
    p.add_argument("--cd-alpha", type=float, default=0.1, help="CD-K plausibility alpha")
    p.add_argument("--cd-k", type=int, default=1, help="CD-K: k-th largest probability")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: defaults.json, else 1.0)")
    p.add_argument("--top-k", type=int, default=None,
                   help="0 = off (default: defaults.json, else 0)")
    p.add_argument("--top-p", type=float, default=None,
                   help="1 = off (default: defaults.json, else 1.0)")
    p.add_argument("-n", "--num-samples", type=int, default=1, dest="n",
                   help="samples to draw (best-of-n with --rerank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=_DTYPES,
                   help="default bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(default_guidance=default_guidance)


# Settings whose CLI default is "not given" (None), so the default model's defaults.json
# can fill them; with --model these values apply.
_FALLBACK = {"cfg_scale": 3.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def _settings(args: argparse.Namespace, task: str):
    """-> (SamplingParams, bank, k_docs) after the default model's defaults.json (no
    --model) or the built-in defaults (--model) filled what the command line left unset."""
    from cm3rt.engine.defaults import apply_defaults
    from cm3rt.engine.params import SamplingParams

    given = {k: getattr(args, k) for k in ("guidance", *_FALLBACK)
             if getattr(args, k) is not None}
    given.update(cfg_image_scale=args.cfg_image_scale,
                 cd_alpha=args.cd_alpha, cd_k=args.cd_k, n=args.n, seed=args.seed)
    if args.max_new_tokens is not None:
        given["max_new_tokens"] = args.max_new_tokens
    bank_arg = getattr(args, "bank", None)
    k_docs = getattr(args, "k_docs", None)
    if args.model is not None and k_docs is None:
        k_docs = 2 if bank_arg else 0
    bank = None
    if bank_arg:
        from cm3rt.retrieval.augment import open_cached

        bank = open_cached(bank_arg)
    sampling, bank, k_docs = apply_defaults(args.model is not None, task, given, bank, k_docs)
    sampling = {"guidance": args.default_guidance, **_FALLBACK, **sampling}
    return SamplingParams.from_kwargs(**sampling), bank, k_docs


def resolve_device_arg(device: str | None) -> str:
    """The --device of a command: given, or CUDA when usable, else CPU; a clear error for a
    malformed name or CUDA without a device / CUDA kernels."""
    from cm3rt.engine.generate import default_device

    device = device or default_device()
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        from cm3rt import ops

        if not (torch.cuda.is_available() and ops.cuda_available()):
            raise RuntimeError(f"--device {device}: no CUDA device is available (or cm3rt was "
                               "built without CUDA); use --device cpu")
    return device


def _engine(args: argparse.Namespace, scorer=None):
    from cm3rt.engine.generate import get_engine

    device = resolve_device_arg(args.device)
    model = args.model
    if model is None:
        from cm3rt.engine.defaults import load_defaults

        model = load_defaults().root  # FileNotFoundError saying what is missing
    eng = get_engine(model, device=device, dtype=args.dtype)
    eng.scorer = scorer
    return eng


def open_image(path: str):
    """A PIL image from ``path`` (RGB), with errors that name the file."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB") if im.mode not in ("RGB", "RGBA") else im.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read {path} as an image: {exc}") from exc


def _run_with_progress(engine, request, total: int, unit: str, quiet: bool, image_only: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, disable=quiet, leave=False, file=sys.stderr,
               desc="generating")
    out = None
    try:
        for ev in engine.stream([request]):
            if ev.output is not None:
                out = ev.output
            elif not image_only or ev.image_pos is not None:
                bar.update(1)
    finally:
        bar.close()
    return out.raise_for_error()


def _out_paths(out: str, count: int) -> list[Path]:
    p = Path(out)
    if p.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise ValueError(f"-o/--out must name an image file (.png, .jpg ...), got {out!r}")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"-o/--out: directory {str(p.parent)!r} does not exist")
    return [p] + [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(2, count + 1)]


def _generate(args: argparse.Namespace) -> int:
    from cm3rt.engine.generate import pick_task
    from cm3rt.engine.request import Request

    images = [open_image(p) for p in args.image]
    _out_paths(args.out, 1)  # fail on a bad path before minutes of generation
    if args.model is None:
        from cm3rt.engine.defaults import load_defaults

        guidance = args.guidance or load_defaults().sampling.get("guidance", "none")
    else:
        guidance = args.guidance or args.default_guidance
    task = pick_task(args.task, bool(images), guidance)
    params, bank, k_docs = _settings(args, task)
    scorer = None
    if args.rerank:
        from cm3rt.retrieval import ClipEncoder

        enc = ClipEncoder(args.rerank, args.rerank_weights)
        scorer = enc.score
    engine = _engine(args, scorer)
    req = Request(prompt=[*images, args.prompt], task=task, params=params,
                  suffix=args.suffix, bank=bank, k_docs=k_docs if bank is not None else 0)
    per_image = engine.vocab.tokens_per_image
    image_task = task in ("text_to_image", "edit")
    total = params.n * (per_image if image_task else (params.max_new_tokens or 64))
    out = _run_with_progress(engine, req, total, "tok", args.no_progress, image_task)
    saved = _save(out, args.out, args.all)
    if out.text.strip():
        print(out.text)
    for path in saved:
        print(f"wrote {path}", file=sys.stderr)
    if image_task and not saved:
        raise RuntimeError("generation ended before a complete image (raise --max-new-tokens)")
    return 0


def _save(out, dest: str, save_all: bool) -> list[Path]:
    images: list[Any] = out.images if save_all else out.images[:1]
    paths = _out_paths(dest, len(images)) if images else []
    for im, path in zip(images, paths):
        im.save(path)
    return paths[:len(images)]


def _caption(args: argparse.Namespace) -> int:
    from cm3rt.engine.request import Request

    image = open_image(args.image)
    params, _, _ = _settings(args, "image_to_text")
    engine = _engine(args)
    req = Request(prompt=[image, args.prompt] if args.prompt else [image],
                  task="image_to_text", params=params)
    total = params.n * (params.max_new_tokens or 64)
    out = _run_with_progress(engine, req, total, "tok", args.no_progress, image_only=False)
    for s in out.samples:
        print(s.text.strip())
    return 0
