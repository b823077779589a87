"""The ledger of applied migrations: the table rollback_toolkit.migrations in staging,
one row per migration a production run applied, with the point taken before it.

The first production run creates it, inside the migration's own first transaction, and
the row is written in the migration's last one: a run that commits nothing leaves no
trace, and a row is there exactly when the migration's last batch is. The ledger is
part of staging like any table, so a point holds it as it was and restoring a point puts
back which migrations were applied then (a point taken before the first production run
has none: restoring it removes the ledger). Diffs and partial rollbacks leave the schema
out: it is the toolkit's bookkeeping, not data a migration moved. A dry run never
writes it; ``applied`` only reads it, and never creates it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

from lib.config import Settings
from lib.errors import DatabaseError
from lib.pg.db import TOOLKIT_SCHEMA, connection, query, scalar

TABLE = f"{TOOLKIT_SCHEMA}.migrations"

_CREATE = sql.SQL("""
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE {table} (
    migration_id text PRIMARY KEY,
    file text NOT NULL,
    description text NOT NULL,
    point_id text,
    applied_at timestamptz NOT NULL,
    migrated integer NOT NULL,
    failed integer NOT NULL,
    skipped integer NOT NULL,
    failures_file text,
    retry_of text
);
COMMENT ON TABLE {table} IS
    'Migrations run_migration.py applied to this database, with the rollback point taken before each.'""")

_RECORD = sql.SQL("""
INSERT INTO {table} AS l (migration_id, file, description, point_id, applied_at, migrated, failed, skipped,
                          failures_file, retry_of)
VALUES (%s, %s, %s, %s, now(), %s, %s, %s, %s, %s)
ON CONFLICT (migration_id) DO UPDATE
   SET file = EXCLUDED.file, description = EXCLUDED.description, point_id = EXCLUDED.point_id,
       applied_at = EXCLUDED.applied_at, migrated = EXCLUDED.migrated, failed = EXCLUDED.failed,
       skipped = EXCLUDED.skipped, failures_file = EXCLUDED.failures_file, retry_of = EXCLUDED.retry_of""")

_READ = sql.SQL("""
SELECT migration_id, file, point_id, applied_at, migrated, failed, skipped, retry_of FROM {table} ORDER BY migration_id""")


def _identifiers() -> dict:
    return {"schema": sql.Identifier(TOOLKIT_SCHEMA), "table": sql.Identifier(TOOLKIT_SCHEMA, "migrations")}


def prepare(conn) -> None:
    """Create the ledger where it is missing, in ``conn``'s open transaction, and make sure
    it can be written: before the first record, not after the last batch. (CREATE SCHEMA
    checks the right to create one even when the schema exists: only where missing.)"""
    try:
        if scalar(conn, "SELECT to_regclass(%s)", (TABLE,)) is None:
            query(conn, _CREATE.format(**_identifiers()))
        writable = scalar(conn, "SELECT has_table_privilege(%s, 'INSERT') AND has_table_privilege(%s, 'UPDATE')", (TABLE, TABLE))
    except psycopg2.Error as exc:
        raise DatabaseError(
            f"The ledger of applied migrations ({TABLE}) could not be set up in staging: {_first_line(exc)}.",
            f"Let the role create a schema (GRANT CREATE ON DATABASE … TO …), or create the schema {TOOLKIT_SCHEMA} "
            "for it; nothing was migrated.",
        ) from exc
    if not writable:
        raise DatabaseError(
            f"The role may not write the ledger of applied migrations ({TABLE}).",
            f"GRANT INSERT, UPDATE ON {TABLE} to it; nothing was migrated.",
        )


def _first_line(exc: psycopg2.Error) -> str:
    return (exc.pgerror or str(exc)).strip().splitlines()[0].removeprefix("ERROR:").strip()


def record(conn, migration, point_id: str | None, tally, retry_of: Path | None) -> None:
    """``migration`` applied, in ``conn``'s open transaction (committed with the migration's last batch)."""
    query(
        conn,
        _RECORD.format(**_identifiers()),
        (
            migration.id,
            migration.path.name,
            migration.description,
            point_id,
            tally.migrated,
            tally.failed,
            tally.skipped,
            str(tally.failures_file) if tally.failures_file else None,
            str(retry_of) if retry_of else None,
        ),
    )


@dataclass
class Entry:
    migration_id: str
    file: str
    point_id: str | None
    applied_at: str
    migrated: int
    failed: int
    skipped: int
    retry_of: str | None


def applied(settings: Settings) -> dict[str, Entry] | None:
    """The ledger's rows by migration id, or None where there is no ledger. Reads only."""
    try:
        with connection(settings.staging(), readonly=True, application_name="rollback-toolkit ledger") as conn:
            if scalar(conn, "SELECT to_regclass(%s)", (TABLE,)) is None:
                return None
            rows = query(conn, _READ.format(**_identifiers()))
    except psycopg2.Error as exc:
        raise DatabaseError(
            f"Could not read the ledger of applied migrations ({TABLE}) in {settings.staging().masked()}: {_first_line(exc)}.",
            f"The role needs USAGE on the schema {TOOLKIT_SCHEMA} and SELECT on the table.",
        ) from exc
    return {r[0]: Entry(r[0], r[1], r[2], r[3].isoformat(timespec="seconds"), r[4], r[5], r[6], r[7]) for r in rows}
