"""run_migration.py FOLDER: every migration of a folder that staging's ledger does not
list as applied, in name order, each as a run of its own (in production: behind its
own rollback point), stopping at the first that does not succeed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lib.config import Settings
from lib.errors import ConfigError, ExitCode, RollbackError
from lib.interaction import Confirmer, Reporter
from lib.migrate import ledger, runner
from lib.migrate.context import Migration, available, load


@dataclass
class FolderReport:
    folder: Path
    mode: str  # "dry run" | "production"
    already_applied: list[str] = field(default_factory=list)
    reports: list[runner.Report] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    stopped_at: str | None = None
    error: RollbackError | None = None  # what stopped it before its run had a report

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return int(self.error.exit_code)
        return int(ExitCode.FAILED if self.stopped_at else ExitCode.DONE)

    def as_dict(self) -> dict:
        return {
            "folder": str(self.folder),
            "mode": self.mode,
            "already_applied": self.already_applied,
            "ran": [r.as_dict() for r in self.reports],
            "stopped_at": self.stopped_at,
            "error": self.error.paragraph() if self.error else None,
            "not_run": self.not_run,
        }


def load_folder(folder: Path) -> list[Migration]:
    """Every migration of the folder, loaded before any runs: a broken file stops nothing half-way."""
    found = [load(path) for path in available(folder)]
    if not found:
        raise ConfigError(f"There is no migration (.py or .sql) in {folder}.", "Give a folder of migrations, or one file.")
    seen: dict[str, Path] = {}
    for migration in found:
        if migration.id in seen:
            raise ConfigError(
                f"{seen[migration.id]} and {migration.path} are both the migration {migration.id}.",
                "Give each its own MIGRATION_ID or file name (nothing was run).",
            )
        seen[migration.id] = migration.path
    return found


def run_pending(
    settings: Settings,
    ui: Reporter,
    ask: Confirmer,
    folder: Path,
    options: runner.Options,
    *,
    production: bool,
    **production_flags,
) -> FolderReport:
    migrations = load_folder(folder)
    applied = ledger.applied(settings) or {}
    pending = [m for m in migrations if m.id not in applied]
    report = FolderReport(folder, "production" if production else "dry run", [m.id for m in migrations if m.id in applied])
    if not pending:
        ui.ok(f"Nothing to run: staging's ledger lists every migration of {folder} as applied.")
        return report
    ui.step(f"{len(pending)} migration(s) of {folder} to run, in this order: " + ", ".join(m.id for m in pending))
    if not production:
        ui.info("Each dry run sees staging as it is now, without the changes of the dry runs before it.")
    for n, migration in enumerate(pending, start=1):
        ui.step(f"Migration {n} of {len(pending)}: {migration.id}")
        try:
            if production:
                one = runner.production(settings, ui, ask, migration, options, **production_flags)
            else:
                one = runner.dry_run(settings, ui, migration, options)
        except RollbackError as exc:
            report.error = exc
        else:
            report.reports.append(one)
            if one.ok:
                continue
        report.stopped_at = migration.id
        report.not_run = [m.id for m in pending[n:]]
        why = "failed (the error below says why)" if report.error else report.reports[-1].outcome
        after = f"; {', '.join(report.not_run)} did not run" if report.not_run else ""
        ui.error(f"Stopped at {migration.id}: {migration.id} {why}{after}.")
        break
    return report
