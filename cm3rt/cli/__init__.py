"""The `cm3rt` command line: every subcommand lives in this package.

Each module contributes its subcommands through ``register_cli(subparsers)`` (kept
import-light: heavy imports happen inside the handlers). A handler returns an exit code.

Errors: a problem the user can fix (bad flag value, missing file, missing optional
package: ValueError, TypeError, OSError, ImportError, and the engine's own request errors)
prints one line and exits 1; anything else is a bug and prints "internal error" with its
traceback (exit 70). ``--debug`` prints the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import traceback

# Modules that contribute subcommands, in help order.
_CLI_MODULES = (
    "cm3rt.cli.generate",      # generate, caption
    "cm3rt.cli.bank",          # bank build | search
    "cm3rt.cli.convert",       # convert
    "cm3rt.cli.eval",          # eval
)

EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE


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
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of every error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show how the kernels were built")
    info.set_defaults(handler=_info)
    for name in _CLI_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ValueError, TypeError, OSError, ImportError]
    engine = sys.modules.get("cm3rt.engine.scheduler")  # loaded iff a request ran
    if engine is not None:
        errors += [engine.CacheTooSmallError, engine.SamplingError]
    return tuple(errors)


def _as_flags(message: str, args: argparse.Namespace) -> str:
    """"argument 'k_docs'" -> "--k-docs" where the command has that flag, so a message
    from the API names what the user typed."""
    def flag(m: re.Match) -> str:
        name = m.group(1)
        return f"--{name.replace('_', '-')}" if hasattr(args, name) else m.group(0)

    return re.sub(r"argument '(\w+)'", flag, message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            if args.debug:
                traceback.print_exc()
            print(f"cm3rt {args.command}: error: {_as_flags(str(exc), args)}", file=sys.stderr)
            return EXIT_USER_ERROR
        traceback.print_exc()
        print(f"cm3rt {args.command}: internal error ({type(exc).__name__}); this is a bug, "
              "please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
