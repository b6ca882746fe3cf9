"""``cm3rt convert vqgan``: Chameleon's vqgan.ckpt + vqgan.yaml -> vqgan.safetensors
(the conversion itself is :mod:`cm3rt.tokenizer.convert`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert`` (and its ``vqgan`` target) to the ``cm3rt`` command line."""
    convert = subparsers.add_parser(
        "convert", help="convert original checkpoints to cm3rt's safetensors layouts")
    targets = convert.add_subparsers(dest="target", metavar="TARGET", required=True)
    vq = targets.add_parser(
        "vqgan", help="Chameleon's vqgan.ckpt + vqgan.yaml -> vqgan.safetensors")
    vq.add_argument("--ckpt", required=True, type=Path, help="the original vqgan.ckpt")
    vq.add_argument("--config", required=True, type=Path, help="its vqgan.yaml")
    vq.add_argument("--out", required=True, type=Path,
                    help="output directory (e.g. the Chameleon model directory)")
    vq.add_argument("--overwrite", action="store_true",
                    help="replace an existing vqgan.safetensors in --out")
    vq.set_defaults(handler=_run_vqgan)


def _run_vqgan(args: argparse.Namespace) -> int:
    from cm3rt.tokenizer.convert import convert_vqgan

    out = convert_vqgan(args.ckpt, args.config, args.out, overwrite=args.overwrite)
    print(f"wrote {out} and {out.parent / 'vqgan_config.json'}")
    return 0


