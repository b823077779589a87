#!/usr/bin/env python3
"""List, inspect, verify and restore rollback points."""

from __future__ import annotations

import argparse
import sys

from lib import operations, render
from lib.cli import Parser, common_flags, epilog, run
from lib.config import load_settings

EXAMPLES = """
commands:
  list                     every point: id, migration id, database, table, method, size, status, created, description
  info ID | --file PATH    one point in detail (alias: details), or any pg_dump archive / point folder
  verify ID                checksums, and the archive read end to end
  restore ID               staging back to that point (alias: execute); asks first, --yes to skip

examples:
  python3 rollback_manager.py list
  python3 rollback_manager.py info rb_before_migration_test_20261121_101500
  python3 rollback_manager.py verify rb_before_migration_test_20261121_101500 --json
  python3 rollback_manager.py restore rb_before_migration_test_20261121_101500
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
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("list", parents=[parent], help="list rollback points")
    info = sub.add_parser("info", aliases=["details"], parents=[parent], help="show one point or an archive file")
    info.add_argument("point_id", nargs="?", metavar="ID")
    info.add_argument("--file", help="a pg_dump archive, a point folder or its manifest.json")
    verify = sub.add_parser("verify", parents=[parent], help="check a point's checksums and read it end to end")
    verify.add_argument("point_id", metavar="ID")
    restore = sub.add_parser("restore", aliases=["execute"], parents=[parent], help="put staging back to a point")
    restore.add_argument("point_id", metavar="ID")
    return p


def split_leading_urls(argv: list[str]) -> tuple[list[str], list[str]]:
    """Seed form: rollback_manager.py V2_URL STAGING_URL COMMAND ..."""
    urls = []
    while argv and len(urls) < 2 and ("://" in argv[0] or argv[0].startswith("postgres")):
        urls.append(argv[0])
        argv = argv[1:]
    return urls, argv


def action(args, ui) -> int:
    settings = load_settings(staging_url=args.database_url, v2_url=args.v2_url, backup_dir=args.backup_dir)
    if args.command == "list":
        points = operations.list_points(settings)
        if args.json:
            ui.emit_json([p.summary() for p in points])
        else:
            render.points_table(ui, points)
        return 0
    if args.command in ("info", "details"):
        if args.file:
            details = operations.file_info(settings, args.file)
            if args.json:
                ui.emit_json(details)
            else:
                for key, value in details.items():
                    ui.out.print(f"[bold]{key}[/]: {value}")
            return 0
        if not args.point_id:
            from lib.errors import ConfigError

            raise ConfigError("info needs a point id or --file PATH.", "See `python3 rollback_manager.py list`.")
        point = operations.get_point(settings, args.point_id)
        if args.json:
            ui.emit_json({**point.manifest, "path": str(point.path)})
        else:
            render.point_details(ui, point)
        return 0
    if args.command == "verify":
        result = operations.verify_point(settings, ui, args.point_id)
        if args.json:
            ui.emit_json(result)
        else:
            ui.ok(f"Point {result['id']} verified")
        return 0
    # restore / execute
    result = operations.restore_point(settings, ui, args.point_id, assume_yes=args.yes)
    if args.json:
        ui.emit_json(result.as_dict())
    else:
        ui.ok(f"{result.database} restored to {result.point_id} and verified ({result.mode}).")
        if result.before_point_id:
            ui.info(
                f"The state before is kept as point {result.before_point_id}; "
                f"undo with: python3 rollback_manager.py restore {result.before_point_id}"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    urls, rest = split_leading_urls(argv)
    if len(urls) == 1:
        rest = ["--database-url", urls[0], *rest]
    elif len(urls) == 2:
        rest = ["--v2-url", urls[0], "--database-url", urls[1], *rest]
    return run("rollback_manager", rest, build_parser, action)


if __name__ == "__main__":
    sys.exit(main())
