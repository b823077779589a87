"""Removing old points of one database, their database copies included, without
ever removing the newest point that still verifies."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from lib.errors import CatalogError, ConfigError, RollbackError
from lib.files import utc_now
from lib.interaction import Reporter
from lib.pg.target import Target
from lib.points.catalog import Catalog, Point, check_files, point_at
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


def check_retention_request(keep: int | None, older_than_days: float | None) -> None:
    """Refused before anything is looked at: a retention that makes no sense."""
    if keep is not None and keep < 1:
        raise ConfigError(f"--keep must be at least 1 (not {keep}).", "The newest verified point is always kept.")
    if older_than_days is not None and not (math.isfinite(older_than_days) and older_than_days >= 0):
        raise ConfigError(
            f"--older-than must be a number of days, 0 or more (not {older_than_days:g}).",
            "For example --older-than 7 removes points older than a week; add --dry-run to see it first.",
        )


def cleanup_plan(target: Target, catalog: Catalog, *, keep: int | None, older_than_days: float | None) -> CleanupPlan:
    if keep is None and older_than_days is None:
        raise ConfigError("Say what to remove: --keep N, --older-than DAYS, or both.", "Add --dry-run to see it first.")
    check_retention_request(keep, older_than_days)
    return plan_cleanup(
        points_of(catalog, target), lambda p: is_good(target, p), keep=keep, older_than_days=older_than_days, now=utc_now()
    )


def plan_cleanup(
    points: list[Point], good: Callable[[Point], bool], *, keep: int | None, older_than_days: float | None, now: datetime
) -> CleanupPlan:
    """The rule itself (``points`` oldest first): the newest ``keep`` and those younger than
    ``older_than_days`` stay; so do, always, the newest point that is ``good`` and the
    newest good one taken on purpose (quick rollback's target), whatever their age."""
    protected = newest_good(points, good)
    protected_manual = newest_good([p for p in points if p.manifest.kind != Kind.BEFORE_ROLLBACK], good)
    keep_ids = {p.id for p in (protected, protected_manual) if p is not None}
    cutoff = now - timedelta(days=older_than_days) if older_than_days is not None else None
    remove = []
    for rank, point in enumerate(reversed(points), start=1):
        if point.id in keep_ids:
            continue
        beyond_keep = keep is None or rank > keep
        old_enough = cutoff is None or point.created_at < cutoff
        if beyond_keep and old_enough:
            remove.append(point)
    return CleanupPlan(list(reversed(remove)), protected, protected_manual)


def delete_point(target: Target, catalog: Catalog, point: Point) -> None:
    """The database copy first: a folder left by a failed drop still names it."""
    _same_server(target, point)
    _drop_copies(target, point)
    catalog.remove(point)


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
) -> list[Point]:
    """Remove the plan's points. ``later``: only unlisted now (a rename), their databases
    dropped by the background (lib/operations/background.py), so that taking a point
    never waits for a DROP DATABASE."""
    cleanup = cleanup or cleanup_plan(target, catalog, keep=keep, older_than_days=older_than_days)
    for point in cleanup.remove:
        what = f"{point.id} ({point.method}, {(point.manifest.created_at_text or '?')[:19]}, {point.manifest.description or ''})"
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


def finish_removal(target: Target, catalog: Catalog, point_id: str) -> None:
    """Drop what an unlisted point held on the server, then its folder."""
    trash = catalog.trash(point_id)
    try:
        point = point_at(trash)
    except (OSError, ValueError, CatalogError):
        shutil.rmtree(trash, ignore_errors=True)
        return
    _drop_copies(target, point)
    shutil.rmtree(trash, ignore_errors=True)
