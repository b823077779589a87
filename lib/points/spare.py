"""A spare copy of the newest template point, prepared in the background while the
migration runs, so that a quick rollback only has to swap it in.

The copy a template restore needs costs as much as copying the database; made ahead
of time, it leaves the rollback itself with a rename. The spare is a database named
after its point (``<point>_spare``), connections disabled; it is checked against the
point's manifest before use, like any rebuilt copy, so a half-made or tampered spare
is simply not used. The background reads it beside its point (every page, every row
against the point's baseline) and marks it ready; a quick rollback swaps a ready spare
at once, and reads any other copy before swapping it in. ROLLBACK_SPARE=0 turns this
off (it needs the database's size once more on the server).

Prepared by ``python -m lib.operations.background after-point POINT_ID``, which the toolkit starts."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2

from lib.config import Settings
from lib.pg.db import derived_name, drop_database, rename_database, set_allow_connections, terminate_sessions
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
    """Copy the point's database to its spare name; False when there was nothing to do
    (another process holds its lock, it exists, or the point's database may have been
    changed outside the toolkit: a spare is copied only from a point sealed as it was left)."""
    lock = _lock(target, point)
    if lock.try_acquire() is not None:
        return False  # another process is preparing it
    try:
        name = spare_name(point)
        source = point.manifest.template_database
        mark = copies.seal_mark(target, source) if source else None
        if mark is None or not mark.trusted() or copies.database_state(target.maint, name) is not None:
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


@contextmanager
def held(target: Target, point: Point) -> Iterator[str | None]:
    """The spare's name while this process holds its lock (to read it, and mark it
    ready); None when there is no usable spare or another process holds the lock."""
    lock = _lock(target, point)
    if lock.try_acquire() is not None:
        yield None
        return
    try:
        name = spare_name(point)
        mark = copies.seal_mark(target, name)
        yield name if mark is not None and mark.trusted() and not mark.interrupted else None
    finally:
        lock.release()


@dataclass(frozen=True)
class Claimed:
    """A spare renamed into place (``taken``), the level it was read at in the
    background (``read``, None when it was not), or why none was taken (``note``)."""

    taken: bool
    read: str | None = None
    note: str = ""


def claim(target: Target, point: Point, new_name: str) -> Claimed:
    """Rename the point's spare to ``new_name``. Never waits: a spare still being
    prepared or read by the background is left to it, and the caller copies the point
    itself. A spare found changed outside the toolkit is dropped, never used."""
    lock = _lock(target, point)
    holder = lock.try_acquire()
    if holder is not None:
        return Claimed(False, note=f"The spare copy of {point.id} is still being prepared or read in the background")
    try:
        name = spare_name(point)
        mark = copies.seal_mark(target, name)
        if mark is None:
            return Claimed(False)
        if not mark.trusted() or mark.interrupted:
            drop_database(target.maint, name)
            why = mark.why_changed() or "a reading of it was killed and it stood open to connections"
            log.warning("spare %s of %s dropped: %s", name, point.id, why)
            return Claimed(False, note=f"The spare copy of {point.id} was dropped, unused: {why}")
        rename_database(target.maint, name, new_name)
        set_allow_connections(target.maint, new_name, True)
        read = f"rows: every row read in the background at {mark.ready} and matched the point's baseline"
        return Claimed(True, read=read if mark.ready else None)
    finally:
        lock.release()


def drop(target: Target, point: Point, *, wait: float = 30) -> bool:
    """The point's spare dropped, under its lock: a background reading it is ended first.
    False when its lock stayed held (it is then left for the next cleanup)."""
    name = spare_name(point)
    if copies.database_state(target.maint, name) is None:
        return True
    lock = _lock(target, point)
    if lock.try_acquire() is not None:
        terminate_sessions(target.maint, name)  # the background's reading yields
        holder = lock.acquire(wait=wait)
        if holder is not None:
            log.warning("spare %s of %s not dropped: %s holds it", name, point.id, holder)
            return False
    try:
        drop_database(target.maint, name)
        return True
    finally:
        lock.release()


def drop_all_but(target: Target, catalog: Catalog, keep: Point | None) -> None:
    """Only the newest template point has a spare: server space stays bounded."""
    for point in catalog.points():
        if point.manifest.template_database and point.database_name == target.dbname and (keep is None or point.id != keep.id):
            drop(target, point, wait=5)
