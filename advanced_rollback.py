#!/usr/bin/env python3
"""Advanced rollback, step by step: pick a point from a numbered list, full or partial,
see what it would undo, confirm."""

from __future__ import annotations

import sys

import lib.cli.venv  # noqa: F401  (first: runs this script again under .venv when its packages are missing)
from lib.cli import advanced
from lib.cli.app import Parser, epilog, run_script, settings_from

EXAMPLES = """
Needs a terminal: it asks. The same work without questions:
  python3 rollback_manager.py restore <id> [--yes]
  python3 rollback_manager.py restore <id> --type partial [--yes]

examples:
  python3 advanced_rollback.py
  ./setup_and_run.sh advanced       (menu option 8)
"""


def build_parser() -> Parser:
    p = Parser(prog="advanced_rollback.py", description=__doc__, epilog=epilog(EXAMPLES))
    p.add_argument("--database-url", help="staging database URL (default: STAGING_DATABASE_URL)")
    p.add_argument("--backup-dir", metavar="DIR", help="where points live (default: BACKUP_DIR or backups/)")
    p.add_argument("--debug", action="store_true", help="log at debug level and show tracebacks on screen")
    return p


def action(args, ui, ask) -> int:
    settings = settings_from(args)
    advanced.walk_through(settings, ui, ask)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_script("advanced_rollback", argv, build_parser, action)


if __name__ == "__main__":
    sys.exit(main())
