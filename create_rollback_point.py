#!/usr/bin/env python3
"""Take a rollback point of the staging database."""

from __future__ import annotations

import sys

import lib.cli.venv  # noqa: F401  (first: runs this script again under .venv when its packages are missing)
from lib.cli.app import Parser, common_flags, epilog, run_script, settings_from
from lib.files import human_size
from lib.operations import commands as operations
from lib.points.methods import registry

EXAMPLES = """
methods:
  auto      template where the role may create databases on staging's server, dump otherwise (default;
            ROLLBACK_METHOD sets another default)
  template  a copy of staging on the same server (CREATE DATABASE ... TEMPLATE): fastest to take and restore;
            sessions on staging are disconnected for the copy (asked first)
  dump      a pg_dump archive in BACKUP_DIR, chosen to fit the server's PostgreSQL version
  data      the rows of every table, or of --table ones, copied with COPY (no client tools needed);
            restores data, not schema
  pitr      a named restore point in staging's pgBackRest repository (PGBACKREST_STANZA): seconds
            whatever the size; for databases too large to copy (asked for by name, never by auto)

examples:
  python3 create_rollback_point.py "Before migration test"
  python3 create_rollback_point.py "Before clients import" --migration-id client_migration --keep 5
  python3 create_rollback_point.py "Nightly" --method dump --json      # prints {"id": ..., ...}
  python3 create_rollback_point.py "Before orders fix" --method data --table customers --table orders
  PGBACKREST_STANZA=staging python3 create_rollback_point.py "Before clients import" --method pitr

Every point has BACKUP_DIR/<id>/manifest.json and is listed by `python3 rollback_manager.py list`.
"""


def build_parser() -> Parser:
    p = Parser(prog="create_rollback_point.py", description=__doc__, epilog=epilog(EXAMPLES))
    p.add_argument("description", nargs="?", help="what this point is for (asked on a terminal; default 'Manual rollback point')")
    p.add_argument("--method", choices=registry.NAMES, help="how to take it (default: ROLLBACK_METHOD or auto)")
    p.add_argument("--migration-id", help="the migration this point guards; also names the point id")
    p.add_argument("--table", action="append", metavar="TABLE", help="a data point of this table (repeatable)")
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="write every file of the point in the age format, to the recipients in ROLLBACK_ENCRYPT_TO",
    )
    p.add_argument(
        "--keep",
        type=int,
        metavar="N",
        help="afterwards keep the N newest points taken on purpose (with --migration-id: of that migration only)",
    )
    p.add_argument(
        "--jobs", type=int, metavar="N", help="parallel pg_dump jobs for a dump point (default: DUMP_JOBS or the number of CPUs)"
    )
    p.add_argument("--database-url", help="staging database URL (default: STAGING_DATABASE_URL)")
    common_flags(p)
    return p


DEFAULT_DESCRIPTION = "Manual rollback point"


def action(args, ui, ask) -> int:
    settings = settings_from(args)
    description = args.description or DEFAULT_DESCRIPTION
    if args.description is None and not args.json:
        description = ask.choose("Description", what="a description", default=DEFAULT_DESCRIPTION)
    point, removed = operations.create_point(
        settings,
        ui,
        ask,
        description=description,
        migration_id=args.migration_id,
        method=args.method,
        keep=args.keep,
        tables=args.table,
    )
    summary = registry.summary(point)
    if args.json:
        ui.emit_json(
            {
                **summary,
                "path": str(point.path),
                "template_database": point.manifest.template_database,
                "duration_seconds": point.manifest.duration_seconds,
                "removed": [p.id for p in removed],
            }
        )
        return 0
    fp = point.manifest.fingerprint
    what = (
        f"{len(fp['relations'])} relations checked by the catalog (rows are read in the background)"
        if "relations" in fp
        else f"{sum(fp['row_counts'].values())} rows in {len(fp['row_counts'])} tables"
    )
    copied = point.manifest.copy
    how = f", {dict(clone='cloned', copy='copied')[copied['method']]}: {copied['why']}" if copied else ""
    ui.ok(
        f"Point created ({point.method}{how}): {human_size(summary['size_bytes'])}, {what}, "
        f"in {point.manifest.duration_seconds} s"
    )
    ui.info(f"Restore it with: python3 rollback_manager.py restore {point.id}")
    print(point.id)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_script("create_rollback_point", argv, build_parser, action)


if __name__ == "__main__":
    sys.exit(main())
