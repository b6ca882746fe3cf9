"""`cm3rt eval`: the quality evaluation of a shapes-world model, printed as a table.

    cm3rt eval                          # the embedded default model and its bank, N = 200
    cm3rt eval --quick                  # a smoke run (4 prompts, 4 captions, ...)
    cm3rt eval --model DIR --bank DIR --prompts 400 --cfg-scales 2 4 --json out.json

The evaluation itself lives in the demo wing (``cm3rt.demo.evaluation``), which needs the
optional extra ``pip install 'cm3rt[eval]'`` (scipy). ``cm3rt.cli`` calls
:func:`register_cli` for every command line, so this module imports only the standard
library; the demo wing, torch and the engine are imported inside the handler.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cm3rt.cli.generate import score_or_none

QUICK_N = 4
_DTYPES = ("float32", "bfloat16", "float16", "int8")  # int8: weight-only, quantised at load
# Built-in sampler settings, for a model directory without defaults.json (flags win, then
# the directory's defaults.json, then these).
_FALLBACKS = {"k_docs": 2, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
_DEMO_MISSING = "cm3rt eval needs the demo extra: pip install 'cm3rt[eval]'"


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` command."""
    p = subparsers.add_parser(
        "eval", help="evaluate prompt adherence and captioning (shapes-world models)",
        description="Generate images for held-out and train-concept prompts of the shapes "
                    "world under guidance none / cfg (each scale) / cdk, retrieval off and "
                    "on; best-of-n reranked by the model's CLIP; caption fresh renders; "
                    "infill masked caption words; edit one-object renders. Prints every "
                    "score with its 95% interval against the default model's targets "
                    "(default-setting adherence >= 85%, CFG +5 points on two-object "
                    "prompts, retrieval +30 points and >= 60% on held-out concepts, "
                    "best-of-n above best-of-1, captions >= 90%). Needs the demo extra: "
                    "pip install 'cm3rt[eval]'.")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model directory (default: the embedded default model)")
    p.add_argument("--bank", default=None, metavar="DIR",
                   help="memory bank for the retrieval rows (default: <model>/bank, or the "
                        "'bank' of <model>/defaults.json)")
    p.add_argument("--no-retrieval", action="store_true", help="skip the retrieval-on rows")
    p.add_argument("--prompts", type=int, default=None, metavar="N",
                   help="held-out prompts per setting (default 200; --quick 4)")
    p.add_argument("--train-prompts", type=int, default=None, metavar="N",
                   help="train-concept prompts per train row (default: --prompts)")
    p.add_argument("--train-settings", default="all", choices=("best", "all", "none"),
                   help="rows the train-concept prompts run under: every row (default), the "
                        "best CFG scale and the default setting (retrieval off and on), or "
                        "none")
    p.add_argument("--best-of", type=int, default=None, metavar="N",
                   help="samples per train-concept prompt for best-of-1/4/N reranked by "
                        "<model>/clip (default 8; --quick 2; 0 = skip)")
    p.add_argument("--infill", type=int, default=None, metavar="N",
                   help="renders whose caption words are masked and infilled (default 200; "
                        "--quick 4; 0 = skip)")
    p.add_argument("--edits", type=int, default=None, metavar="N",
                   help="one-object renders edited by instruction (default 200; --quick 4; "
                        "0 = skip)")
    p.add_argument("--captions", type=int, default=None, metavar="N",
                   help="fresh renders to caption (default 200; --quick 4; 0 = skip)")
    p.add_argument("--seed", type=int, default=0, help="prompt sets and samplers (default 0)")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.5, 3.0, 5.0],
                   metavar="S", help="CFG scales (default 1.5 3 5)")
    p.add_argument("-k", "--k-docs", type=int, default=None,
                   help="documents retrieved per prompt (default 2, or defaults.json)")
    p.add_argument("--temperature", type=float, default=None,
                   help="image sampling temperature (default 1, or defaults.json)")
    p.add_argument("--top-k", type=int, default=None, help="default 0 (off), or defaults.json")
    p.add_argument("--top-p", type=float, default=None, help="default 1 (off), or defaults.json")
    p.add_argument("--cd-alpha", type=float, default=None, help="CD-K alpha (default 0.1)")
    p.add_argument("--cd-k", type=int, default=None, help="CD-K k (default 1)")
    p.add_argument("--caption-temperature", type=float, default=0.0,
                   help="captioning temperature (default 0 = greedy)")
    p.add_argument("--caption-max-tokens", type=int, default=48)
    p.add_argument("--uncond-docs", action=argparse.BooleanOptionalAction, default=None,
                   help="retrieval-on rows: documents in the unconditional stream too "
                        "(default: the model's defaults.json, else no)")
    p.add_argument("--max-doc-score", type=score_or_none, default="defaults", metavar="S",
                   help="retrieval: drop documents more similar to the query than S (cosine), "
                        "'none' = keep them (default: the model's defaults.json "
                        "max_doc_score, else 0.9)")
    p.add_argument("--caption-k-docs", type=int, default=None, metavar="K",
                   help="documents retrieved per caption, the image the query (default: the "
                        "model's defaults.json caption.k_docs, else 0); with retrieval on "
                        "and K > 0 captions are scored with and without them")
    p.add_argument("--caption-doc-sweep", action=argparse.BooleanOptionalAction, default=None,
                   help="the default caption row chooses among the captions with 0..K "
                        "documents by the bank's CLIP (default: the model's defaults.json "
                        "caption.doc_sweep, else off); scored as one more row")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_N} prompts and {QUICK_N} captions unless given")
    p.add_argument("--json", default=None, metavar="OUT", help="write every number to OUT")
    p.add_argument("--strict", action="store_true",
                   help="exit status 3 when a target is missed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=_DTYPES,
                   help="default bfloat16 on CUDA, float32 on the CPU; int8: weight-only int8 "
                        "projections, quantised at load, activations bfloat16 (float32 on "
                        "CPUs without AVX512_BF16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_eval)


def resolve_paths(model: str | None, bank: str | None, retrieval: bool
                  ) -> tuple[Path, Path | None, dict[str, Any]]:
    """(model dir, bank dir or None, sampler defaults) for the command's arguments.

    The sampler defaults come from the model directory's defaults.json (read by
    ``cm3rt.api.defaults``) when it has one, else they are empty (built-ins apply).
    """
    from cm3rt.api.defaults import default_model_dir, load_defaults

    model_dir = Path(model).expanduser() if model else default_model_dir()
    if not (model_dir / "config.json").is_file():
        if not model:
            raise FileNotFoundError(f"the embedded default model is not installed (looked in "
                                    f"{str(model_dir)!r}); pass --model DIR")
        raise FileNotFoundError(f"--model: expected a model directory with config.json, got "
                                f"{str(model_dir)!r}")
    defaults: dict[str, Any] = {}
    default_bank = model_dir / "bank"
    if (model_dir / "defaults.json").is_file():
        assets = load_defaults(model_dir)
        defaults = {k: assets.sampling[k] for k in ("temperature", "top_k", "top_p",
                                                      "guidance", "cfg_scale", "uncond_docs")
                    if k in assets.sampling}
        if assets.k_docs > 0:
            defaults["k_docs"] = assets.k_docs
        defaults["caption_k_docs"] = assets.caption_k_docs
        defaults["caption_doc_sweep"] = assets.caption_doc_sweep
        defaults["max_doc_score"] = assets.max_doc_score
        if assets.bank_dir is not None:
            default_bank = assets.bank_dir
    if not retrieval:
        return model_dir, None, defaults
    bank_dir = Path(bank).expanduser() if bank else default_bank
    if not bank_dir.is_dir():
        what = "--bank" if bank else "the model's bank (default <model>/bank)"
        raise FileNotFoundError(f"{what}: expected a memory bank directory, got "
                                f"{str(bank_dir)!r}; pass --bank DIR or --no-retrieval")
    return model_dir, bank_dir, defaults


def _import_demo():
    """The demo wing's evaluation module; a one-line error when the extra is missing."""
    try:
        from cm3rt.demo.evaluation import quality
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing == "scipy" or (exc.name or "").startswith("cm3rt.demo"):
            raise ImportError(_DEMO_MISSING) from exc
        raise
    return quality


def build_config(args: argparse.Namespace, defaults: dict[str, Any]):
    """The QualityConfig of the command line (flags over defaults.json over built-ins)."""
    quality = _import_demo()

    def pick(flag: Any, key: str, fallback: Any = None) -> Any:
        if flag is not None:
            return flag
        return defaults.get(key, _FALLBACKS.get(key) if fallback is None else fallback)

    n_default = QUICK_N if args.quick else 200
    prompts = args.prompts if args.prompts is not None else n_default
    scales = tuple(args.cfg_scales)
    guidance = defaults.get("guidance", "cfg")
    if guidance not in ("none", "cfg", "cdk"):
        guidance = "cfg"  # cfg3 is the edit's guidance, not an image row of the table
    default_scale = float(defaults.get("cfg_scale", 3.0))
    if guidance == "cfg" and default_scale not in scales:
        scales = (*scales, default_scale)
    train_n = args.train_prompts
    if train_n is None and args.quick:
        train_n = min(prompts, QUICK_N)
    return quality.QualityConfig(
        prompts=prompts, train_prompts=train_n,
        captions=args.captions if args.captions is not None else n_default,
        seed=args.seed, cfg_scales=scales, retrieval=not args.no_retrieval,
        k_docs=pick(args.k_docs, "k_docs"), train_settings=args.train_settings,
        default_guidance=guidance, default_cfg_scale=default_scale,
        best_of=args.best_of if args.best_of is not None else (2 if args.quick else 8),
        infill=args.infill if args.infill is not None else n_default,
        edits=args.edits if args.edits is not None else n_default,
        temperature=pick(args.temperature, "temperature"),
        top_k=pick(args.top_k, "top_k"), top_p=pick(args.top_p, "top_p"),
        cd_alpha=pick(args.cd_alpha, "cd_alpha", 0.1), cd_k=pick(args.cd_k, "cd_k", 1),
        uncond_docs=pick(args.uncond_docs, "uncond_docs", False),
        max_doc_score=(defaults.get("max_doc_score", quality.DEFAULT_MAX_SCORE)
                       if args.max_doc_score == "defaults" else args.max_doc_score),
        caption_temperature=args.caption_temperature,
        caption_max_tokens=args.caption_max_tokens,
        caption_k_docs=pick(args.caption_k_docs, "caption_k_docs", 0),
        caption_doc_sweep=pick(args.caption_doc_sweep, "caption_doc_sweep", False))


def _eval(args: argparse.Namespace) -> int:
    quality = _import_demo()  # the demo extra first: nothing else matters without it
    model_dir, bank_dir, defaults = resolve_paths(args.model, args.bank, not args.no_retrieval)
    config = build_config(args, defaults)  # validates before anything heavy loads
    if args.json:
        out = Path(args.json)
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--json: directory {str(out.parent)!r} does not exist")

    import time

    from cm3rt.api import load_engine
    from cm3rt.devices import resolve_device, resolve_weight_dtype

    device = resolve_device(args.device)
    dtype, int8 = resolve_weight_dtype(args.dtype, device)
    t0 = time.perf_counter()
    engine = load_engine(str(model_dir), device=device, dtype="int8" if int8 else dtype)
    bank = None
    if bank_dir is not None:
        from cm3rt.retrieval.bank import open_cached

        bank = open_cached(bank_dir)
    load_s = time.perf_counter() - t0
    scorer = None
    if config.best_of and (model_dir / "clip").is_dir():
        from cm3rt.retrieval.clip import ClipEncoder

        scorer = ClipEncoder(f"local-dir:{model_dir / 'clip'}").score
    report = quality.run_quality(engine, bank, config, scorer=scorer,
                                 progress=not args.no_progress)
    report.info = {"model": str(model_dir), "bank": str(bank_dir) if bank_dir else None,
                   "device": str(device), "dtype": "int8" if int8 else str(dtype), "load_s": load_s}
    print(f"# cm3rt eval: {model_dir}" + (f" (bank {bank_dir})" if bank_dir else "")
          + f", {device}, load {load_s:.1f} s\n")
    print(quality.format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.strict and any(t.status == "MISS" for t in report.targets):
        return 3
    return 0
