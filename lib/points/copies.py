"""Databases copied on staging's own server: a point's copy, its spare, the state
kept before a swap. Copied by the server (cloned in O(1) where the filesystem shares
blocks, lib/points/clone.py), sealed against connections with a comment naming the
point, and opened briefly, by readers who overlap safely, to be read."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import psycopg2
from psycopg2 import sql

from lib.errors import DatabaseError
from lib.files import human_size
from lib.pg.codes import DISK_FULL, DUPLICATE_DATABASE, INSUFFICIENT_PRIVILEGE, OBJECT_IN_USE, sqlstate
from lib.pg.db import (
    connection,
    execute,
    query,
    sessions_on,
    set_allow_connections,
    terminate_session,
    terminate_sessions,
)
from lib.pg.fingerprint import Fingerprint, physical_fingerprint
from lib.pg.locks import Readers, SealLock
from lib.pg.target import Target
from lib.points import intents
from lib.points.catalog import Catalog
from lib.points.clone import CopyChoice, choose_copy

log = logging.getLogger(__name__)


def comment_for(point_id: str, description: str, marker: str) -> str:
    return f"rollback point {point_id}: {description} (managed by rollback_manager.py, {marker}; do not connect)"


# Why a point database may have been changed outside the toolkit, by the code its comment keeps.
CHANGED = {
    "open": "it was found open to connections with no toolkit command reading it",
    "resealed": "it was opened to connections and sealed again outside the toolkit",
    "session": "a session outside the toolkit connected to it while it was open for reading",
}


@dataclass(frozen=True)
class SealMark:
    """What a sealed database's comment says of its seal, after the point's own text:
    `` [seal=XMIN; open=XMIN/SESSIONS/READERS; changed=CODE; interrupted; ready=AT]``.

    ``stamp`` is the xmin of the database's pg_database row when the toolkit sealed it:
    ALTER DATABASE (opening it to connections, sealing it again) writes a new row
    version, a comment does not, so a stamp that no longer matches means someone opened
    it since. ``open``: the toolkit opened it to read it, and what the opening was: the
    row's xmin then, the server's count of sessions established to it, and how many of
    the toolkit's readers joined since (ALTER DATABASE by anyone else, or more sessions
    than readers, mean someone else was there). ``changed``: it may have been
    changed outside the toolkit (sticky: a key of CHANGED). ``interrupted``: a reading
    of it was killed and it stood open with nobody reading. ``ready``: a spare copy that
    was read and matched its point (the level and when)."""

    stamp: str | None = None
    open: str | None = None
    changed: str | None = None
    interrupted: bool = False
    ready: str | None = None

    def text(self) -> str:
        parts = [f"seal={self.stamp}"] if self.stamp else []
        parts += [f"open={self.open}"] if self.open else []
        parts += [f"changed={self.changed}"] if self.changed else []
        parts += ["interrupted"] if self.interrupted else []
        parts += [f"ready={self.ready}"] if self.ready else []
        return f" [{'; '.join(parts)}]" if parts else ""

    @classmethod
    def split(cls, comment: str | None) -> tuple[str, SealMark]:
        """The point's own text and the mark after it (an empty mark when it has none)."""
        comment = comment or ""
        head, bracket, tail = comment.rpartition(" [")
        if not bracket or not tail.endswith("]") or not tail.startswith(("seal=", "open", "changed=", "interrupted", "ready=")):
            return comment, cls()
        found: dict = {}
        for part in tail[:-1].split("; "):
            key, _, value = part.partition("=")
            if key == "seal":
                found["stamp"] = value
            elif key == "interrupted":
                found[key] = True
            elif key in ("open", "changed", "ready"):
                found[key] = value or "?"
        return head, cls(**found)

    def opening(self) -> tuple[str, int, int]:
        """The xmin, session count and readers of the toolkit's opening."""
        xmin, _, rest = (self.open or "").partition("/")
        sessions, _, readers = rest.partition("/")
        return xmin, int(sessions or 0), int(readers or 0)

    def joined(self) -> SealMark:
        xmin, sessions, readers = self.opening()
        return replace(self, open=f"{xmin}/{sessions}/{readers + 1}")

    def trusted(self) -> bool:
        return self.changed is None

    def why_changed(self) -> str | None:
        return CHANGED.get(self.changed or "", self.changed)


def database_state(maint, name: str) -> dict | None:
    """exists / allows connections / invalid (an interrupted DROP DATABASE leaves datconnlimit -2)."""
    rows = query(maint, "SELECT datallowconn, datconnlimit FROM pg_database WHERE datname = %s", (name,))
    if not rows:
        return None
    return {"allow_connections": rows[0][0], "invalid": rows[0][1] == -2}


def _row(maint, name: str) -> tuple[bool, str, str | None] | None:
    """Allows connections, the xmin of its pg_database row, its comment."""
    rows = query(
        maint,
        "SELECT datallowconn, xmin::text, shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        (name,),
    )
    return (rows[0][0], rows[0][1], rows[0][2]) if rows else None


def _write_mark(target: Target, name: str, head: str, mark: SealMark) -> None:
    execute(target.maint, sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(head + mark.text())))


def _seal_as(target: Target, name: str, head: str, mark: SealMark) -> SealMark:
    """No connections, and the comment stamped with the pg_database row that says so."""
    set_allow_connections(target.maint, name, False)
    row = _row(target.maint, name)
    sealed = replace(mark, stamp=row[1] if row else None, open=None)
    _write_mark(target, name, head, sealed)
    return sealed


def seal(target: Target, name: str, point_id: str, description: str) -> None:
    """No connections, and a comment naming the point and the catalog it belongs to,
    stamped so that opening it outside the toolkit shows (SealMark)."""
    head = comment_for(point_id, description, intents.marker(Catalog(target.settings.backup_dir)))
    _seal_as(target, name, head, SealMark())


def seal_mark(target: Target, name: str) -> SealMark | None:
    """How a sealed database stands (None when it does not exist), after finishing what
    others left: found open with nobody reading it, it is sealed again and marked (changed
    outside the toolkit, or interrupted when the toolkit had opened it); found sealed by
    someone else since the toolkit sealed it, it is marked changed."""
    with _sealing(target, name):
        return _inspect(target, name)


def _inspect(target: Target, name: str) -> SealMark | None:
    row = _row(target.maint, name)
    if row is None:
        return None
    allow, xmin, comment = row
    head, mark = SealMark.split(comment)
    if allow:
        if _readers(target, name).busy():
            return mark
        if mark.open:
            log.warning("%s was left open by a reading that was killed: sealed again", name)
            return _seal_as(target, name, head, replace(mark, interrupted=True))
        log.warning("%s was found open to connections outside the toolkit: sealed again and marked changed", name)
        _end_outsiders(target, name)
        return _seal_as(target, name, head, replace(mark, changed=mark.changed or "open"))
    if mark.stamp and mark.stamp != xmin:
        log.warning("%s was opened and sealed again outside the toolkit: marked changed", name)
        return _seal_as(target, name, head, replace(mark, changed=mark.changed or "resealed"))
    return mark


def mark_ready(target: Target, name: str, ready: str) -> bool:
    """A spare read and matched: said in its comment, under its current stamp. False when
    it was opened outside the toolkit meanwhile (then it is not ready)."""
    with _sealing(target, name):
        mark = _inspect(target, name)
        if mark is None or not mark.trusted() or mark.interrupted:
            return False
        head, _ = SealMark.split(_row(target.maint, name)[2])
        _write_mark(target, name, head, replace(mark, ready=ready))
        return True


def _readers(target: Target, name: str) -> Readers:
    return Readers(target.maint, target.facts.system_identifier, name)


def _end_outsiders(target: Target, name: str) -> list:
    """Sessions on a point database that are not the toolkit's readers, ended."""
    found = [s for s in sessions_on(target.maint, name) if not (s.application or "").startswith(READER_APPLICATION)]
    for s in found:
        terminate_session(target.maint, s.pid)
    return found


READER_APPLICATION = "rollback-toolkit verify"


def _sessions(target: Target, name: str) -> int:
    """Sessions ever established to a database, as the server counts them (client sessions only)."""
    execute(target.maint, "SELECT pg_stat_clear_snapshot()")
    found = query(target.maint, "SELECT sessions FROM pg_stat_database WHERE datname = %s", (name,))
    return int(found[0][0] or 0) if found else 0


@contextmanager
def opened(target: Target, name: str) -> Iterator[object]:
    """Briefly allow connections to a sealed point database to read it. Readers may
    overlap (the background's baseline, a diff, a verify): each joins the database's
    Readers when it opens it and leaves when done, and the last to leave seals it; both
    under a SealLock, so that no reader finds it sealed under it. The comment says the
    toolkit opened it, so that one killed meanwhile is told from someone else's opening;
    when the last reader leaves, anyone else's ALTER DATABASE meanwhile, or more
    sessions than readers, marks the database changed (SealMark). Not nested in one
    process for the same database."""
    with _sealing(target, name):
        mark = _inspect(target, name)
        row = _row(target.maint, name)
        if mark is not None and row is not None:
            head, _ = SealMark.split(row[2])
            if not row[0]:
                before = _sessions(target, name)
                set_allow_connections(target.maint, name, True)
                mark = replace(mark, open=f"{_row(target.maint, name)[1]}/{before}/0")
            _write_mark(target, name, head, mark.joined())
        readers = _readers(target, name)
        readers.join()
    try:
        with connection(target.info, name, application_name=READER_APPLICATION) as conn:
            yield conn
    finally:
        with _sealing(target, name):
            if readers.leave():
                _reseal_after_reading(target, name)


def _reseal_after_reading(target: Target, name: str) -> None:
    row = _row(target.maint, name)
    if row is None:
        return
    head, mark = SealMark.split(row[2])
    xmin, sessions, readers = mark.opening()
    outsiders = _end_outsiders(target, name)
    if mark.open and xmin and xmin != row[1]:
        log.warning("%s was altered by someone else while the toolkit read it: marked changed", name)
        mark = replace(mark, changed=mark.changed or "resealed")
    elif outsiders or (mark.open and _sessions(target, name) - sessions > readers):
        log.warning("%s had a session outside the toolkit while it was open for reading: marked changed", name)
        mark = replace(mark, changed=mark.changed or "session")
    _seal_as(target, name, head, mark)


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
