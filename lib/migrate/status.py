"""run_migration.py --status: which migrations staging has applied, which were rolled
back, and which are pending. It only reads: the ledger in staging for what is applied,
and the audit trail for what was rolled back, since a restore takes the ledger back
too and so removes the rows of the migrations it undid."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lib import audit
from lib.config import Settings
from lib.migrate import ledger
from lib.migrate import undo as undo_log
from lib.migrate.context import Migration

APPLIED, ROLLED_BACK, PENDING = "applied", "rolled back", "pending"
_UNDOING = ("restore", "reset", "undo")  # audit events that put staging back (wholesale, or one run's changes)


@dataclass
class MigrationStatus:
    migration_id: str
    file: str | None
    state: str
    point_id: str | None = None  # applied: the point taken before it; rolled back: the point staging went back to
    when: str | None = None
    detail: str = ""


@dataclass
class Status:
    database: str
    ledger: bool  # whether staging has a ledger at all
    migrations: list[MigrationStatus] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)  # captured production runs, and whether each can be undone

    def as_dict(self) -> dict:
        return asdict(self)


def status(settings: Settings, migrations: list[Migration]) -> Status:
    database = settings.staging().masked()
    entries = ledger.applied(settings)
    trail = [e for e in audit.read(settings.log_dir).entries if e.get("database") == database]
    found = Status(database, entries is not None, runs=[r.as_dict() for r in undo_log.runs(settings)])
    entries = entries or {}
    files = {m.id: m.path.name for m in migrations}
    for migration_id, name in files.items():
        found.migrations.append(_one(migration_id, name, entries, trail))
    for migration_id in sorted(set(entries) - set(files)):
        found.migrations.append(_one(migration_id, entries[migration_id].file, entries, trail))
    for migration_id in sorted(_production_runs(trail) - set(entries) - set(files)):
        elsewhere = _one(migration_id, None, entries, trail)
        if elsewhere.state == ROLLED_BACK:  # a file outside the folder that was rolled back
            found.migrations.append(elsewhere)
    return found


def _production_runs(trail: list[dict]) -> set[str]:
    return {e["migration_id"] for e in trail if _is_production_end(e) and e.get("migration_id")}


def _is_production_end(entry: dict) -> bool:
    return entry.get("event") == "migration end" and entry.get("mode") == "production"


def _one(migration_id: str, file: str | None, entries: dict[str, ledger.Entry], trail: list[dict]) -> MigrationStatus:
    entry = entries.get(migration_id)
    if entry is not None:
        detail = f"{entry.migrated} migrated, {entry.failed} failed, {entry.skipped} skipped"
        if entry.retry_of:
            detail += f" (a retry of {entry.retry_of})"
        return MigrationStatus(migration_id, file, APPLIED, entry.point_id, entry.applied_at, detail)
    ends = [(n, e) for n, e in enumerate(trail) if _is_production_end(e) and e.get("migration_id") == migration_id]
    if not ends:
        return MigrationStatus(migration_id, file, PENDING, detail="never run in production")
    n, end = ends[-1]
    if end.get("undone") and end.get("outcome") in ("rolled back", "aborted"):
        why = f": {end['error']}" if end.get("error") else ""
        return MigrationStatus(
            migration_id,
            file,
            ROLLED_BACK,
            None,
            end.get("timestamp"),
            f"{end.get('outcome')}, run {end.get('undo_run')} undone{why}",
        )
    restored_to = end.get("restored_to") or (end.get("point_id") if end.get("outcome") == "rolled back" else None)
    if restored_to:
        why = f": {end['error']}" if end.get("error") else ""
        return MigrationStatus(
            migration_id,
            file,
            ROLLED_BACK,
            restored_to,
            end.get("timestamp"),
            f"{end.get('outcome')}, put back to its point{why}",
        )
    if end.get("outcome") == "succeeded":
        return _undone_later(migration_id, file, end, trail[n + 1 :])
    detail = f"its last run {end.get('outcome')} at {end.get('timestamp')}"
    if end.get("batches_committed"):
        detail += f", and its {end['batches_committed']} committed batch(es) were not rolled back"
    return MigrationStatus(migration_id, file, PENDING, detail=detail)


def _undone_later(migration_id: str, file: str | None, end: dict, after: list[dict]) -> MigrationStatus:
    """Applied, and out of the ledger now: a restore or a reset took it back."""
    undo = next(
        (
            e
            for e in after
            if e.get("event") in _UNDOING
            and e.get("outcome") == "succeeded"
            and (e["event"] != "undo" or e.get("migration_id") == migration_id)
        ),
        None,
    )
    if undo is None:
        return MigrationStatus(migration_id, file, ROLLED_BACK, end.get("point_id"), None, "applied, and no longer in the ledger")
    how = {
        "restore": f"a restore to {undo.get('point_id')}",
        "reset": "a reset from V2",
        "undo": f"the undo of run {undo.get('run_id')}",
    }[undo["event"]]
    return MigrationStatus(
        migration_id, file, ROLLED_BACK, undo.get("point_id"), undo.get("timestamp"), f"applied, then undone by {how}"
    )
