"""Capture of one run's changes (lib/undo/__init__.py).

Each of the run's tables gets, for the run only, AFTER INSERT / UPDATE / DELETE
statement triggers with transition tables and a BEFORE TRUNCATE trigger. They write
every row the run's statements inserted, updated (before and after image, paired by
the table's key) or deleted into a log table in the ``rollback_toolkit`` schema. A row
is logged as its text (``row::text``, every column as PostgreSQL prints it, which is
what pg_dump writes too), so every value comes back exactly, and the log does not
depend on the table's row type: later migrations may still alter or drop the table.

Only sessions that carry the run's id in the setting ``rollback_toolkit.undo_run``
(given when the run's session connects) are captured; every other session's writes
are not. A TRUNCATE of a captured table, by anyone, is recorded; so is DDL the run's
sessions run (an event trigger, where the role may create one) and any change to the
captured tables' columns or to staging's set of tables during the run (a digest of the
catalog, for roles that may not create event triggers). Each makes the run's undo
refuse."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

from lib.pg.db import TOOLKIT_SCHEMA, query, scalar

SCHEMA = TOOLKIT_SCHEMA
RUN_SETTING = "rollback_toolkit.undo_run"
TRIGGER_PREFIX = "rb_undo_"
EVENT_TRIGGER = "rb_undo_ddl"
RUNS = f"{SCHEMA}.undo_runs"

_SETUP = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE SEQUENCE IF NOT EXISTS {SCHEMA}.statement_seq;
CREATE TABLE IF NOT EXISTS {RUNS} (
    run_id text PRIMARY KEY,
    migration_id text,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    tables jsonb NOT NULL,
    without_key jsonb NOT NULL DEFAULT '[]',
    columns_digest jsonb NOT NULL DEFAULT '{{}}',
    tables_digest text,
    capturing boolean NOT NULL DEFAULT true,
    truncated text,
    ddl text,
    uncaptured text,
    undone_at timestamptz,
    undone jsonb
);
COMMENT ON TABLE {RUNS} IS
    'Migration runs whose changes were captured for an undo (rollback_manager.py undo RUN).';
CREATE OR REPLACE FUNCTION {SCHEMA}.uncaptured() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
    IF current_setting('{RUN_SETTING}', true) IS NOT DISTINCT FROM TG_ARGV[0] THEN
        UPDATE {RUNS} SET uncaptured = coalesce(uncaptured || ', ', '') || format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)
         WHERE run_id = TG_ARGV[0] AND strpos(coalesce(uncaptured, ''), format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)) = 0;
    END IF;
    RETURN NULL;
END
$f$;
CREATE OR REPLACE FUNCTION {SCHEMA}.truncated() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
    UPDATE {RUNS} SET truncated = coalesce(truncated || ', ', '') || format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)
     WHERE run_id = TG_ARGV[0];
    RETURN NULL;
END
$f$;
"""

# DDL the run's own sessions run while it is captured (created only where the role may:
# event triggers need a superuser before PostgreSQL 17's event-trigger privileges)
_EVENT = rf"""
CREATE OR REPLACE FUNCTION {SCHEMA}.ddl_seen() RETURNS event_trigger LANGUAGE plpgsql AS $f$
DECLARE
    run text := current_setting('{RUN_SETTING}', true);
    seen text;
BEGIN
    IF run IS NULL OR run = '' THEN
        RETURN;
    END IF;
    -- the toolkit's own bookkeeping (the ledger's first creation) and temporary objects are not the run's DDL
    IF TG_EVENT = 'sql_drop' THEN
        SELECT string_agg('DROP ' || object_type || coalesce(' ' || object_identity, ''), ', ') INTO seen
          FROM pg_event_trigger_dropped_objects()
         WHERE original AND NOT is_temporary AND schema_name IS DISTINCT FROM '{SCHEMA}';
    ELSE
        SELECT string_agg(command_tag || coalesce(' ' || object_identity, ''), ', ') INTO seen
          FROM pg_event_trigger_ddl_commands()
         WHERE schema_name IS DISTINCT FROM '{SCHEMA}' AND coalesce(schema_name, '') NOT LIKE 'pg\_temp%'
           AND NOT (command_tag = 'CREATE SCHEMA' AND object_identity = '{SCHEMA}');
    END IF;
    IF seen IS NOT NULL THEN
        UPDATE {RUNS} SET ddl = coalesce(ddl || ', ', '') || seen WHERE run_id = run AND capturing;
    END IF;
END
$f$;
DROP EVENT TRIGGER IF EXISTS {EVENT_TRIGGER};
CREATE EVENT TRIGGER {EVENT_TRIGGER} ON ddl_command_end EXECUTE FUNCTION {SCHEMA}.ddl_seen();
DROP EVENT TRIGGER IF EXISTS {EVENT_TRIGGER}_drop;
CREATE EVENT TRIGGER {EVENT_TRIGGER}_drop ON sql_drop EXECUTE FUNCTION {SCHEMA}.ddl_seen();
"""

# staging's tables and their columns, by name and type: what a digest compares
_SHAPE = """
SELECT n.nspname, c.relname, coalesce(string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                                                 || CASE WHEN a.attgenerated <> '' THEN ' generated' ELSE '' END,
                                                 ', ' ORDER BY a.attnum), '')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', %s)
   AND n.nspname NOT LIKE 'pg\\_%%'
 GROUP BY 1, 2 ORDER BY 1, 2"""


@dataclass(frozen=True)
class CapturedTable:
    schema: str
    name: str
    key: tuple[str, ...]  # the primary key's columns, or a replica identity index's
    log: str  # its log table in SCHEMA
    by_row: bool = (
        False  # in an inheritance tree: captured by row triggers (a statement on the parent reaches its children's rows)
    )

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
         WHERE n.nspname = %s AND c.relname = %s AND k.pos <= i.indnkeyatts
           AND i.indexrelid = (SELECT x.indexrelid FROM pg_index x WHERE x.indrelid = c.oid
                                 AND (x.indisprimary OR x.indisreplident)
                               ORDER BY x.indisprimary DESC LIMIT 1)
         ORDER BY k.pos""",
        (schema, name),
    )
    return tuple(r[0] for r in rows) or None


def user_tables(conn) -> list[tuple[str, str]]:
    """Every table of staging's user schemas, partitions and inheritance children
    included (a statement that names a partition fires only that partition's statement
    triggers)."""
    rows = query(
        conn,
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p')
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', %s) AND n.nspname NOT LIKE 'pg\\_%%'
         ORDER BY 1, 2""",
        (SCHEMA,),
    )
    return [(r[0], r[1]) for r in rows]


def with_members(conn, tables: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``tables`` and every table below them: partitions, and inheritance children."""
    found: list[tuple[str, str]] = []
    for schema, name in tables:
        rows = query(
            conn,
            """
            WITH RECURSIVE tree(oid) AS (
                SELECT to_regclass(%s)::oid
                UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
            SELECT n.nspname, c.relname FROM tree JOIN pg_class c ON c.oid = tree.oid
              JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')""",
            (sql.Identifier(schema, name).as_string(conn),),
        )
        found += [(r[0], r[1]) for r in rows if (r[0], r[1]) not in found]
    return found


def _in_inheritance(conn, schema: str, name: str) -> bool:
    """Whether the table is a parent or a child in an inheritance tree (not partitioning)."""
    return bool(
        scalar(
            conn,
            """
            WITH t AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname = %s AND c.relname = %s)
            SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent, t
                            WHERE p.relkind = 'r' AND (i.inhrelid = t.oid OR i.inhparent = t.oid))""",
            (schema, name),
        )
    )


def log_name(run_id: str, schema: str, name: str) -> str:
    digest = hashlib.sha256(f"{run_id}\0{schema}\0{name}".encode()).hexdigest()[:16]
    return f"log_{digest}"


def trigger_name(run_id: str, op: str) -> str:
    return f"{TRIGGER_PREFIX}{hashlib.sha256(run_id.encode()).hexdigest()[:12]}_{op}"


def plan(conn, run_id: str, tables: list[tuple[str, str]]) -> tuple[list[CapturedTable], list[tuple[str, str]]]:
    """The tables that can be captured, and those without a key (schema, name): no undo for them."""
    usable, without = [], []
    for schema, name in tables:
        key = table_key(conn, schema, name)
        if key is None:
            without.append((schema, name))
        else:
            usable.append(CapturedTable(schema, name, key, log_name(run_id, schema, name), _in_inheritance(conn, schema, name)))
    return usable, without


def shape(conn) -> dict[str, str]:
    """Staging's tables and their columns, by qualified name."""
    return {f"{s}.{n}": cols for s, n, cols in query(conn, _SHAPE, (SCHEMA,))}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def may_watch_ddl(conn) -> bool:
    """Whether this role may create the event trigger (a superuser)."""
    return bool(scalar(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))


def install(
    conn,
    run_id: str,
    tables: list[CapturedTable],
    *,
    migration_id: str | None = None,
    without_key: list[tuple[str, str]] = (),
) -> None:
    """The run's log tables and triggers, in one transaction. ``without_key``: tables
    whose rows cannot be found again; a write of the run to one of them is recorded, and
    makes the undo refuse."""
    was = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute(_SETUP)
            if may_watch_ddl(conn):
                cur.execute(_EVENT)
            now = shape(conn)
            cur.execute(
                f"INSERT INTO {RUNS} (run_id, migration_id, tables, without_key, columns_digest, tables_digest) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    run_id,
                    migration_id,
                    _tables_json(tables),
                    json.dumps([f"{s}.{n}" for s, n in without_key]),
                    json.dumps({t.qualified: _digest(now.get(t.qualified, "")) for t in tables}),
                    _digest(json.dumps(sorted(now))),
                ),
            )
            for schema, name in without_key:
                cur.execute(
                    sql.SQL(
                        "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {} "
                        "FOR EACH STATEMENT EXECUTE FUNCTION {}.uncaptured({})"
                    ).format(
                        sql.Identifier(trigger_name(run_id, "w")),
                        sql.Identifier(schema, name),
                        sql.Identifier(SCHEMA),
                        sql.Literal(run_id),
                    )
                )
            for t in tables:
                _install_table(cur, run_id, t)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = was


def _ident(cur, name: str) -> str:
    return sql.Identifier(name).as_string(cur)


def key_types(conn, t: CapturedTable) -> list[str]:
    """The key columns' types, as the catalog writes them."""
    rows = query(
        conn,
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped""",
        (t.schema, t.name),
    )
    types = dict(rows)
    return [types[k] for k in t.key]


def old_key(t: CapturedTable) -> list[str]:
    """The log's columns holding the key of a row's image before (ok_*) and after (nk_*) a statement."""
    return [f"ok_{i}" for i in range(len(t.key))]


def new_key(t: CapturedTable) -> list[str]:
    return [f"nk_{i}" for i in range(len(t.key))]


def _function_name(t: CapturedTable) -> str:
    return "cap_" + t.log.removeprefix("log_")


# Every image is written and read back under the same output settings, whatever the
# run's session sets (a date written under DateStyle 'SQL, DMY' would come back as
# another day; a float under extra_float_digits 0 would lose digits): the capture
# functions carry them, and the undo sets them for its transaction.
OUTPUT_SETTINGS = (
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
)


def _dollar_tag(*texts: str) -> str:
    """A dollar-quote tag that none of ``texts`` contains (identifiers are pasted into a
    function body: a column named ``x$f$`` must not end it)."""
    n = 0
    while any(f"$rb{n}$" in text for text in texts):
        n += 1
    return f"$rb{n}$"


def _install_table(cur, run_id: str, t: CapturedTable) -> None:
    """The table's log (each image as text, and its key as text, cast back to the key's
    type by the undo so that rows are found by the table's own index; no column of the
    log depends on a user type), its capture function (static SQL: planned once per
    session; aliases no column name can shadow) and its triggers, which fire only in the
    run's sessions (WHEN)."""
    q = lambda name: _ident(cur, name)  # noqa: E731
    log = sql.Identifier(SCHEMA, t.log).as_string(cur)
    function = sql.Identifier(SCHEMA, _function_name(t)).as_string(cur)
    table = sql.Identifier(t.schema, t.name)
    ok, nk = old_key(t), new_key(t)
    cur.execute(
        f'CREATE TABLE {log} (statement bigint NOT NULL, op "char" NOT NULL, old_row text, new_row text, '
        + ", ".join(f"{c} text" for c in (*ok, *nk))
        + ")"
    )
    targets = ", ".join(["statement", "op", "old_row", "new_row", *ok, *nk])
    o, n = "rb_undo_old", "rb_undo_new"
    o_keys = ", ".join(f"{o}.{q(k)}::text" for k in t.key)
    n_keys = ", ".join(f"{n}.{q(k)}::text" for k in t.key)
    nulls = ", ".join("NULL" for _ in t.key)
    first = q(t.key[0])
    if t.by_row:
        old_vals = ", ".join(f"CASE WHEN TG_OP <> 'INSERT' THEN OLD.{q(k)}::text END" for k in t.key)
        new_vals = ", ".join(f"CASE WHEN TG_OP <> 'DELETE' THEN NEW.{q(k)}::text END" for k in t.key)
        body = f"""
    INSERT INTO {log} ({targets}) VALUES (rb_undo_statement, left(TG_OP, 1)::"char",
        CASE WHEN TG_OP <> 'INSERT' THEN OLD::text END, CASE WHEN TG_OP <> 'DELETE' THEN NEW::text END,
        {old_vals}, {new_vals});"""
    else:
        join = " AND ".join(f"{o}.{q(k)} = {n}.{q(k)}" for k in t.key)
        body = f"""
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {log} ({targets}) SELECT rb_undo_statement, 'I', NULL, {n}::text, {nulls}, {n_keys} FROM new_rows {n};
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {log} ({targets}) SELECT rb_undo_statement, 'D', {o}::text, NULL, {o_keys}, {nulls} FROM old_rows {o};
    ELSE
        -- a row whose key the update changed pairs with nothing: its old image was
        -- deleted and its new one inserted, as far as the undo is concerned
        INSERT INTO {log} ({targets})
        SELECT rb_undo_statement, CASE WHEN {o}.{first} IS NULL THEN 'I' WHEN {n}.{first} IS NULL THEN 'D' ELSE 'U' END,
               CASE WHEN {o}.{first} IS NULL THEN NULL ELSE {o}::text END,
               CASE WHEN {n}.{first} IS NULL THEN NULL ELSE {n}::text END,
               {o_keys}, {n_keys}
          FROM old_rows {o} FULL JOIN new_rows {n} ON {join};
    END IF;"""
    settings = " ".join(f"SET {name} = '{value}'" for name, value in OUTPUT_SETTINGS)
    tag = _dollar_tag(body, log)
    cur.execute(
        f"""CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql {settings} AS {tag}
DECLARE
    rb_undo_statement bigint := nextval('{SCHEMA}.statement_seq');
BEGIN{body}
    RETURN NULL;
END
{tag}"""
    )
    when = sql.SQL("WHEN (current_setting({}, true) = {})").format(sql.Literal(RUN_SETTING), sql.Literal(run_id))
    triggers = (
        [("r", "AFTER INSERT OR UPDATE OR DELETE", "FOR EACH ROW")]
        if t.by_row
        else [
            ("i", "AFTER INSERT", "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT"),
            ("u", "AFTER UPDATE", "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT"),
            ("d", "AFTER DELETE", "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT"),
        ]
    )
    for op, event, how in triggers:
        cur.execute(
            sql.SQL("CREATE TRIGGER {} " + event + " ON {} " + how + " {} EXECUTE FUNCTION " + function + "()").format(
                sql.Identifier(trigger_name(run_id, op)), table, when
            )
        )
    cur.execute(
        sql.SQL("CREATE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}.truncated({})").format(
            sql.Identifier(trigger_name(run_id, "t")), table, sql.Identifier(SCHEMA), sql.Literal(run_id)
        )
    )


def _tables_json(tables: list[CapturedTable]) -> str:
    return json.dumps(
        [{"schema": t.schema, "name": t.name, "key": list(t.key), "log": t.log, "by_row": t.by_row} for t in tables]
    )


def session_options(run_id: str) -> str:
    """libpq ``options`` that make a new session's writes the run's (the setting is given
    at connection start, so no transaction of the run can lose it)."""
    escaped = run_id.replace("\\", "\\\\").replace(" ", "\\ ")
    return f"-c {RUN_SETTING}={escaped}"


def mark(conn, run_id: str) -> None:
    """This session's writes belong to the run from now on (until the session ends)."""
    scalar(conn, "SELECT set_config(%s, %s, false)", (RUN_SETTING, run_id))


def finish(conn, run_id: str) -> None:
    """The run's capture ended: its triggers dropped (the logs stay for the undo), and a
    change of staging's set of tables during the run recorded (``conn`` autocommit)."""
    remove_triggers(conn, run_id)
    row = query(conn, f"SELECT tables_digest FROM {RUNS} WHERE run_id = %s", (run_id,))
    changed = bool(row) and row[0][0] != _digest(json.dumps(sorted(shape(conn))))
    scalar(
        conn,
        f"UPDATE {RUNS} SET capturing = false, finished_at = now(), "
        "ddl = CASE WHEN %s THEN coalesce(ddl || ', ', '') || 'tables created or dropped' ELSE ddl END WHERE run_id = %s",
        (changed, run_id),
    )
    _drop_event_trigger(conn)


def remove_triggers(conn, run_id: str | None = None) -> list[str]:
    """The capture triggers of ``run_id`` (None: of every run, as after a killed one)
    dropped; the log tables stay for the undo. Returns the tables they were on."""
    like = trigger_name(run_id, "%") if run_id else TRIGGER_PREFIX + "%"
    rows = query(
        conn,
        """
        SELECT t.tgname, n.nspname, c.relname FROM pg_trigger t
          JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND t.tgname LIKE %s""",
        (like,),
    )
    for tgname, schema, name in rows:
        scalar(conn, sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(tgname), sql.Identifier(schema, name)))
    for (function,) in query(
        conn,
        "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = to_regnamespace(%s) "
        "AND p.proname LIKE 'cap\\_%%' AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid)",
        (SCHEMA,),
    ):
        scalar(conn, f"DROP FUNCTION IF EXISTS {function}")
    return sorted({f"{s}.{n}" for _, s, n in rows})


def finish_killed(conn, keep: set[str] = frozenset()) -> list[str]:
    """Runs still capturing whose process is gone (a killed runner): their triggers
    removed and their capture ended; ``keep``: runs whose process lives. Called with
    staging's lock held; returns what was done, as sentences."""
    if scalar(conn, "SELECT to_regclass(%s)", (RUNS,)) is None:
        return []
    done = []
    for (run_id,) in query(conn, f"SELECT run_id FROM {RUNS} WHERE capturing ORDER BY started_at"):
        if run_id in keep:
            continue
        tables = remove_triggers(conn, run_id)
        scalar(
            conn, f"UPDATE {RUNS} SET capturing = false, finished_at = coalesce(finished_at, now()) WHERE run_id = %s", (run_id,)
        )
        done.append(f"Removed the capture triggers of the interrupted run {run_id} ({', '.join(tables) or 'none left'})")
    if done:
        _drop_event_trigger(conn)
    return done


def _drop_event_trigger(conn) -> None:
    """The DDL watch dropped once no run is captured (it is a database-wide object)."""
    if scalar(conn, f"SELECT count(*) FROM {RUNS} WHERE capturing") == 0 and scalar(
        conn, "SELECT count(*) FROM pg_event_trigger WHERE evtname IN (%s, %s)", (EVENT_TRIGGER, EVENT_TRIGGER + "_drop")
    ):
        scalar(conn, f"DROP EVENT TRIGGER IF EXISTS {EVENT_TRIGGER}")
        scalar(conn, f"DROP EVENT TRIGGER IF EXISTS {EVENT_TRIGGER}_drop")


def changed_columns(conn, run_id: str, tables: list[CapturedTable]) -> list[str]:
    """The captured tables whose columns differ from when the run started."""
    row = query(conn, f"SELECT columns_digest FROM {RUNS} WHERE run_id = %s", (run_id,))
    then = row[0][0] if row else {}
    now = shape(conn)
    return [t.qualified for t in tables if then.get(t.qualified) != _digest(now.get(t.qualified, ""))]


def readable(conn) -> bool:
    """Whether staging has an undo log at all."""
    try:
        return scalar(conn, "SELECT to_regclass(%s)", (RUNS,)) is not None
    except psycopg2.Error:
        return False


def marker(folder: Path, run_id: str) -> Path:
    """A file in the catalog's folder that says a run is being captured: the next
    operation looks in staging for capture triggers only where one is left."""
    return folder / f".capturing-{hashlib.sha256(run_id.encode()).hexdigest()[:16]}"


def markers(folder: Path) -> list[Path]:
    return sorted(folder.glob(".capturing-*"))


def write_marker(path: Path, run_id: str) -> None:
    """The marker names its run and the process capturing it: a run whose process still
    lives (an API transaction taking a point inside its body) is not a killed one."""
    path.write_text(json.dumps({"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname()}))


def marker_owner(path: Path) -> tuple[str | None, int | None, str | None]:
    """(run id, pid, host) a marker names; Nones where it cannot be read."""
    try:
        found = json.loads(path.read_text() or "{}")
        return found.get("run_id"), found.get("pid"), found.get("host")
    except (OSError, ValueError, AttributeError):
        return None, None, None


def resolve_table(conn, name: str) -> tuple[str, str] | None:
    """A table as a migration names it (``schema.table``, quoted where needed, or a name
    found on the search path): its schema and name, or None."""
    try:
        rows = query(
            conn,
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = to_regclass(%s) AND c.relkind IN ('r', 'p')",
            (name,),
        )
    except psycopg2.Error:
        conn.rollback()
        return None
    return (rows[0][0], rows[0][1]) if rows else None
