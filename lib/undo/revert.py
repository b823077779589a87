"""The undo of one captured run (lib/undo/__init__.py), in one transaction.

The log is read per key first: for every key the run touched, its image before the
run's first statement on it (none if the run inserted it) and after its last (none if
the run deleted it), in the order of the run's statements. That is what replaying the
log backwards statement by statement would give, in three set-based statements per
table whatever the number of the run's statements:

- a row the run inserted is deleted if it is still exactly as the run left it;
- a row it changed gets its image before the run back if it still holds the run's last;
- a row it deleted is inserted again if no row has its key.

"Exactly" is by each row's text, every column as PostgreSQL prints it (so 1.0 and 1.00
differ). Every other row is a conflict: someone changed it after the run. Each step
marks the keys it changed, and a conflict is a key it was to change and did not, so a
row another session changes meanwhile is a conflict too, never overwritten. A step that
breaks a constraint (a foreign key whose parent comes back in a later step) is done
row by row, and the rows held back are tried again once the others are done. With
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
from lib.undo.capture import OUTPUT_SETTINGS, RUNS, SCHEMA, CapturedTable, changed_columns, key_types, new_key, old_key


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
    # (a child the run deleted by a cascade before its parent): (table, step, key) -> (table, the error)
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
            f"Run {run_id} cannot be undone: it wrote to {uncaptured}, whose rows were not captured (a table without "
            "a primary key or replica identity index, or one the migration's TABLES leaves out).",
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


def _net_name(t: CapturedTable) -> str:
    return "rb_undo_net_" + t.log.removeprefix("log_")


def _net(conn, t: CapturedTable, shape: Shape) -> None:
    """The table's net effect of the run, as a temporary table of the undo's transaction:
    each key (k_*) the run touched, its image before the run (none: the run inserted the
    row), after it (none: the run deleted it), and whether a step changed it (done)."""
    keys = [f"k_{i}" for i in range(len(t.key))]
    log = sql.Identifier(SCHEMA, t.log)
    k = sql.SQL(", ").join(sql.Identifier(c) for c in keys)
    net = sql.Identifier(_net_name(t))
    # the order is found on narrow rows (key, statement, log row); the images are read
    # once, by their log row, for the first and the last event of each key
    scalar(
        conn,
        sql.SQL(
            "CREATE TEMPORARY TABLE {net} ON COMMIT DROP AS "
            "WITH ev AS (SELECT {ok}, statement, 0 AS kind, ctid AS lid FROM {log} WHERE old_row IS NOT NULL "
            "            UNION ALL SELECT {nk}, statement, 1, ctid FROM {log} WHERE new_row IS NOT NULL), "
            "ends AS (SELECT DISTINCT ON ({k}) {k}, first_value(kind) OVER w AS fk, first_value(lid) OVER w AS fl, "
            "                last_value(kind) OVER w AS lk, last_value(lid) OVER w AS ll FROM ev "
            "         WINDOW w AS (PARTITION BY {k} ORDER BY statement, kind ROWS BETWEEN UNBOUNDED PRECEDING "
            "                      AND UNBOUNDED FOLLOWING)) "
            "SELECT {k}, CASE WHEN fk = 0 THEN (SELECT x.old_row FROM {log} x WHERE x.ctid = e.fl) END AS before, "
            "       CASE WHEN lk = 1 THEN (SELECT x.new_row FROM {log} x WHERE x.ctid = e.ll) END AS after, false AS done "
            "  FROM ends e"
        ).format(
            net=net,
            k=k,
            ok=sql.SQL(", ").join(
                sql.SQL("{}::{} AS {}").format(sql.Identifier(c), sql.SQL(shape.key_types[i]), sql.Identifier(f"k_{i}"))
                for i, c in enumerate(old_key(t))
            ),
            nk=sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Identifier(c), sql.SQL(shape.key_types[i])) for i, c in enumerate(new_key(t))
            ),
            log=log,
        ),
    )
    scalar(conn, sql.SQL("CREATE INDEX ON {} ({})").format(net, k))


def _last_statement(conn, t: CapturedTable) -> int:
    return scalar(conn, sql.SQL("SELECT coalesce(max(statement), 0) FROM {}").format(sql.Identifier(SCHEMA, t.log))) or 0


def _match(t: CapturedTable) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("rb_undo_row.{} = n.{}").format(sql.Identifier(k), sql.Identifier(f"k_{i}")) for i, k in enumerate(t.key)
    )


def _key_json(t: CapturedTable) -> sql.Composable:
    parts = []
    for i, k in enumerate(t.key):
        parts += [sql.Literal(k), sql.SQL("n.{}").format(sql.Identifier(f"k_{i}"))]
    return sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(parts))


STEPS = {  # which keys each step is for, and what it counts
    "delete": ("NOT n.done AND n.before IS NULL AND n.after IS NOT NULL", "deleted"),
    "update": ("NOT n.done AND n.before IS NOT NULL AND n.after IS NOT NULL AND n.before <> n.after", "restored"),
    "insert": ("NOT n.done AND n.before IS NOT NULL AND n.after IS NULL", "reinserted"),
}


@dataclass(frozen=True)
class Shape:
    """How a table's rows are written back."""

    columns: list[str]  # not generated (those are computed again)
    always: list[str]  # identity GENERATED ALWAYS: inserted with OVERRIDING SYSTEM VALUE, never updated
    key_types: list[str]
    unreferenced: sql.Composable  # a row is deleted only where no row refers to it (see _unreferenced)


def _unreferenced(conn, t: CapturedTable) -> sql.Composable:
    """A condition on rb_undo_row: no row of any table refers to it by a foreign key. The
    foreign keys stay on during the undo, so deleting a row that another session's row
    refers to would cascade into that row (ON DELETE CASCADE, SET NULL): such a row is not
    deleted, and is a conflict. A row the run's own rows refer to goes in a later pass,
    once they are deleted."""
    parts = []
    for child_schema, child, pairs, own in query(
        conn,
        """
        SELECT cn.nspname, cc.relname,
               array(SELECT ARRAY[ca.attname, pa.attname]
                       FROM unnest(co.conkey, co.confkey) AS k(c, p)
                       JOIN pg_attribute ca ON ca.attrelid = co.conrelid AND ca.attnum = k.c
                       JOIN pg_attribute pa ON pa.attrelid = co.confrelid AND pa.attnum = k.p),
               co.conrelid = co.confrelid
          FROM pg_constraint co
          JOIN pg_class pc ON pc.oid = co.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
          JOIN pg_class cc ON cc.oid = co.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
         WHERE co.contype = 'f' AND pn.nspname = %s AND pc.relname = %s AND co.conparentid = 0""",
        (t.schema, t.name),
    ):
        same = sql.SQL(" AND ").join(
            sql.SQL("rb_undo_ref.{} = rb_undo_row.{}").format(sql.Identifier(c), sql.Identifier(p)) for c, p in pairs
        )
        itself = sql.SQL(" AND rb_undo_ref.ctid <> rb_undo_row.ctid") if own else sql.SQL("")
        parts.append(
            sql.SQL(" AND NOT EXISTS (SELECT 1 FROM {} rb_undo_ref WHERE {}{})").format(
                sql.Identifier(child_schema, child), same, itself
            )
        )
    return sql.SQL("").join(parts)


def _statement(t: CapturedTable, step: str, shape: Shape, only: sql.Composable) -> sql.Composable:
    """One step over the keys of ``step`` (and ``only``), marking in the net table the
    keys it changed; returns a row per key changed."""
    table = sql.Identifier(t.schema, t.name)
    net = sql.Identifier(_net_name(t))
    which = sql.SQL(STEPS[step][0])
    returning = sql.SQL(", ").join(sql.SQL("rb_undo_row.{}").format(sql.Identifier(k)) for k in t.key)
    only_table = sql.SQL("ONLY " if t.by_row else "")  # an inheritance parent's statement would reach its children
    if step == "delete":
        change = sql.SQL(
            "DELETE FROM {only_table}{table} rb_undo_row USING {net} n WHERE {which}{only} AND {match} "
            "AND rb_undo_row::text = n.after{unreferenced} RETURNING {r}"
        ).format(
            only_table=only_table,
            table=table,
            net=net,
            which=which,
            only=only,
            match=_match(t),
            unreferenced=shape.unreferenced,
            r=returning,
        )
    elif step == "update":
        # each image becomes a row once (OFFSET 0 keeps the planner from casting it per column)
        settable = [c for c in shape.columns if c not in shape.always]
        change = sql.SQL(
            "UPDATE {only_table}{table} rb_undo_row SET ({cols}) = ROW({values}) "
            "FROM (SELECT n.*, n.before::{table} AS b FROM {net} n WHERE {which}{only} OFFSET 0) n "
            "WHERE {match} AND rb_undo_row::text = n.after RETURNING {r}"
        ).format(
            only_table=only_table,
            table=table,
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in settable),
            values=sql.SQL(", ").join(sql.SQL("(n.b).{}").format(sql.Identifier(c)) for c in settable),
            net=net,
            which=which,
            only=only,
            match=_match(t),
            r=returning,
        )
    else:
        change = sql.SQL(
            "INSERT INTO {table} AS rb_undo_row ({cols}) {overriding} "
            "SELECT {values} FROM (SELECT n.before::{table} AS b FROM {net} n WHERE {which}{only} OFFSET 0) n "
            "ON CONFLICT DO NOTHING RETURNING {r}"
        ).format(
            table=table,
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in shape.columns),
            overriding=sql.SQL("OVERRIDING SYSTEM VALUE" if shape.always else ""),
            values=sql.SQL(", ").join(sql.SQL("(n.b).{}").format(sql.Identifier(c)) for c in shape.columns),
            net=net,
            which=which,
            only=only,
            r=returning,
        )
    n = len(t.key)
    return sql.SQL(
        "WITH changed ({done}) AS ({change}) UPDATE {net} n SET done = true FROM changed d WHERE {same} RETURNING 1"
    ).format(
        done=sql.SQL(", ").join(sql.Identifier(f"d_{i}") for i in range(n)),
        change=change,
        net=net,
        same=sql.SQL(" AND ").join(
            sql.SQL("n.{} = d.{}").format(sql.Identifier(f"k_{i}"), sql.Identifier(f"d_{i}")) for i in range(n)
        ),
    )


INTEGRITY = {"23502", "23503", "23505", "23514", "23P01"}  # not null, foreign key, unique, check, exclusion


def _step(conn, t: CapturedTable, step: str, shape: Shape, result: UndoResult) -> None:
    """One step, set-based. When it breaks a constraint (another session's row refers to
    a row the run inserted, say), once more key by key, each in a savepoint: the keys
    that break one wait for a second try (_retry_pending), and the others are done."""
    counts = getattr(result, STEPS[step][1])
    scalar(conn, "SAVEPOINT undo_step")
    try:
        done = len(query(conn, _statement(t, step, shape, sql.SQL(""))))
        scalar(conn, "RELEASE SAVEPOINT undo_step")
        counts[t.qualified] = counts.get(t.qualified, 0) + done
        return
    except psycopg2.Error as exc:
        if sqlstate(exc) not in INTEGRITY:
            raise
        scalar(conn, "ROLLBACK TO SAVEPOINT undo_step")
    texts = sql.SQL(", ").join(sql.SQL("n.{}::text").format(sql.Identifier(f"k_{i}")) for i in range(len(t.key)))
    for key, *text in query(
        conn,
        sql.SQL("SELECT {}, {} FROM {} n WHERE {}").format(
            _key_json(t), texts, sql.Identifier(_net_name(t)), sql.SQL(STEPS[step][0])
        ),
    ):
        if _one_key(conn, t, step, shape, key, text, result):
            counts[t.qualified] = counts.get(t.qualified, 0) + 1


def _one_key(conn, t: CapturedTable, step: str, shape: Shape, key: dict, text: list, result: UndoResult) -> bool:
    """The step for one key (``text``: its columns as text, exact whatever their type), in
    a savepoint; a key that breaks a constraint waits (pending)."""
    only = sql.SQL("").join(
        sql.SQL(" AND n.{} = {}::{}").format(sql.Identifier(f"k_{i}"), sql.Literal(value), sql.SQL(shape.key_types[i]))
        for i, value in enumerate(text)
    )
    marker = (t.qualified, step, json.dumps(key, sort_keys=True))
    scalar(conn, "SAVEPOINT undo_row")
    try:
        done = bool(query(conn, _statement(t, step, shape, only)))
        scalar(conn, "RELEASE SAVEPOINT undo_row")
        result.pending.pop(marker, None)
        return done
    except psycopg2.Error as exc:
        if sqlstate(exc) not in INTEGRITY:
            raise
        scalar(conn, "ROLLBACK TO SAVEPOINT undo_row")
        result.pending[marker] = (t, key, text, str(exc).strip().splitlines()[0])
        return False


def _retry_pending(conn, shapes: dict[str, Shape], result: UndoResult) -> None:
    """The keys a constraint held back, tried again until none more goes through; those
    left are conflicts with the constraint's reason."""
    progress = True
    while result.pending and progress:
        progress = False
        for marker, (t, key, text, _why) in list(result.pending.items()):
            step = marker[1]
            if _one_key(conn, t, step, shapes[t.log], key, text, result):
                counts = getattr(result, STEPS[step][1])
                counts[t.qualified] = counts.get(t.qualified, 0) + 1
                progress = True
            elif marker not in result.pending:  # no constraint now, and nothing done: a conflict (below)
                progress = True


def _conflicts(conn, t: CapturedTable, result: UndoResult) -> None:
    """The keys of the table's steps that no step changed and that no constraint holds
    back: rows someone changed after the run, with what the run left and what is there."""
    held = {m[2]: entry[3] for m, entry in result.pending.items() if m[0] == t.qualified}
    rows = query(
        conn,
        sql.SQL(
            "SELECT {key}, n.after, (SELECT rb_undo_row::text FROM {only_table}{table} rb_undo_row WHERE {match} LIMIT 1) "
            "FROM {net} n "
            "WHERE NOT n.done AND (({a}) OR ({b}) OR ({c}))"
        ).format(
            key=_key_json(t),
            only_table=sql.SQL("ONLY " if t.by_row else ""),
            table=sql.Identifier(t.schema, t.name),
            match=_match(t),
            net=sql.Identifier(_net_name(t)),
            a=sql.SQL(STEPS["delete"][0]),
            b=sql.SQL(STEPS["update"][0]),
            c=sql.SQL(STEPS["insert"][0]),
        ),
    )
    for key, wrote, now in rows:
        why = held.get(json.dumps(key, sort_keys=True))
        if why is None and now is not None and now == wrote:  # as the run left it: only the guard kept it
            why = "another row refers to it by a foreign key"
        result.conflicts.append(Conflict(t.qualified, key, wrote, now, why or Conflict.why))


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
        scalar(conn, sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(table, sql.Identifier(name)) + sql.SQL(definition))
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
        # each key looked up by the table's own index: the undo costs what the run
        # changed, not what the table holds (a hash join would read every row)
        for name, value in OUTPUT_SETTINGS:  # images are read back as they were written (capture.OUTPUT_SETTINGS)
            scalar(conn, "SELECT set_config(%s, %s, true)", (name, value))
        scalar(conn, "SET CONSTRAINTS ALL IMMEDIATE")  # a deferred foreign key fails its step, not the commit
        scalar(conn, "SET LOCAL enable_hashjoin = off")
        scalar(conn, "SET LOCAL enable_mergejoin = off")
        shapes = {t.log: Shape(*_columns(conn, t), key_types(conn, t), _unreferenced(conn, t)) for t in tables}
        quiet = _quiet_triggers(conn, tables)
        relaxed = _relax_not_valid(conn, tables)
        # the table the run wrote last first: children it inserted after their parents
        # are deleted first, parents it deleted after their children come back first;
        # what a foreign key still holds back is tried again at the end
        order = sorted(tables, key=lambda t: _last_statement(conn, t), reverse=True)
        for t in order:
            _net(conn, t, shapes[t.log])
        deleted = -1
        while deleted != sum(result.deleted.values()):  # again while a pass deletes: rows their children held
            deleted = sum(result.deleted.values())
            for t in order:
                _step(conn, t, "delete", shapes[t.log], result)
        for step in ("update", "insert"):
            for t in order:
                _step(conn, t, step, shapes[t.log], result)
        _retry_pending(conn, shapes, result)
        for t in order:
            _conflicts(conn, t, result)
        result.pending.clear()
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
