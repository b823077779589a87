"""The Python API seed 000 shows, on top of the same commands the scripts use.

``RollbackManager``, ``MigrationTransaction`` and ``MigrationBackup`` are
asynchronous, as seed 000 shows them: ``await manager.create_rollback_point(...)``,
``async with MigrationTransaction(...) as session``; each call runs in a worker
thread, so the event loop keeps serving. ``SyncRollbackManager``,
``SyncMigrationTransaction`` and ``SyncMigrationBackup`` are their synchronous twins
with the same methods. ``get_rollback_history`` and ``list_rollback_points`` only
read files and are plain calls in both. Nothing asks for confirmation: calling
``execute_rollback`` is the confirmation (a protected database still needs
``confirm_database=``)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import psycopg2

from lib import audit
from lib.config import Settings, load_settings
from lib.errors import ConfigError, RollbackError, VerificationError
from lib.interaction import Granted, Reporter, Silent
from lib.migrate import undo as undo_runs
from lib.migrate.context import SequenceGuard, TrackedConnection, open_staging
from lib.operations import commands as operations
from lib.points.methods import registry
from lib.undo import capture

log = logging.getLogger(__name__)

__all__ = [
    "MigrationBackup",
    "MigrationTransaction",
    "RollbackManager",
    "RollbackType",
    "SyncMigrationBackup",
    "SyncMigrationTransaction",
    "SyncRollbackManager",
    "Verification",
]


class RollbackType(StrEnum):
    """Seed 000's four kinds of rollback."""

    FULL = "full"  # the point restored whole (a table point: its tables)
    PARTIAL = "partial"  # only the rows added since the point deleted
    TRANSACTION = "transaction"  # the open transaction of a running MigrationTransaction rolled back
    BACKUP = "backup"  # straight from a pg_dump archive or a point folder (file=...)


@dataclass
class Verification:
    """verify_rollback's answer: does staging now match the point?"""

    rollback_id: str
    matches: bool
    tables: dict[str, dict] = field(default_factory=dict)  # table: expected_rows, actual_rows, matches
    problems: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.matches

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class SyncRollbackManager:
    """Rollback points of one staging database, called plainly.

    ``SyncRollbackManager(url)``; without a url, STAGING_DATABASE_URL (environment or .env).
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        v2_url: str | None = None,
        backup_dir: str | Path | None = None,
        method: str | None = None,
        ui: Reporter | None = None,
        confirm_database: str | None = None,
    ) -> None:
        self.settings: Settings = load_settings(
            staging_url=database_url,
            v2_url=v2_url,
            backup_dir=str(backup_dir) if backup_dir else None,
        )
        self.settings.staging()  # a missing or malformed URL fails here, not later
        self.method = method
        self.ui = ui or Silent()
        self.ask = Granted(confirm_database)
        self._open_transactions: dict[str, SyncMigrationTransaction] = {}

    # -- points

    def _create(self, migration_id: str | None, table_name: str | list[str] | None, description: str | None) -> str:
        tables = [table_name] if isinstance(table_name, str) else list(table_name or [])
        point, _ = operations.create_point(
            self.settings,
            self.ui,
            self.ask,
            description=description or (f"before {migration_id}" if migration_id else "rollback point"),
            migration_id=migration_id,
            method=registry.FOR_TABLES if tables else self.method,
            tables=tables or None,
        )
        return point.id

    def create_rollback_point(
        self,
        session=None,
        migration_id: str | None = None,
        table_name: str | list[str] | None = None,
        description: str | None = None,
    ) -> str:
        """A point of ``table_name`` (a data point of that table, or those tables), or of
        the whole database when it is None; returns its id. ``session`` is accepted for
        seed 000's signature: the point is read in its own snapshot, so it holds what was
        committed, never ``session``'s uncommitted work."""
        return self._create(migration_id, table_name, description)

    def execute_rollback(
        self,
        rollback_id: str,
        rollback_type: RollbackType | str = RollbackType.FULL,
        *,
        tables: list[str] | None = None,
        file: str | Path | None = None,
        force: bool = False,
    ) -> dict:
        kind = RollbackType(rollback_type)
        if kind is RollbackType.TRANSACTION:
            tx = self._open_transactions.get(rollback_id)
            if tx is None:
                raise ConfigError(
                    f"No MigrationTransaction of point {rollback_id} is open in this RollbackManager, so there is no "
                    "transaction to roll back.",
                    "Use RollbackType.FULL to restore the point.",
                )
            return tx.rollback_transaction()
        if kind is RollbackType.PARTIAL:
            return operations.partial_rollback(self.settings, self.ui, self.ask, rollback_id, tables=tables)
        archive = None
        if kind is RollbackType.BACKUP:
            archive = Path(file) if file else operations.get_point(self.settings, rollback_id).path
        return self._restore(rollback_id, archive, force=force)

    def _restore(self, rollback_id: str, archive: Path | None = None, *, force: bool = False) -> dict:
        return operations.restore_point(self.settings, self.ui, self.ask, rollback_id, archive=archive, force=force).as_dict()

    def verify_rollback(self, rollback_id: str) -> Verification:
        """Does staging now hold what the point holds? Row counts per table, sequences,
        and for a whole-database point the schema digest and large objects."""
        tables, problems = operations.verify_staging(self.settings, rollback_id)
        return Verification(operations.get_point(self.settings, rollback_id).id, not problems, tables, problems)

    def get_rollback_history(self, limit: int | None = None) -> list[dict]:
        """The audit trail, oldest first (the newest ``limit`` entries)."""
        return audit.read(self.settings.log_dir, limit).entries

    def undo(self, run_id: str, *, dry_run: bool = False, skip_conflicts: bool = False) -> dict:
        """Revert exactly what one captured run changed (a run id, or a migration id for
        its newest run), keeping every other session's writes; see rollback_manager.py undo.
        Raises UndoRefused (changing nothing) on conflicts unless ``skip_conflicts``."""
        return undo_runs.undo_run(self.settings, self.ui, self.ask, run_id, dry_run=dry_run, skip_conflicts=skip_conflicts)

    def undo_runs(self) -> list[dict]:
        """The captured runs in staging, and whether each can be undone."""
        return [r.as_dict() for r in undo_runs.runs(self.settings)]

    def list_rollback_points(self) -> list[dict]:
        return [registry.summary(p) for p in operations.list_points(self.settings)]


class SyncMigrationTransaction:
    """``with``: a point on entry, a psycopg2 connection in a transaction as the
    session; commit on success. On an exception the transaction is rolled back and,
    when the body had already committed (batches), staging is put back: by the undo
    log with ``undo_log=True`` (only the session's own changes, other writes kept),
    else, or when the undo is refused, by restoring the point.

    ``undo_log``: True (or "on") captures the session's changes in the tables
    ``table_name`` names (else every user table), refusing tables without a key;
    "keyed" captures those with a key and makes the undo unavailable after a write to
    one without."""

    def __init__(
        self,
        manager: SyncRollbackManager,
        migration_id: str,
        table_name: str | list[str] | None = None,
        description: str | None = None,
        *,
        undo_log: bool | str = False,
    ) -> None:
        self.manager = manager
        self.migration_id = migration_id
        self.table_name = table_name
        self.description = description
        self.undo_mode = ("on" if undo_log else "off") if isinstance(undo_log, bool) else undo_log
        if self.undo_mode not in ("on", "keyed", "off"):
            raise ConfigError(f"undo_log={undo_log!r}: give True, False, 'on', 'keyed' or 'off'.")
        self.rollback_id: str | None = None
        self.session: TrackedConnection | None = None
        self.restored: dict | None = None
        self.undo_run: str | None = None  # the run's id in staging's undo log
        self.undone: dict | None = None  # the undo that put staging back, when it was one

    def _event(self, name: str, **fields) -> None:
        audit.event(
            self.manager.settings.log_dir,
            name,
            database=self.manager.settings.staging().masked(),
            point_id=self.rollback_id,
            migration_id=self.migration_id,
            **fields,
        )

    def __enter__(self) -> TrackedConnection:
        settings, ui = self.manager.settings, self.manager.ui
        declared = [self.table_name] if isinstance(self.table_name, str) else self.table_name
        plan = undo_runs.plan_capture(settings, ui, self.migration_id, declared, self.undo_mode)
        self.rollback_id = self.manager._create(self.migration_id, self.table_name, self.description)
        self._sequences = SequenceGuard(settings)
        if plan is not None:
            self.undo_run = undo_runs.start_capture(settings, ui, plan, self.migration_id)
        try:
            self.session = open_staging(
                settings,
                f"migration {self.migration_id}",
                options=capture.session_options(self.undo_run) if self.undo_run else None,
            )
        except BaseException:
            if self.undo_run:
                undo_runs.end_capture(settings, self.undo_run)
            raise
        self.manager._open_transactions[self.rollback_id] = self
        self._event("migration start", mode="MigrationTransaction")
        return self.session

    def rollback_transaction(self) -> dict:
        """RollbackType.TRANSACTION: the open transaction's work is undone; committed work stays."""
        assert self.session is not None
        self.session.rollback()
        self._event("transaction rollback", outcome="succeeded")
        return {"rollback_id": self.rollback_id, "type": "transaction", "commits_kept": self.session.commits}

    def __exit__(self, exc_type, exc, tb) -> bool:
        session = self.session
        assert session is not None and self.rollback_id is not None
        self.manager._open_transactions.pop(self.rollback_id, None)
        try:
            if exc_type is None:
                session.commit()
                self._event("migration end", outcome="succeeded", commits=session.commits, undo_run=self.undo_run)
                return False
            committed = session.commits
            if not committed:
                self._sequences.note_where_left()
            session.rollback()
        finally:
            session.close()
            if self.undo_run:
                undo_runs.end_capture(self.manager.settings, self.undo_run)
        if not committed:
            self._sequences.put_back()
        reason = f"{exc_type.__name__}: {exc}"
        if committed and self.undo_run and self._undo(reason):
            outcome = "rolled back"
        elif committed:
            database = self.manager.settings.staging().masked()
            with audit.audited(
                self.manager.settings.log_dir, "automatic rollback", database, self.rollback_id, self.migration_id
            ) as record:
                record.set(reason=reason)
                self.restored = self.manager._restore(self.rollback_id)
            outcome = "rolled back"
        else:
            outcome = "transaction rolled back"
        self._event(
            "migration end", outcome=outcome, error=reason, commits=committed, undo_run=self.undo_run, undone=bool(self.undone)
        )
        return False  # the exception goes on to the caller

    def _undo(self, reason: str) -> bool:
        """The committed work undone by the log; False (logged) when refused or failed."""
        try:
            self.undone = undo_runs.undo_run(
                self.manager.settings,
                self.manager.ui,
                self.manager.ask,
                self.undo_run,
                event="automatic undo",
                ask_first=False,
                reason=reason,
            )
            return True
        except (RollbackError, psycopg2.Error) as exc:
            why = getattr(exc, "message", None) or str(exc).strip()
            log.warning("the undo of %s was not possible (%s); the point is restored instead", self.undo_run, why)
            return False


class SyncMigrationBackup:
    """Table backups (data points): create, verify, restore."""

    def __init__(self, manager: SyncRollbackManager | RollbackManager | str | None = None) -> None:
        if isinstance(manager, RollbackManager):
            manager = manager.sync
        self.manager = manager if isinstance(manager, SyncRollbackManager) else SyncRollbackManager(manager)

    def create_backup(self, table_name: str | list[str], description: str | None = None, migration_id: str | None = None) -> str:
        names = [table_name] if isinstance(table_name, str) else list(table_name)
        return self.manager._create(migration_id, names, description or f"Backup of {', '.join(names)}")

    def verify_backup(self, backup_id: str) -> Verification:
        """Checksums, and every file read end to end against its row counts."""
        point = operations.get_point(self.manager.settings, backup_id)
        try:
            details = operations.verify_point(self.manager.settings, self.manager.ui, backup_id)
        except VerificationError as exc:
            return Verification(backup_id, False, problems=[exc.message])
        read = details.get("rows_read", {})
        want = point.manifest.row_counts or {}
        tables = {t: {"expected_rows": n, "actual_rows": read[t], "matches": read[t] == n} for t, n in want.items() if t in read}
        return Verification(backup_id, True, tables=tables)

    def restore_backup(self, backup_id: str) -> dict:
        return self.manager._restore(backup_id)


class RollbackManager:
    """Seed 000's RollbackManager: the methods of SyncRollbackManager, awaited."""

    def __init__(self, database_url: str | None = None, **kwargs) -> None:
        self.sync = SyncRollbackManager(database_url, **kwargs)

    @property
    def settings(self) -> Settings:
        return self.sync.settings

    async def create_rollback_point(
        self,
        session=None,
        migration_id: str | None = None,
        table_name: str | list[str] | None = None,
        description: str | None = None,
    ) -> str:
        return await asyncio.to_thread(self.sync.create_rollback_point, session, migration_id, table_name, description)

    async def execute_rollback(self, rollback_id: str, rollback_type: RollbackType | str = RollbackType.FULL, **kwargs) -> dict:
        return await asyncio.to_thread(self.sync.execute_rollback, rollback_id, rollback_type, **kwargs)

    async def verify_rollback(self, rollback_id: str) -> Verification:
        return await asyncio.to_thread(self.sync.verify_rollback, rollback_id)

    def get_rollback_history(self, limit: int | None = None) -> list[dict]:
        return self.sync.get_rollback_history(limit)

    async def undo(self, run_id: str, *, dry_run: bool = False, skip_conflicts: bool = False) -> dict:
        return await asyncio.to_thread(self.sync.undo, run_id, dry_run=dry_run, skip_conflicts=skip_conflicts)

    def undo_runs(self) -> list[dict]:
        return self.sync.undo_runs()

    def list_rollback_points(self) -> list[dict]:
        return self.sync.list_rollback_points()


class MigrationTransaction:
    """Seed 000's ``async with MigrationTransaction(manager, ...) as session``: a
    SyncMigrationTransaction entered and left in a worker thread."""

    def __init__(
        self,
        manager: RollbackManager,
        migration_id: str,
        table_name: str | list[str] | None = None,
        description: str | None = None,
        *,
        undo_log: bool | str = False,
    ) -> None:
        self.sync = SyncMigrationTransaction(manager.sync, migration_id, table_name, description, undo_log=undo_log)

    @property
    def rollback_id(self) -> str | None:
        return self.sync.rollback_id

    @property
    def restored(self) -> dict | None:
        return self.sync.restored

    @property
    def undo_run(self) -> str | None:
        return self.sync.undo_run

    @property
    def undone(self) -> dict | None:
        return self.sync.undone

    async def __aenter__(self) -> TrackedConnection:
        return await asyncio.to_thread(self.sync.__enter__)

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        return await asyncio.to_thread(self.sync.__exit__, exc_type, exc, tb)


class MigrationBackup:
    """Seed 000's MigrationBackup: the methods of SyncMigrationBackup, awaited."""

    def __init__(self, manager: RollbackManager | str | None = None) -> None:
        self.sync = SyncMigrationBackup(manager.sync if isinstance(manager, RollbackManager) else manager)

    async def create_backup(
        self, table_name: str | list[str], description: str | None = None, migration_id: str | None = None
    ) -> str:
        return await asyncio.to_thread(self.sync.create_backup, table_name, description, migration_id)

    async def verify_backup(self, backup_id: str) -> Verification:
        return await asyncio.to_thread(self.sync.verify_backup, backup_id)

    async def restore_backup(self, backup_id: str) -> dict:
        return await asyncio.to_thread(self.sync.restore_backup, backup_id)
