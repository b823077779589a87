"""Removing old points of one database, their database copies included, without
ever removing the newest point that still verifies.

A point retention removes later is unlisted (its folder renamed aside), then, holding
the point's lock, its databases are dropped and only then its folder removed. The lock
is the point's SpareLock, since making or claiming its spare must not cross a removal
either (a spare made meanwhile would belong to nobody). Whoever takes it first (the
background remover, or a cleanup) does the removal; whoever comes after finds the
folder gone and does nothing. A database is thus never left that no point owns: while
its folder exists, the unlisted point owns it. A point deleted at once is dropped and
removed holding the same lock."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from lib import faults
from lib.errors import CatalogError, ConfigError, LockHeld, RollbackError
from lib.files import fsync_path, utc_now
from lib.interaction import Reporter
from lib.pg.codes import OBJECT_IN_USE
from lib.pg.db import drop_database, query, terminate_sessions
from lib.pg.locks import SpareLock
from lib.pg.retry import retry_on
from lib.pg.target import Target
from lib.points import intents, spare
from lib.points.catalog import Catalog, Point, check_files, point_at
from lib.points.copies import comment_for
from lib.points.manifest import Kind
from lib.points.methods import registry

log = logging.getLogger(__name__)


def points_of(catalog: Catalog, target: Target) -> list[Point]:
    """This database's points on this server, oldest first."""
    sysid = target.facts.system_identifier
    return [
        p for p in catalog.points() if p.database_name == target.dbname and p.manifest.database.system_identifier in (None, sysid)
    ]


def before_states_to_retire(target: Target, catalog: Catalog, keep: int) -> list[Point]:
    """The states kept before rollbacks (post-migration states) of this database beyond
    its newest ``keep``, oldest first; none when ``keep`` is 0 (all are kept)."""
    befores = [p for p in points_of(catalog, target) if p.manifest.kind == Kind.BEFORE_ROLLBACK]
    return befores[:-keep] if keep > 0 and len(befores) > keep else []


def is_good(target: Target, point: Point) -> bool:
    """Complete, files intact, and for a database copy: present and valid."""
    if not point.manifest.is_completed or check_files(point):
        return False
    try:
        registry.of(point).check_usable(target, point)
    except RollbackError:
        return False
    return True


def newest_good(points: list[Point], good: Callable[[Point], bool]) -> Point | None:
    return next((point for point in reversed(points) if good(point)), None)


@dataclass
class CleanupPlan:
    remove: list[Point]
    protected: Point | None  # the newest point that verifies
    protected_manual: Point | None = None  # the newest one taken on purpose: quick_rollback's target
    why: dict[str, str] = field(default_factory=dict)  # point id -> why it goes


def check_retention_request(keep: int | None, older_than_days: float | None) -> None:
    """Refused before anything is looked at: a retention that makes no sense."""
    if keep is not None and keep < 1:
        raise ConfigError(f"--keep must be at least 1 (not {keep}).", "The newest point that passes its checks is always kept.")
    if older_than_days is not None and not (math.isfinite(older_than_days) and older_than_days >= 0):
        raise ConfigError(
            f"--older-than must be a number of days, 0 or more (not {older_than_days:g}).",
            "For example --older-than 7 removes points older than a week; add --dry-run to see it first.",
        )


def cleanup_plan(
    target: Target, catalog: Catalog, *, keep: int | None, older_than_days: float | None, migration_id: str | None = None
) -> CleanupPlan:
    if keep is None and older_than_days is None:
        raise ConfigError("Say what to remove: --keep N, --older-than DAYS, or both.", "Add --dry-run to see it first.")
    check_retention_request(keep, older_than_days)
    return plan_cleanup(
        points_of(catalog, target),
        lambda p: is_good(target, p),
        keep=keep,
        older_than_days=older_than_days,
        now=utc_now(),
        migration_id=migration_id,
    )


def plan_cleanup(
    points: list[Point],
    good: Callable[[Point], bool],
    *,
    keep: int | None,
    older_than_days: float | None,
    now: datetime,
    migration_id: str | None = None,
) -> CleanupPlan:
    """The rule itself (``points`` oldest first). It counts and removes only points taken
    on purpose (states kept before rollbacks follow KEEP_BEFORE_STATES alone), and with
    ``migration_id`` only that migration's: the newest ``keep`` of them and those younger
    than ``older_than_days`` stay; so do, always, the newest point that is ``good`` and the
    newest good one taken on purpose (quick rollback's target), whatever their age."""
    protected = newest_good(points, good)
    manual = [p for p in points if p.manifest.kind != Kind.BEFORE_ROLLBACK]
    protected_manual = newest_good(manual, good)
    keep_ids = {p.id for p in (protected, protected_manual) if p is not None}
    cutoff = now - timedelta(days=older_than_days) if older_than_days is not None else None
    counted = [p for p in manual if migration_id is None or p.manifest.migration_id == migration_id]
    whose = f"of migration {migration_id}" if migration_id else "of this database"
    remove, why = [], {}
    for rank, point in enumerate(reversed(counted), start=1):
        if point.id in keep_ids:
            continue
        beyond_keep = keep is None or rank > keep
        old_enough = cutoff is None or point.created_at < cutoff
        if beyond_keep and old_enough:
            remove.append(point)
            reasons = ([f"beyond the newest {keep} points {whose}"] if keep is not None else []) + (
                [f"older than {older_than_days:g} days"] if cutoff is not None else []
            )
            why[point.id] = " and ".join(reasons)
    return CleanupPlan(list(reversed(remove)), protected, protected_manual, why)


def delete_point(target: Target, catalog: Catalog, point: Point) -> None:
    """The database copy first: a folder left by a failed drop still names it. Holding the
    point's lock, so a spare being made of it is finished first (waited for, as a quick
    rollback waits for a spare), never made after the drop for nobody."""
    _same_server(target, point)
    lock = point_lock(target, catalog, point.id, "delete")
    holder = lock.try_acquire()
    if holder is not None:  # the background reading its copies yields at once; a copy being made is waited for
        for name in (point.manifest.template_database, spare.spare_name(point) if point.manifest.template_database else None):
            if name:
                terminate_sessions(target.maint, name)
        holder = lock.acquire(wait=LOCK_WAIT_SECONDS)
    if holder is not None:
        raise LockHeld(
            f"Point {point.id} was not deleted: {holder} still holds it after {LOCK_WAIT_SECONDS} s. Nothing was changed.",
            "Run the command again once it has finished.",
        )
    try:
        _drop_copies(target, point)
        catalog.remove(point)
    finally:
        lock.release()


def _drop_copies(target: Target, point: Point) -> None:
    """What the point holds on the server (a database copy and its spare)."""
    if registry.find(point.method) is not None:
        registry.of(point).drop(target, point)


def apply(
    target: Target,
    catalog: Catalog,
    ui: Reporter,
    *,
    keep: int | None = None,
    older_than_days: float | None = None,
    dry_run: bool = False,
    cleanup: CleanupPlan | None = None,
    later: bool = False,
    migration_id: str | None = None,
) -> list[Point]:
    """Remove the plan's points. ``later``: only unlisted now (a rename), their databases
    dropped by the background (lib/operations/background.py), so that taking a point
    never waits for a DROP DATABASE."""
    cleanup = cleanup or cleanup_plan(target, catalog, keep=keep, older_than_days=older_than_days, migration_id=migration_id)
    for point in cleanup.remove:
        what = (
            f"{point.id} ({point.method}, {(point.manifest.created_at_text or '?')[:19]}, "
            f"{point.manifest.description or ''}): {cleanup.why.get(point.id, 'by the retention asked for')}"
        )
        if dry_run:
            ui.info(f"  would remove {what}")
            continue
        if later:
            _same_server(target, point)
            catalog.unlist(point)
        else:
            delete_point(target, catalog, point)
        ui.info(f"  removed {what}")
    return cleanup.remove


def _same_server(target: Target, point: Point) -> None:
    method = registry.find(point.method)
    if method is not None and method.holds_database and not method.lives_on(target, point):
        raise ConfigError(
            f"Point {point.id}'s database copy lives on another server ({point.manifest.database.server}).",
            "Run the command with --database-url for that server.",
        )


LOCK_WAIT_SECONDS = 900  # what a removal waits for a point's lock: a spare being copied takes a database copy's time


def point_lock(target: Target, catalog: Catalog, point_id: str, doing: str) -> SpareLock:
    """The lock on what a point holds on the server: its removal, and the making or
    claiming of its spare (lib/points/spare.py takes the same lock, by the point's id)."""
    return SpareLock(target.maint, target.facts.system_identifier, point_id, folder=catalog.root, doing=doing)


class Outcome(StrEnum):
    REMOVED = "removed"  # this run dropped the point's databases, then removed its folder
    ALREADY_REMOVED = "already removed"  # its folder was gone when this run held its lock
    BUSY = "busy"  # another process holds its lock: the removal is left to it
    OTHER_SERVER = "other server"  # its database copy lives on another server: left to a run against that one


@dataclass(frozen=True)
class Removal:
    """What one attempt to finish an unlisted point's removal did."""

    point_id: str
    outcome: Outcome
    dropped: tuple[str, ...] = ()  # the databases this run dropped
    held_database: bool = False  # whether the point held a database on the server at all
    by: str | None = None  # who held the point's lock when this run came

    @property
    def what_was_dropped(self) -> str:
        if self.dropped:
            return f"database{'s' if len(self.dropped) > 1 else ''} {', '.join(self.dropped)} dropped"
        return "its database was already gone" if self.held_database else "it held no database"

    def describe(self) -> str:
        if self.outcome is Outcome.REMOVED:
            return f"removed {self.point_id} ({self.what_was_dropped})"
        if self.outcome is Outcome.ALREADY_REMOVED:
            return f"{self.point_id} already removed by {self.by or 'another run (its folder was gone when this one looked)'}"
        if self.outcome is Outcome.BUSY:
            return f"{self.point_id} left to {self.by}, which holds it (else the next cleanup removes it)"
        return f"{self.point_id} left alone: its database copy lives on another server"


def finish_removal(target: Target, catalog: Catalog, point_id: str, *, doing: str, wait: float = 0) -> Removal:
    """Drop what an unlisted point holds on the server, then its folder, holding the
    point's lock (waiting up to ``wait`` seconds for another holder), so that of the
    background remover and a foreground cleanup only the first does it, once."""
    faults.pause("before removal")
    lock = point_lock(target, catalog, point_id, doing)
    first_holder = lock.try_acquire()
    if first_holder is not None:
        holder = lock.acquire(wait=wait) if wait > 0 else first_holder
        if holder is not None:
            return Removal(point_id, Outcome.BUSY, by=holder)
    try:
        trash = catalog.trash(point_id)
        if not trash.is_dir():
            return Removal(point_id, Outcome.ALREADY_REMOVED, by=first_holder)
        point = unlisted_point(catalog, point_id)
        if point is not None and _elsewhere(target, point):
            return Removal(point_id, Outcome.OTHER_SERVER)
        faults.pause("removal locked")
        existing = databases_of(target, catalog, point_id, point)
        retry_on({OBJECT_IN_USE}, 3, lambda _: _drop_all(target, point, existing), what=f"dropping {point_id}'s databases")
        shutil.rmtree(trash)
        fsync_path(catalog.root)
        method = registry.find(point.method) if point is not None else None
        held = bool(existing) or (method is not None and method.holds_database)
        return Removal(point_id, Outcome.REMOVED, tuple(existing), held_database=held)
    finally:
        lock.path.unlink(missing_ok=True)  # held: nobody else is in it; a lock file per removed point would pile up
        lock.release()


def databases_of(target: Target, catalog: Catalog, point_id: str, point: Point | None) -> list[str]:
    """The databases on this server that belong to a point: the copy and spare its manifest
    names, and those whose comment names it as this catalog's (found so even when its
    manifest cannot be read)."""
    names = []
    if point is not None and point.manifest.template_database:
        names = [point.manifest.template_database, spare.spare_name(point)]
    head = comment_for(point_id, "\0", intents.marker(catalog)).split("\0")[0]  # "rollback point <id>: "
    rows = query(
        target.maint,
        """
        SELECT datname FROM pg_database
         WHERE datname = ANY(%s)
            OR (left(coalesce(shobj_description(oid, 'pg_database'), ''), %s) = %s
                AND strpos(shobj_description(oid, 'pg_database'), %s) > 0)
        """,
        (names, len(head), head, intents.marker(catalog)),
    )
    return sorted(name for (name,) in rows)


def unlisted_point(catalog: Catalog, point_id: str) -> Point | None:
    """An unlisted point as its folder holds it; None when it is gone or its manifest unreadable."""
    try:
        return point_at(catalog.trash(point_id))
    except (OSError, ValueError, CatalogError):
        return None


def _elsewhere(target: Target, point: Point) -> bool:
    method = registry.find(point.method)
    return method is not None and method.holds_database and not method.lives_on(target, point)


def _drop_all(target: Target, point: Point | None, names: list[str]) -> None:
    """A point's databases are read only by the toolkit, which yields: its sessions are ended first."""
    for name in names:
        terminate_sessions(target.maint, name)
    if point is not None:
        _drop_copies(target, point)
    for name in names:  # what its comment named and its method did not drop
        drop_database(target.maint, name)
