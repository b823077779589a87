"""The undo of one captured run (lib/undo/__init__.py): in one transaction, statement by
statement in reverse order of the run's, each table's rows put back where they still
hold what the run wrote:

- a row the run inserted is deleted if it is still exactly as inserted;
- a row it updated gets its before image back if it still holds the after image;
- a row it deleted is inserted again if no row has its key.

"Exactly" is by each row's text, every column as PostgreSQL prints it (so 1.0 and 1.00
differ). Every other row is a conflict: someone changed it after the run. Each step
returns the keys it changed, and a conflict is a key it was to change and did not, so a
row another session changes meanwhile is a conflict too, never overwritten. With
conflicts nothing is changed unless ``skip_conflicts``. Sequences are never moved back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import psycopg2
from psycopg2 import sql

from lib import faults
from lib.errors import UndoRefused
from lib.pg.codes import sqlstate
from lib.pg.db import query, scalar
from lib.undo.capture import RUNS, SCHEMA, CapturedTable, changed_columns


@dataclass(frozen=True)
class Conflict:
    table: str
    key: dict
    run_wrote: str | None  # the row as the run left it (None: the run deleted it)
    now: str | None  # the row as it is now (None: no row with that key)
    why: str = "changed after the run"  # or the constraint putting it back would break


@dataclass
class UndoResult:
    run_id: str
    deleted: dict[str, int] = field(default_factory=dict)
    restored: dict[str, int] = field(default_factory=dict)
    reinserted: dict[str, int] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    applied: bool = False
    # rows whose step broke a constraint, tried again once the other steps are done
    # (a child the run deleted by a cascade before its parent): (table, statement, op, log row, key) -> the error
    pending: dict[tuple, tuple] = field(default_factory=dict)


def _tables(conn, run_id: str) -> list[CapturedTable]:
    row = query(conn, f"SELECT tables, truncated, undone_at, ddl, capturing, uncaptured FROM {RUNS} WHERE run_id = %s", (run_id,))
    if not row:
        raise UndoRefused(
            f"Run {run_id} has no undo log in staging.",
            "See `python3 run_migration.py --status` for the runs that have one, or restore the run's point instead.",
        )
    tables, truncated, undone_at, ddl, capturing, uncaptured = row[0]
    if undone_at is not None:
        raise UndoRefused(
            f"Run {run_id} was undone already, at {undone_at:%Y-%m-%d %H:%M:%S %Z}.",
            "An undo is not undone: to have the run's changes again, run the migration again "
            "(or restore a point taken after the run).",
        )
    if capturing:
        raise UndoRefused(
            f"Run {run_id} is still being captured (its migration is running, or was killed and nothing has run since).",
            "Wait for the run to end; after a killed run, `python3 rollback_manager.py cleanup` ends its capture.",
        )
    if truncated:
        raise UndoRefused(
            f"Run {run_id} cannot be undone: {truncated} was truncated while it was captured, and a TRUNCATE "
            "leaves no rows to put back.",
            "Restore the run's point instead (`python3 run_migration.py FILE --rollback`).",
        )
    if uncaptured:
        raise UndoRefused(
            f"Run {run_id} cannot be undone: it wrote to {uncaptured}, which has no primary key (or replica identity "
            "index), so its rows could not be captured.",
            "Restore the run's point instead (`python3 run_migration.py FILE --rollback`).",
        )
    if ddl:
        raise UndoRefused(
            f"Run {run_id} cannot be undone: it changed the schema ({ddl}), and the undo puts back rows, not schema.",
            "Restore the run's point instead (`python3 run_migration.py FILE --rollback`).",
        )
    tables = tables if isinstance(tables, list) else json.loads(tables)
    found = [CapturedTable(t["schema"], t["name"], tuple(t["key"]), t["log"], t.get("by_row", False)) for t in tables]
    changed = changed_columns(conn, run_id, found)
    if changed:
        raise UndoRefused(
            f"Run {run_id} cannot be undone: the columns of {', '.join(changed)} changed since the run started, "
            "so its logged rows no longer fit.",
            "Restore the run's point instead (`python3 run_migration.py FILE --rollback`).",
        )
    return found


def _columns(conn, table: CapturedTable) -> tuple[list[str], list[str]]:
    """The columns a row is written back with (generated ones are computed again), and
    the identity columns GENERATED ALWAYS (inserted with OVERRIDING SYSTEM VALUE, never
    updated: an update cannot have changed them)."""
    rows = query(
        conn,
        """
        SELECT a.attname, a.attidentity, a.attgenerated FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum""",
        (table.schema, table.name),
    )
    return [r[0] for r in rows if not r[2]], [r[0] for r in rows if r[1] == "a"]


def _key_json(alias: str, table: CapturedTable, image: str | None = None) -> sql.Composable:
    """The key of a row as JSON: of table row ``alias``, or of ``alias``'s ``image`` column."""
    parts = []
    for k in table.key:
        value = (
            sql.SQL("({}.{}).{}").format(sql.Identifier(alias), sql.Identifier(image), sql.Identifier(k))
            if image
            else (sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(k)))
        )
        parts += [sql.Literal(k), value]
    return sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(parts))


def _key_match(table_alias: str, table: CapturedTable, log_alias: str, image: str) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = ({}.{}).{}").format(
            sql.Identifier(table_alias), sql.Identifier(k), sql.Identifier(log_alias), sql.Identifier(image), sql.Identifier(k)
        )
        for k in table.key
    )


def _log(t: CapturedTable) -> sql.Composable:
    """The run's log of ``t`` with each image as text (old_text, new_text) and as a row
    of the table (old_row, new_row); ``lid`` the log row's position."""
    table = sql.Identifier(t.schema, t.name)
    return sql.SQL(
        "(SELECT x.ctid AS lid, x.statement, x.op, x.old_row AS old_text, x.new_row AS new_text, "
        "x.old_row::{table} AS old_row, x.new_row::{table} AS new_row FROM {log} x)"
    ).format(table=table, log=sql.Identifier(SCHEMA, t.log))


def _steps(conn, tables: list[CapturedTable]) -> list[tuple[int, CapturedTable]]:
    """(statement, table) for every statement of the run, newest first."""
    found = []
    for t in tables:
        for (statement,) in query(conn, sql.SQL("SELECT DISTINCT statement FROM {}").format(sql.Identifier(SCHEMA, t.log))):
            found.append((int(statement), t))
    return sorted(found, key=lambda s: s[0], reverse=True)


def _undo_statement(conn, t: CapturedTable, statement: int, columns: list[str], always: list[str], result: UndoResult) -> None:
    log = _log(t)
    table = sql.Identifier(t.schema, t.name)
    st = sql.Literal(statement)
    # rows the run inserted: deleted where still exactly as inserted
    deleted = _step(
        conn,
        lambda only: sql.SQL(
            "DELETE FROM {table} t USING {log} l WHERE l.statement = {st} AND l.op = 'I'{only} AND {match} "
            "AND t::text = l.new_text RETURNING {key}"
        ).format(table=table, log=log, st=st, only=only, match=_key_match("t", t, "l", "new_row"), key=_key_json("t", t)),
        t,
        statement,
        "I",
        result,
    )
    _conflicts(conn, t, statement, "I", {json.dumps(r[0], sort_keys=True) for r in deleted}, result)
    result.deleted[t.qualified] = result.deleted.get(t.qualified, 0) + len(deleted)
    # rows it updated: their before image back where they still hold the after image
    # a row trigger pairs an update's images exactly, so its key may have changed too
    settable = [c for c in columns if (t.by_row or c not in t.key) and c not in always]
    if settable:
        restored = _step(
            conn,
            lambda only: sql.SQL(
                "UPDATE {table} t SET ({cols}) = ROW({values}) FROM {log} l WHERE l.statement = {st} AND l.op = 'U'{only} "
                "AND {match} AND t::text = l.new_text RETURNING {key}"
            ).format(
                only=only,
                table=table,
                cols=sql.SQL(", ").join(sql.Identifier(c) for c in settable),
                values=sql.SQL(", ").join(sql.SQL("(l.old_row).{}").format(sql.Identifier(c)) for c in settable),
                log=log,
                st=st,
                match=_key_match("t", t, "l", "new_row"),
                key=_key_json("t", t),
            ),
            t,
            statement,
            "U",
            result,
        )
    else:
        restored = []
    _conflicts(conn, t, statement, "U", {json.dumps(r[0], sort_keys=True) for r in restored}, result)
    result.restored[t.qualified] = result.restored.get(t.qualified, 0) + len(restored)
    # rows it deleted: inserted again where no row has their key
    reinserted = _step(
        conn,
        lambda only: sql.SQL(
            "INSERT INTO {table} ({cols}) {overriding} SELECT {values} FROM {log} l WHERE l.statement = {st} AND l.op = 'D'{only} "
            "ON CONFLICT DO NOTHING RETURNING {key}"
        ).format(
            only=only,
            table=table,
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
            overriding=sql.SQL("OVERRIDING SYSTEM VALUE" if always else ""),
            values=sql.SQL(", ").join(sql.SQL("(l.old_row).{}").format(sql.Identifier(c)) for c in columns),
            log=log,
            st=st,
            key=_key_json(t.name, t),
        ),
        t,
        statement,
        "D",
        result,
    )
    _conflicts(conn, t, statement, "D", {json.dumps(r[0], sort_keys=True) for r in reinserted}, result)
    result.reinserted[t.qualified] = result.reinserted.get(t.qualified, 0) + len(reinserted)


INTEGRITY = {"23502", "23503", "23505", "23514", "23P01"}  # not null, foreign key, unique, check, exclusion


def _step(conn, build, t: CapturedTable, statement: int, op: str, result: UndoResult) -> list:
    """One step, set-based. When it breaks a constraint (another session's row refers to
    a row the run inserted, say), once more row by row, each in a savepoint: the rows
    that break one are conflicts, with the server's reason, and the others are done."""
    scalar(conn, "SAVEPOINT undo_step")
    try:
        rows = query(conn, build(sql.SQL("")))
        scalar(conn, "RELEASE SAVEPOINT undo_step")
        return rows
    except psycopg2.Error as exc:
        if sqlstate(exc) not in INTEGRITY:
            raise
        scalar(conn, "ROLLBACK TO SAVEPOINT undo_step")
    image = "old_row" if op == "D" else "new_row"
    done = []
    for ctid, key in query(
        conn,
        sql.SQL("SELECT l.lid::text, {} FROM {} l WHERE l.statement = {} AND l.op = {}").format(
            _key_json("l", t, image), _log(t), sql.Literal(statement), sql.Literal(op)
        ),
    ):
        scalar(conn, "SAVEPOINT undo_row")
        try:
            done += query(conn, build(sql.SQL(" AND l.lid = {}::tid").format(sql.Literal(ctid))))
            scalar(conn, "RELEASE SAVEPOINT undo_row")
        except psycopg2.Error as exc:
            if sqlstate(exc) not in INTEGRITY:
                raise
            scalar(conn, "ROLLBACK TO SAVEPOINT undo_row")
            result.pending[(t.qualified, statement, op, ctid, json.dumps(key, sort_keys=True))] = (
                build,
                t,
                key,
                str(exc).strip().splitlines()[0],
            )
    scalar(conn, "RELEASE SAVEPOINT undo_step")
    return done


def _conflicts(conn, t: CapturedTable, statement: int, op: str, done: set[str], result: UndoResult) -> None:
    """The rows of ``op`` in ``statement`` that the step was to change and did not."""
    image = "old_row" if op == "D" else "new_row"
    rows = query(
        conn,
        sql.SQL(
            "SELECT {key}, l.{text}, (SELECT t::text FROM {table} t WHERE {match}) "
            "FROM {log} l WHERE l.statement = {st} AND l.op = {op}"
        ).format(
            key=_key_json("l", t, image),
            text=sql.Identifier(image.replace("_row", "_text")),
            table=sql.Identifier(t.schema, t.name),
            match=_key_match("t", t, "l", image),
            log=_log(t),
            st=sql.Literal(statement),
            op=sql.Literal(op),
        ),
    )
    waiting = {k[4] for k in result.pending if k[:3] == (t.qualified, statement, op)}
    for key, wrote, now in rows:
        k = json.dumps(key, sort_keys=True)
        if k not in done and k not in waiting:
            result.conflicts.append(Conflict(t.qualified, key, None if op == "D" else wrote, now))


_COUNTS = {"I": "deleted", "U": "restored", "D": "reinserted"}


def _retry_pending(conn, result: UndoResult) -> None:
    """The rows a constraint held back, tried again until none more goes through; those
    left are conflicts with the constraint's reason."""
    progress = True
    while result.pending and progress:
        progress = False
        for marker, (build, t, key, _why) in list(result.pending.items()):
            table, _statement, op, lid, _k = marker
            scalar(conn, "SAVEPOINT undo_row")
            try:
                done = query(conn, build(sql.SQL(" AND l.lid = {}::tid").format(sql.Literal(lid))))
                scalar(conn, "RELEASE SAVEPOINT undo_row")
            except psycopg2.Error as exc:
                if sqlstate(exc) not in INTEGRITY:
                    raise
                scalar(conn, "ROLLBACK TO SAVEPOINT undo_row")
                result.pending[marker] = (build, t, key, str(exc).strip().splitlines()[0])
                continue
            del result.pending[marker]
            progress = True
            if done:
                counts = getattr(result, _COUNTS[op])
                counts[table] = counts.get(table, 0) + 1
            else:
                result.conflicts.append(Conflict(table, key, None, None))
    for (table, _statement, _op, _lid, _k), (_build, _t, key, why) in result.pending.items():
        result.conflicts.append(Conflict(table, key, None, None, why))
    result.pending.clear()


_ENABLE = {"O": "ENABLE TRIGGER", "A": "ENABLE ALWAYS TRIGGER", "R": "ENABLE REPLICA TRIGGER"}


def _quiet_triggers(conn, tables: list[CapturedTable]) -> list[tuple[CapturedTable, str, str]]:
    """The tables' own enabled triggers switched off inside the undo's transaction (a
    trigger that wrote elsewhere when the run wrote must not write again when the run's
    rows are put back; foreign keys are internal triggers and stay on). Returns what to
    switch on again, as it was, before the commit."""
    quiet = []
    for t in tables:
        for name, enabled in query(
            conn,
            """
            SELECT tg.tgname, tg.tgenabled FROM pg_trigger tg
              JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = %s AND c.relname = %s AND NOT tg.tgisinternal AND tg.tgenabled <> 'D'
               AND tg.tgparentid = 0""",
            (t.schema, t.name),
        ):
            scalar(
                conn, sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(sql.Identifier(t.schema, t.name), sql.Identifier(name))
            )
            quiet.append((t, name, enabled))
    return quiet


def _relax_not_valid(conn, tables: list[CapturedTable]) -> list[tuple[CapturedTable, str, str, str | None]]:
    """The tables' NOT VALID check and foreign key constraints, dropped inside the undo's
    transaction where the run deleted or updated rows: a row put back held its values
    before the run, and may be one of the rows such a constraint was never checked on
    (an insert would check it). Returns what to add again, NOT VALID, as it was."""
    relaxed = []
    for t in tables:
        if not query(conn, sql.SQL("SELECT 1 FROM {} WHERE op <> 'I' LIMIT 1").format(sql.Identifier(SCHEMA, t.log))):
            continue
        for name, definition, comment in query(
            conn,
            """
            SELECT co.conname, pg_get_constraintdef(co.oid), obj_description(co.oid, 'pg_constraint')
              FROM pg_constraint co JOIN pg_class c ON c.oid = co.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = %s AND c.relname = %s AND co.contype IN ('c', 'f') AND NOT co.convalidated
               AND co.conislocal AND co.coninhcount = 0 AND co.conparentid = 0""",
            (t.schema, t.name),
        ):
            scalar(
                conn, sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier(t.schema, t.name), sql.Identifier(name))
            )
            relaxed.append((t, name, definition, comment))
    return relaxed


def _restore_not_valid(conn, relaxed: list[tuple[CapturedTable, str, str, str | None]]) -> None:
    for t, name, definition, comment in relaxed:
        table = sql.Identifier(t.schema, t.name)
        scalar(
            conn, sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} " + definition.replace("%", "%%")).format(table, sql.Identifier(name))
        )
        if comment is not None:
            scalar(
                conn, sql.SQL("COMMENT ON CONSTRAINT {} ON {} IS {}").format(sql.Identifier(name), table, sql.Literal(comment))
            )


def _wake_triggers(conn, quiet: list[tuple[CapturedTable, str, str]]) -> None:
    for t, name, enabled in quiet:
        scalar(
            conn,
            sql.SQL("ALTER TABLE {} " + _ENABLE[enabled] + " {}").format(sql.Identifier(t.schema, t.name), sql.Identifier(name)),
        )


def undo(conn, run_id: str, *, skip_conflicts: bool = False, dry_run: bool = False, before_commit=None) -> UndoResult:
    """Revert the run's captured changes in one transaction on ``conn`` (committed unless
    ``dry_run``, or conflicts without ``skip_conflicts``: then rolled back, nothing changed).
    ``before_commit(conn, result)`` writes what else belongs to the same transaction."""
    was = conn.autocommit
    conn.autocommit = False
    result = UndoResult(run_id)
    try:
        if scalar(conn, "SELECT to_regclass(%s)", (RUNS,)) is None:
            raise UndoRefused(
                "Staging has no undo log: no run was captured here (or a point restore took staging back before one).",
                "Restore the run's point instead.",
            )
        scalar(conn, f"SELECT 1 FROM {RUNS} WHERE run_id = %s FOR UPDATE", (run_id,))  # one undo at a time
        tables = _tables(conn, run_id)
        shapes = {t.log: _columns(conn, t) for t in tables}
        quiet = _quiet_triggers(conn, tables)
        relaxed = _relax_not_valid(conn, tables)
        for statement, t in _steps(conn, tables):
            _undo_statement(conn, t, statement, *shapes[t.log], result)
        _retry_pending(conn, result)
        _restore_not_valid(conn, relaxed)
        _wake_triggers(conn, quiet)
        if not dry_run:
            faults.pause("undo applied")
        if dry_run or (result.conflicts and not skip_conflicts):
            conn.rollback()
            return result
        summary = {
            "deleted": result.deleted,
            "restored": result.restored,
            "reinserted": result.reinserted,
            "conflicts": len(result.conflicts),
        }
        scalar(conn, f"UPDATE {RUNS} SET undone_at = now(), undone = %s WHERE run_id = %s", (json.dumps(summary), run_id))
        for t in tables:  # the log has served: an undo is not undone
            scalar(conn, sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(SCHEMA, t.log)))
        if before_commit is not None:
            before_commit(conn, result)
        conn.commit()
        result.applied = True
        return result
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = was
