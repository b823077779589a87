#!/usr/bin/env python3
"""Take a rollback point of the staging database."""

from __future__ import annotations

import sys

from lib import operations
from lib.catalog import human_size
from lib.cli import Parser, common_flags, epilog, run
from lib.config import load_settings

EXAMPLES = """
examples:
  python3 create_rollback_point.py "Before migration test"
  python3 create_rollback_point.py "Before clients import" --migration-id client_migration
  python3 create_rollback_point.py "Nightly" --json          # prints {"id": ..., ...}

The point is written to BACKUP_DIR/<id>/ (an archive and manifest.json) and
listed by `python3 rollback_manager.py list`. pg_dump is chosen to fit the
server's PostgreSQL version; see ROLLBACK_GUIDE.md for the version rules.
"""


def build_parser() -> Parser:
    p = Parser(prog="create_rollback_point.py", description=__doc__, epilog=epilog(EXAMPLES))
    p.add_argument("description", nargs="?", default="Manual rollback point", help="what this point is for")
    p.add_argument(
        "--method", choices=operations.METHODS, default="dump", help="dump: a pg_dump archive on this machine (default)"
    )
    p.add_argument("--migration-id", help="the migration this point guards; also names the point id")
    p.add_argument("--database-url", help="staging database URL (default: STAGING_DATABASE_URL)")
    common_flags(p)
    return p


def action(args, ui) -> int:
    settings = load_settings(staging_url=args.database_url, backup_dir=args.backup_dir)
    point = operations.create_point(
        settings, ui, description=args.description, migration_id=args.migration_id, method=args.method
    )
    summary = point.summary()
    if args.json:
        ui.emit_json({**summary, "path": str(point.path), "duration_seconds": point.manifest.get("duration_seconds")})
    else:
        rows = sum(point.manifest["fingerprint"]["row_counts"].values())
        ui.ok(
            f"Point created: {human_size(summary['size_bytes'])}, {rows} rows in "
            f"{len(point.manifest['fingerprint']['row_counts'])} tables, in {point.manifest.get('duration_seconds')} s"
        )
        ui.info(f"Restore it with: python3 rollback_manager.py restore {point.id}")
        print(point.id)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run("create_rollback_point", argv, build_parser, action)


if __name__ == "__main__":
    sys.exit(main())
