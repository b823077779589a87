"""The commands the scripts, the menu and the Python API offer: create, list, info,
verify, restore, partial rollback, diff, delete, cleanup, audit.

Each takes settings, a Reporter and, where it may destroy something, a Confirmer
(lib/interaction.py); what changes anything starts through the operation scaffold
(lib/operations/scaffold.py). They return results and raise on failure."""

from __future__ import annotations

import getpass
import logging
import os
import socket
from pathlib import Path

from lib import audit
from lib.audit import audited
from lib.config import Settings
from lib.errors import ConfigError, CopyRejected, NoPointError, RollbackError, VerificationError
from lib.files import sha256_file, utc_now
from lib.interaction import Confirmer, Reporter
from lib.operations import background
from lib.operations import pitr_restore as pitr_ops
from lib.operations.scaffold import Operation, operation
from lib.pg.db import connection, database_properties
from lib.pg.fingerprint import compare, fingerprint, rekeyed, row_counts, sequence_positions
from lib.pg.target import Target, open_target
from lib.points import crypto, retention
from lib.points.catalog import MANIFEST, Catalog, Point, check_files, refuse_damaged_manifest
from lib.points.manifest import DEFAULT_KIND, CreatedBy, Kind, thawed
from lib.points.methods import data as data_method
from lib.points.methods import dump as dump_method
from lib.points.methods import registry
from lib.points.methods.base import REPOSITORY, SWAP, TABLES, Method, TakeRequest
from lib.restore import diff, partial
from lib.restore.swap import (
    RestoreResult,
    check_point_usable,
    refuse_other_database,
    refuse_replication_ties,
    restore_data,
    restore_in_place,
    restore_plan,
    restore_swap,
)

log = logging.getLogger(__name__)


def default_method(settings: Settings) -> str:
    return registry.check_name(settings.rollback_method, setting="ROLLBACK_METHOD")


def _take_trying(op: Operation, requested: str, chosen: Method, **point) -> Point:
    """``chosen``; with --method auto, on a failure that is that method's own (see
    RollbackError.another_method_may_work), the next one, saying which failed and why. A
    failure every method shares (the server, the backup folder) stops at once."""
    method, failed = chosen, []
    while True:
        try:
            return _take(op, method=method, **point)
        except RollbackError as exc:
            after = registry.fallback(method)
            if requested != registry.AUTO or not exc.another_method_may_work or after is None:
                raise
            op.ui.warn(
                f"A {method.name} point could not be taken: {exc.message} Trying a {after.name} point instead (--method auto)."
            )
            failed.append({"method": method.name, "error": exc.message})
            op.record.set(methods_failed=failed)
            method = after


def _who() -> CreatedBy:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return CreatedBy(user=user, host=socket.gethostname(), pid=os.getpid())


def _take(
    op: Operation,
    *,
    description: str,
    migration_id: str | None,
    method: Method,
    kind: Kind = DEFAULT_KIND,
    tables: list[str] | None = None,
) -> Point:
    """A point of staging under an operation already started (the lock held); the
    background work the method asks for is started here."""
    unlogged = op.target.facts.unlogged_tables  # read with the server's facts: no session of its own
    if unlogged and kind != Kind.BEFORE_ROLLBACK:
        op.ui.warn(
            f"UNLOGGED tables in {op.target.dbname}: {', '.join(unlogged)}. For this {method.name} point, {method.unlogged_note}."
        )
    base = {
        "description": description,
        "migration_id": migration_id,
        "kind": kind,
        "created_by": _who(),
        "unlogged_tables": unlogged or None,
    }
    taken = method.take(
        TakeRequest(op.target, op.catalog, op.ui, op.ask, label=migration_id or description, base=base, tables=tables)
    )
    for follow_up in taken.follow_up:
        background.start(op.settings, follow_up.job, *follow_up.point_ids)
        for note in follow_up.notes:
            op.ui.info(f"  {note[0].upper()}{note[1:]}.")
    return taken.point


def create_point(
    settings: Settings,
    ui: Reporter,
    ask: Confirmer,
    *,
    description: str,
    migration_id: str | None = None,
    method: str | None = None,
    keep: int | None = None,
    tables: list[str] | None = None,
) -> tuple[Point, list[Point]]:
    """The new point, and the points --keep removed."""
    requested = registry.check_name(method or (registry.FOR_TABLES if tables else default_method(settings)))
    if tables and requested != registry.FOR_TABLES:
        raise ConfigError(
            "--table makes a data point of those tables.", "Use --method data with --table (or leave --method out)."
        )
    retention.check_retention_request(keep, None)
    with operation(settings, "create", ui=ui, ask=ask, migration_id=migration_id) as op:
        target = op.target
        chosen, why = registry.choose(target, requested)
        ui.step(
            f"Rollback point of {target.dbname} on {target.info.server_label()} "
            f"(PostgreSQL {target.facts.version}), method {chosen.name}" + (f": {why}" if requested == registry.AUTO else "")
        )
        point = _take_trying(op, requested, chosen, description=description, migration_id=migration_id, tables=tables)
        op.record.set(point_id=point.id, method=point.method)
        # --keep with a migration id keeps that migration's newest N and touches no other point
        removed = retention.apply(target, op.catalog, ui, keep=keep, later=True, migration_id=migration_id) if keep else []
        if removed:
            background.start(settings, "remove", *(p.id for p in removed))  # their databases, dropped in the background
    return point, removed


def list_points(settings: Settings) -> list[Point]:
    return Catalog(settings.backup_dir).points()


def get_point(settings: Settings, point_id: str) -> Point:
    return Catalog(settings.backup_dir).get(point_id)


def file_info(settings: Settings, path: Path) -> tuple[dict, Point | None]:
    """info --file: a point folder or its manifest (with the point), or a bare pg_dump archive."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        path = path / MANIFEST
    if path.name == MANIFEST and path.is_file():
        point = Catalog(path.parent.parent).get(path.parent.name)
        problems = check_files(point)
        return {"point": point.manifest.as_dict(), "path": str(point.path), "files": problems or "ok"}, point
    if dump_method.is_archive_folder(path):
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        return {"file": str(path), "size_bytes": size, **dump_method.archive_header(path, settings)}, None
    if not path.is_file():
        raise ConfigError(f"{path} does not exist or is not a file.", "Give the path of an archive or a point folder.")
    header = dump_method.archive_header(path, settings)
    return {"file": str(path), "size_bytes": path.stat().st_size, "sha256": sha256_file(path), **header}, None


def verify_point(settings: Settings, ui: Reporter, point_id: str, *, deep: bool = False) -> dict:
    """Checksums, then by method: an archive read end to end, a data point's files read
    and counted, a database copy checked by its catalog (physical). With ``deep``, every
    row: a dump rebuilt beside staging and counted, a copy's rows against the baseline."""
    catalog = Catalog(settings.backup_dir)
    point = catalog.get(point_id)
    with audited(settings.log_dir, "verify", point.manifest.database.url, point.id) as record:
        result: dict = {"id": point.id, "method": point.method}
        refuse_damaged_manifest(point)
        problems = check_files(point)
        if problems:
            raise VerificationError(
                f"Point {point.id} failed its checksums: " + "; ".join(problems) + ".",
                "Use an earlier point (`python3 rollback_manager.py list`).",
            )
        files = len(point.manifest.files)
        result["checksums"] = f"{files} file(s) match"
        if files:
            ui.ok(f"Checksums of {point.id} match ({files} file(s))")
        if crypto.is_encrypted(point):
            crypto.check_point_keys(point, settings)
            result["encryption"] = "age; the key opens every file"
        method = registry.of(point)
        try:
            if method.needs_server_to_verify(deep):
                with open_target(settings, check_v2=False, ui=ui) as target:
                    result.update(method.verify(point, settings, ui, target, deep=deep))
            else:
                result.update(method.verify(point, settings, ui, None, deep=deep))
        except VerificationError as exc:  # quick_rollback.py skips a point whose last verification failed
            point.record_verification(failed=f"{utc_now().isoformat(timespec='seconds')}: {exc.message}")
            raise
        if point.verification.failed:
            point.record_verification(failed=None)
        level = result.pop("verified", None) or method.verified_level(point)
        result["verified"] = True
        result["level"] = level
        record.set(outcome="verified", level=level)
    return result


def verify_staging(settings: Settings, point_id: str) -> tuple[dict[str, dict], list[str]]:
    """Does staging now hold what the point holds? Row counts per table and sequences; for a
    whole-database point also the schema digest and large objects. Returns per table
    (expected_rows, actual_rows, matches) and the problems found."""
    point = get_point(settings, point_id)
    expected = thawed(point.manifest.fingerprint or {})
    if expected.pop("kind", None) == "physical":  # a database copy: its rows as the background read them
        expected.pop("relations", None)
        baseline = point.verification.baseline
        if baseline and baseline.row_counts:
            expected["row_counts"] = thawed(baseline.row_counts)
    with audited(settings.log_dir, "verify rollback", settings.staging().masked(), point.id) as record:
        with connection(settings.staging(), readonly=True, application_name="rollback-toolkit verify") as conn:
            if registry.of(point).whole_database:
                fp = fingerprint(conn)
                want = rekeyed(expected.get("row_counts", {}), fp.row_counts)
                tables = {
                    t: {
                        "expected_rows": want.get(t),
                        "actual_rows": fp.row_counts.get(t),
                        "matches": want.get(t) == fp.row_counts.get(t),
                    }
                    for t in sorted(set(want) | set(fp.row_counts))
                }
                problems = compare(expected, fp)
            else:  # only the point's tables, and their sequences (keys recorded before quoting, matched)
                actual = row_counts(conn)
                want = rekeyed(expected.get("row_counts", {}), actual)
                tables = {
                    t: {"expected_rows": n, "actual_rows": actual.get(t), "matches": actual.get(t) == n} for t, n in want.items()
                }
                problems = [
                    f"{t}: {d['expected_rows']} rows in the point, {d['actual_rows']} now"
                    for t, d in tables.items()
                    if not d["matches"]
                ]
                now = sequence_positions(conn)
                problems += [
                    f"sequence {name}: {list(position)} in the point, {now.get(name)} now"
                    for name, position in expected.get("sequences", {}).items()
                    if list(position) != list(now.get(name) or [])
                ]
        record.set(outcome="differs" if problems else "matches", problems=problems[:10])
    return tables, problems


def restore_point(
    settings: Settings,
    ui: Reporter,
    ask: Confirmer,
    point_id: str | None,
    *,
    archive: Path | None = None,
    force: bool = False,
    to_time: str | None = None,
    to_lsn: str | None = None,
    in_place: bool = False,
    catalog_only: bool = False,
) -> RestoreResult:
    """A point by id, an archive or point folder (--file), or a moment the pgBackRest
    repository covers (--to-time, --to-lsn)."""
    if to_time or to_lsn:
        with operation(settings, "restore", ui=ui, ask=ask) as op:
            recovery = pitr_ops.recovery_for(op, None, to_time=to_time, to_lsn=to_lsn)
            op.record.set(target=recovery.label)
            return pitr_ops.restore(op, recovery, point=None, in_place=in_place, force=force)
    catalog = Catalog(settings.backup_dir).ensure()
    point = dump_method.point_of_archive(settings, archive) if archive else catalog.get(point_id or "")
    pitr_ops.refuse_for_other_methods(point, in_place=in_place)
    with operation(settings, "restore", ui=ui, ask=ask, point_id=point.id) as op:
        if point.manifest.kind == Kind.FILE:
            # a bare archive records nothing: restored here, with staging's own encoding, locale, owner and
            # settings. A point folder stays as it was written (its checksums cover its manifest).
            here = point.manifest.database.replaced(
                name=op.target.dbname, properties=database_properties(op.target.maint, op.target.dbname).as_dict()
            )
            point = Point(point.path, point.manifest.replaced(database=here))
        return _restore(op, point, force=force, in_place=in_place, catalog_only=catalog_only)


def quick_rollback(
    settings: Settings,
    ui: Reporter,
    ask: Confirmer,
    *,
    method: str | None = None,
    force: bool = False,
    catalog_only: bool = False,
) -> tuple[Point, RestoreResult]:
    """Staging back to its newest point that can be restored, in one operation: the point
    is chosen under the same lock and connections that restore it. A point that cannot be
    used (its last verification failed, it was changed, its key is missing, its tables
    changed shape) or whose copy fails its reading before the swap is skipped with one
    line, and the next one is tried; one older than the newest taken on purpose is said."""
    with operation(settings, "restore", ui=ui, ask=ask) as op:
        candidates = _candidates(op.target, op.catalog, method)
        skipped: list[str] = []
        for point in candidates:
            why = _cannot_use(op, point, force=force)
            if why:
                ui.warn(f"Skipping point {point.id} ({_when(point)}, {point.manifest.description or 'no description'}): {why}")
                skipped.append(point.id)
                continue
            if skipped:
                ui.warn(
                    f"Using point {point.id} ({_when(point)}), older than the newest point taken on purpose "
                    f"({candidates[0].id}), which cannot be used."
                )
            op.record.set(point_id=point.id, skipped=skipped)
            try:
                return point, _restore(op, point, force=force, catalog_only=catalog_only)
            except CopyRejected as exc:  # before the swap: staging untouched, the next point may do
                ui.warn(f"Skipping point {point.id}: {exc.message}")
                skipped.append(point.id)
        raise NoPointError(
            f"There is no usable rollback point of {op.target.dbname} on {op.target.info.server_label()} in "
            f"{op.catalog.root}" + (f" ({len(skipped)} skipped above)." if skipped else "."),
            "Rebuild staging from V2 with `python3 quick_rollback.py --from-v2`, and take a point "
            '(`python3 create_rollback_point.py "Before migration"`) before the next migration.',
        )


def _when(point: Point) -> str:
    return f"taken {(point.manifest.created_at_text or '?')[:19].replace('T', ' ')} UTC"


def _candidates(target: Target, catalog: Catalog, method: str | None) -> list[Point]:
    """Completed points of staging taken on purpose (not the 'state before rollback'
    safety nets, not table-level points), newest first."""
    return [
        p
        for p in reversed(retention.points_of(catalog, target))
        if p.manifest.kind != Kind.BEFORE_ROLLBACK
        and (p.method == method if method else not p.manifest.is_table_level)
        and p.manifest.is_completed
    ]


def _cannot_use(op: Operation, point: Point, *, force: bool) -> str | None:
    """Why quick rollback cannot restore ``point``, in one sentence; None when it can try."""
    failed = point.verification.failed
    if failed:
        return f"its last verification failed ({failed[:200]})"
    method = registry.of(point)
    try:
        check_point_usable(op.target, op.catalog, point)
        if not force:
            method.check_unchanged(op.target, point, "restore it")
        if method.restore_mode == TABLES:
            method.check_restorable(op.target, point)
    except RollbackError as exc:
        return exc.message
    return None


def _restore(op: Operation, point: Point, *, force: bool, in_place: bool = False, catalog_only: bool = False) -> RestoreResult:
    target, ui, settings = op.target, op.ui, op.settings
    check_point_usable(target, op.catalog, point)
    method = registry.of(point)
    if not force:
        method.check_unchanged(target, point, f"restore {target.dbname} to it")
    if method.restore_mode == REPOSITORY:
        recovery = pitr_ops.recovery_for(op, point, to_time=None, to_lsn=None)
        return pitr_ops.restore(op, recovery, point=point, in_place=in_place, force=force)
    rplan = restore_plan(target, point)
    refuse_replication_ties(target, rplan.ties, force=force, doing=f"restore {target.dbname}")
    ui.info(rplan.describe(target))
    if not op.ask.granted and point.manifest.fingerprint:
        ui.info("  What it undoes, per table:")
        for line in diff.summary_for_confirmation(target, point, ui):
            ui.info(f"    {line}")
    op.confirm_change("Go ahead?", what=f"restore {target.dbname}")
    if rplan.mode == SWAP:
        result = restore_swap(target, op.catalog, rplan, ui, catalog_only=catalog_only)
        background.after_restore(settings, point, result.before_point_id)  # the next spare, the kept state's rows
    else:  # in one transaction: the current state is kept first, by the method that restores it
        method.check_restorable(target, point)  # refused before anything is written
        ui.step(rplan.keeping_before(target))
        before = _take(
            op,
            description=f"state before rollback to {point.id}",
            migration_id=None,
            method=method,
            kind=Kind.BEFORE_ROLLBACK,
            tables=method.keeps_before(point) if rplan.mode == TABLES else None,
        )
        result = restore_data(target, rplan, ui, before) if rplan.mode == TABLES else restore_in_place(target, rplan, ui, before)
    op.record_swap(result)
    background.retire_before_states(op)
    return result


def check_restore_request(
    kind: str, point_id: str | None, file: str | None, *, moment: bool = False, in_place: bool = False
) -> None:
    """restore --type full|partial|backup|transaction: what each needs, or why it does not apply."""
    if moment:
        if point_id or file or kind != "full":
            raise ConfigError(
                "--to-time and --to-lsn restore a moment from the pgBackRest repository: give them without a point "
                "id, --file or --type.",
                "For a point: `rollback_manager.py restore <id>`.",
            )
        return
    if in_place and kind != "full":
        raise ConfigError("--in-place restores a whole pitr point (or moment), not --type " + kind + ".")
    if kind == "transaction":
        raise ConfigError(
            "A transaction rollback exists only inside a running migration: the migration's own transaction "
            "is rolled back when it fails (the Python API's MigrationTransaction).",
            "For a finished migration, restore a point: `python3 rollback_manager.py restore <id>`.",
        )
    if kind == "backup" and not file:
        raise ConfigError("--type backup needs --file PATH (a pg_dump archive or a point folder).")
    if kind != "backup" and not point_id:
        raise ConfigError("restore needs a point id.", "See `python3 rollback_manager.py list`.")


def audit_trail(settings: Settings, ui: Reporter, limit: int | None) -> list[dict]:
    """The newest entries; damaged lines are named and skipped."""
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit must be 0 (every entry) or more (not {limit}).", "For example --limit 50.")
    found = audit.read(settings.log_dir, limit)
    for number in found.damaged:
        ui.warn(f"line {number} of {found.path} is damaged (not a JSON entry); skipped")
    return found.entries


def diff_point(settings: Settings, ui: Reporter, point_id: str) -> diff.Diff:
    point = Catalog(settings.backup_dir).get(point_id)
    with open_target(settings, check_v2=False, ui=ui) as target:
        refuse_other_database(target, point)
        with ui.progress(f"Comparing staging with {point.id}"):
            return diff.compute(target, point, ui)


def partial_rollback(settings: Settings, ui: Reporter, ask: Confirmer, point_id: str, *, tables: list[str] | None) -> dict:
    point = Catalog(settings.backup_dir).get(point_id)
    with operation(settings, "partial rollback", ui=ui, ask=ask, point_id=point.id) as op:
        target = op.target
        check_point_usable(target, op.catalog, point)
        kept: dict = {}

        def confirm(partial_plan) -> None:
            ui.info(
                f"Partial rollback of {target.dbname} to {point.id}: rows added since the point are deleted, "
                "every other row is kept; in one transaction."
            )
            for line in partial_plan.lines():
                ui.info(f"  {line}")
            op.confirm_change("Delete them?", what="delete rows")
            kept["point"] = _take(
                op,
                description=f"state before partial rollback to {point.id}",
                migration_id=None,
                method=registry.get(registry.FOR_TABLES),
                kind=Kind.BEFORE_ROLLBACK,
                tables=[data_method.quoted(t) for t in partial_plan.tables],
            )

        outcome = partial.delete_added_rows(target, point, ui, tables=tables, confirm=confirm)
        outcome.update(
            point_id=point.id, database=target.dbname, mode="partial", before_point_id=kept["point"].id if kept else None
        )
        op.record.set(mode="partial", deleted=outcome["deleted"], before_point_id=outcome["before_point_id"])
        background.retire_before_states(op)
    return outcome


def delete_point(settings: Settings, ui: Reporter, ask: Confirmer, point_id: str) -> Point:
    point = Catalog(settings.backup_dir).get(point_id)
    with operation(settings, "delete", ui=ui, ask=ask, point_id=point.id, check_v2=False) as op:
        method = registry.find(point.method)
        held = method is not None and method.holds_database and point.manifest.is_completed
        copy = f" and its database copy {point.manifest.template_database!r}" if held else ""
        ui.info(f"Delete point {point.id}{copy} ({point.manifest.description or 'no description'})?")
        ask.confirm("Delete it?", what=f"delete {point.id}")
        retention.delete_point(op.target, op.catalog, point)
    return point


def cleanup(
    settings: Settings, ui: Reporter, ask: Confirmer, *, keep: int | None, older_than_days: float | None, dry_run: bool
) -> tuple[list[Point], Point | None, list[str]]:
    """Old points by the retention asked for, and always what interrupted runs left."""
    retention.check_retention_request(keep, older_than_days)
    removed: list[Point] = []
    with operation(settings, "cleanup", ui=ui, ask=ask, check_v2=False, audit=not dry_run, sweep=True, dry_run=dry_run) as op:
        target, catalog, left = op.target, op.catalog, op.leftovers
        for line in left:
            ui.info(line)
        if not left:
            ui.info("Nothing left behind by interrupted runs.")
        op.record.set(leftovers=left, removed=[])
        if keep is None and older_than_days is None:
            return [], None, left
        plan = retention.cleanup_plan(target, catalog, keep=keep, older_than_days=older_than_days)
        if plan.protected:
            ui.info(f"Newest point that passes its checks, always kept: {plan.protected.id}")
        manual = plan.protected_manual
        if manual and manual is not plan.protected and manual.id != plan.protected.id:
            ui.info(f"Newest point quick_rollback.py would use, also kept: {manual.id}")
        if not plan.remove:
            ui.info("No point to remove.")
            return [], plan.protected, left
        if dry_run:
            retention.apply(target, catalog, ui, dry_run=True, cleanup=plan)
            return plan.remove, plan.protected, left
        ui.info(f"{len(plan.remove)} point(s) of {target.dbname} will be removed, database copies included:")
        for p in plan.remove:
            ui.info(f"  - {p.id} ({p.method}, {(p.manifest.created_at_text or '?')[:19]})")
        ask.confirm("Remove them?", what="remove points")
        removed = retention.apply(target, catalog, ui, cleanup=plan)
        op.record.set(removed=[p.id for p in removed])
    return removed, plan.protected, left
