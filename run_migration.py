#!/usr/bin/env python3
"""Run a data migration into staging, with a rollback point and automatic rollback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lib.cli.venv  # noqa: F401  (first: runs this script again under .venv when its packages are missing)
from lib.cli import render
from lib.cli.app import Parser, common_flags, epilog, run_script, settings_from
from lib.config import PROJECT_ROOT
from lib.errors import ConfigError
from lib.migrate import folder, runner
from lib.migrate.context import MIGRATIONS_DIR, available, load
from lib.migrate.status import status
from lib.points.methods.registry import NAMES as METHODS

EXAMPLES = """
By default a migration is a dry run: it runs whole, in one transaction on staging,
reports what it would change and which records would fail, and rolls back.

--production first takes a rollback point of staging and verifies it, then commits
every --batch-size records. A record that fails validation is written to a failures
file (logs/<migration>_<time>_failures.csv) and the run goes on. When the failure
rate passes --failure-threshold, or the migration crashes, staging is put back to the
point by itself. Ctrl-C rolls back the open batch and asks whether to restore the
point (without a terminal it restores). The progress line shows the failure rate
against the threshold, and a warning says when it passes half the threshold.

--retry-failed FILE runs the migration again for the records FILE lists as failed,
and only for those, dry or --production as any run; the records that fail again go
to a new failures file.

A production run also captures its own changes in staging's undo log (statement
triggers, only the run's session; other sessions' writes are not captured), so
`rollback_manager.py undo RUN` can revert exactly what it changed and keep the rest.
The automatic rollback uses that undo when it can, the point otherwise, and says
which. A table without a primary key makes the run refuse first: --undo-keyed-only
captures the others, --no-undo captures nothing (ROLLBACK_UNDO=on|keyed|off).

A production run that succeeds is written in staging's ledger of applied migrations
(the table rollback_toolkit.migrations, part of every point). Given a folder, the
migrations it holds that the ledger does not list run one after the other in name
order, each behind its own point, stopping at the first that does not succeed.
--status lists them: applied, rolled back (from the audit trail) or pending.

A migration is a .py file with def migrate(ctx) or a .sql file run as one unit;
see ROLLBACK_GUIDE.md, "Writing a migration".

examples:
  python3 run_migration.py migrations/001_migrate_clients.py                 # dry run
  python3 run_migration.py migrations/001_migrate_clients.py --production
  python3 run_migration.py migrations/001_migrate_clients.py --production --param strict=1
  python3 run_migration.py migrations/001_migrate_clients.py --rollback      # its newest point
  python3 run_migration.py migrations/002_fix_prices.sql --production --limit 10
  python3 run_migration.py migrations/001_migrate_clients.py --production \\
      --retry-failed logs/001_migrate_clients_20250101_120000_failures.csv   # those records only
  python3 run_migration.py migrations/ --production      # every pending migration, in name order
  python3 run_migration.py --status                      # applied, rolled back, pending; runs and their undo
  python3 rollback_manager.py undo 001_migrate_clients --dry-run   # what undoing its newest run would do

exit codes of a migration: 0 it ran (a dry run, or a production run that succeeded),
1 it failed or was rolled back (the summary says which; for a folder, the first that did).
"""


def build_parser() -> Parser:
    p = Parser(prog="run_migration.py", description=__doc__, epilog=epilog(EXAMPLES))
    p.add_argument(
        "migration",
        nargs="?",
        help="the migration file (.py with migrate(ctx), or .sql), or a folder of them; asked on a terminal",
    )
    p.add_argument("--production", action="store_true", help="really migrate: rollback point, committed batches")
    p.add_argument("--no-rollback", action="store_true", help="production without a rollback point (asks first)")
    p.add_argument("--rollback", nargs="?", const="", metavar="ID", help="restore ID, or the newest point this migration made")
    p.add_argument("--batch-size", type=int, default=100, metavar="N", help="records per committed batch (default 100)")
    p.add_argument(
        "--failure-threshold",
        type=float,
        default=0.10,
        metavar="F",
        help="stop and roll back above this failure rate (default 0.10)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="migrate at most N records")
    undo = p.add_mutually_exclusive_group()
    undo.add_argument(
        "--no-undo",
        dest="undo",
        action="store_const",
        const="off",
        help="production: capture no undo log (the point alone puts staging back)",
    )
    undo.add_argument(
        "--undo-keyed-only",
        dest="undo",
        action="store_const",
        const="keyed",
        help="production: capture the tables that have a key; a write to one without makes the undo unavailable",
    )
    p.add_argument(
        "--retry-failed",
        metavar="FILE",
        help="run the migration again only for the records this failures file of it lists as failed",
    )
    p.add_argument(
        "--status",
        action="store_true",
        help="list the migrations of the folder (default migrations/): applied, rolled back, pending; changes nothing",
    )
    p.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="passed to the migration as ctx.params (repeatable)"
    )
    p.add_argument("--method", choices=METHODS, help="how the rollback point is taken (default: ROLLBACK_METHOD or auto)")
    p.add_argument(
        "--force",
        action="store_true",
        help="go ahead although staging has logical replication slots or subscriptions (they stay with the state kept before)",
    )
    p.add_argument("--database-url", help="staging database URL (default: STAGING_DATABASE_URL)")
    p.add_argument("--v2-url", help="V2 database URL (default: V2_DATABASE_URL)")
    common_flags(p)
    return p


def parse_params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {pair!r} is not KEY=VALUE.")
        params[key] = value
    return params


def choose(ui, ask) -> str:
    found = available()
    names = [str(p.relative_to(PROJECT_ROOT)) for p in found]
    if not ask.person or not found:
        raise ConfigError(
            "Which migration? Give its file.",
            "For example: python3 run_migration.py " + (names[0] if names else "migrations/<file>.py") + ".",
        )
    for n, name in enumerate(names, start=1):
        ui.info(f"  {n}) {name}")
    answer = ask.choose(
        "Run which migration? (number)", what="the migration", choices=[str(n) for n in range(1, len(names) + 1)], default="1"
    )
    return names[int(answer) - 1]


def _is_a_file(text: str) -> bool:
    return text.endswith((".py", ".sql")) or "/" in text or Path(text).is_file()


def show_status(args: argparse.Namespace, ui, settings) -> int:
    if args.production or args.rollback is not None or args.retry_failed:
        raise ConfigError("--status only reads: it takes no --production, --rollback or --retry-failed.")
    where = Path(args.migration) if args.migration else MIGRATIONS_DIR
    found = status(settings, folder.load_folder(where) if where.is_dir() else [load(where)])
    return ui.result(found.as_dict(), lambda: render.migration_status(ui, found))


def run_folder(args: argparse.Namespace, ui, ask, settings, where: Path) -> int:
    if args.rollback is not None or args.retry_failed:
        raise ConfigError(f"{where} is a folder: --rollback and --retry-failed take one migration file.")
    options = runner.Options(args.batch_size, args.failure_threshold, args.limit, parse_params(args.param))
    flags = (
        {"no_rollback": args.no_rollback, "method": args.method, "force": args.force, "undo": args.undo}
        if args.production
        else {}
    )
    report = folder.run_pending(settings, ui, ask, where, options, production=args.production, **flags)
    if args.json:
        ui.emit_json(report.as_dict())
    else:
        render.migrations_folder(ui, report)
    if report.error is not None:
        raise report.error
    return report.exit_code


def action(args: argparse.Namespace, ui, ask) -> int:
    settings = settings_from(args)
    if args.status:
        return show_status(args, ui, settings)
    if args.rollback and not args.migration and _is_a_file(args.rollback):
        # `--rollback migrations/001_….py`: the flag took the file as a point id
        args.migration, args.rollback = args.rollback, ""
    if args.no_rollback and not args.production:
        raise ConfigError("--no-rollback only applies with --production.", "A dry run never changes staging.")
    if args.undo and not args.production:
        raise ConfigError("--no-undo and --undo-keyed-only only apply with --production.", "A dry run never changes staging.")
    given = args.migration or choose(ui, ask)
    if Path(given).is_dir():
        return run_folder(args, ui, ask, settings, Path(given))
    migration = load(given)
    if args.rollback is not None and args.retry_failed:
        raise ConfigError("--rollback restores a point; it takes no --retry-failed.")
    if args.rollback is not None:
        result = runner.rollback(settings, ui, ask, migration, args.rollback or None, force=args.force)
        return render.restore_outcome(ui, result, as_json=args.json, headline=f"{result.database} restored to {result.point_id}.")
    retry = runner.retry(migration, args.retry_failed) if args.retry_failed else None
    options = runner.Options(args.batch_size, args.failure_threshold, args.limit, parse_params(args.param), retry)
    if args.production:
        report = runner.production(
            settings,
            ui,
            ask,
            migration,
            options,
            no_rollback=args.no_rollback,
            method=args.method,
            force=args.force,
            undo=args.undo,
        )
    else:
        report = runner.dry_run(settings, ui, migration, options)
    if args.json:
        ui.emit_json(report.as_dict())
    else:
        render.migration_report(ui, report)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    return run_script("run_migration", argv, build_parser, action)


if __name__ == "__main__":
    sys.exit(main())
