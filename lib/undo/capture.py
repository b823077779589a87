"""Capture of one run's changes (lib/undo/__init__.py).

Each of the run's tables gets, for the run only, AFTER INSERT / UPDATE / DELETE
statement triggers with transition tables and a BEFORE TRUNCATE trigger. They write
every row the run's statements inserted, updated (before and after image, paired by
the table's key) or deleted into a log table of that table's own row type in the
``rollback_toolkit`` schema, so every value comes back exactly as it was. Only sessions
that carry the run's id in the setting ``rollback_toolkit.undo_run`` are captured;
every other session's writes are not. A TRUNCATE of a captured table by anyone is
recorded, and makes the run's undo refuse."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from psycopg2 import sql

from lib.pg.db import query, scalar

SCHEMA = "rollback_toolkit"
RUN_SETTING = "rollback_toolkit.undo_run"
TRIGGER_PREFIX = "rb_undo_"

_SETUP = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE SEQUENCE IF NOT EXISTS {SCHEMA}.statement_seq;
CREATE TABLE IF NOT EXISTS {SCHEMA}.undo_runs (
    run_id text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    tables jsonb NOT NULL,
    capturing boolean NOT NULL DEFAULT true,
    truncated text,
    undone_at timestamptz,
    undone jsonb
);
CREATE OR REPLACE FUNCTION {SCHEMA}.capture() RETURNS trigger LANGUAGE plpgsql AS $f$
DECLARE
    statement bigint;
BEGIN
    -- TG_ARGV: run id, log table, key join condition (old_rows o, new_rows n), first key column
    IF current_setting('{RUN_SETTING}', true) IS DISTINCT FROM TG_ARGV[0] THEN
        RETURN NULL;
    END IF;
    statement := nextval('{SCHEMA}.statement_seq');
    -- a transition table's rows are records: ROW(x.*) cast to the table's own row type
    IF TG_OP = 'INSERT' THEN
        EXECUTE format('INSERT INTO {SCHEMA}.%I (statement, op, new_row) SELECT $1, ''I'', ROW(n.*)::%I.%I FROM new_rows n',
                       TG_ARGV[1], TG_TABLE_SCHEMA, TG_TABLE_NAME)
            USING statement;
    ELSIF TG_OP = 'DELETE' THEN
        EXECUTE format('INSERT INTO {SCHEMA}.%I (statement, op, old_row) SELECT $1, ''D'', ROW(o.*)::%I.%I FROM old_rows o',
                       TG_ARGV[1], TG_TABLE_SCHEMA, TG_TABLE_NAME)
            USING statement;
    ELSE
        -- a row whose key the update changed pairs with nothing: its old image was
        -- deleted and its new one inserted, as far as the undo is concerned
        EXECUTE format(
            'INSERT INTO {SCHEMA}.%1$I (statement, op, old_row, new_row) '
            'SELECT $1, CASE WHEN o.%3$I IS NULL THEN ''I'' WHEN n.%3$I IS NULL THEN ''D'' ELSE ''U'' END, '
            'CASE WHEN o.%3$I IS NULL THEN NULL ELSE ROW(o.*)::%4$I.%5$I END, '
            'CASE WHEN n.%3$I IS NULL THEN NULL ELSE ROW(n.*)::%4$I.%5$I END '
            'FROM old_rows o FULL JOIN new_rows n ON %2$s',
            TG_ARGV[1], TG_ARGV[2], TG_ARGV[3], TG_TABLE_SCHEMA, TG_TABLE_NAME) USING statement;
    END IF;
    RETURN NULL;
END
$f$;
CREATE OR REPLACE FUNCTION {SCHEMA}.truncated() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    UPDATE {SCHEMA}.undo_runs SET truncated = coalesce(truncated || ', ', '') || format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)
     WHERE run_id = TG_ARGV[0];
    RETURN NULL;
END
$f$;
"""


@dataclass(frozen=True)
class CapturedTable:
    schema: str
    name: str
    key: tuple[str, ...]  # the primary key's columns, or a replica identity index's
    log: str  # its log table in SCHEMA

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def table_key(conn, schema: str, name: str) -> tuple[str, ...] | None:
    """The columns that identify a row: the primary key, else the index REPLICA IDENTITY
    names (unique, on NOT NULL columns); None when the table has neither."""
    rows = query(
        conn,
        """
        SELECT a.attname
          FROM pg_index i
          JOIN pg_class c ON c.oid = i.indrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos) ON true
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
         WHERE n.nspname = %s AND c.relname = %s
           AND i.indexrelid = (SELECT x.indexrelid FROM pg_index x WHERE x.indrelid = c.oid
                                 AND (x.indisprimary OR x.indisreplident)
                               ORDER BY x.indisprimary DESC LIMIT 1)
         ORDER BY k.pos""",
        (schema, name),
    )
    return tuple(r[0] for r in rows) or None


def log_name(run_id: str, schema: str, name: str) -> str:
    digest = hashlib.sha256(f"{run_id}\0{schema}\0{name}".encode()).hexdigest()[:16]
    return f"log_{digest}"


def trigger_name(run_id: str, op: str) -> str:
    return f"{TRIGGER_PREFIX}{hashlib.sha256(run_id.encode()).hexdigest()[:12]}_{op}"


def plan(conn, run_id: str, tables: list[tuple[str, str]]) -> tuple[list[CapturedTable], list[str]]:
    """The tables that can be captured, and the names of those without a key (no undo for them)."""
    usable, without = [], []
    for schema, name in tables:
        key = table_key(conn, schema, name)
        if key is None:
            without.append(f"{schema}.{name}")
        else:
            usable.append(CapturedTable(schema, name, key, log_name(run_id, schema, name)))
    return usable, without


def install(conn, run_id: str, tables: list[CapturedTable]) -> None:
    """The run's log tables and triggers, in one transaction (``conn`` autocommit off or on)."""
    was = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute(_SETUP)
            cur.execute(
                f"INSERT INTO {SCHEMA}.undo_runs (run_id, tables) VALUES (%s, %s)",
                (run_id, _tables_json(tables)),
            )
            for t in tables:
                table = sql.Identifier(t.schema, t.name)
                log = sql.Identifier(SCHEMA, t.log)
                cur.execute(
                    sql.SQL('CREATE TABLE {} (statement bigint NOT NULL, op "char" NOT NULL, old_row {}, new_row {})').format(
                        log, table, table
                    )
                )
                join = " AND ".join(f"o.{_ident(cur, k)} = n.{_ident(cur, k)}" for k in t.key)
                args = [sql.Literal(run_id), sql.Literal(t.log), sql.Literal(join), sql.Literal(t.key[0])]
                for op, event, referencing in (
                    ("i", "INSERT", "NEW TABLE AS new_rows"),
                    ("u", "UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
                    ("d", "DELETE", "OLD TABLE AS old_rows"),
                ):
                    cur.execute(
                        sql.SQL(
                            "CREATE TRIGGER {} AFTER " + event + " ON {} REFERENCING " + referencing + " "
                            "FOR EACH STATEMENT EXECUTE FUNCTION {}.capture({})"
                        ).format(
                            sql.Identifier(trigger_name(run_id, op)), table, sql.Identifier(SCHEMA), sql.SQL(", ").join(args)
                        )
                    )
                cur.execute(
                    sql.SQL(
                        "CREATE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}.truncated({})"
                    ).format(sql.Identifier(trigger_name(run_id, "t")), table, sql.Identifier(SCHEMA), sql.Literal(run_id))
                )
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = was


def _ident(cur, name: str) -> str:
    return sql.Identifier(name).as_string(cur)


def _tables_json(tables: list[CapturedTable]) -> str:
    return json.dumps([{"schema": t.schema, "name": t.name, "key": list(t.key), "log": t.log} for t in tables])


def mark(conn, run_id: str) -> None:
    """This session's writes belong to the run from now on (until the session ends)."""
    scalar(conn, "SELECT set_config(%s, %s, false)", (RUN_SETTING, run_id))


def remove_triggers(conn, run_id: str | None = None) -> list[str]:
    """The capture triggers of ``run_id`` (None: of every run, as after a killed one)
    dropped; the log tables stay for the undo. Returns the tables they were on."""
    like = trigger_name(run_id, "%") if run_id else TRIGGER_PREFIX + "%"
    rows = query(
        conn,
        """
        SELECT t.tgname, n.nspname, c.relname FROM pg_trigger t
          JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT t.tgisinternal AND t.tgname LIKE %s""",
        (like,),
    )
    for tgname, schema, name in rows:
        scalar(conn, sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(tgname), sql.Identifier(schema, name)))
    if rows and run_id:
        scalar(conn, f"UPDATE {SCHEMA}.undo_runs SET capturing = false WHERE run_id = %s", (run_id,))
    return sorted({f"{s}.{n}" for _, s, n in rows})
