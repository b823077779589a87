"""Undo of one migration run (rollback_manager.py undo RUN, the API's manager.undo and
the runner's automatic rollback): exactly the run's captured changes reverted in one
transaction, every other session's writes kept (lib/undo). Also the runs' list for
run_migration.py --status."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

import psycopg2
from psycopg2 import sql

from lib.config import Settings
from lib.errors import ConfigError, DatabaseError, RollbackError, UndoRefused
from lib.interaction import Confirmer, Reporter
from lib.migrate import ledger
from lib.operations.scaffold import Operation, operation
from lib.pg.db import connection, query, scalar
from lib.points.catalog import Catalog
from lib.undo import capture, revert

log = logging.getLogger(__name__)

AVAILABLE = "available"
UNDONE = "undone"
SHOWN_CONFLICTS = 20


@dataclass
class Run:
    run_id: str
    migration_id: str | None
    started_at: str
    finished_at: str | None
    tables: list[str]
    without_key: list[str]
    undo: str  # available | undone | unavailable: why | capturing
    undone_at: str | None = None
    undone: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _when(value) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _why_not(truncated, ddl, capturing, uncaptured) -> str | None:
    if capturing:
        return "capturing"
    if uncaptured:
        return f"unavailable: the run wrote to {uncaptured}, whose rows were not captured"
    if truncated:
        return f"unavailable: {truncated} truncated during the run"
    if ddl:
        return f"unavailable: the run changed the schema ({ddl})"
    return None


def runs(settings: Settings) -> list[Run]:
    """Every captured run in staging, oldest first; reads only."""
    try:
        with connection(settings.staging(), readonly=True, application_name="rollback-toolkit undo log") as conn:
            if not capture.readable(conn):
                return []
            rows = query(
                conn,
                f"SELECT run_id, migration_id, started_at, finished_at, tables, without_key, truncated, ddl, capturing, "
                f"uncaptured, undone_at, undone FROM {capture.RUNS} ORDER BY started_at",
            )
    except psycopg2.Error as exc:
        raise DatabaseError(
            f"Could not read the undo log ({capture.RUNS}) in {settings.staging().masked()}: {exc}".strip(),
            f"The role needs USAGE on the schema {capture.SCHEMA} and SELECT on its tables.",
        ) from exc
    found = []
    for (
        run_id,
        migration_id,
        started,
        finished,
        tables,
        without,
        truncated,
        ddl,
        capturing,
        uncaptured,
        undone_at,
        undone,
    ) in rows:
        state = UNDONE if undone_at is not None else (_why_not(truncated, ddl, capturing, uncaptured) or AVAILABLE)
        found.append(
            Run(
                run_id,
                migration_id,
                _when(started),
                _when(finished),
                [f"{t['schema']}.{t['name']}" for t in tables],
                list(without or []),
                state,
                _when(undone_at),
                undone,
            )
        )
    return found


def new_run_id(migration_id: str) -> str:
    """The migration's id and the moment, to the millisecond (two runs in one second differ)."""
    now = time.time()
    return f"{migration_id}@{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}"


@dataclass(frozen=True)
class CapturePlan:
    """A run's tables, read before anything is done: those captured, and those without a
    key (a write of the run to one of them makes its undo unavailable)."""

    tables: tuple[tuple[str, str], ...]
    without_key: tuple[tuple[str, str], ...]  # watched, not captured: no key, or left out by TABLES


def plan_capture(
    settings: Settings, ui: Reporter, migration_id: str, declared: list[str] | None, mode: str
) -> CapturePlan | None:
    """``declared``: the tables a migration names (``TABLES = ["schema.table", ...]``); else
    every table of staging's user schemas. ``mode``: on (refuse when one has no key),
    keyed (capture the others, and say so), off (None: no undo log)."""
    if mode == "off":
        return None
    with connection(settings.staging(), readonly=True, application_name="rollback-toolkit undo plan") as conn:
        if declared:
            tables = []
            for name in declared:
                found = capture.resolve_table(conn, name)
                if found is None:
                    raise ConfigError(
                        f"{migration_id} declares the table {name!r} (TABLES), and staging has no such table.",
                        "Fix TABLES in the migration file; nothing was run.",
                    )
                tables.append(found)
            tables = capture.with_members(conn, tables)  # a partition or a child written by name is the run's too
            # every other table is watched: a write of the run to one makes its undo unavailable
            others = [t for t in capture.user_tables(conn) if t not in tables]
        else:
            tables, others = capture.user_tables(conn), []
        usable, without = capture.plan(conn, "", tables)
        names = [f"{s}.{n}" for s, n in without]
    if without and mode == "on":
        raise ConfigError(
            f"{migration_id} would run with an undo log, and {len(without)} of its tables have no primary key (or replica "
            f"identity index), so their rows could not be found again: {', '.join(names)}.",
            "Give them a key, name the migration's tables (TABLES = [...] in its file) to leave them out, run with "
            "--undo-keyed-only (a write to one of them makes the undo unavailable) or --no-undo (the point alone). "
            "Nothing was run.",
        )
    if without:
        ui.warn(f"No undo for {', '.join(names)} (no key): a write of the run to one of them makes its undo unavailable.")
    return CapturePlan(tuple((t.schema, t.name) for t in usable), tuple(without) + tuple(others))


def start_capture(settings: Settings, ui: Reporter, plan: CapturePlan, migration_id: str) -> str:
    """The run's capture installed just before it runs; returns the run's id. A marker in
    the catalog's folder lets the next operation remove the triggers of a killed run."""
    run_id = new_run_id(migration_id)
    marker = capture.marker(Catalog(settings.backup_dir).ensure().root, run_id)
    capture.write_marker(marker, run_id)
    try:
        with connection(settings.staging(), application_name="rollback-toolkit undo capture") as conn:
            usable, _ = capture.plan(conn, run_id, list(plan.tables))
            capture.install(conn, run_id, usable, migration_id=migration_id, without_key=list(plan.without_key))
    except psycopg2.Error as exc:
        marker.unlink(missing_ok=True)
        first = (exc.pgerror or str(exc)).strip().splitlines()[0].removeprefix("ERROR:").strip()
        raise DatabaseError(
            f"The undo log of {migration_id} could not be set up in staging: {first}.",
            "`python3 check_setup.py` says what the role is missing; --no-undo runs with the point alone. Nothing was run.",
        ) from exc
    ui.info(f"Capturing the run's changes for an undo: run {run_id}, {len(usable)} table(s)")
    return run_id


def end_capture(settings: Settings, run_id: str) -> None:
    """The run's triggers removed (its log stays); on failure the next operation does it."""
    try:
        with connection(settings.staging(), application_name="rollback-toolkit undo capture") as conn:
            capture.finish(conn, run_id)
        capture.marker(Catalog(settings.backup_dir).root, run_id).unlink(missing_ok=True)
    except (RollbackError, psycopg2.Error) as exc:
        log.warning("the capture of %s could not be ended now: %s", run_id, exc)


def _resolve(conn, wanted: str) -> tuple[str, str | None]:
    """A run id, or a migration id: its newest run."""
    if not capture.readable(conn):
        raise UndoRefused(
            "Staging has no undo log: no migration run was captured here (or a point restore took staging back before one).",
            "Restore the run's point instead (`python3 run_migration.py FILE --rollback`).",
        )
    row = query(conn, f"SELECT run_id, migration_id FROM {capture.RUNS} WHERE run_id = %s", (wanted,))
    if not row:
        row = query(
            conn,
            f"SELECT run_id, migration_id FROM {capture.RUNS} WHERE migration_id = %s ORDER BY started_at DESC LIMIT 1",
            (wanted,),
        )
    if not row:
        known = [r[0] for r in query(conn, f"SELECT run_id FROM {capture.RUNS} ORDER BY started_at DESC LIMIT 5")]
        raise UndoRefused(
            f"There is no captured run {wanted!r} in staging" + (f" (the newest: {', '.join(known)})." if known else "."),
            "See `python3 run_migration.py --status` for the runs and whether each can be undone.",
        )
    return row[0][0], row[0][1]


def _plan_lines(result: revert.UndoResult) -> list[str]:
    tables = sorted(set(result.deleted) | set(result.restored) | set(result.reinserted))
    lines = [
        f"{t}: {result.deleted.get(t, 0)} row(s) the run inserted deleted, {result.restored.get(t, 0)} it updated put back, "
        f"{result.reinserted.get(t, 0)} it deleted inserted again"
        for t in tables
    ]
    return lines or ["the run changed no rows"]


def conflict_lines(result: revert.UndoResult, limit: int = SHOWN_CONFLICTS) -> list[str]:
    lines = []
    for c in result.conflicts[:limit]:
        key = ", ".join(f"{k}={v}" for k, v in c.key.items())
        lines.append(f"{c.table} ({key}): {c.why}; the run left {c.run_wrote or 'no row'}, now {c.now or 'no row'}")
    if len(result.conflicts) > limit:
        lines.append(f"… and {len(result.conflicts) - limit} more (--json lists them all)")
    return lines


def _document(run_id: str, migration_id: str | None, result: revert.UndoResult, *, dry_run: bool) -> dict:
    return {
        "run_id": run_id,
        "migration_id": migration_id,
        "dry_run": dry_run,
        "applied": result.applied,
        "deleted": result.deleted,
        "restored": result.restored,
        "reinserted": result.reinserted,
        "conflicts": [asdict(c) for c in result.conflicts],
    }


def _forget_in_ledger(migration_id: str | None, run_id: str):
    """In the undo's transaction: the migration is no longer applied (its ledger row goes,
    where that row was written by this run or before it)."""

    def write(conn, _result) -> None:
        if migration_id and scalar(conn, "SELECT to_regclass(%s)", (ledger.TABLE,)) is not None:
            scalar(
                conn,
                sql.SQL(
                    "DELETE FROM {} WHERE migration_id = %s AND applied_at >= (SELECT started_at FROM {} WHERE run_id = %s)"
                ).format(sql.Identifier(*ledger.TABLE.split(".")), sql.Identifier(*capture.RUNS.split("."))),
                (migration_id, run_id),
            )

    return write


def _show(ui: Reporter, result: revert.UndoResult) -> None:
    for line in _plan_lines(result):
        ui.info(f"  {line}")
    if result.conflicts:
        ui.warn(f"{len(result.conflicts)} conflict(s): rows changed after the run, left as they are now")
        for line in conflict_lines(result):
            ui.info(f"  {line}")


def _refused(run_id: str, result: revert.UndoResult) -> UndoRefused:
    return UndoRefused(
        f"Run {run_id} was not undone: {len(result.conflicts)} row(s) it wrote were changed after it "
        "(listed above); nothing was changed.",
        f"`python3 rollback_manager.py undo {run_id} --skip-conflicts` undoes the rest and leaves those rows as "
        "they are now; a point restore puts back everything, other sessions' writes included.",
    )


def undo_in(op: Operation, wanted: str, *, dry_run: bool = False, skip_conflicts: bool = False, ask_first: bool = True) -> dict:
    """The undo inside an operation that holds staging's lock (the command's own, or the
    runner's after a failed run). Where a person is asked, the undo is first made and
    rolled back to show what it will do; where the call is the confirmation (--yes, the
    API, the runner) nobody reads that preview, and the undo is made once."""
    ui = op.ui
    target = op.target
    with connection(target.info, target.dbname, application_name="rollback-toolkit undo") as conn:
        run_id, migration_id = _resolve(conn, wanted)
        op.record.set(run_id=run_id, migration_id=migration_id)
        ui.info(
            f"Undo of run {run_id} on {target.dbname}: the run's own changes reverted in one transaction, "
            "every other session's writes kept; sequences stay where they are."
        )
        preview = dry_run or (ask_first and not op.ask.granted)
        if preview:
            shown = revert.undo(conn, run_id, dry_run=True)
            _show(ui, shown)
            if dry_run:
                return _document(run_id, migration_id, shown, dry_run=True)
            if shown.conflicts and not skip_conflicts:
                raise _refused(run_id, shown)
        if ask_first:
            op.confirm_change(f"Undo run {run_id}?", what=f"undo {run_id}")
        started = time.monotonic()
        result = revert.undo(conn, run_id, skip_conflicts=skip_conflicts, before_commit=_forget_in_ledger(migration_id, run_id))
        if not preview:
            _show(ui, result)
        if not result.applied:  # conflicts, found now (or appeared since the preview)
            raise _refused(run_id, result)
    document = _document(run_id, migration_id, result, dry_run=False)
    document["seconds"] = round(time.monotonic() - started, 3)
    op.record.set(
        deleted=result.deleted,
        restored=result.restored,
        reinserted=result.reinserted,
        conflicts=len(result.conflicts),
        conflicts_skipped=[f"{c.table} {json.dumps(c.key, sort_keys=True)}" for c in result.conflicts[:100]],
    )
    return document


def undo_run(
    settings: Settings,
    ui: Reporter,
    ask: Confirmer,
    wanted: str,
    *,
    dry_run: bool = False,
    skip_conflicts: bool = False,
    event: str = "undo",
    ask_first: bool = True,
    **audit_fields,
) -> dict:
    """rollback_manager.py undo RUN (``event``: the audit entry's name)."""
    with operation(settings, event, ui=ui, ask=ask, check_v2=False, audit=not dry_run) as op:
        op.record.set(**audit_fields)
        return undo_in(op, wanted, dry_run=dry_run, skip_conflicts=skip_conflicts, ask_first=ask_first)
