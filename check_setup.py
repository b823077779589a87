#!/usr/bin/env python3
"""Check the configuration and the connections: URLs, servers, client tools, rights, space."""

from __future__ import annotations

import sys

import lib.cli.venv  # noqa: F401  (first: runs this script again under .venv when its packages are missing)
from lib.cli import render
from lib.cli.app import Parser, common_flags, epilog, run_script, settings_from
from lib.operations.check import run_checks

EXAMPLES = """
Reports, each with ok or how to fix it: both URLs (passwords masked), each server's
version, which pg_dump and pg_restore will serve each server, whether the staging
role may create databases (template points, swap restores) and end sessions, that
V2 and staging are different databases, the points and free space in BACKUP_DIR,
and the log folder. Nothing is changed. Exit code 0 when nothing failed (warnings
allowed), 1 otherwise.

examples:
  python3 check_setup.py
  python3 check_setup.py --json
"""


def build_parser() -> Parser:
    p = Parser(prog="check_setup.py", description=__doc__, epilog=epilog(EXAMPLES))
    p.add_argument("--database-url", help="staging database URL (default: STAGING_DATABASE_URL)")
    p.add_argument("--v2-url", help="V2 database URL (default: V2_DATABASE_URL)")
    common_flags(p)
    return p


def action(args, ui, ask) -> int:
    settings = settings_from(args)
    findings = run_checks(settings)
    if args.json:
        ui.emit_json([f.as_dict() for f in findings])
    else:
        render.findings(ui, findings)
    return 1 if any(f.status == "fail" for f in findings) else 0


def main(argv: list[str] | None = None) -> int:
    return run_script("check_setup", argv, build_parser, action)


if __name__ == "__main__":
    sys.exit(main())
