"""Points kept as databases on staging's own server, with connections disabled so
nobody writes to them by accident; restored by a server-side copy."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
from psycopg2 import sql

from lib import faults
from lib.errors import ConfigError, ConfirmationRefused, DatabaseError, VerificationError
from lib.files import human_size, utc_now
from lib.interaction import Confirmer, Reporter
from lib.pg.codes import DISK_FULL, DUPLICATE_DATABASE, INSUFFICIENT_PRIVILEGE, OBJECT_IN_USE, sqlstate
from lib.pg.db import (
    connection,
    database_properties,
    derived_name,
    drop_database,
    execute,
    query,
    refuse_prepared_transactions,
    sessions_on,
    set_allow_connections,
    terminate_sessions,
)
from lib.pg.fingerprint import Fingerprint, compare, fingerprint, fingerprint_like, is_physical, physical_fingerprint
from lib.pg.locks import CountLock, Readers, SealLock
from lib.pg.retry import retry_on
from lib.pg.target import Target
from lib.points import intents
from lib.points.catalog import Catalog, Point
from lib.points.clone import CopyChoice, choose_copy
from lib.points.methods.dump import database_section

log = logging.getLogger(__name__)


def comment_for(point_id: str, description: str, marker: str) -> str:
    return f"rollback point {point_id}: {description} (managed by rollback_manager.py, {marker}; do not connect)"


def database_state(maint, name: str) -> dict | None:
    """exists / allows connections / invalid (an interrupted DROP DATABASE leaves datconnlimit -2)."""
    rows = query(maint, "SELECT datallowconn, datconnlimit FROM pg_database WHERE datname = %s", (name,))
    if not rows:
        return None
    return {"allow_connections": rows[0][0], "invalid": rows[0][1] == -2}


def seal(target: Target, name: str, point_id: str, description: str) -> None:
    """No connections, and a comment naming the point and the catalog it belongs to."""
    set_allow_connections(target.maint, name, False)
    text = comment_for(point_id, description, intents.marker(Catalog(target.settings.backup_dir)))
    execute(target.maint, sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(text)))


@contextmanager
def opened(target: Target, name: str) -> Iterator[object]:
    """Briefly allow connections to a sealed point database to read it. Readers may
    overlap (the background's baseline, a diff, a verify): each joins the database's
    Readers when it opens it and leaves when done, and the last to leave seals it; both
    under a SealLock, so that no reader finds it sealed under it."""
    with _sealing(target, name):
        set_allow_connections(target.maint, name, True)
        readers = Readers(target.maint, target.facts.system_identifier, name)
        readers.join()
    try:
        with connection(target.info, name, application_name="rollback-toolkit verify") as conn:
            yield conn
    finally:
        with _sealing(target, name):
            if readers.leave():
                set_allow_connections(target.maint, name, False)


@contextmanager
def _sealing(target: Target, name: str) -> Iterator[None]:
    lock = SealLock(target.maint, target.facts.system_identifier, name)
    holder = lock.acquire(wait=30)
    if holder is not None:
        raise lock.refused(holder)
    try:
        yield
    finally:
        lock.release()


def read_physical(target: Target, name: str) -> Fingerprint:
    """A sealed database's catalog, in O(relations): no row is read."""
    with opened(target, name) as conn:
        return physical_fingerprint(conn)


def read_baseline(target: Target, point: Point, name: str) -> dict:
    """Every row of a point's database (exact counts and content hashes): the background
    reads them once, as the baseline `verify --deep` compares with later. Held under a
    CountLock, so a check that finds the database open to connections knows why; a
    foreground copy of the database ends this session (the background yields)."""
    with CountLock(target.maint, target.facts.system_identifier, name), opened(target, name) as conn:
        fp = fingerprint(conn, deep=True)
    baseline = {"row_counts": fp.row_counts, "content": fp.content, "read_at": utc_now().isoformat(timespec="seconds")}
    point.record_verification(baseline=baseline)
    return baseline


def copy_database(target: Target, source: str, new_name: str, owner: str | None) -> CopyChoice:
    """CREATE DATABASE ... TEMPLATE, with STRATEGY FILE_COPY from PostgreSQL 15 on: a file
    copy plus two checkpoints, several times faster than WAL_LOG for large databases. On
    PostgreSQL 18, cloned where the filesystem shares blocks (lib/points/clone.py);
    where a clone fails outright, copied the plain way. Returns how it was copied."""
    choice = copy_choice(target)
    parts = [sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(new_name), sql.Identifier(source))]
    if target.facts.major >= 15:
        parts.append(sql.SQL("STRATEGY FILE_COPY"))
    if owner:
        parts.append(sql.SQL("OWNER {}").format(sql.Identifier(owner)))
    statement = sql.SQL(" ").join(parts)
    if source != target.dbname:  # a point's database: the background may be reading it, and yields
        terminate_sessions(target.maint, source)
    if target.facts.major < 18:
        execute(target.maint, statement)
        return choice
    execute(target.maint, "SET file_copy_method = %s", (choice.method,))
    try:
        execute(target.maint, statement)
    except psycopg2.Error as exc:
        if choice.method != "clone" or sqlstate(exc) in (OBJECT_IN_USE, DUPLICATE_DATABASE, DISK_FULL):
            raise
        log.warning("file_copy_method = clone failed (%s); copying the plain way", str(exc).strip())
        execute(target.maint, "SET file_copy_method = copy")
        execute(target.maint, statement)
        choice = CopyChoice("copy", f"clone failed ({str(exc).strip().splitlines()[0]})", choice.evidence)
    finally:
        execute(target.maint, "RESET file_copy_method")
    return choice


_choices: dict[tuple, CopyChoice] = {}


def copy_choice(target: Target) -> CopyChoice:
    """How this server copies staging's databases: decided once per process and server."""
    key = (target.facts.system_identifier, target.info.server_label(), target.dbname, target.settings.file_copy_method)
    if key not in _choices:
        _choices[key] = choose_copy(target)
    return _choices[key]


def verify_point_database(target: Target, point: Point, *, deep: bool = False) -> dict:
    """Physically (O(relations)): the database exists, is valid and sealed, and its
    schema digest, every relation's file node and size, sequences and large objects are
    the manifest's. With ``deep``, every row is read and compared with the baseline the
    background read when the point was taken."""
    name = point.manifest.get("template_database")
    state = database_state(target.maint, name) if name else None
    if state is None:
        raise VerificationError(
            f"The database {name!r} that holds point {point.id} does not exist on {target.info.server_label()}.",
            "The point cannot be restored; delete it with `python3 rollback_manager.py delete "
            f"{point.id}` and use another point.",
        )
    if state["invalid"]:
        raise VerificationError(
            f"The database {name!r} that holds point {point.id} is invalid (an interrupted DROP DATABASE left it).",
            "Drop it by hand (DROP DATABASE) and use another point.",
        )
    counting = CountLock(target.maint, target.facts.system_identifier, name)
    if state["allow_connections"] and counting.try_acquire() is None:
        counting.release()
        raise VerificationError(
            f"Point {point.id}'s database {name!r} takes connections, and it should be sealed: someone may have changed it.",
            f"Use another point, or check it with `python3 rollback_manager.py verify {point.id} --deep`.",
        )
    expected = point.manifest.get("fingerprint", {})
    with opened(target, name) as conn:
        found = fingerprint_like(conn, expected)
        problems = compare(expected, found)
        result = {
            "database": name,
            "fingerprint": "matches the manifest",
            "verified": "physical" if is_physical(expected) else "deep",
        }
        if deep and not problems:
            result.update(_deep_check(point, conn, problems))
    if problems:
        raise VerificationError(
            f"Point {point.id}'s database {name!r} no longer matches its manifest: " + "; ".join(problems[:10]) + ".",
            "Someone changed it; use another point.",
        )
    return result


def _deep_check(point: Point, conn, problems: list[str]) -> dict:
    """Every row against the baseline (``problems`` grows where they differ)."""
    baseline = point.verification.get("baseline")
    now = fingerprint(conn, deep=True)
    if not baseline:
        point.record_verification(
            baseline={"row_counts": now.row_counts, "content": now.content, "read_at": utc_now().isoformat(timespec="seconds")}
        )
        return {"rows": f"{now.total_rows} read; no baseline had been read yet: it is now, for the next `verify --deep`"}
    problems += compare({"row_counts": baseline["row_counts"], "content": baseline["content"]}, now)
    if not problems:
        point.record_verification(level="deep", verified_at=utc_now().isoformat(timespec="seconds"))
        return {"verified": "deep", "rows": f"{now.total_rows} rows match the baseline read on {baseline.get('read_at')}"}
    return {}


def invalid_databases(maint) -> list[str]:
    """Databases an interrupted DROP DATABASE left invalid: never a source, never a point."""
    return [r[0] for r in query(maint, "SELECT datname FROM pg_database WHERE datconnlimit = -2 ORDER BY 1")]


def preflight(target: Target, ui: Reporter, ask: Confirmer) -> None:
    """Before copying: rights, invalid databases, space, and the sessions that must end."""
    f = target.facts
    if not f.can_create_db:
        raise ConfigError(
            f"Role {f.current_user} may not create databases, which a template point needs.",
            "Use --method dump, or grant CREATEDB to the role.",
        ).only_this_method()
    invalid = invalid_databases(target.maint)
    if target.dbname in invalid:
        raise VerificationError(
            f"Database {target.dbname!r} is invalid (an interrupted DROP DATABASE left it) and cannot be a source.",
            "Drop it and restore a point, or rebuild staging.",
        )
    if invalid:
        ui.warn("Invalid databases on this server (left by interrupted drops; never used as sources): " + ", ".join(invalid))
    refuse_prepared_transactions(target.maint, target.dbname, "copy it")
    ui.info(f"  The copy needs about {human_size(f.database_size)} of free space on the server.")
    sessions = sessions_on(target.maint, target.dbname)
    if sessions:
        ui.info(f"  A copy needs {target.dbname} to itself; these {len(sessions)} session(s) will be disconnected:")
        for s in sessions:
            ui.info(f"    - {s.describe()}")
        try:
            ask.confirm("Disconnect them and take the point?", what=f"disconnect the sessions on {target.dbname}")
        except ConfirmationRefused as exc:
            raise exc.only_this_method() from None  # a dump point needs nobody disconnected


COPY_ATTEMPTS = 5


def copy_staging(target: Target, new_name: str) -> int:
    """CREATE DATABASE new TEMPLATE staging: the source must have no other sessions, so
    end them and try again when one slips in (55006). Staging's connections are never
    disabled, so a killed copy leaves staging fully usable. Returns sessions ended."""
    ended = 0

    def attempt(_n: int) -> None:
        nonlocal ended
        ended += len(terminate_sessions(target.maint, target.dbname))
        faults.pause("before copy")
        copy_database(target, target.dbname, new_name, None)

    try:
        retry_on({OBJECT_IN_USE}, COPY_ATTEMPTS, attempt, what=f"copying {target.dbname}")
    except psycopg2.Error as exc:
        raise copy_error(target, exc, target.dbname, attempts=COPY_ATTEMPTS if sqlstate(exc) == OBJECT_IN_USE else 1) from None
    return ended


def copy_error(target: Target, exc: psycopg2.Error, source: str, *, attempts: int = 1) -> DatabaseError:
    """Why a server-side copy failed, and what to do, decided by its SQLSTATE."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    code = sqlstate(exc)
    if code == OBJECT_IN_USE:
        return DatabaseError(
            f"Could not copy {source}: sessions kept connecting to it ({attempts} attempt(s)): {first}",
            "Stop the clients that keep connecting to it, then try again.",
        ).only_this_method()
    if code == DISK_FULL:
        return DatabaseError(
            f"The server ran out of disk space copying {source} ({human_size(target.facts.database_size)}): {first}. "
            "The unfinished copy is not kept.",
            "Free space on the server; or take a dump point (--method dump), which writes to BACKUP_DIR instead; "
            "`python3 rollback_manager.py cleanup --dry-run` lists what earlier failures left.",
        ).only_this_method()
    if code == INSUFFICIENT_PRIVILEGE:
        return DatabaseError(
            f"Could not copy {source}: {first}", "Grant the role CREATEDB, or take a dump point (--method dump)."
        ).only_this_method()
    return DatabaseError(f"Could not copy {source}: {first}", "See the log for details.")


def drop_orphans(target: Target, point_ids: list[str], dry_run: bool = False) -> list[str]:
    """Databases of creations that were killed before their manifest was written; returns their names."""
    found = []
    for point_id in point_ids:
        name = derived_name(point_id, "")
        if database_state(target.maint, name) is not None:
            found.append(name)
            if not dry_run:
                log.info("dropping %s, left by an interrupted template point", name)
                drop_database(target.maint, name)
    return found


def take(target: Target, catalog: Catalog, ui: Reporter, ask: Confirmer, *, label: str, base_manifest: dict) -> Point:
    preflight(target, ui, ask)
    started = utc_now()
    with catalog.writing(label) as writer:
        name = derived_name(writer.id, "")
        with intents.new_database(target, name, "template point copy", point_id=writer.id) as new:
            clock = time.monotonic()
            with ui.progress(f"Copying {target.dbname} to {name} on the server"):
                ended = copy_staging(target, name)
            copy_seconds = time.monotonic() - clock
            faults.pause("after copy")
            seal(target, name, writer.id, base_manifest.get("description") or "")
            fp = read_physical(target, name)
            props = database_properties(target.maint, target.dbname).as_dict()
            manifest = dict(base_manifest)
            manifest.update(
                created_at=started.isoformat(timespec="milliseconds"),
                method="template",
                template_database=name,
                database=database_section(target, props),
                fingerprint=fp.as_dict(),
                sessions_terminated=ended,
                copy=copy_choice(target).as_dict(),
                copy_seconds=round(copy_seconds, 3),
                duration_seconds=round((utc_now() - started).total_seconds(), 3),
            )
            point = writer.commit(manifest)
            new.own()
        return point
