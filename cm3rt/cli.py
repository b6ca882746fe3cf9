"""The `cm3rt` command line.

Each feature area contributes its subcommands through a ``register_cli(subparsers)``
function in its own module (kept import-light: heavy imports happen inside the handlers).
A handler returns an exit code; errors a person can fix are printed as one line, not a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in help order.
_CLI_MODULES = (
    "cm3rt.cli_generate",      # generate, caption
    "cm3rt.retrieval.cli",     # bank build | search
    "cm3rt.convert",           # convert
    "cm3rt.evaluation.cli",    # eval
)


def _info(args: argparse.Namespace) -> int:
    from cm3rt import ops

    info = ops.build_info()
    print(f"cm3rt build: {info['summary']}")
    print(f"CUDA devices visible: {info['cuda_devices']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cm3rt",
        description="Retrieval-augmented multimodal generation (CM3Leon / Chameleon family).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show how the kernels were built")
    info.set_defaults(handler=_info)
    for name in _CLI_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # feature area not present in this build
            raise
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"cm3rt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
