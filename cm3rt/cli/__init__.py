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
    "cm3rt.cli.serve",         # serve
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


# Problems the user can fix (bad flag value, missing file, missing optional package).
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)
# ... and the engine's own request errors (RuntimeError subclasses), by name: importing the
# engine here would load torch for every `cm3rt --help`.
ENGINE_REQUEST_ERRORS = ("CacheTooSmallError", "SamplingError")


def _report_user_error(exc: BaseException, args: argparse.Namespace,
                       options: dict[str, str]) -> int:
    if args.debug:
        traceback.print_exc()
    print(f"cm3rt {args.command}: error: {_as_flags(str(exc), options)}", file=sys.stderr)
    return EXIT_USER_ERROR


def _as_flags(message: str, options: dict[str, str]) -> str:
    """"argument 'k_docs'" -> "--k-docs" where the command has that option, so a message
    from the API names what the user typed."""
    return re.sub(r"argument '(\w+)'", lambda m: options.get(m.group(1), m.group(0)), message)


def _options_of(parser: argparse.ArgumentParser, command: str | None) -> dict[str, str]:
    """dest -> its long option string, for the subcommand ``command``."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    chosen = sub.choices.get(command) if sub is not None and command else None
    actions = chosen._actions if chosen is not None else []
    # the longest option, but never a BooleanOptionalAction's "--no-..." form
    return {a.dest: max([o for o in a.option_strings if not o.startswith("--no-")]
                        or a.option_strings, key=len)
            for a in actions if a.option_strings}


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
    except USER_ERRORS as exc:
        return _report_user_error(exc, args, _options_of(parser, args.command))
    except Exception as exc:  # noqa: BLE001 - the last resort: a bug, with its traceback
        if type(exc).__name__ in ENGINE_REQUEST_ERRORS and \
                type(exc).__module__ == "cm3rt.engine.scheduler":
            return _report_user_error(exc, args, _options_of(parser, args.command))
        traceback.print_exc()
        print(f"cm3rt {args.command}: internal error ({type(exc).__name__}); this is a bug, "
              "please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
