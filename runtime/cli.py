"""Uniform CLI behaviour: one clear line and a non-zero exit for user errors, tracebacks only with --debug."""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from runtime.errors import UserError

EXIT_USER_ERROR = 2


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Add the common --debug flag (show tracebacks instead of one-line errors)."""
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a CLI entry point; turn UserError into one line on stderr and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = main(args)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc.line()}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
