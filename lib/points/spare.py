"""A spare copy of the newest template point, prepared in the background while the
migration runs, so that a quick rollback only has to verify it and swap it in.

The copy a template restore needs costs as much as copying the database; made ahead
of time, it leaves the rollback itself with a rename. The spare is a database named
after its point (``<point>_spare``), connections disabled; it is checked against the
point's manifest before use, like any rebuilt copy, so a half-made or tampered spare
is simply not used. ROLLBACK_SPARE=0 turns this off (it needs the database's size
once more on the server).

Run as ``python -m lib.points.spare POINT_ID`` by the toolkit itself."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import psycopg2
from psycopg2 import sql

from lib.config import PROJECT_ROOT, Settings, load_settings
from lib.errors import RollbackError
from lib.pg.db import derived_name, drop_database, execute, lock_key, scalar, set_allow_connections
from lib.pg.target import Target, open_target
from lib.points import intents
from lib.points.catalog import Catalog, Point
from lib.points.methods import template as template_method

log = logging.getLogger(__name__)

SUFFIX = "_spare"


def enabled(settings: Settings) -> bool:
    return settings.rollback_spare


def spare_name(point: Point) -> str:
    return derived_name(point.manifest.get("template_database") or point.id, SUFFIX)


def _lock_key(target: Target, point: Point) -> int:
    return lock_key(target.facts.system_identifier, f"spare:{point.id}")


def start_in_background(settings: Settings, point: Point) -> None:
    """A detached ``python -m lib.points.spare`` for ``point``; the settings travel in its
    environment (never its argv)."""
    env = dict(os.environ)
    env.update(
        STAGING_DATABASE_URL=settings.staging_url or "",
        BACKUP_DIR=str(settings.backup_dir),
        LOG_DIR=str(settings.log_dir),
    )
    subprocess.Popen(
        [sys.executable, "-m", "lib.points.spare", point.id],
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.info("preparing a spare copy of %s in the background", point.id)


def prepare(target: Target, point: Point) -> bool:
    """Copy the point's database to its spare name; False when there was nothing to do."""
    key = _lock_key(target, point)
    if not scalar(target.maint, "SELECT pg_try_advisory_lock(%s)", (key,)):
        return False  # another process is preparing it
    try:
        name = spare_name(point)
        source = point.manifest.get("template_database")
        state = template_method.database_state(target.maint, source) if source else None
        if state is None or state["invalid"] or template_method.database_state(target.maint, name) is not None:
            return False
        with intents.new_database(target, name, "spare copy", point_id=point.id) as new:
            try:
                template_method.copy_database(target, source, name, None)
            except psycopg2.Error as exc:
                raise template_method.copy_error(target, exc, source) from None
            template_method.seal(target, name, point.id, "spare copy for quick rollback")
            new.own()
        return True
    finally:
        scalar(target.maint, "SELECT pg_advisory_unlock(%s)", (key,))


def claim(target: Target, point: Point, new_name: str, *, wait_seconds: float = 900) -> bool:
    """Rename the point's spare to ``new_name``; waits while one is being prepared
    (never longer than a fresh copy would take). False when there is none."""
    key = _lock_key(target, point)
    deadline = time.monotonic() + wait_seconds
    while not scalar(target.maint, "SELECT pg_try_advisory_lock(%s)", (key,)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    try:
        name = spare_name(point)
        state = template_method.database_state(target.maint, name)
        if state is None or state["invalid"]:
            return False
        execute(target.maint, sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(name), sql.Identifier(new_name)))
        set_allow_connections(target.maint, new_name, True)
        return True
    finally:
        scalar(target.maint, "SELECT pg_advisory_unlock(%s)", (key,))


def drop(target: Target, point: Point) -> None:
    name = spare_name(point)
    if template_method.database_state(target.maint, name) is not None:
        drop_database(target.maint, name)


def drop_all_but(target: Target, catalog: Catalog, keep: Point | None) -> None:
    """Only the newest template point has a spare: server space stays bounded."""
    for point in catalog.points():
        if point.method == "template" and point.database_name == target.dbname and (keep is None or point.id != keep.id):
            drop(target, point)


def main(argv: list[str] | None = None) -> int:
    from lib.cli.app import setup_logging

    args = sys.argv[1:] if argv is None else argv
    setup_logging("spare", debug=False)
    settings = load_settings()
    try:
        point = Catalog(settings.backup_dir).get(args[0])
        with open_target(settings, check_v2=False) as target:
            made = prepare(target, point)
        log.info("spare copy of %s: %s", point.id, "ready" if made else "nothing to do")
        return 0
    except RollbackError as exc:
        log.error("could not prepare a spare copy: %s", exc.paragraph())
        return 1
    except Exception:  # noqa: BLE001 - a background helper: log, never crash loudly
        log.exception("could not prepare a spare copy")
        return 1


if __name__ == "__main__":
    sys.exit(main())
