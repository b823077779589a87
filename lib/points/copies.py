"""Databases copied on staging's own server: a point's copy, its spare, the state
kept before a swap. Copied by the server (cloned in O(1) where the filesystem shares
blocks, lib/points/clone.py), sealed against connections with a comment naming the
point, and opened briefly, by readers who overlap safely, to be read."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
from psycopg2 import sql

from lib.errors import DatabaseError
from lib.files import human_size
from lib.pg.codes import DISK_FULL, DUPLICATE_DATABASE, INSUFFICIENT_PRIVILEGE, OBJECT_IN_USE, sqlstate
from lib.pg.db import connection, execute, query, set_allow_connections, terminate_sessions
from lib.pg.fingerprint import Fingerprint, physical_fingerprint
from lib.pg.locks import Readers, SealLock
from lib.pg.target import Target
from lib.points import intents
from lib.points.catalog import Catalog
from lib.points.clone import CopyChoice, choose_copy

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


def invalid_databases(maint) -> list[str]:
    """Databases an interrupted DROP DATABASE left invalid: never a source, never a point."""
    return [r[0] for r in query(maint, "SELECT datname FROM pg_database WHERE datconnlimit = -2 ORDER BY 1")]


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
