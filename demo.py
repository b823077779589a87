#!/usr/bin/env python3
"""The demo on an embedded PostgreSQL: take a point, botch a migration, restore, prove it exact.

No configuration needed; everything lives in .demo/ (git-ignored)."""

from __future__ import annotations

import sys

from lib.cli import Parser, epilog, run
from lib.demo import run_demo, stop_demo


def build_parser() -> Parser:
    p = Parser(
        prog="demo.py", description=__doc__, epilog=epilog("examples:\n  ./setup_and_run.sh demo\n  python3 demo.py --keep")
    )
    p.add_argument("--keep", action="store_true", help="leave the demo server running to try commands by hand")
    p.add_argument("--stop", action="store_true", help="stop a demo server left running by --keep")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    return run("demo", argv, build_parser, lambda args, ui: stop_demo(ui) if args.stop else run_demo(ui, keep=args.keep))


if __name__ == "__main__":
    sys.exit(main())
