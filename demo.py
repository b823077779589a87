#!/usr/bin/env python3
"""The demo on an embedded PostgreSQL: check, a rollback point, a migration that passes its
failure threshold and is rolled back by itself, verification, the points, the audit trail.

No configuration needed: the server lives in .pgdata/ and keeps running afterwards, and
.env is written to point at it unless there is one already (it is never overwritten)."""

from __future__ import annotations

import sys

import lib.cli.venv  # noqa: F401  (first: runs this script again under .venv when its packages are missing)
from lib.cli.app import Parser, epilog, run_script
from lib.cli.demo import run_demo, stop_demo


def build_parser() -> Parser:
    p = Parser(
        prog="demo.py",
        description=__doc__,
        epilog=epilog("examples:\n  ./setup_and_run.sh demo\n  ./setup_and_run.sh demo --stop\n  python3 demo.py"),
    )
    p.add_argument("--stop", action="store_true", help="stop the demo server (its data stays in .pgdata/)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_script("demo", argv, build_parser, lambda args, ui, ask: stop_demo(ui) if args.stop else run_demo(ui))


if __name__ == "__main__":
    sys.exit(main())
