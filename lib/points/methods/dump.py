"""Points as pg_dump archives (the directory format by parallel jobs; the custom format
when encrypted, and in points written before), taken in one exported snapshot so the
recorded row counts are exactly the archive's. Sequences are not held by a snapshot:
their recorded positions are read back from the archive, as pg_dump wrote them."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from lib.errors import CatalogError, ConfigError, ToolError, VerificationError
from lib.files import human_size, utc_now, write_private_file
from lib.interaction import Reporter
from lib.pg.archive_sequences import archived_positions, fed
from lib.pg.db import connection, create_database_like, database_properties, derived_name, drop_database, query, snapshot_session
from lib.pg.fingerprint import compare, fingerprint
from lib.pg.progress import DumpTracker, RestoreTracker, Watch, application_name, named_sessions, table_sizes
from lib.pg.target import Target
from lib.pg.tools import (
    INDEX_MEMORY,
    Tool,
    UnknownSettingsFilter,
    candidates_for_archive,
    candidates_for_server,
    command_for,
    companion,
    try_each,
)
from lib.points import crypto, intents
from lib.points.catalog import MANIFEST, Catalog, Point, point_at
from lib.points.manifest import DatabaseSection, Kind, Manifest, Status, ToolSection, VerificationLevel, thawed
from lib.points.methods.base import Built, Method, Taken, TakeRequest
from lib.process import NO_INPUT, pipeline

log = logging.getLogger(__name__)

ARCHIVE_NAME = "database.dump"


def check_free_space(folder: Path, database_size: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < database_size:
        raise CatalogError(
            f"Not enough free space in {folder}: the database is {human_size(database_size)} "
            f"({database_size} bytes) and only {human_size(free)} ({free} bytes) is free.",
            "Free some space (`python3 rollback_manager.py list` shows old points), or set BACKUP_DIR to a larger disk.",
        )


def database_section(target: Target, props: Mapping[str, Any]) -> DatabaseSection:
    f = target.facts
    return DatabaseSection(
        name=target.dbname,
        url=target.masked,
        server=target.info.server_label(),
        server_version=f.version,
        server_major=f.major,
        system_identifier=f.system_identifier,
        database_oid=f.database_oid,
        size_bytes=f.database_size,
        properties=props,
    )


ARCHIVE_FOLDER = "database.dir"  # the directory format: one file per table, written and read by parallel jobs
COMPRESSION = "1"  # gzip level 1: about half the time of the default level, for files about a tenth larger


def take(
    target: Target,
    catalog: Catalog,
    ui: Reporter,
    *,
    label: str,
    base: Mapping[str, Any],
) -> Point:
    """pg_dump in one exported snapshot, its exact row counts read in the same snapshot
    while it runs, its sequences read back from the archive it wrote. Unencrypted: the
    directory format by ``DUMP_JOBS`` parallel jobs; encrypted: the custom format
    streamed into age (one stream, no plaintext on disk; its head kept in memory)."""
    to = crypto.recipients_if_asked(target.settings)  # refused before anything is written
    check_free_space(catalog.root, target.facts.database_size)
    candidates = candidates_for_server("pg_dump", target.facts.major, target.settings)
    started = utc_now()
    jobs = 1 if to else target.settings.dump_jobs
    name = ARCHIVE_NAME + crypto.SUFFIX if to else ARCHIVE_FOLDER
    app = application_name("dump")
    with snapshot_session(target.info, application_name="rollback-toolkit snapshot") as snap_conn:
        snapshot = query(snap_conn, "SELECT pg_export_snapshot()")[0][0]
        tables = table_sizes(snap_conn)  # what pg_dump reads, for its progress; before the count uses the connection
        with catalog.writing(label) as writer:
            archive = writer.new_file(name) if to else writer.tmp / name
            head = ArchiveHead(HEAD_LIMIT) if to else None
            with ThreadPoolExecutor(max_workers=1) as counter:
                counted = counter.submit(fingerprint, snap_conn)  # the same snapshot, while pg_dump reads
                with (
                    ui.progress(f"Dumping {target.dbname}", total=sum(t.size for t in tables), unit="B", estimated=True) as tick,
                    target.progress_poller(target.dbname, app) as poller,
                    crypto.encrypting(archive, to, tap=head.keep) if to else nullcontext() as sink,
                ):
                    fds = (sink.fileno(),) if sink else ()

                    def dump_with(tool: Tool) -> None:
                        dump = command_for(tool, conn=target.info, env=named_sessions(app))
                        if fds:
                            head.clear()  # a refused attempt may have begun it
                            args = dump.archive(snapshot=snapshot, file=f"/dev/fd/{fds[0]}", compress=COMPRESSION)
                        else:
                            shutil.rmtree(archive, ignore_errors=True)  # a refused attempt may have begun it
                            args = dump.archive(snapshot=snapshot, file=str(archive), compress=COMPRESSION, fmt="directory")
                            args += [f"--jobs={jobs}"]
                        watch = Watch(
                            tick,
                            DumpTracker(tables, parallel=jobs > 1),
                            poller,
                            note=lambda: f"{human_size(_bytes_in(archive))} written",
                        )
                        dump.run(
                            [*args, "--no-sync", "--verbose"],  # every file is fsynced when the point is committed
                            on_tick=watch,
                            on_stderr=watch.tracker.line,
                            pass_fds=fds,
                        )
                        watch.finished()

                    try:
                        tool, _ = try_each(candidates, dump_with)
                    except BaseException:
                        with suppress(psycopg2.Error):  # the count may wait on a lock pg_dump waited on too
                            snap_conn.cancel()
                        raise
                fp = counted.result()
            recorded = fp.as_dict()
            del recorded["sequences"]  # read in the snapshot's session at its own moment: not the archive's
            recorded.update(sequences_as_archived(tool, archive, head, target.settings))
            ui.step(
                f"Archive written by {tool.path} ({tool.version}), "
                + ("custom format, encrypted with age" if to else f"directory format by {jobs} job(s)")
                + f"; {fp.total_rows} rows counted in the same snapshot; "
                + (
                    f"{len(recorded['sequences'])} sequences as the archive sets them"
                    if "sequences" in recorded
                    else f"sequences not recorded: {recorded[SEQUENCES_NOT_RECORDED]}"
                )
            )
            props = database_properties(snap_conn, target.dbname).as_dict()
            point = writer.commit(
                Manifest(
                    id=writer.id,
                    **base,
                    created_at_text=started.isoformat(timespec="milliseconds"),
                    method=DumpMethod.name,
                    database=database_section(target, props),
                    tool=ToolSection(name=tool.name, path=str(tool.path), major=tool.major, version=tool.version),
                    archive=name,
                    archive_format="custom" if to else "directory",
                    compression=f"gzip:{COMPRESSION}",
                    jobs=jobs,
                    encryption=crypto.manifest_section() if to else None,
                    fingerprint=recorded,
                    duration_seconds=round((utc_now() - started).total_seconds(), 3),
                )
            )
    return point


# Where a dump point's recorded sequences come from (the fingerprint's keys beside "sequences").
SEQUENCES_FROM = "sequences_from"  # "archive": its SEQUENCE SET entries, as pg_dump wrote them
SEQUENCES_NOT_RECORDED = "sequences_not_recorded"  # why there are none; nothing is then compared for them
HEAD_LIMIT = 64 << 20  # of an encrypted archive's plaintext, kept in memory for its table of contents


class ArchiveHead:
    """The first bytes of a custom-format archive as they pass into age, in memory only.
    Written to a pipe, the format puts its whole table of contents first (pg_dump
    cannot seek back to it), and SEQUENCE SET entries carry their SQL there: the head
    is all pg_restore reads of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.cut = False  # the archive went on past the limit

    def keep(self, chunk: memoryview) -> bool:
        room = self.limit - len(self.kept)
        self.kept += chunk[:room]
        self.cut = self.cut or len(chunk) > room
        return not self.cut

    def clear(self) -> None:
        self.kept.clear()
        self.cut = False


def sequences_as_archived(dumped_by: Tool, archive: Path, head: ArchiveHead | None, settings) -> dict:
    """The fingerprint's sequences as the archive sets them, read by a pg_restore that
    reads what ``dumped_by`` wrote: from the archive's folder, or from the head of an
    encrypted one. When that head was cut before the table of contents ended, none
    are recorded, and the reason is."""
    candidates = candidates_for_archive("pg_restore", dumped_by.major, settings)
    source = (lambda: fed(head.kept)) if head is not None else (lambda: nullcontext(([str(archive)], NO_INPUT)))
    try:
        reader, positions = archived_positions(candidates, source)
    except ToolError as exc:
        if head is None or not head.cut:
            raise
        log.warning("no sequences read from the first %s of the encrypted archive: %s", human_size(HEAD_LIMIT), exc)
        return {
            SEQUENCES_NOT_RECORDED: f"the archive's table of contents is longer than the {human_size(HEAD_LIMIT)} "
            "kept in memory while it was encrypted"
        }
    log.info("%d sequences read back from the archive by %s", len(positions), reader.describe())
    return {"sequences": positions, SEQUENCES_FROM: "archive"}


def is_archive_folder(path: Path) -> bool:
    """A pg_dump archive in the directory format (its table of contents is toc.dat)."""
    return path.is_dir() and (path / "toc.dat").is_file()


def _bytes_in(path: Path) -> int:
    """How much of the archive is written so far (a file, or a folder of files)."""
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.iterdir())
        return path.stat().st_size
    except OSError:
        return 0


@contextmanager
def archive_source(point: Point, settings) -> Iterator[tuple[list[str], int]]:
    """The archive as pg_restore reads it: (arguments, stdin). Its path; or for an
    encrypted point no path and, on stdin, a pipe of its plaintext decrypted as
    pg_restore reads (pg_restore reads a custom archive from stdin in one pass)."""
    archive = point.file_path(archive_name(point))
    if not crypto.is_encrypted(point):
        yield [str(archive)], NO_INPUT
        return
    with crypto.decrypting(archive, crypto.identities(settings, point.id), point.id) as plain:
        yield [], plain.fileno()


def archive_name(point: Point) -> str:
    """The archive's name in the point's folder (points of the first versions did not record it)."""
    return ARCHIVE_NAME if point.manifest.archive is None else point.manifest.archive


def restore_candidates(point: Point, target: Target) -> list[Tool]:
    return candidates_for_archive("pg_restore", point.manifest.tool_major, target.settings)


def restore_into(target: Target, point: Point, dbname: str, ui: Reporter) -> Tool:
    """pg_restore --exit-on-error into an existing empty database."""
    jobs = target.settings.restore_jobs
    app = application_name("restore")

    def attempt(tool: Tool) -> None:
        newer = tool.major > target.facts.major
        if newer:
            ui.step(
                f"Restoring with {tool.describe()}, which is newer than the server (PostgreSQL {target.facts.major}): "
                "its SQL script goes into psql, without the settings that server does not know"
            )
        else:
            ui.step(f"Restoring with {tool.describe()}")
        with archive_source(point, target.settings) as (src, stdin):
            tracker = restore_tracker(tool, point, src)
            with (
                ui.progress(f"Restoring {point.id} into {dbname}", total=tracker.total, unit=tracker.unit) as tick,
                target.progress_poller(dbname, app) as poller,
            ):
                watch = Watch(tick, tracker, poller)
                if newer:
                    # A newer pg_restore writes settings an older server rejects; go through
                    # its SQL script, filtered, into psql, stopping at the first error.
                    restore_script(target, tool, src, dbname, single_transaction=False, watch=watch, app=app, stdin=stdin)
                else:
                    options = f"-c maintenance_work_mem={INDEX_MEMORY}"
                    restore = command_for(tool, conn=target.info, options=options, env=named_sessions(app))
                    # a pipe (an encrypted archive) cannot be read in parallel
                    args = restore.into(dbname, src, jobs=jobs if src else 1, verbose=True)
                    restore.run(args, on_tick=watch, on_stderr=tracker.line, stdin=stdin)
                watch.finished()

    tool, _ = try_each(restore_candidates(point, target), attempt)
    return tool


def restore_tracker(tool: Tool, point: Point, src: list[str]) -> RestoreTracker:
    """Progress in rows where the point counted them, in entries of the archive's table of
    contents otherwise; the table of contents is read ahead where the archive is a path."""
    listing = archive_listing(tool, src) if src else None
    return RestoreTracker(listing, thawed(point.manifest.row_counts))


def archive_listing(tool: Tool, src: list[str]) -> str | None:
    """``pg_restore --list``: the archive's table of contents (read from its start, fast); None when it cannot be read."""
    try:
        return command_for(tool).output(["--list", *src], quiet=True)
    except (OSError, ToolError) as exc:
        log.debug("no table of contents for the progress: %s", exc)
        return None


def restore_script(
    target: Target,
    tool: Tool,
    archive: list[str],
    dbname: str,
    *,
    single_transaction: bool,
    prelude: Path | None = None,
    watch: Watch | None = None,
    app: str | None = None,
    stdin=NO_INPUT,
) -> None:
    """``pg_restore --file=-`` piped into psql with ON_ERROR_STOP, filtered for the server.
    With ``watch``, pg_restore says each entry as it goes and psql's sessions are named ``app``."""
    psql = command_for(companion(tool, "psql", target.settings), conn=target.info, env=named_sessions(app) if app else None)
    with connection(target.info, dbname) as conn:
        known = {row[0] for row in query(conn, "SELECT name FROM pg_settings")}
    files = [str(prelude)] if prelude else []
    line_filter = UnknownSettingsFilter(known)
    pipeline(
        command_for(tool),
        ["--file=-", *(["--verbose"] if watch else []), *archive],
        psql,
        psql.script(dbname, files=[*files, "-"], single_transaction=single_transaction),
        line_filter=line_filter,
        on_tick=watch,
        on_producer_stderr=watch.tracker.line if watch else None,
        producer_stdin=stdin,
    )
    if line_filter.dropped:
        log.info("left out settings unknown to PostgreSQL %s: %s", target.facts.major, sorted(set(line_filter.dropped)))


def read_through(point: Point, settings) -> Tool:
    """Read every block of the archive (decompressing, and decrypting, it) without touching a database."""

    def attempt(tool: Tool) -> None:
        with archive_source(point, settings) as (src, stdin):
            command_for(tool).run(["--file=/dev/null", *src], stdin=stdin)

    tool, _ = try_each(candidates_for_archive("pg_restore", point.manifest.tool_major, settings), attempt)
    return tool


def archive_header(archive: Path, settings) -> dict:
    """What pg_restore -l says about an archive: versions, format, entries."""
    tool, listing = try_each(
        candidates_for_archive("pg_restore", None, settings), lambda t: command_for(t).output(["--list", str(archive)])
    )
    info: dict = {"read_by": str(tool.path), "entries": 0}
    keys = {
        "Archive created at": "created_at",
        "dbname": "database",
        "Format": "format",
        "Compression": "compression",
        "Dumped from database version": "server_version",
        "Dumped by pg_dump version": "pg_dump_version",
        "TOC Entries": "entries",
    }
    for line in listing.splitlines():
        text = line.lstrip(";").strip()
        for prefix, key in keys.items():
            if text.startswith(prefix):  # "Archive created at 2026-…" has no colon; "Format: DIRECTORY" has
                info[key] = text[len(prefix) :].lstrip(":").strip()
    if "created_at" in info:
        info["created_at"] = _listed_time(info["created_at"])
    return info


def _listed_time(text: str) -> str:
    """pg_restore prints when the archive was made in this process's own time zone
    ("2026-11-22 02:28:00 UTC", "… CET"): as UTC, in ISO 8601."""
    try:
        when = datetime.strptime(text[:19], "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return text
    zone = text[19:].strip()
    when = when.replace(tzinfo=UTC) if zone in ("UTC", "GMT", "Z") else when.astimezone()
    return when.astimezone(UTC).isoformat(timespec="seconds")


def archive_table_count(archive: Path, settings) -> int:
    """How many TABLE DATA entries the archive's table of contents lists."""
    _, listing = try_each(
        candidates_for_archive("pg_restore", None, settings), lambda t: command_for(t).output(["--list", str(archive)])
    )
    return sum(1 for line in listing.splitlines() if re.match(r"^\d+; \d+ \d+ TABLE DATA ", line))


def _clear_sql(server_major: int) -> str:
    """Empty the database in the same transaction as the restore (in-place mode)."""
    public_grant = "GRANT USAGE ON SCHEMA public TO PUBLIC;" if server_major >= 15 else "GRANT ALL ON SCHEMA public TO PUBLIC;"
    owner = "ALTER SCHEMA public OWNER TO pg_database_owner;" if server_major >= 14 else ""
    return f"""
DO $clear$
DECLARE r record;
BEGIN
  FOR r IN SELECT nspname FROM pg_namespace
            WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
              AND nspname NOT LIKE 'pg\\_temp\\_%' AND nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
  LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', r.nspname);
  END LOOP;
  FOR r IN SELECT extname FROM pg_extension WHERE extname <> 'plpgsql' LOOP
    EXECUTE format('DROP EXTENSION %I CASCADE', r.extname);
  END LOOP;
  PERFORM lo_unlink(oid) FROM pg_largeobject_metadata;
END
$clear$;
CREATE SCHEMA public;
{owner}
{public_grant}
COMMENT ON SCHEMA public IS 'standard public schema';
"""


def restore_in_place(target: Target, point: Point, ui: Reporter) -> Tool:
    """Empty staging and restore the point in one transaction: all of it commits or none."""
    clear = point.path.parent / f".clear-{point.id}.sql"
    write_private_file(clear, _clear_sql(target.facts.major).encode())
    app = application_name("restore")

    def attempt(tool: Tool) -> None:
        with archive_source(point, target.settings) as (src, stdin):
            tracker = restore_tracker(tool, point, src)
            with (
                ui.progress(
                    f"Restoring {point.id} into {target.dbname} in one transaction", total=tracker.total, unit=tracker.unit
                ) as tick,
                target.progress_poller(target.dbname, app) as poller,
            ):
                watch = Watch(tick, tracker, poller)
                restore_script(
                    target, tool, src, target.dbname, single_transaction=True, prelude=clear, watch=watch, app=app, stdin=stdin
                )
                watch.finished()

    try:
        tool, _ = try_each(restore_candidates(point, target), attempt)
    finally:
        clear.unlink(missing_ok=True)
    return tool


def verify_archive(point: Point, settings) -> dict:
    archive = point.file_path(archive_name(point))
    try:
        tool = read_through(point, settings)
    except ToolError as exc:
        raise VerificationError(
            f"The archive {archive} could not be read end to end: {exc.message}",
            "Use an earlier point (`python3 rollback_manager.py list`).",
        ) from None
    return {"archive": "read end to end", "read_by": str(tool.path)}


VERIFY_SUFFIX = "_rb_verify"


@contextmanager
def rebuilt(target: Target, point: Point, suffix: str, purpose: str, ui: Reporter) -> Iterator[object]:
    """A connection to the point restored into a scratch database beside staging
    (``<staging><suffix>``), recorded before it exists and dropped afterwards."""
    name = derived_name(target.dbname, suffix)
    drop_database(target.maint, name)
    props = thawed(point.manifest.database.properties)
    with intents.new_database(target, name, f"{point.id} rebuilt for {purpose}"):
        try:
            create_database_like(target.maint, name, props, target.facts.major)
            intents.mark(target, name, f"{point.id} rebuilt for {purpose}")
            restore_into(target, point, name, ui)
            with connection(target.info, name, application_name=f"rollback-toolkit {purpose}") as conn:
                yield conn
        finally:
            drop_database(target.maint, name)


def rebuild_and_count(target: Target, point: Point, ui: Reporter) -> dict:
    """verify --deep of a dump point: restored into a scratch database beside staging,
    compared with the manifest row by row count, then dropped."""
    with rebuilt(target, point, VERIFY_SUFFIX, "verify --deep", ui) as conn:
        found = fingerprint(conn)
    problems = compare(thawed(point.manifest.fingerprint or {}), found)
    if problems:
        raise VerificationError(
            f"Point {point.id}, rebuilt, does not match its manifest: " + "; ".join(problems[:10]) + ".",
            "Use an earlier point (`python3 rollback_manager.py list`).",
        )
    point.record_verification(level=VerificationLevel.DEEP, verified_at=utc_now().isoformat(timespec="seconds"))
    return {"rebuilt": f"{found.total_rows} rows in {len(found.row_counts or {})} tables match the manifest"}


def _sequences_recorded(point: Point) -> bool:
    return "sequences" in (point.manifest.fingerprint or {})


DIFF_SUFFIX = "_rb_diff"


class DumpMethod(Method):
    """A pg_dump archive on this machine: every row counted in the dump's own snapshot
    when it is taken (deep), read end to end by `verify`, rebuilt by pg_restore."""

    name = "dump"
    level = "counted"  # every row counted in the snapshot it was taken in
    read_by_rebuilding = True

    def take(self, request: TakeRequest) -> Taken:
        r = request
        return Taken(take(r.target, r.catalog, r.ui, label=r.label, base=r.base))

    def needs_server_to_verify(self, deep: bool) -> bool:
        return deep

    def verify(self, point: Point, settings, ui: Reporter, target: Target | None, *, deep: bool) -> dict:
        with ui.progress(f"Reading the archive of {point.id} end to end"):
            result = verify_archive(point, settings)
        ui.ok("Archive read end to end")
        if deep:
            result.update(rebuild_and_count(target, point, ui))
            compared = "schema digest, row counts and sequences" if _sequences_recorded(point) else "schema digest and row counts"
            ui.ok(f"Rebuilt beside staging: {compared} match the manifest")
        return result

    def describe_verification(self, point: Point) -> str:
        found = point.verification
        return "deep: every row was counted when it was taken" + (
            f"; rebuilt and counted {found.verified_at}" if found.verified_at else ""
        )

    def build_beside(self, target: Target, point: Point, aside: str, ui: Reporter) -> Built:
        create_database_like(target.maint, aside, thawed(point.manifest.database.properties), target.facts.major)
        tool = restore_into(target, point, aside, ui)
        return Built(f"{tool.path} ({tool.version})")

    def can_restore_in_place(self) -> bool:
        return True

    def restore_in_place(self, target: Target, point: Point, ui: Reporter) -> str:
        tool = restore_in_place(target, point, ui)
        return f"{tool.path} ({tool.version})"

    @contextmanager
    def open_for_reading(self, target: Target, point: Point, ui: Reporter) -> Iterator[object | None]:
        with rebuilt(target, point, DIFF_SUFFIX, "diff", ui) as conn:
            yield conn


def point_of_archive(settings, path: Path) -> Point:
    """restore --type backup --file: a point folder anywhere, or a bare pg_dump archive."""
    path = Path(path).expanduser().resolve()
    if path.is_dir() and (path / MANIFEST).is_file():
        return point_at(path)
    if not path.is_file() and not is_archive_folder(path):
        raise ConfigError(f"{path} is neither a pg_dump archive nor a point folder.", "Give the path of one.")
    header = archive_header(path, settings)
    writer = re.match(r"(\d+)", header.get("pg_dump_version", "") or "")
    return Point(
        path.parent,
        Manifest(
            id=f"file:{path.name}",
            created_at_text=header.get("created_at") or _modified_at(path),
            description=f"archive {path}",
            method=DumpMethod.name,
            archive=path.name,
            status=Status.COMPLETED,
            kind=Kind.FILE,
            tool=ToolSection(major=int(writer.group(1))) if writer else ToolSection(),
            database=DatabaseSection(),
            fingerprint=None,  # nothing recorded: checked against the archive's own table of contents
            archive_table_count=archive_table_count(path, settings),
        ),
    )


def _modified_at(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
