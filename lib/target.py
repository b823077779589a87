"""The staging database an operation works on, its server, and the V2 guard."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg2

from .config import ConnInfo, Settings
from .db import MAINTENANCE_DB, ServerFacts, connect, connection, scalar, server_facts, system_identifier
from .errors import ConfigError, DatabaseError

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

    def close(self) -> None:
        if not self.maint.closed:
            self.maint.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect_maintenance(info: ConnInfo) -> psycopg2.extensions.connection:
    """An autocommit session outside staging, so staging can be renamed and emptied of sessions."""
    last: DatabaseError | None = None
    for name in (MAINTENANCE_DB, "template1"):
        if name == info.dbname:
            continue
        try:
            return connect(info, name, application_name="rollback-toolkit maintenance")
        except DatabaseError as exc:
            last = exc
            if "does not exist" not in exc.message and "not currently accepting" not in exc.message:
                break
    assert last is not None
    raise DatabaseError(
        f"Could not open a maintenance session on {info.server_label()} (database 'postgres'): {last.message}",
        last.hint,
    )


def open_target(settings: Settings, *, check_v2: bool = True) -> Target:
    info = settings.staging()
    with connection(info, application_name="rollback-toolkit") as conn:
        facts = server_facts(conn)
    if check_v2:
        guard_against_v2(settings, info, facts)
    maint = connect_maintenance(info)
    return Target(settings, info, maint, facts)


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
