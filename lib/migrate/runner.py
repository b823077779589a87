"""run_migration.py's work: a dry run that changes nothing, a production run behind a
verified rollback point with automatic rollback, and --rollback."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from lib import audit
from lib.config import Settings
from lib.errors import ConfigError, MigrationError, RollbackError, ThresholdExceeded
from lib.files import percent
from lib.interaction import Confirmer, Granted, Reporter
from lib.migrate import failures, ledger
from lib.migrate import undo as undo_runs
from lib.migrate.context import (
    Migration,
    MigrationContext,
    SequenceGuard,
    Tally,
    open_staging,
    perform,
)
from lib.operations import commands as operations
from lib.operations.scaffold import operation
from lib.pg.db import replication_ties
from lib.pg.target import confirm_change, open_target
from lib.points.catalog import Catalog
from lib.restore.swap import RestoreResult, refuse_replication_ties
from lib.undo import capture

log = logging.getLogger(__name__)


@dataclass
class Report:
    migration_id: str
    mode: str  # "dry run" | "production"
    outcome: str = "running"  # dry run | succeeded | rolled back | failed | aborted
    point_id: str | None = None
    tally: Tally = field(default_factory=Tally)
    threshold: float = 0.1
    duration_seconds: float = 0.0
    error: str | None = None
    restored: RestoreResult | None = None
    notes: list[str] = field(default_factory=list)
    retry_of: Path | None = None  # --retry-failed: the failures file whose records ran again
    undo_run: str | None = None  # the run's id in staging's undo log, when it was captured
    undone: dict | None = None  # the automatic rollback's undo, when it was one

    @property
    def ok(self) -> bool:
        return self.outcome in ("dry run", "succeeded")

    def as_dict(self) -> dict:
        t = self.tally
        return {
            "migration_id": self.migration_id,
            "mode": self.mode,
            "outcome": self.outcome,
            "point_id": self.point_id,
            "migrated": t.migrated,
            "failed": t.failed,
            "skipped": t.skipped,
            "failure_rate": t.failure_rate,  # exact: people read it through lib.files.percent
            "failure_threshold": self.threshold,
            "threshold_exceeded": t.threshold_batch is not None,
            "batches_committed": t.batches_committed,
            "changes": {k: dict(zip(("inserted", "updated", "deleted"), v, strict=True)) for k, v in sorted(t.changes.items())},
            "failures_file": str(t.failures_file) if t.failures_file else None,
            "retry_of": str(self.retry_of) if self.retry_of else None,
            "retry_not_found": t.retry_not_found,
            "duration_seconds": round(self.duration_seconds, 3),
            "error": self.error,
            "restored_to": self.restored.point_id if self.restored else None,
            "before_rollback_point_id": self.restored.before_point_id if self.restored else None,
            "undo_run": self.undo_run,
            "undone": self.undone,
            "notes": self.notes,
        }


@dataclass
class Options:
    batch_size: int = 100
    threshold: float = 0.10
    limit: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    retry: failures.Retry | None = None  # --retry-failed: only the records this failures file lists as failed

    def check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1.")
        if not 0 <= self.threshold <= 1:
            raise ConfigError("--failure-threshold is a fraction between 0 and 1 (0.10 is 10%).")
        if self.limit is not None and self.limit < 0:
            raise ConfigError("--limit must be 0 or more.")


def retry(migration: Migration, failures_file: str | Path) -> failures.Retry:
    """--retry-failed: what to run again, checked before anything runs."""
    if migration.kind == "sql":
        raise ConfigError(
            f"{migration.id} is a .sql migration, and a .sql migration has no records to retry: it runs as one unit.",
            "Run it again whole (nothing was run).",
        )
    return failures.read_retry(failures_file, migration.id)


def _context(settings, ui, migration, staging, options: Options, *, dry_run: bool, before_last_commit=None) -> MigrationContext:
    return MigrationContext(
        settings,
        migration,
        staging,
        ui,
        dry_run=dry_run,
        batch_size=options.batch_size,
        threshold=options.threshold,
        limit=options.limit,
        params=options.params,
        failures_path=failures.path_for(settings.log_dir, migration.id, dry_run=dry_run, retry=options.retry is not None),
        only_keys=options.retry.keys if options.retry else None,
        before_last_commit=before_last_commit,
    )


def dry_run(settings: Settings, ui: Reporter, migration: Migration, options: Options) -> Report:
    """The whole migration in one transaction on staging, rolled back: nothing changes."""
    options.check()
    report = Report(migration.id, "dry run", threshold=options.threshold, retry_of=_retry_path(options))
    started = time.monotonic()
    with open_target(settings) as target:  # refuses V2 given as staging
        database = target.masked
    ui.step(f"Dry run of {migration.id} ({migration.description}) on {database}: one transaction, rolled back at the end")
    _say_retry(ui, options)
    audit.event(
        settings.log_dir,
        "migration start",
        database=database,
        migration_id=migration.id,
        mode="dry run",
        retry_of=_retry_path(options),
    )
    guard = SequenceGuard(settings)
    staging = open_staging(settings, f"migration {migration.id} (dry run)")
    staging.forbid_commit = "A dry run commits nothing, and the migration tried to commit."
    ctx = _context(settings, ui, migration, staging, options, dry_run=True)
    try:
        perform(ctx)
        report.outcome = "dry run"
    except RollbackError:
        report.outcome = "failed"
        raise
    except KeyboardInterrupt:
        report.outcome = "aborted"
        raise
    except Exception as exc:
        report.outcome = "failed"
        raise MigrationError(
            f"The dry run of {migration.id} failed: {type(exc).__name__}: {exc}".rstrip(".") + ".",
            "Nothing was changed (the dry run's transaction was rolled back). Fix the migration and run it again.",
        ) from exc
    finally:
        guard.note_where_left()
        _close(staging)  # the rollback
        ctx.close()
        _put_back(guard, report)
        report.tally = ctx.tally
        report.duration_seconds = time.monotonic() - started
        _audit_end(settings, report, database)
    if ctx.tally.threshold_batch is not None:
        report.notes.append(
            f"The failure rate passed the threshold of {percent(options.threshold)} after batch "
            f"{ctx.tally.threshold_batch}: a production run would stop there and put staging back to its rollback point."
        )
    _note_not_found(report)
    return report


def production(
    settings: Settings,
    ui: Reporter,
    ask: Confirmer,
    migration: Migration,
    options: Options,
    *,
    no_rollback: bool = False,
    method: str | None = None,
    force: bool = False,
    undo: str | None = None,
) -> Report:
    """``undo``: on (capture the run's changes; refuse when one of its tables has no
    key), keyed (capture the tables with a key; a write to one without makes the undo
    unavailable), off; None: the ROLLBACK_UNDO setting."""
    options.check()
    report = Report(migration.id, "production", threshold=options.threshold, retry_of=_retry_path(options))
    started = time.monotonic()
    undo = undo or settings.rollback_undo
    plan = _undo_plan(settings, ui, migration, undo)
    database = _before_production(settings, ui, ask, migration, report, no_rollback=no_rollback, method=method, force=force)
    audit.event(
        settings.log_dir,
        "migration start",
        database=database,
        point_id=report.point_id,
        migration_id=migration.id,
        mode="production",
        batch_size=options.batch_size,
        failure_threshold=options.threshold,
        limit=options.limit,
        retry_of=_retry_path(options),
    )
    ui.step(
        f"Running {migration.id} on {database} in batches of {options.batch_size}, "
        f"failure threshold {percent(options.threshold)}"
        + (f", at most {options.limit} records" if options.limit is not None else "")
    )
    _say_retry(ui, options)
    guard = SequenceGuard(settings)
    failure = _run_in_batches(settings, ui, ask, migration, options, report, guard, database, plan)
    try:
        if failure is not None:
            _after_failure(settings, ui, ask, migration, report, failure, database, force=force)
            if report.tally.batches_committed == 0:
                _put_back(guard, report)
    finally:  # also when the automatic rollback itself failed
        report.duration_seconds = time.monotonic() - started
        _audit_end(settings, report, database)
    if isinstance(failure, KeyboardInterrupt):
        raise failure
    _note_not_found(report)
    return report


def _before_production(
    settings: Settings,
    ui: Reporter,
    ask: Confirmer,
    migration: Migration,
    report: Report,
    *,
    no_rollback: bool,
    method: str | None,
    force: bool,
) -> str:
    """What must hold before a record is migrated: no replication tie a rollback would
    break, a protected database's name typed, and a verified point (or its absence
    confirmed). Returns staging's masked URL."""
    with open_target(settings, ui=ui) as target:
        database, dbname = target.masked, target.dbname
        if not no_rollback:  # the automatic rollback swaps staging: refuse now, not after a batch committed
            refuse_replication_ties(
                target, replication_ties(target.maint, dbname), force=force, doing=f"run {migration.id} with automatic rollback"
            )
        if dbname in settings.protected_databases:
            confirm_change(target, ask, f"Run {migration.id} on {dbname}?", what=f"run {migration.id}")
    if no_rollback:
        ui.warn(
            f"--no-rollback: no rollback point of {dbname} is taken. If {migration.id} fails after a batch was committed, "
            "staging keeps those batches, and only an older point or a reset from V2 can put it back."
        )
        ask.confirm("Run the migration without a rollback point?", what="skip the rollback point")
    else:
        point, _ = operations.create_point(
            settings, ui, ask, description=f"before migration {migration.id}", migration_id=migration.id, method=method
        )
        operations.verify_point(settings, ui, point.id)
        report.point_id = point.id
    return database


def _undo_plan(settings: Settings, ui: Reporter, migration: Migration, undo: str) -> undo_runs.CapturePlan | None:
    declared = getattr(migration.module, "TABLES", None) if migration.module is not None else None
    return undo_runs.plan_capture(settings, ui, migration.id, declared, undo)


def _start_capture(op, migration: Migration, report: Report, plan) -> str | None:
    """The run's capture installed just before it; returns the session options that make
    its writes the run's."""
    if plan is None:
        return None
    report.undo_run = undo_runs.start_capture(op.settings, op.ui, plan, migration.id)
    return capture.session_options(report.undo_run)


def _end_capture(op, report: Report) -> None:
    if report.undo_run is not None:
        undo_runs.end_capture(op.settings, report.undo_run)


def _run_in_batches(
    settings: Settings,
    ui: Reporter,
    ask: Confirmer,
    migration: Migration,
    options: Options,
    report: Report,
    guard: SequenceGuard,
    database: str,
    plan=None,
) -> BaseException | None:
    """The migration under staging's lock; returns how it failed, or None."""
    failure: BaseException | None = None
    ctx = None
    try:
        # its own start and end events are written around it: no operation entry
        with operation(settings, f"migration {migration.id}", ui=ui, ask=ask, migration_id=migration.id, audit=False) as op:
            session = _start_capture(op, migration, report, plan)
            try:
                staging = open_staging(settings, f"migration {migration.id}", options=session)
            except BaseException:
                _end_capture(op, report)
                raise
            ctx = _context(
                settings, ui, migration, staging, options, dry_run=False, before_last_commit=_ledger_entry(migration, report)
            )
            try:
                ledger.prepare(staging)  # in the first batch's transaction: a run that commits nothing leaves no ledger
                perform(ctx)
                report.outcome = "succeeded"
            except BaseException as exc:  # noqa: BLE001 - every failure ends in the same rollback
                failure = exc
                guard.note_where_left()
            finally:  # closing the session rolls back the open batch
                _close(staging)
                ctx.close()
                _end_capture(op, report)
    except RollbackError as exc:
        if ctx is None:
            raise  # could not even start: nothing ran
        failure = failure or exc
    if ctx is not None:
        report.tally = ctx.tally
    return failure


def _after_failure(
    settings: Settings,
    ui: Reporter,
    ask: Confirmer,
    migration: Migration,
    report: Report,
    failure: BaseException,
    database: str,
    *,
    force: bool,
) -> None:
    committed = report.tally.batches_committed
    interrupted = isinstance(failure, KeyboardInterrupt)
    report.error = (
        "interrupted (Ctrl-C)"
        if interrupted
        else getattr(failure, "message", None) or f"{type(failure).__name__}: {failure}".strip()
    )
    log.error("migration %s failed: %s", migration.id, report.error, exc_info=not interrupted)
    if isinstance(failure, ThresholdExceeded):
        _audit_breach(settings, report, database)
    ui.error(f"{migration.id} stopped: {report.error}")
    ui.info(f"The open batch was rolled back. {committed} batch(es) had been committed.")
    report.outcome = "aborted" if interrupted else "failed"
    if committed == 0:
        report.notes.append("Nothing had been committed: rolling back the open transaction undid everything.")
        return
    if report.point_id is None and report.undo_run is None:
        report.notes.append(
            f"{committed} batch(es) stay committed: there is no rollback point (--no-rollback). Put staging back with "
            "`python3 quick_rollback.py` (newest point) or `python3 reset_staging.py` (copy of V2)."
        )
        return
    question = (
        f"Undo the run's {committed} committed batch(es) (other sessions' writes are kept)?"
        if report.undo_run
        else f"Restore staging to the point {report.point_id} taken before the migration?"
    )
    if interrupted and not ask.decide(question, default=True):
        later = (
            f"`python3 rollback_manager.py undo {report.undo_run}`"
            if report.undo_run
            else f"`python3 run_migration.py {migration.path} --rollback {report.point_id}`"
        )
        report.notes.append(f"Staging keeps {committed} committed batch(es). Put them back later with {later}.")
        return
    if report.undo_run and _undo_automatically(settings, ui, ask, migration, report):
        report.outcome = "aborted" if interrupted else "rolled back"
        ui.ok(f"The run's changes are undone (run {report.undo_run}); other sessions' writes were kept")
        return
    if report.point_id is None:
        report.notes.append(
            f"{committed} batch(es) stay committed: the undo was not possible and there is no rollback point "
            "(--no-rollback). Put staging back with `python3 quick_rollback.py` or `python3 reset_staging.py`."
        )
        return
    _restore_automatically(settings, ui, ask, migration, report, database, force=force)
    report.outcome = "aborted" if interrupted else "rolled back"
    ui.ok(f"Staging is back at {report.point_id}")


def _undo_automatically(settings: Settings, ui: Reporter, ask: Confirmer, migration: Migration, report: Report) -> bool:
    """The automatic rollback by the run's undo log; False (and why, said) when the undo
    was refused or failed, and the point is to be restored instead."""
    ui.step(f"Automatic rollback: undoing the run's own changes (run {report.undo_run})")
    granted = Granted(getattr(ask, "typed", None))  # the run was the confirmation
    try:
        report.undone = undo_runs.undo_run(
            settings, ui, granted, report.undo_run, event="automatic undo", ask_first=False, reason=report.error
        )
        return True
    except (RollbackError, psycopg2.Error) as exc:
        why = getattr(exc, "message", None) or str(exc).strip()
        instead = f"the point {report.point_id} is restored instead" if report.point_id else "there is no point to restore"
        ui.warn(f"The undo was not possible: {why} So {instead}.")
        report.notes.append(f"The undo of run {report.undo_run} was not possible ({why}); {instead}.")
        return False


def _restore_automatically(
    settings: Settings, ui: Reporter, ask: Confirmer, migration: Migration, report: Report, database: str, *, force: bool
) -> None:
    committed = report.tally.batches_committed
    ui.step(f"Automatic rollback: putting staging back to {report.point_id}")
    try:
        with audit.audited(settings.log_dir, "automatic rollback", database, report.point_id, migration.id) as record:
            # the run was the confirmation; a protected database's name was given at its start
            granted = Granted(getattr(ask, "typed", None))
            report.restored = operations.restore_point(settings, ui, granted, report.point_id, force=force)
            record.set(reason=report.error, before_point_id=report.restored.before_point_id)
            if report.restored.after_swap_failed:
                record.set(after_swap_failed=report.restored.after_swap_failed)
                ui.warn(report.restored.after_swap_failed)
    except (RollbackError, psycopg2.Error) as exc:
        raise MigrationError(
            f"{migration.id} failed ({report.error}) and the automatic rollback to {report.point_id} failed too: "
            f"{getattr(exc, 'message', exc)}. Staging still holds {committed} committed batch(es) of the migration.",
            f"Run `python3 rollback_manager.py restore {report.point_id}` once the cause is fixed, "
            "or `python3 quick_rollback.py --from-v2` as a last resort.",
        ) from exc


def rollback(
    settings: Settings, ui: Reporter, ask: Confirmer, migration: Migration, point_id: str | None, *, force: bool = False
) -> RestoreResult:
    """--rollback [ID]: the given point, or the newest point this migration made."""
    if not point_id:
        mine = [
            p
            for p in Catalog(settings.backup_dir).points()
            if p.manifest.migration_id == migration.id and p.manifest.is_completed
        ]
        if not mine:
            raise ConfigError(
                f"No rollback point was made by the migration {migration.id} in {settings.backup_dir}.",
                "Give a point id (`python3 rollback_manager.py list`), or use `python3 quick_rollback.py`.",
            )
        point_id = mine[-1].id
        ui.info(f"The newest point made by {migration.id}: {point_id}")
    return operations.restore_point(settings, ui, ask, point_id, force=force)


def _audit_breach(settings: Settings, report: Report, database: str) -> None:
    audit.event(
        settings.log_dir,
        "threshold breach",
        database=database,
        point_id=report.point_id,
        migration_id=report.migration_id,
        outcome="stopped",
        failed=report.tally.failed,
        processed=report.tally.processed,
        failure_rate=report.tally.failure_rate,
        failure_threshold=report.threshold,
    )


def _audit_end(settings: Settings, report: Report, database: str) -> None:
    t = report.tally
    if t.failed:
        _audit_failures(settings, report, database)
    audit.event(
        settings.log_dir,
        "migration end",
        database=database,
        point_id=report.point_id,
        migration_id=report.migration_id,
        outcome=report.outcome,
        mode=report.mode,
        migrated=t.migrated,
        failed=t.failed,
        skipped=t.skipped,
        batches_committed=t.batches_committed,
        error=report.error,
        restored_to=report.restored.point_id if report.restored else None,
        undo_run=report.undo_run,
        **({"undone": True} if report.undone else {}),  # the automatic rollback was the run's undo
    )


def _audit_failures(settings: Settings, report: Report, database: str) -> None:
    """One entry per run for its failed records (an operator reads the file for each one)."""
    t = report.tally
    audit.event(
        settings.log_dir,
        "record failures",
        database=database,
        point_id=report.point_id,
        migration_id=report.migration_id,
        mode=report.mode,
        failed=t.failed,
        processed=t.processed,
        failure_rate=t.failure_rate,
        batches_with_failures=len(t.batches_with_failures),
        batches=_ranges(t.batches_with_failures),
        failures_file=str(t.failures_file) if t.failures_file else None,
    )


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7, 9, 10] as '1-3, 7, 9-10': a run's batches stay one short line."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _retry_path(options: Options) -> Path | None:
    return options.retry.path if options.retry else None


def _say_retry(ui: Reporter, options: Options) -> None:
    if options.retry:
        ui.info(f"Only the {len(options.retry.keys)} record(s) {options.retry.path} lists as failed are run again.")


def _note_not_found(report: Report) -> None:
    missing = report.tally.retry_not_found
    if missing:
        shown = ", ".join(missing[:10]) + (", …" if len(missing) > 10 else "")
        report.notes.append(
            f"{len(missing)} record(s) of {report.retry_of} were not among the migration's records, so they did not run: "
            f"{shown}. A record is found by the key its run wrote (key(record) in ctx.run_batches, else its position)."
        )


def _ledger_entry(migration: Migration, report: Report):
    """What the last commit of a production run writes: this migration, applied."""

    def write(ctx: MigrationContext) -> None:
        ledger.record(ctx.staging, migration, report.point_id, ctx.tally, report.retry_of)

    return write


def _put_back(guard: SequenceGuard, report: Report) -> None:
    try:
        moved = guard.put_back()
    except RollbackError as exc:
        report.notes.append(f"The sequences the migration advanced could not be put back: {exc.message}")
        return
    if moved:
        report.notes.append("Sequences put back where they were: " + ", ".join(moved) + ".")


def _close(conn) -> None:
    try:
        if not conn.closed:
            conn.close()
    except psycopg2.Error:
        pass
