#!/usr/bin/env python3
"""Put staging back to its newest good rollback point, in one command."""

from __future__ import annotations

import sys

import lib.cli.venv  # noqa: F401  (first: runs this script again under .venv when its packages are missing)
from lib.cli import render
from lib.cli.app import CATALOG_CHECK_ONLY_HELP, Parser, common_flags, epilog, run_script, settings_from
from lib.errors import NoPointError
from lib.operations import commands as operations
from lib.operations.reset import reset_staging

EXAMPLES = """
The newest completed point of staging that can be restored is (any method; the
"state before rollback" points a restore leaves are skipped, and so is, with one line
each, a point whose last verification failed, that was changed, whose key is missing,
or whose copy fails its reading), through the same build-aside, read, and swap as
`rollback_manager.py restore`. A spare copy the background already read is swapped in
at once; any other copy is read first (every page, every row against the point). The
state before is kept as a point, so this can be undone: the last line names it.

examples:
  python3 quick_rollback.py              # shows the point, its age and description, asks
  python3 quick_rollback.py --yes --json
  python3 quick_rollback.py --from-v2    # rebuild staging from V2 instead
"""


def build_parser() -> Parser:
    p = Parser(prog="quick_rollback.py", description=__doc__, epilog=epilog(EXAMPLES))
    p.add_argument("--from-v2", action="store_true", help="rebuild staging from the V2 database instead of a point")
    p.add_argument(
        "--force",
        action="store_true",
        help="go ahead although staging has replication slots or subscriptions (they stay with the state kept before), "
        "or a point's database was opened outside the toolkit",
    )
    p.add_argument("--catalog-check-only", action="store_true", help=CATALOG_CHECK_ONLY_HELP)
    p.add_argument("--database-url", help="staging database URL (default: STAGING_DATABASE_URL)")
    common_flags(p)
    return p


def reset_from_v2(settings, ui, ask, args) -> int:
    result = reset_staging(settings, ui, ask, force=args.force)
    return render.restore_outcome(ui, result, as_json=args.json, headline=f"{result.database} rebuilt from V2 and checked.")


def action(args, ui, ask) -> int:
    settings = settings_from(args)
    if args.from_v2:
        return reset_from_v2(settings, ui, ask, args)
    try:
        point, result = operations.quick_rollback(settings, ui, ask, force=args.force, catalog_only=args.catalog_check_only)
    except NoPointError as exc:
        ui.error(exc.paragraph())
        if not args.json and ask.decide("Rebuild staging from V2 instead?", default=False):
            return reset_from_v2(settings, ui, ask, args)
        return int(exc.exit_code)
    description = point.manifest.description or "no description"
    return render.restore_outcome(
        ui, result, as_json=args.json, headline=f"{result.database} is back at {result.point_id} ({description})."
    )


def main(argv: list[str] | None = None) -> int:
    return run_script("quick_rollback", argv, build_parser, action)


if __name__ == "__main__":
    sys.exit(main())
