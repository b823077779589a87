#!/usr/bin/env python3
"""Rebuild staging from the V2 database: the last resort when no point will do."""

from __future__ import annotations

import sys

import lib.cli.venv  # noqa: F401  (first: runs this script again under .venv when its packages are missing)
from lib.cli import render
from lib.cli.app import Parser, common_flags, epilog, run_script, settings_from
from lib.errors import ConfigError
from lib.operations.reset import reset_staging

EXAMPLES = """
V2 is only read (read-only sessions); a staging URL that is really V2 is refused.
V2 is copied in one snapshot into a new database beside staging: the schema with
pg_dump into pg_restore (each chosen for its server's PostgreSQL version), the rows
by parallel COPY pipes, then indexes and constraints by parallel workers; its row
counts and sequences are checked against V2's in
the same snapshot, then swapped in; the old staging is kept as a point (undo:
`rollback_manager.py restore <that id>`).

examples:
  python3 reset_staging.py
  python3 reset_staging.py --yes --json
  python3 reset_staging.py --jobs 4            # four COPY pipes, four index builders
  python3 quick_rollback.py --from-v2          # the same
"""


def build_parser() -> Parser:
    p = Parser(prog="reset_staging.py", description=__doc__, epilog=epilog(EXAMPLES))
    p.add_argument("--database-url", help="staging database URL (default: STAGING_DATABASE_URL)")
    p.add_argument("--v2-url", help="V2 database URL (default: V2_DATABASE_URL)")
    p.add_argument(
        "--force",
        action="store_true",
        help="go ahead although staging has logical replication slots or subscriptions (they stay with the state kept before)",
    )
    p.add_argument("--jobs", type=int, metavar="N", help="COPY pipes and index builders at once (default: the number of CPUs)")
    common_flags(p)
    return p


def action(args, ui, ask) -> int:
    settings = settings_from(args)
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs must be at least 1.")
    result = reset_staging(settings, ui, ask, jobs=args.jobs, force=args.force)
    return render.restore_outcome(ui, result, as_json=args.json, headline=f"{result.database} rebuilt from V2 and checked.")


def main(argv: list[str] | None = None) -> int:
    return run_script("reset_staging", argv, build_parser, action)


if __name__ == "__main__":
    sys.exit(main())
