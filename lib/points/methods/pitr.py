"""Points as named restore points in a pgBackRest repository: for databases that
outgrow copies. A point is ``pg_create_restore_point(<id>)`` and a WAL switch, waited
for until that segment is archived, in seconds whatever the database's size; it
needs a backup in the repository that holds staging's current database (by oid), and
takes one first where there is none. Restoring one is lib/restore/pitr_recovery.py's."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib.errors import ConfigError, RollbackError, ToolError, VerificationError
from lib.files import utc_now
from lib.interaction import Reporter
from lib.pg.backrest import Backup, History, Repository, parse_history
from lib.pg.cluster import LocalCluster, local_cluster
from lib.pg.db import connection, database_properties, query, scalar
from lib.pg.fingerprint import schema_lines, sequence_positions
from lib.pg.target import Target
from lib.points.catalog import Catalog, Point
from lib.points.manifest import BackupSection, ClusterSection, Manifest, RepositorySection, RestorePointSection
from lib.points.methods.base import REPOSITORY, Method, Taken, TakeRequest
from lib.points.methods.dump import database_section

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05


def repository_for(target: Target, *, needed_for: str) -> tuple[LocalCluster, Repository]:
    """The cluster on this machine and its pgBackRest stanza, or why not."""
    if not target.facts.is_superuser:
        raise ConfigError(
            f"{needed_for} needs a superuser (pg_create_restore_point, pg_switch_wal and the server's files); "
            f"role {target.facts.current_user} is not one.",
            "Use a superuser URL for staging (--database-url), or take template or dump points.",
        )
    cluster = local_cluster(target.maint, needed_for=needed_for)
    return cluster, Repository(target.settings, cluster)


def check_archiving(target: Target, repo: Repository) -> None:
    mode = scalar(target.maint, "SELECT current_setting('archive_mode')")
    command = scalar(target.maint, "SELECT current_setting('archive_command')")
    if mode not in ("on", "always"):
        raise ConfigError(
            f"archive_mode is {mode} on {target.info.server_label()}: no WAL reaches the repository, so no point can be "
            "restored from it.",
            f"Set archive_mode = on and archive_command = 'pgbackrest --stanza={repo.stanza} archive-push %p', "
            "restart the server, then run `pgbackrest check`.",
        )
    if "pgbackrest" not in (command or ""):
        log.warning("archive_command does not mention pgbackrest: %s", command)


def history(target: Target) -> History:
    """The server's timeline and the ones it branched from (its .history file, read by a
    superuser), with when the current one began (that file's time: written at the
    promotion that started it)."""
    current = int(scalar(target.maint, "SELECT pg_walfile_name(pg_current_wal_lsn())")[:8], 16)
    if current == 1:
        return History(1, {})
    name = f"pg_wal/{current:08X}.history"
    text, since = query(
        target.maint,
        "SELECT pg_read_file(%s, 0, 10000000, true), extract(epoch FROM (pg_stat_file(%s, true)).modification)",
        (name, name),
    )[0]
    if text is None:
        raise RollbackError(
            f"The server is on timeline {current}, but its history file {name} is missing, so the toolkit cannot tell "
            "which backups lead to it. Nothing was touched.",
            "Take a full backup (`pgbackrest --stanza=… --type=full backup`), then try again.",
        )
    return parse_history(current, text, float(since) if since is not None else None)


def backup_for(target: Target, repo: Repository, ui: Reporter) -> Backup:
    """The newest backup holding staging as it is now, on the current timeline's
    history; one taken first where none does (incremental when a full one exists)."""
    timelines = history(target)
    found = repo.backup_holding(target.dbname, target.facts.database_oid, timelines)
    if found is not None:
        return found
    kind = "incr" if any(b.kind == "full" for b in repo.backups()) else "full"
    ui.warn(
        f"No backup in stanza {repo.stanza!r} holds {target.dbname} as it is now (oid {target.facts.database_oid} on "
        f"timeline {timelines.current}; every restore beside gives it a new oid, every restore in place a new "
        f"timeline): taking {'an incremental' if kind == 'incr' else 'a full'} backup first."
    )
    with ui.progress(f"pgbackrest backup --type={kind}") as tick:
        try:
            repo.backup(kind, on_tick=lambda _e: tick())
        except ToolError as exc:
            raise ToolError(
                f"pgBackRest could not take the backup this point needs: {exc.message}. Nothing was listed.",
                f"Run `pgbackrest --stanza={repo.stanza} check` as {repo.cluster.owner.pw_name} and fix what it says.",
            ) from None
    found = repo.backup_holding(target.dbname, target.facts.database_oid, timelines)
    if found is None:
        raise VerificationError(
            f"The {kind} backup just taken does not list {target.dbname} (oid {target.facts.database_oid}).",
            f"Check the stanza's configuration (pg1-path must be {repo.cluster.data_dir}).",
        )
    return found


def wait_archived(target: Target, segment: str, ui: Reporter) -> float:
    """Until ``segment`` is archived (pg_stat_archiver), at most PITR_ARCHIVE_TIMEOUT seconds."""
    started = time.monotonic()
    limit = target.settings.archive_timeout
    with ui.progress(f"Waiting for WAL segment {segment} to be archived") as tick:
        while True:
            archived, failed, failed_at, failures = query(
                target.maint, "SELECT last_archived_wal, last_failed_wal, last_failed_time, failed_count FROM pg_stat_archiver"
            )[0]
            if archived and not archived.endswith((".history", ".partial", ".backup")) and archived >= segment:
                return time.monotonic() - started
            waited = time.monotonic() - started
            if waited > limit:
                said = f"; the last failure was {failed} at {failed_at} ({failures} failures so far)" if failed else ""
                raise RollbackError(
                    f"WAL segment {segment} was not archived within {limit} s (the last archived is {archived or 'none'}"
                    f"{said}), so the restore point cannot be relied on. Nothing was listed.",
                    "Check archiving: `pgbackrest --stanza=… check` as the cluster's owner, and the server's log for "
                    "archive_command errors; PITR_ARCHIVE_TIMEOUT waits longer.",
                )
            tick(f"{waited:.0f} s")
            time.sleep(POLL_SECONDS)


def reached_repository(repo: Repository, segment: str) -> None:
    """pg_stat_archiver says the segment was archived; the repository must say so too (an
    archive_command that exits 0 without pgBackRest would fool the first)."""
    covered = repo.archived_range()
    if covered is None or not covered[0] <= segment <= covered[1]:
        raise RollbackError(
            f"The server says WAL segment {segment} was archived, but stanza {repo.stanza!r} does not hold it "
            f"(it holds {covered[0] + ' to ' + covered[1] if covered else 'none'}): archive_command does not archive "
            "into this stanza. Nothing was listed.",
            f"Set archive_command = 'pgbackrest --stanza={repo.stanza} archive-push %p', reload, and run "
            f"`pgbackrest --stanza={repo.stanza} check`.",
        )


def take(target: Target, catalog: Catalog, ui: Reporter, *, label: str, base: Mapping[str, Any]) -> Point:
    started = utc_now()
    cluster, repo = repository_for(target, needed_for="A pitr point")
    check_archiving(target, repo)
    backup = backup_for(target, repo, ui)
    with catalog.writing(label) as writer, connection(target.info, application_name="rollback-toolkit pitr") as conn:
        lines = schema_lines(conn)
        props = database_properties(conn, target.dbname).as_dict()
        lsn, segment = query(conn, "SELECT p, pg_walfile_name(p) FROM pg_create_restore_point(%s) p", (writer.id,))[0]
        # read right after the restore point, so never behind it (a restore sets them: recovery leaves them up to 32 ahead)
        sequences = sequence_positions(conn)
        query(conn, "SELECT pg_switch_wal()")
        conn.commit()
        waited = wait_archived(target, segment, ui)
        reached_repository(repo, segment)
        point = writer.commit(
            Manifest(
                id=writer.id,
                **base,
                created_at_text=started.isoformat(timespec="milliseconds"),
                method=PitrMethod.name,
                database=database_section(target, props),
                restore_point=RestorePointSection(name=writer.id, lsn=lsn, wal=segment, timeline=int(segment[:8], 16)),
                backup=BackupSection(**backup.as_dict()),
                repository=RepositorySection(stanza=repo.stanza, config=target.settings.pgbackrest_env.get("PGBACKREST_CONFIG")),
                cluster=ClusterSection(data_directory=str(cluster.data_dir), owner=cluster.owner.pw_name, major=cluster.major),
                sequences=sequences,
                fingerprint={
                    "kind": "pitr",
                    "schema_digest": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
                    "schema_objects": len(lines),
                    "sequences": sequences,
                },
                archive_wait_seconds=round(waited, 3),
                duration_seconds=round((utc_now() - started).total_seconds(), 3),
            )
        )
    ui.step(
        f"Restore point {point.id} at {lsn} (WAL {segment}, archived); it needs backup {backup.label} of stanza {repo.stanza}"
    )
    return point


def verify(target: Target, point: Point) -> dict:
    """The backup the point needs is in the repository, and so is the archived WAL up to
    its restore point. (pgBackRest's own `pgbackrest verify` reads every file of the
    repository, hours at hundreds of GB: it belongs on pgBackRest's schedule.)"""
    _, repo = repository_for(target, needed_for="Verifying a pitr point")
    point_in_repository(repo, point)
    m = point.manifest
    return {"backup": m.backup.label, "wal": f"{m.restore_point.wal} archived", "repository": repo.stanza}


def point_in_repository(repo: Repository, point: Point) -> None:
    m = point.manifest
    label = m.backup.label
    if label not in {b.label for b in repo.backups()}:
        raise VerificationError(
            f"Point {point.id} needs backup {label} of stanza {repo.stanza}, which the repository no longer holds "
            "(pgBackRest's retention expired it). Nothing was touched.",
            "Delete the point (`rollback_manager.py delete`); keep backups longer (repo1-retention-full) for the next ones.",
        )
    covered = repo.archived_range()
    wal = m.restore_point.wal
    if covered is None or not covered[0] <= wal <= covered[1]:
        raise VerificationError(
            f"The WAL point {point.id} needs ({wal}) is not among the archived segments "
            f"({covered[0] + ' to ' + covered[1] if covered else 'none'}). Nothing was touched.",
            "Check archiving with `pgbackrest check`; the point cannot be restored without it.",
        )


def side_folder(settings, cluster: LocalCluster, point_id: str) -> Path:
    """Where a point's cluster is restored beside staging: PITR_SIDE_DIR, else beside the
    cluster's own data directory (its filesystem has room for a cluster)."""
    parent = settings.pitr_side_dir or cluster.data_dir.parent
    return parent / f"rollback-side-{point_id}"


class PitrMethod(Method):
    """A named restore point in staging's pgBackRest repository: costs a WAL switch to
    take; restored by recovery, beside staging or the whole cluster in place."""

    name = "pitr"
    level = "repository"
    restore_mode = REPOSITORY
    unlogged_note = "they come back empty from any pitr restore: their rows are never in the WAL"

    def take(self, request: TakeRequest) -> Taken:
        r = request
        return Taken(take(r.target, r.catalog, r.ui, label=r.label, base=r.base))

    def verify(self, point: Point, settings, ui: Reporter, target: Target | None, *, deep: bool) -> dict:
        with ui.progress("Checking the repository"):
            result = verify(target, point)
        ui.ok(f"Backup {result['backup']} and the WAL up to the restore point are in the repository")
        return result

    def describe_verification(self, point: Point) -> str:
        backup = point.manifest.backup.label if point.manifest.backup else "?"
        return f"repository: needs backup {backup} and the WAL up to its restore point (`verify` asks pgBackRest)"

    def describe_rows(self, point: Point) -> str:
        return "not counted: a restore point in the WAL (a restore counts the recovered copy against its source)"
