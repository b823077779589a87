"""What interrupted runs left behind (kill -9, a power cut, a full disk): half-written
point folders, the databases a killed restore, diff, template copy or spare was
building, and private temporary files. Only what no live run can still be using is
touched: folders and files by the liveness of the process that made them, databases
of staging while holding its operation lock (no other operation on it is running).

A database is found three ways: by the record written before it was created
(catalog intents), by the comment that ties it to this catalog, and, for runs of
older versions, by the fixed names a restore and a diff build under."""

from __future__ import annotations

import logging
import os
import socket

import psycopg2

from lib.errors import RollbackError
from lib.files import human_size
from lib.pg.db import connection, database_exists, derived_name, drop_database, query
from lib.pg.target import Target
from lib.points import copies, retention, spare
from lib.points.catalog import Catalog
from lib.points.copies import comment_for
from lib.points.intents import marker
from lib.points.methods import template as template_method
from lib.points.methods.dump import DIFF_SUFFIX, VERIFY_SUFFIX
from lib.points.retention import Outcome
from lib.process import dead_temporaries, pid_alive
from lib.restore.pitr_recovery import leftover_sides
from lib.restore.swap import ASIDE_SUFFIX, recover_pending
from lib.undo import capture

log = logging.getLogger(__name__)


def _owned(target: Target, catalog: Catalog) -> set[str]:
    """Databases that belong to a listed point, to an unlisted one whose removal is not
    finished (the removal that holds its lock drops them), or are staging itself."""
    owned = {target.dbname}
    for point in catalog.points():
        name = point.manifest.template_database
        if name:
            owned |= {name, spare.spare_name(point)}
    for point_id in catalog.unlisted():
        owned |= set(retention.databases_of(target, catalog, point_id, retention.unlisted_point(catalog, point_id)))
    return owned


def _why_marked(comment: str) -> str:
    """Why a database whose comment names this catalog is unowned, naming its point when the comment does."""
    head = comment_for("\0", "", "").split("\0")[0]  # "rollback point "
    if comment.startswith(head) and ": " in comment:
        return f"made by this catalog for point {comment[len(head) :].split(': ', 1)[0]}, which is no longer listed"
    return "made by this catalog and belonging to no listed point"


def unowned_databases(target: Target, catalog: Catalog, *, tidy: bool = False) -> list[tuple[str, int | None, str]]:
    """(name, size, why) of every database this catalog created on staging's server
    that no listed point owns and no running operation is building. ``tidy`` removes
    the records of databases that are owned or gone."""
    sysid = target.facts.system_identifier
    owned = _owned(target, catalog)
    here = socket.gethostname()
    found: dict[str, str] = {}
    running: set[str] = set()
    for path, record in catalog.intents():
        if record.get("server") not in (None, sysid):
            continue  # another server's
        name = record.get("database", "")
        if record.get("host") == here and record.get("pid") != os.getpid() and pid_alive(int(record.get("pid", 0))):
            running.add(name)
            continue
        if name in owned or not database_exists(target.maint, name):
            if tidy:
                catalog.settle(path)
            continue
        found[name] = (
            f"the {record.get('purpose', 'database')} of a run that did not finish (recorded {record.get('created_at')})"
        )
    rows = query(
        target.maint,
        """
        SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database
         WHERE strpos(coalesce(shobj_description(oid, 'pg_database'), ''), %s) > 0
        """,
        (marker(catalog),),
    )
    for name, comment in rows:
        if name not in owned and name not in running and name not in found:
            found[name] = _why_marked(comment)
    for suffix in (ASIDE_SUFFIX, DIFF_SUFFIX, VERIFY_SUFFIX):
        name = derived_name(target.dbname, suffix)
        if name not in found and name not in running and database_exists(target.maint, name):
            found[name] = "left by an interrupted restore, reset or diff"
    sizes = dict(query(target.maint, "SELECT datname, pg_database_size(oid) FROM pg_database WHERE datconnlimit <> -2"))
    return [(name, sizes.get(name), why) for name, why in sorted(found.items())]


def _finish_removals(target: Target, catalog: Catalog, *, dry_run: bool) -> list[str]:
    """Points unlisted earlier whose removal is not finished: their databases dropped,
    then their folders; never listed again. One whose lock another process holds (the
    background remover at work) is left to it, its databases still its own."""
    done = []
    for point_id in catalog.unlisted():
        if dry_run:
            names = retention.databases_of(target, catalog, point_id, retention.unlisted_point(catalog, point_id))
            what = f"database {', '.join(names)}, then its folder" if names else "its folder"
            done.append(f"Would finish removing point {point_id}, unlisted earlier: {what}")
            continue
        removal = retention.finish_removal(target, catalog, point_id, doing="cleanup")
        if removal.outcome is Outcome.REMOVED:
            done.append(f"Removed point {point_id}, unlisted earlier ({removal.what_was_dropped})")
        elif removal.outcome is Outcome.BUSY:
            done.append(f"Left point {point_id}, unlisted earlier, alone: {removal.by} holds it now")
        elif removal.outcome is Outcome.OTHER_SERVER:
            done.append(
                f"Left point {point_id}, unlisted earlier: its database copy lives on another server, "
                "where a cleanup with --database-url for that server removes it"
            )
    return done


def finish_interrupted(target: Target, catalog: Catalog, *, dry_run: bool = False, everything: bool = False) -> list[str]:
    """The one place what killed runs left is finished, with staging's lock held: before
    every operation starts (the scaffold), and on demand (cleanup, ``everything``: also
    the removal of points unlisted earlier that the background has not finished, and
    every database this catalog made that nothing owns). Unfinished point folders are
    removed, the state kept before a restore killed after its swap is listed, and the
    database copy of a point whose creation was killed, the copy a killed restore was
    building beside staging, private temporary files and pgBackRest side servers of
    dead processes are removed. Returns what was (or would be) done, as sentences."""
    verb = "Would remove" if dry_run else "Removed"
    found = [f"{verb} unfinished point folder {p}" for p in catalog.remove_stale_temporaries(dry_run=dry_run)]
    if dry_run:
        found += [f"Would finish unfinished point folder {p} (or remove it if its swap did not happen)" for p in catalog.pending]
    else:
        found += [line[0].upper() + line[1:] for line in recover_pending(target, catalog)]
    named: set[str] = set()
    if everything:
        found += _finish_removals(target, catalog, dry_run=dry_run)
        for name, size, why in unowned_databases(target, catalog, tidy=not dry_run):
            found.append(f"{verb} database {name} ({human_size(size) if size is not None else 'invalid'}), {why}")
            named.add(name)
            if not dry_run:
                drop_database(target.maint, name)
        if not dry_run:
            for path, record in catalog.intents():  # their databases are gone now
                if record.get("server") in (None, target.facts.system_identifier) and not database_exists(
                    target.maint, record.get("database", "")
                ):
                    catalog.settle(path)
    orphans = [i for i in catalog.stale_ids if derived_name(i, "") not in named]
    aside = derived_name(target.dbname, ASIDE_SUFFIX)

    def drop_orphans() -> list[str]:
        names = template_method.drop_orphans(target, orphans, dry_run=dry_run)
        return [f"{verb} database {name}, the copy of a point whose creation was interrupted" for name in names]

    def drop_aside() -> list[str]:
        if aside in named or not database_exists(target.maint, aside):
            return []
        if not dry_run:
            drop_database(target.maint, aside)
        return [f"{verb} database {aside}, left behind by an interrupted restore"]

    def reseal_open() -> list[str]:
        """Point databases of this catalog found open with nobody of the toolkit reading
        them: sealed again (a killed reading: its baseline, if unfinished, becomes
        unknown; anyone else's opening: the point is marked changed)."""
        found_open = query(
            target.maint,
            "SELECT datname FROM pg_database WHERE datallowconn AND datname <> %s "
            "AND left(coalesce(shobj_description(oid, 'pg_database'), ''), 15) = 'rollback point ' "
            "AND strpos(shobj_description(oid, 'pg_database'), %s) > 0",
            (target.dbname, marker(catalog)),
        )
        done = []
        for (name,) in found_open:
            if dry_run:
                done.append(f"Would seal database {name} again, found open to connections")
                continue
            before = copies.seal_mark(target, name)
            state = copies.database_state(target.maint, name)
            if state is not None and not state["allow_connections"] and before is not None:
                done.append(
                    f"Sealed database {name} again, found open to connections"
                    + (f" ({before.why_changed()})" if not before.trusted() else " (a reading of it was killed)")
                )
        return done

    def end_captures() -> list[str]:
        """A migration run killed while captured: its triggers removed from staging."""
        here = socket.gethostname()
        alive, dead = set(), []
        for path in capture.markers(catalog.root):
            run_id, pid, host = capture.marker_owner(path)
            if run_id and host == here and isinstance(pid, int) and pid_alive(pid):
                alive.add(run_id)  # an API transaction of a living process, taking a point inside its body
            else:
                dead.append(path)
        if not dead:
            return []
        if dry_run:
            return [f"Would remove the capture triggers of {len(dead)} interrupted run(s)"]
        with connection(target.info, target.dbname, application_name="rollback-toolkit cleanup") as conn:
            done = capture.finish_killed(conn, keep=alive)
        for path in dead:
            path.unlink(missing_ok=True)
        return done

    for step in (
        end_captures,
        reseal_open,
        drop_orphans,
        drop_aside,
        lambda: [f"{verb} {line}" for line in dead_temporaries(dry_run)],
        lambda: [f"{verb} {line}" for line in leftover_sides(target.settings, dry_run=dry_run)],
    ):
        try:
            found += step()
        except (RollbackError, psycopg2.Error, OSError, KeyError, ValueError) as exc:  # never a reason to stop the work asked for
            if everything:
                raise
            log.warning("could not finish what a killed run left (%s): %s", step.__name__, exc)
    for line in found:
        log.info("%s", line)
    return found
