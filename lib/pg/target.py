"""The staging database an operation works on, its server, and the V2 guard."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg2

from lib.config import ConnInfo, Settings
from lib.errors import ConfigError, ConnectError, ConnectProblem, DatabaseError, LockHeld
from lib.interaction import Confirmer, Reporter, Silent
from lib.pg.db import (
    MAINTENANCE_DB,
    ServerFacts,
    connect,
    connection,
    scalar,
    server_facts,
    set_allow_connections,
    system_identifier,
)
from lib.pg.locks import DatabaseLock
from lib.pg.progress import ProgressPoller

log = logging.getLogger(__name__)


@dataclass
class Target:
    settings: Settings
    info: ConnInfo
    maint: psycopg2.extensions.connection  # autocommit, on the maintenance database
    facts: ServerFacts

    @property
    def dbname(self) -> str:
        return self.info.dbname

    @property
    def masked(self) -> str:
        return self.info.masked()

    @property
    def lock_key(self) -> int:
        """The advisory lock key every operation on staging holds (its DatabaseLock)."""
        return DatabaseLock.key_for(self.facts.system_identifier, self.dbname)

    @property
    def may_swap(self) -> bool:
        """Whether staging can be replaced by renaming: a superuser, or its owner with CREATEDB."""
        f = self.facts
        return f.is_superuser or (f.can_create_db and f.is_db_owner)

    def progress_poller(self, dbname: str, app: str) -> ProgressPoller:
        """The progress of ``app``'s sessions on ``dbname``, read through the maintenance database."""
        return ProgressPoller(self.info, self.maint.info.dbname, dbname, app)

    def close(self) -> None:
        if not self.maint.closed:
            self.maint.close()

    def reopen(self) -> None:
        """A new maintenance session, after the server was restarted (an in-place pitr restore)."""
        self.close()
        self.maint = connect_maintenance(self.info)

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def confirm_change(target: Target, ask: Confirmer, question: str, *, what: str) -> None:
    """The confirmation before staging changes; a protected database's name must be typed."""
    protected = target.dbname if target.dbname in target.settings.protected_databases else None
    ask.confirm(question, what=what, protected=protected)


def connect_maintenance(info: ConnInfo) -> psycopg2.extensions.connection:
    """An autocommit session outside staging, so staging can be renamed and emptied of sessions."""
    last: ConnectError | None = None
    for name in (MAINTENANCE_DB, "template1"):
        if name == info.dbname:
            continue
        try:
            return connect(info, name, application_name="rollback-toolkit maintenance")
        except ConnectError as exc:
            last = exc
            if exc.problem not in (ConnectProblem.NO_DATABASE, ConnectProblem.NOT_ACCEPTING):
                break
    assert last is not None
    raise ConnectError(
        f"Could not open a maintenance session on {info.server_label()} (database 'postgres'): {last.message}",
        last.hint,
        problem=last.problem,
    )


def open_target(settings: Settings, *, check_v2: bool = True, ui: Reporter | None = None) -> Target:
    info = settings.staging()
    try:
        with connection(info, application_name="rollback-toolkit") as conn:
            facts = server_facts(conn)
    except ConnectError as exc:
        if exc.problem is not ConnectProblem.NOT_ACCEPTING:
            raise
        reopen_after_interrupted_swap(info, ui or Silent())
        with connection(info, application_name="rollback-toolkit") as conn:
            facts = server_facts(conn)
    if check_v2:
        guard_against_v2(settings, info, facts)
    maint = connect_maintenance(info)
    return Target(settings, info, maint, facts)


def reopen_after_interrupted_swap(info: ConnInfo, ui: Reporter) -> None:
    """Staging refuses connections only during a swap. When no operation holds its lock,
    the run that disabled them was killed before it could allow them again: allow them."""
    maint = connect_maintenance(info)
    try:
        with DatabaseLock(maint, system_identifier(maint), info.dbname) as lock:
            comment = scalar(
                maint,
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s AND NOT datallowconn",
                (info.dbname,),
            )
            if comment and comment.startswith("rollback point "):
                raise ConfigError(
                    f"Database {info.dbname!r} is a rollback point's copy ({comment.split(':')[0]}), sealed on purpose.",
                    "Point STAGING_DATABASE_URL at the staging database itself.",
                )
            set_allow_connections(lock.conn, info.dbname, True)
        log.warning("%s was left refusing connections by an interrupted swap; connections allowed again", info.dbname)
        ui.warn(f"{info.dbname} was left refusing connections by an interrupted restore; connections are allowed again.")
    except LockHeld as exc:
        raise LockHeld(
            f"Database {info.dbname!r} refuses connections because an operation is swapping it right now "
            f"({exc.message.split(': ', 1)[-1].rstrip('.')}).",
            "Wait a few seconds for it to finish, then run the command again.",
        ) from None
    finally:
        maint.close()


def guard_against_v2(settings: Settings, staging: ConnInfo, facts: ServerFacts) -> None:
    """Refuse when the staging URL is really the V2 database: V2 is never written."""
    v2 = settings.v2()
    if v2 is None:
        return
    try:
        with connection(v2, readonly=True, application_name="rollback-toolkit v2 check") as conn:
            v2_sysid = system_identifier(conn)
            v2_oid = scalar(conn, "SELECT oid FROM pg_database WHERE datname = current_database()")
    except DatabaseError as exc:
        log.warning("could not reach V2 to compare it with staging: %s", exc.message)
        same_address = (v2.host, v2.port, v2.dbname) == (staging.host, staging.port, staging.dbname)
        if same_address:
            raise ConfigError(
                f"The staging URL points at the same database as V2_DATABASE_URL ({v2.masked()}).",
                "Fix STAGING_DATABASE_URL; the V2 database is never written.",
            ) from None
        return
    same_cluster = (
        v2_sysid == facts.system_identifier
        if v2_sysid and facts.system_identifier
        else ((v2.host, v2.port) == (staging.host, staging.port))
    )
    if same_cluster and v2_oid == facts.database_oid:
        raise ConfigError(
            f"The staging database {staging.masked()} is the V2 database {v2.masked()} "
            f"(same server system identifier and database oid {v2_oid}).",
            "Fix STAGING_DATABASE_URL or V2_DATABASE_URL; the V2 database is never written.",
        )
