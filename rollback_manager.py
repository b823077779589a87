#!/usr/bin/env python3
"""List, inspect, verify and restore rollback points."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lib.cli.venv  # noqa: F401  (first: runs this script again under .venv when its packages are missing)
from lib import api
from lib.api import *  # noqa: F403 - the Python API of seed 000, re-exported
from lib.cli import render
from lib.cli.app import CATALOG_CHECK_ONLY_HELP, Parser, common_flags, epilog, run_script, settings_from
from lib.errors import ConfigError
from lib.migrate import undo as undo_runs
from lib.operations import commands as operations
from lib.points.methods import registry

# The Python API of seed 000: from rollback_manager import RollbackManager, MigrationTransaction, RollbackType
__all__ = [*api.__all__, "main"]

EXAMPLES = """
commands:
  list                     every point: id, migration id, database, table, method, size, status, created, description
  info ID | --file PATH    one point in detail (alias: details), or any pg_dump archive / point folder
  verify ID [--deep]       checksums, then an archive read end to end, or a database copy checked by its
                           catalog; --deep reads every row
  restore ID               staging back to that point (alias: execute); asks first, --yes to skip
      --type partial [--table T]...   only delete the rows added since the point, keep the rest
      --type backup --file PATH       straight from a pg_dump archive or a point folder
      --in-place                      a pitr point: the whole cluster, stopped and restored
  restore --to-time T | --to-lsn L    staging back to a moment the pgBackRest repository covers
  diff ID                  what restoring ID would undo: rows added, deleted, changed per table
  undo RUN                 revert exactly what one captured migration run changed, keep every other
                           session's writes (RUN: a run id, or a migration id for its newest run);
                           --dry-run, --skip-conflicts; run_migration.py --status lists the runs
  backup TABLE             a data point of one table (--description TEXT)
  delete ID                remove one point, its database copy included
  cleanup                  remove what interrupted runs left (half-made points, temporary databases
                           and files), and old points of staging: --keep N, --older-than DAYS;
                           --dry-run; the newest point that verifies is never removed
  audit [--limit N]        the audit trail: points, restores, verifications, resets, migrations

examples:
  python3 rollback_manager.py list
  python3 rollback_manager.py info rb_before_migration_test_20261121_101500
  python3 rollback_manager.py verify rb_before_migration_test_20261121_101500 --json
  python3 rollback_manager.py restore rb_before_migration_test_20261121_101500
  python3 rollback_manager.py restore --to-time "2026-11-21 21:55:00+00"
  python3 rollback_manager.py undo 003_fix_prices --dry-run
  python3 rollback_manager.py cleanup --keep 5 --dry-run
  python3 rollback_manager.py audit --limit 50 --json
  python3 rollback_manager.py "$V2_DATABASE_URL" "$STAGING_DATABASE_URL" list

A restore keeps staging's current state as a new point first, so it can be undone
by restoring that point (its id is printed at the end).
"""


def build_parser() -> Parser:
    p = Parser(prog="rollback_manager.py", description=__doc__, epilog=epilog(EXAMPLES))
    p.add_argument("--database-url", help="staging database URL (default: STAGING_DATABASE_URL)")
    p.add_argument("--v2-url", help=argparse.SUPPRESS)
    parent = argparse.ArgumentParser(add_help=False)
    common_flags(parent)
    # also after the command, as every other script takes it anywhere (SUPPRESS: absent, it leaves the one before alone)
    parent.add_argument("--database-url", default=argparse.SUPPRESS, help="staging database URL (default: STAGING_DATABASE_URL)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("list", parents=[parent], help="list rollback points")
    info = sub.add_parser("info", aliases=["details"], parents=[parent], help="show one point or an archive file")
    info.add_argument("point_id", nargs="?", metavar="ID")
    info.add_argument("--file", help="a pg_dump archive, a point folder or its manifest.json")
    verify = sub.add_parser("verify", parents=[parent], help="check a point's checksums and read it end to end")
    verify.add_argument("point_id", metavar="ID")
    verify.add_argument(
        "--deep",
        action="store_true",
        help="read every row: a dump rebuilt beside staging and counted, a database copy's rows against its baseline",
    )
    restore = sub.add_parser("restore", aliases=["execute"], parents=[parent], help="put staging back to a point")
    restore.add_argument("point_id", metavar="ID", nargs="?")
    restore.add_argument(
        "--type",
        choices=("full", "partial", "backup", "transaction"),
        default="full",
        help="full (default), partial, backup (with --file), transaction",
    )
    restore.add_argument("--table", action="append", metavar="TABLE", help="partial: only this table (repeatable)")
    restore.add_argument("--file", help="backup: a pg_dump archive or a point folder")
    moment = restore.add_mutually_exclusive_group()
    moment.add_argument(
        "--to-time", metavar="TIME", help="a moment the pgBackRest repository covers, with its zone: '2026-11-21 21:55:00+00'"
    )
    moment.add_argument("--to-lsn", metavar="LSN", help="a WAL position the pgBackRest repository covers, e.g. 0/3000100")
    restore.add_argument(
        "--in-place",
        action="store_true",
        help="pitr only: stop the cluster and restore ALL of it (every database on it goes back)",
    )
    restore.add_argument(
        "--force",
        action="store_true",
        help="go ahead although staging has replication slots or subscriptions (they stay with the state kept before), "
        "or the point's database was opened outside the toolkit",
    )
    restore.add_argument("--catalog-check-only", action="store_true", help=CATALOG_CHECK_ONLY_HELP)
    differ = sub.add_parser("diff", parents=[parent], help="what restoring a point would undo")
    differ.add_argument("point_id", metavar="ID")
    undo = sub.add_parser("undo", parents=[parent], help="revert one migration run's own changes, keep the rest")
    undo.add_argument("run", metavar="RUN", help="a run id (run_migration.py --status), or a migration id for its newest run")
    undo.add_argument("--dry-run", action="store_true", help="show per table what would be put back, and the conflicts")
    undo.add_argument(
        "--skip-conflicts",
        action="store_true",
        help="undo the rest where rows were changed after the run (those stay as they are now; listed and audited)",
    )
    backup = sub.add_parser("backup", parents=[parent], help="a data point of one or more tables")
    backup.add_argument("tables", nargs="+", metavar="TABLE")
    backup.add_argument("--description", default=None, help="what this point is for")
    backup.add_argument("--encrypt", action="store_true", help="age-encrypt the files, to ROLLBACK_ENCRYPT_TO")
    delete = sub.add_parser("delete", parents=[parent], help="remove one point and its database copy")
    delete.add_argument("point_id", metavar="ID")
    clean = sub.add_parser("cleanup", parents=[parent], help="remove old points of staging")
    clean.add_argument(
        "--keep",
        type=int,
        metavar="N",
        help="keep the N newest points taken on purpose (states kept before rollbacks: KEEP_BEFORE_STATES)",
    )
    clean.add_argument("--older-than", type=float, metavar="DAYS", help="remove only points older than DAYS days")
    clean.add_argument("--dry-run", action="store_true", help="show what would be removed, remove nothing")
    trail = sub.add_parser("audit", parents=[parent], help="show the audit trail")
    trail.add_argument("--limit", type=int, default=50, metavar="N", help="the newest N entries (default 50, 0 for all)")
    return p


def split_leading_urls(argv: list[str]) -> tuple[list[str], list[str]]:
    """Seed form: rollback_manager.py V2_URL STAGING_URL COMMAND ..."""
    urls = []
    while argv and len(urls) < 2 and ("://" in argv[0] or argv[0].startswith("postgres")):
        urls.append(argv[0])
        argv = argv[1:]
    return urls, argv


def action(args, ui, ask) -> int:
    settings = settings_from(args)
    command = {"details": "info", "execute": "restore"}.get(args.command, args.command)
    if command == "list":
        points = operations.list_points(settings)
        return ui.result([registry.summary(p) for p in points], lambda: render.points_table(ui, points))
    if command == "info":
        if args.file:
            details, point = operations.file_info(settings, args.file)
            return ui.result(details, lambda: render.file_details(ui, details, point))
        if not args.point_id:
            raise ConfigError("info needs a point id or --file PATH.", "See `python3 rollback_manager.py list`.")
        point = operations.get_point(settings, args.point_id)
        return ui.result({**point.manifest.as_dict(), "path": str(point.path)}, lambda: render.point_details(ui, point))
    if command == "verify":
        result = operations.verify_point(settings, ui, args.point_id, deep=args.deep)
        return ui.result(result, lambda: ui.ok(f"Point {result['id']} verified ({result['level']})"))
    if command == "backup":
        description = args.description or f"Backup of {', '.join(args.tables)}"
        point, _ = operations.create_point(
            settings, ui, ask, description=description, method=registry.FOR_TABLES, tables=args.tables
        )
        return ui.result(
            {**registry.summary(point), "path": str(point.path)},
            lambda: (ui.ok(f"Data point {point.id} of {point.manifest.table}"), print(point.id)),
        )
    if command == "delete":
        point = operations.delete_point(settings, ui, ask, args.point_id)
        return ui.result({"deleted": point.id}, lambda: ui.ok(f"Point {point.id} deleted"))
    if command == "cleanup":
        removed, protected, left = operations.cleanup(
            settings, ui, ask, keep=args.keep, older_than_days=args.older_than, dry_run=args.dry_run
        )
        document = {
            "dry_run": args.dry_run,
            "removed": [p.id for p in removed],
            "leftovers": left,
            "kept_newest_verified": protected.id if protected else None,
        }
        verb = "would be removed" if args.dry_run else "removed"
        return ui.result(document, lambda: removed and ui.ok(f"{len(removed)} point(s) {verb}"))
    if command == "audit":
        entries = operations.audit_trail(settings, ui, None if args.limit == 0 else args.limit)
        return ui.result(entries, lambda: render.audit_trail(ui, entries))
    if command == "undo":
        done = undo_runs.undo_run(settings, ui, ask, args.run, dry_run=args.dry_run, skip_conflicts=args.skip_conflicts)
        return ui.result(done, lambda: render.undo_outcome(ui, done))
    if command == "diff":
        found = operations.diff_point(settings, ui, args.point_id)
        return ui.result(found.as_dict(), lambda: render.diff_lines(ui, found))
    return restore(args, ui, ask, settings)


def restore(args, ui, ask, settings) -> int:
    moment = bool(args.to_time or args.to_lsn)
    operations.check_restore_request(args.type, args.point_id, args.file, moment=moment, in_place=args.in_place)
    if args.type == "partial":
        outcome = operations.partial_rollback(settings, ui, ask, args.point_id, tables=args.table)
        return ui.result(outcome, lambda: render.partial_outcome(ui, outcome))
    archive = Path(args.file) if args.type == "backup" else None
    result = operations.restore_point(
        settings,
        ui,
        ask,
        args.point_id,
        archive=archive,
        force=args.force,
        to_time=args.to_time,
        to_lsn=args.to_lsn,
        in_place=args.in_place,
        catalog_only=args.catalog_check_only,
    )
    headline = f"{result.database} restored to {result.point_id} ({result.mode})."
    return render.restore_outcome(ui, result, as_json=args.json, headline=headline)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    urls, rest = split_leading_urls(argv)
    if len(urls) == 1:
        rest = ["--database-url", urls[0], *rest]
    elif len(urls) == 2:
        rest = ["--v2-url", urls[0], "--database-url", urls[1], *rest]
    return run_script("rollback_manager", rest, build_parser, action)


if __name__ == "__main__":
    sys.exit(main())
