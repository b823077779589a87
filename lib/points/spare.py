"""A spare copy of the newest template point, prepared in the background while the
migration runs, so that a quick rollback only has to verify it and swap it in.

The copy a template restore needs costs as much as copying the database; made ahead
of time, it leaves the rollback itself with a rename. The spare is a database named
after its point (``<point>_spare``), connections disabled; it is checked against the
point's manifest before use, like any rebuilt copy, so a half-made or tampered spare
is simply not used. ROLLBACK_SPARE=0 turns this off (it needs the database's size
once more on the server).

Prepared by ``python -m lib.operations.background after-point POINT_ID``, which the toolkit starts."""

from __future__ import annotations

import logging

import psycopg2

from lib.config import Settings
from lib.errors import VerificationError
from lib.pg.db import derived_name, drop_database, rename_database, set_allow_connections
from lib.pg.locks import SpareLock
from lib.pg.target import Target
from lib.points import copies, intents
from lib.points.catalog import Catalog, Point

log = logging.getLogger(__name__)

SUFFIX = "_spare"


def enabled(settings: Settings) -> bool:
    return settings.rollback_spare


def spare_name(point: Point) -> str:
    return derived_name(point.manifest.template_database or point.id, SUFFIX)


def _lock(target: Target, point: Point) -> SpareLock:
    return SpareLock(target.maint, target.facts.system_identifier, point.id)


def prepare(target: Target, point: Point) -> bool:
    """Copy the point's database to its spare name; False when there was nothing to do."""
    lock = _lock(target, point)
    if lock.try_acquire() is not None:
        return False  # another process is preparing it
    try:
        name = spare_name(point)
        source = point.manifest.template_database
        state = copies.database_state(target.maint, source) if source else None
        if state is None or state["invalid"] or copies.database_state(target.maint, name) is not None:
            return False
        with intents.new_database(target, name, "spare copy", point_id=point.id) as new:
            try:
                copies.copy_database(target, source, name, None)
            except psycopg2.Error as exc:
                raise copies.copy_error(target, exc, source) from None
            copies.seal(target, name, point.id, "spare copy for quick rollback")
            new.own()
        return True
    finally:
        lock.release()


def claim(target: Target, point: Point, new_name: str, *, wait_seconds: float = 900) -> bool:
    """Rename the point's spare to ``new_name``; waits while one is being prepared
    (never longer than a fresh copy would take). False when there is none."""
    lock = _lock(target, point)
    if lock.acquire(wait=wait_seconds) is not None:
        return False
    try:
        name = spare_name(point)
        state = copies.database_state(target.maint, name)
        if state is None or state["invalid"]:
            return False
        if state["allow_connections"]:  # sealed when made: somebody opened it since
            drop_database(target.maint, name)
            raise VerificationError(
                f"The spare copy {name!r} of point {point.id} takes connections, and it was sealed when it was made: "
                "somebody may have changed it, so it was dropped. Staging was not touched.",
                "Run the command again: the point itself is copied this time.",
            )
        rename_database(target.maint, name, new_name)
        set_allow_connections(target.maint, new_name, True)
        return True
    finally:
        lock.release()


def drop(target: Target, point: Point) -> None:
    name = spare_name(point)
    if copies.database_state(target.maint, name) is not None:
        drop_database(target.maint, name)


def drop_all_but(target: Target, catalog: Catalog, keep: Point | None) -> None:
    """Only the newest template point has a spare: server space stays bounded."""
    for point in catalog.points():
        if point.manifest.template_database and point.database_name == target.dbname and (keep is None or point.id != keep.id):
            drop(target, point)
