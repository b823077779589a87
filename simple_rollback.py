#!/usr/bin/env python3
"""Rollback points in pure Python: COPY through psycopg2, no pg_dump, no client tools.

The way out when no pg_dump / pg_restore fits the server. Points hold table data,
not schema (a restore refuses when a table's columns changed), and are listed by
`rollback_manager.py list` with the rest (data points)."""

from __future__ import annotations

import sys

import lib.cli.venv  # noqa: F401  (first: runs this script again under .venv when its packages are missing)
from lib.cli import render
from lib.cli.app import Parser, common_flags, epilog, run_script, settings_from
from lib.operations import commands as operations
from lib.points.methods import registry

EXAMPLES = """
commands:
  create ["DESCRIPTION"] [--table T]...   copy every table (or the chosen ones) in one snapshot
  list                                    the data points
  restore [ID]                            the newest data point of staging, or ID; asks first

examples:
  python3 simple_rollback.py create "Before migration"
  python3 simple_rollback.py create "Before orders fix" --table orders --table order_items
  python3 simple_rollback.py restore --yes
"""


def build_parser() -> Parser:
    p = Parser(prog="simple_rollback.py", description=__doc__, epilog=epilog(EXAMPLES))
    p.add_argument("--database-url", help="staging database URL (default: STAGING_DATABASE_URL)")
    parent = Parser(add_help=False)
    common_flags(parent)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    create = sub.add_parser("create", parents=[parent], help="take a data point")
    create.add_argument("description", nargs="?", default="Simple rollback point")
    create.add_argument("--table", action="append", metavar="TABLE", help="only this table (repeatable)")
    create.add_argument("--encrypt", action="store_true", help="age-encrypt the files, to ROLLBACK_ENCRYPT_TO")
    sub.add_parser("list", parents=[parent], help="list data points")
    restore = sub.add_parser("restore", parents=[parent], help="restore a data point")
    restore.add_argument("point_id", nargs="?", metavar="ID")
    return p


def action(args, ui, ask) -> int:
    settings = settings_from(args)
    if args.command == "create":
        point, _ = operations.create_point(
            settings, ui, ask, description=args.description, method=registry.FOR_TABLES, tables=args.table
        )
        if args.json:
            ui.emit_json({**registry.summary(point), "path": str(point.path)})
        else:
            print(point.id)
        return 0
    if args.command == "list":
        points = [p for p in operations.list_points(settings) if p.method == registry.FOR_TABLES]
        if args.json:
            ui.emit_json([registry.summary(p) for p in points])
        else:
            render.points_table(ui, points)
        return 0
    if args.point_id:
        result = operations.restore_point(settings, ui, ask, args.point_id)
    else:
        _, result = operations.quick_rollback(settings, ui, ask, method=registry.FOR_TABLES)
    return render.restore_outcome(
        ui, result, as_json=args.json, headline=f"{result.database} restored to {result.point_id} (data)."
    )


def main(argv: list[str] | None = None) -> int:
    return run_script("simple_rollback", argv, build_parser, action)


if __name__ == "__main__":
    sys.exit(main())
