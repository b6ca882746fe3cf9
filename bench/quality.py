"""Quality benchmark of the embedded default model: the same run as ``cm3rt eval``.

    python bench/quality.py [--quick] [--model DIR] [--prompts N] [--json OUT] ...

Every option of ``cm3rt eval`` is accepted (``python bench/quality.py --help``). Not a
pytest-benchmark suite: it measures model quality, not speed (it prints its wall time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from cm3rt.cli.eval import register_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/quality.py")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.handler(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"bench/quality.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
