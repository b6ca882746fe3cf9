"""`cm3rt bank build|search`: build a memory bank from a folder/JSONL, query it.

cm3rt/cli/__init__.py calls ``register_cli(subparsers)``; each command sets
``args.handler(args) -> int`` (the exit status). Errors a person can fix are raised as
ValueError / TypeError / OSError / ImportError, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bank`` command (with ``build`` and ``search``) to a subparsers object."""
    bank = subparsers.add_parser("bank", help="build and search retrieval memory banks",
                                 description="Retrieval memory banks (CLIP + FAISS + SQLite).")
    sub = bank.add_subparsers(dest="bank_command", metavar="{build,search}")
    sub.required = True

    b = sub.add_parser("build", help="build (or resume building) a bank",
                       description="Embed a folder of images with same-stem .txt captions, or a "
                                   "JSONL of {\"image\": path, \"text\": caption}, into a bank.")
    b.add_argument("source", help="folder or .jsonl file")
    b.add_argument("--out", required=True, help="bank directory (resumes if it holds a bank)")
    _encoder_args(b, default="embedded")
    b.add_argument("--index", default="flat",
                   help="flat (exact), ivf (inverted lists) or a FAISS factory string")
    b.add_argument("--image-tokenizer", metavar="PATH",
                   help="model directory (or VQGAN file) whose image tokenizer encodes the images")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--device", default="cpu")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(handler=_build)

    s = sub.add_parser("search", help="query a bank", description="Print the documents a query "
                       "retrieves: id, score, modality, source, caption.")
    s.add_argument("bank", help="bank directory")
    s.add_argument("query", nargs="?", default=None, help="query text")
    s.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="query image (repeatable)")
    s.add_argument("-k", type=int, default=2, help="documents to return")
    s.add_argument("--candidates", type=int, default=None, help="top-M candidates to select from")
    s.add_argument("--max-score", type=float, default=0.9,
                   help="drop candidates more similar to the query than this")
    s.add_argument("--dedupe", type=float, default=0.95,
                   help="drop candidates this similar to an already chosen one")
    s.add_argument("--no-prefer-multimodal", action="store_true",
                   help="do not prefer image+text documents")
    _encoder_args(s, default=None)
    s.add_argument("--device", default="cpu")
    s.set_defaults(handler=_search)
    return bank


def _encoder_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--encoder", default=default, metavar="ARCH",
                   help="open_clip architecture, model config .json, local-dir:DIR or 'embedded'"
                        + ("" if default else " (default: the one the bank records)"))
    p.add_argument("--weights", default=None, metavar="FILE", help="local CLIP checkpoint")


def _load_image_tokenizer(path: str | None):
    if path is None:
        return None
    from cm3rt.tokenizer import ImageTokenizer

    return ImageTokenizer.from_pretrained(path)


def _build(args: argparse.Namespace) -> int:
    from cm3rt.retrieval.bank import MemoryBank
    from cm3rt.retrieval.clip import ClipEncoder

    _require_retrieval_packages()
    encoder = ClipEncoder(args.encoder, weights=args.weights, device=args.device)
    tok = _load_image_tokenizer(args.image_tokenizer)
    with MemoryBank.build(args.source, args.out, encoder, tok, index=args.index,
                          batch_size=args.batch_size, progress=not args.no_progress) as bank:
        print(f"bank {Path(args.out)}: {len(bank)} documents, index {bank.manifest.index}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from cm3rt.retrieval.bank import MemoryBank
    from cm3rt.retrieval.clip import ClipEncoder
    from cm3rt.retrieval.sources import load_image

    _require_retrieval_packages()
    encoder = None
    if args.encoder is not None:
        encoder = ClipEncoder(args.encoder, weights=args.weights, device=args.device)
    images = [load_image(Path(p)) for p in args.image]
    if not args.query and not images:
        raise ValueError("query: expected query text or --image, got neither")
    with MemoryBank.open(args.bank, encoder=encoder, device=args.device) as bank:
        docs = bank.search(text=args.query, image=images, k=args.k,
                           candidates=args.candidates, max_score=args.max_score,
                           dedupe=args.dedupe, prefer_multimodal=not args.no_prefer_multimodal)
    if not docs:
        print("no documents")
    for d in docs:
        caption = (d.caption or "").replace("\n", " ")
        print(f"{d.id:>8}  {d.score:7.4f}  {d.modality:<10}  {d.source}  {caption}")
    return 0


def _require_retrieval_packages() -> None:
    import importlib.util

    for module, package in (("faiss", "faiss-cpu"), ("open_clip", "open_clip_torch")):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"memory banks need {package}: pip install {package}")
