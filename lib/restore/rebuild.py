"""Rebuilding staging from V2, the last resort.

V2 is only read: its sessions are read-only (default_transaction_read_only) and the
staging URL must not resolve to it. V2 is streamed with pg_dump (chosen for V2's
major) straight into pg_restore (chosen for the archive and staging's major) into a
new database beside staging, with no intermediate file; the row counts are compared
with V2's, counted in the very snapshot pg_dump read, and only then is the new
database swapped in. The old staging is kept as a point, as after any restore."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from lib.config import Settings
from lib.errors import ConfigError, VerificationError
from lib.files import human_size
from lib.interaction import Reporter
from lib.pg.db import (
    connection,
    create_database_like,
    query,
    scalar,
    sessions_on,
    snapshot_session,
)
from lib.pg.fingerprint import (
    portable_schema_lines,
    rekeyed,
    row_counts,
    schema_differences,
    schema_lines,
    sequence_positions,
    split_qualified,
)
from lib.pg.progress import RestoreTracker, RowsLoaded, Watch, application_name, named_sessions
from lib.pg.target import Target
from lib.pg.tools import INDEX_MEMORY, candidates_for_archive, candidates_for_server, command_for, companion, try_each
from lib.points.methods import data as data_method
from lib.points.methods.data import Table
from lib.points.methods.dump import archive_listing, restore_script
from lib.process import PgDump, PgRestore, pipeline, private_temporary_folder
from lib.restore.swap import build_verify_swap

log = logging.getLogger(__name__)


def v2_facts(settings: Settings):
    v2 = settings.v2()
    if v2 is None:
        raise ConfigError(
            "V2_DATABASE_URL is not set, so there is nothing to rebuild staging from.",
            "Set it in the environment or in .env (V2_DATABASE_URL=postgresql://USER:PASSWORD@HOST:5432/v2).",
        )
    with connection(v2, readonly=True, application_name="rollback-toolkit v2 facts") as conn:
        major = scalar(conn, "SELECT current_setting('server_version_num')::int / 10000")
        size = scalar(conn, "SELECT pg_database_size(current_database())")
    return v2, major, size


def describe(target: Target, v2, v2_major: int, v2_size: int) -> str:
    sessions = sessions_on(target.maint, target.dbname, own=False)
    lines = [
        f"Rebuild [bold]{target.dbname}[/] on {target.info.server_label()} (PostgreSQL {target.facts.major}) "
        f"from V2 {v2.masked()} (PostgreSQL {v2_major}, {human_size(v2_size)}).",
        "  V2 is only read. The copy is built beside staging and its row counts checked against V2's;",
        "  staging is then swapped in one short step and its current state kept as a point (undo: restore it).",
    ]
    if sessions:
        lines.append(f"  These {len(sessions)} session(s) on {target.dbname} will be disconnected:")
        lines += [f"    - {s.describe()}" for s in sessions]
    return "\n".join(lines)


# Every name quoted, by pg_dump and by the server's deparsing of expressions alike, as
# pg_dump's manual advises when the copy goes to another major: each major quotes only
# its own keywords, so V2 on 15 writes a column system_user bare, which 16 and later
# read as the SQL function SYSTEM_USER.
QUOTE_ALL = "--quote-all-identifiers"


def copy_v2(target: Target, v2, v2_major: int, aside: str, snapshot: str, ui: Reporter, jobs: int, expected: V2State) -> str:
    dumps = candidates_for_server("pg_dump", v2_major, target.settings)

    def attempt_dump(dump_tool):
        restores = candidates_for_archive("pg_restore", dump_tool.major, target.settings)
        dump = command_for(dump_tool, conn=v2, readonly=True)

        def attempt_restore(restore_tool):
            if restore_tool.major > target.facts.major:
                # tools newer than staging's server: through the SQL script, filtered for it
                _dump_then_script(target, dump, snapshot, restore_tool, aside)
            else:
                restore = command_for(restore_tool, conn=target.info)
                _stream_then_index(target, v2, dump, restore, snapshot, aside, jobs, ui, expected)
            return restore_tool

        return try_each(restores, attempt_restore)[1]

    dump_tool, restore_tool = try_each(dumps, attempt_dump)
    return f"{dump_tool.path} ({dump_tool.version}) | {restore_tool.path} ({restore_tool.version})"


def _stream_then_index(
    target: Target, v2, dump: PgDump, restore: PgRestore, snapshot: str, aside: str, jobs: int, ui: Reporter, expected: V2State
) -> None:
    """Schema first; then every table's rows streamed from V2 by ``jobs`` COPY pipes at
    once (large tables split by block ranges), sequences and large objects, all in the
    same snapshot and with no intermediate file; then indexes, constraints and the rest
    built by ``jobs`` workers from a small schema-only archive."""
    common = ["--format=custom", "--compress=0", f"--snapshot={snapshot}", QUOTE_ALL]
    with ui.progress(f"Creating V2's tables in {aside}"):
        pipeline(dump, [*common, "--section=pre-data", *v2.tool_args()], restore, restore.into(aside, []))
    _stream_rows(target, v2, dump, restore, aside, snapshot, jobs, ui, expected.rows)
    with connection(target.info, aside, application_name="rollback-toolkit reset") as conn:
        for key, (last, called) in expected.sequences.items():
            query(conn, "SELECT setval(%s::regclass, %s, %s)", (data_method.quoted(Table(*split_qualified(key))), last, called))
    with ui.progress("Copying large objects"):
        pipeline(dump, [*common, "--section=data", "--exclude-table-data=*.*", *v2.tool_args()], restore, restore.into(aside, []))
    with private_temporary_folder("reset") as tmp:
        post = post_data_archive(dump, [*common, *v2.tool_args()], Path(tmp) / "schema.dump")
        _build_indexes(target, restore, post, aside, jobs, ui)


POST_DATA = "--section=post-data"


def post_data_archive(dump: PgDump, args: list[str], file: Path) -> list[str]:
    """V2's pre-data and post-data sections in one archive at ``file`` (post-data
    holds the materialized views' refreshes, which --schema-only would leave out);
    returns pg_restore's arguments for the post-data part. The archive holds the
    tables too, though only post-data is restored: a parallel pg_restore keeps two entries that lock the same table (two
    foreign keys between the same tables in opposite directions) apart only when it
    finds that table's entry in the archive. A post-data-only archive lacks it, and
    its workers can deadlock."""
    dump.run([*args, "--section=pre-data", POST_DATA, f"--file={file}"])
    return [POST_DATA, str(file)]


def _build_indexes(target: Target, restore: PgRestore, post: list[str], aside: str, jobs: int, ui: Reporter) -> None:
    """The post-data archive by ``jobs`` workers: progress in its entries, and the index
    builds under way (pg_stat_progress_create_index)."""
    app = application_name("reset")
    options = f"-c maintenance_work_mem={INDEX_MEMORY}"
    indexer = command_for(restore.tool, conn=target.info, options=options, env=named_sessions(app))
    tracker = RestoreTracker(archive_listing(restore.tool, post), None)
    with (
        ui.progress(f"Building indexes and constraints with {jobs} worker(s)", total=tracker.total, unit="entries") as tick,
        target.progress_poller(aside, app) as poller,
    ):
        watch = Watch(tick, tracker, poller)
        indexer.run(indexer.into(aside, post, jobs=jobs, verbose=True), on_tick=watch, on_stderr=tracker.line)
        watch.finished()


SPLIT_PAGES = 16384  # 128 MB of 8 kB blocks per part of a large table


@dataclass(frozen=True)
class CopyUnit:
    """One COPY pipe's work: a table, or a range of its blocks."""

    table: Table
    columns: tuple[str, ...]
    where: str  # a block range, or "" for the whole table
    pages: int
    share: float  # of the table's blocks


def _copy_units(v2, snapshot: str, jobs: int) -> list[CopyUnit]:
    """Every part to copy, largest first."""
    with snapshot_session(v2, application_name="rollback-toolkit v2 plan", snapshot=snapshot) as conn:
        tid_ranges = scalar(conn, "SELECT current_setting('server_version_num')::int") >= 140000
        units = []
        for table in data_method.all_tables(conn):
            cols = tuple(c[0] for c in data_method.columns(conn, table) if not c[2])
            pages = scalar(conn, "SELECT pg_relation_size(to_regclass(%s)) / 8192", (data_method.quoted(table),)) or 0
            if tid_ranges and pages > SPLIT_PAGES and jobs > 1:
                starts = list(range(0, pages, SPLIT_PAGES))
                for n, first in enumerate(starts):
                    upper = "" if n == len(starts) - 1 else f" AND ctid < '({first + SPLIT_PAGES},0)'::tid"
                    part = min(SPLIT_PAGES, pages - first)
                    units.append(CopyUnit(table, cols, f"ctid >= '({first},0)'::tid{upper}", part, part / pages))
            else:
                units.append(CopyUnit(table, cols, "", pages, 1.0))
    units.sort(key=lambda u: -u.pages)
    return units


def _stream_rows(
    target: Target, v2, dump: PgDump, restore: PgRestore, aside: str, snapshot: str, jobs: int, ui: Reporter, rows: dict
) -> None:
    """Every table's rows by ``jobs`` COPY pipes; progress in V2's rows (counted in the same
    snapshot), the ones under way as pg_stat_progress_copy tells."""
    units = _copy_units(v2, snapshot, jobs)
    app = application_name("reset")
    tracker = RowsLoaded(sum(rows.get(key, 0) for key in {u.table.key for u in units}))
    with (
        ui.progress(
            f"Streaming {len(units)} part(s) of V2's tables with {jobs} pipe(s)", total=tracker.total, unit="rows"
        ) as tick,
        target.progress_poller(aside, app) as poller,
    ):
        watch = Watch(tick, tracker, poller, note=lambda: f"{tracker.pieces} of {len(units)} parts")
        _run_units(target, v2, dump, restore, units, aside, snapshot, jobs, app, watch, rows)
        watch.finished()


def _run_units(
    target: Target, v2, dump: PgDump, restore: PgRestore, units, aside: str, snapshot: str, jobs: int, app: str, watch, rows
) -> None:
    v2_psql = command_for(companion(dump.tool, "psql", target.settings), conn=v2, readonly=True)
    staging_psql = command_for(companion(restore.tool, "psql", target.settings), conn=target.info, env=named_sessions(app))

    def copy_one(unit: CopyUnit) -> None:
        column_list = ", ".join('"' + c.replace('"', '""') + '"' for c in unit.columns)
        condition = f" WHERE {unit.where}" if unit.where else ""
        name = data_method.quoted(unit.table)
        out = v2_psql.commands(
            v2.dbname,
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            f"SET TRANSACTION SNAPSHOT '{snapshot}'",
            f"COPY (SELECT {column_list} FROM ONLY {name}{condition}) TO STDOUT",
            "COMMIT",
        )
        into = staging_psql.commands(
            aside, f"COPY {name} ({column_list}) FROM STDIN" if column_list else f"COPY {name} FROM STDIN"
        )
        pipeline(v2_psql, out, staging_psql, into)

    tracker = watch.tracker
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(copy_one, unit): unit for unit in units}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()
                    unit = futures[future]
                    tracker.add(round(rows.get(unit.table.key, 0) * unit.share))
                watch()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _dump_then_script(target: Target, dump: PgDump, snapshot: str, restore_tool, aside: str) -> None:
    """pg_dump newer than staging's server: archive to a private temporary file, then
    its SQL script, filtered for the older server, into psql."""
    with private_temporary_folder("reset") as tmp:
        archive = Path(tmp) / "v2.dump"
        dump.run([QUOTE_ALL, *dump.archive(snapshot=snapshot, file=str(archive), compress="0")])
        restore_script(target, restore_tool, [str(archive)], aside, single_transaction=False)


@dataclass
class V2State:
    """What the copy of V2 (or of another source) must show: its rows, sequences and
    schema, read in the snapshot the copy is made from."""

    rows: dict[str, int]
    sequences: dict[str, list]
    read_schema: Callable
    schema: list[str] = field(default_factory=list)
    source: str = "V2"  # what the copy is of, in messages

    def check(self, conn, staging: str) -> None:
        got = row_counts(conn)
        problems = [
            f"{t}: {self.source} has {self.rows.get(t)}, the copy {got.get(t)}"
            for t in sorted(set(self.rows) | set(got))
            if self.rows.get(t) != got.get(t)
        ]
        got_sequences = sequence_positions(conn)
        problems += [
            f"sequence {q}: {self.source} at {self.sequences.get(q)}, the copy at {got_sequences.get(q)}"
            for q in sorted(set(self.sequences) | set(got_sequences))
            if self.sequences.get(q) != got_sequences.get(q)
        ]
        problems += [f"schema {line}" for line in schema_differences(self.schema, self.read_schema(conn))]
        if problems:
            raise VerificationError(
                f"The copy does not match {self.source}: " + "; ".join(problems[:10]) + f". Staging {staging} was not touched."
            )

    def describe_rows(self) -> str:
        return f"{sum(self.rows.values())} rows in {len(self.rows)} tables"


def rebuild_from(
    target: Target,
    catalog,
    ui: Reporter,
    source,
    source_major: int,
    *,
    props: dict,
    jobs: int,
    restored: str,
    what: str,
    sequences: dict | None = None,
):
    """Staging rebuilt as a copy of ``source``'s database (V2, or a point's cluster restored
    beside it), streamed in one snapshot, checked against that snapshot's rows, sequences
    and schema, and swapped in (lib/restore/swap.py). ``sequences``: positions to give the
    copy instead of the source's (a recovered cluster's run up to 32 ahead)."""
    with snapshot_session(source, application_name="rollback-toolkit source snapshot") as snap:
        snapshot = query(snap, "SELECT pg_export_snapshot()")[0][0]
        expected = V2State(
            row_counts(snap),
            sequence_positions(snap),
            # the same major prints the schema alike; across majors, what both print alike
            schema_lines if source_major == target.facts.major else portable_schema_lines,
            source=what,
        )
        expected.sequences.update(
            {k: v for k, v in rekeyed(sequences or {}, expected.sequences).items() if k in expected.sequences}
        )
        expected.schema = expected.read_schema(snap)

        def build(aside: str) -> str:
            create_database_like(target.maint, aside, props, target.facts.major)
            return copy_v2(target, source, source_major, aside, snapshot, ui, jobs, expected)

        def verify(conn) -> str:
            expected.check(conn, target.dbname)
            note = (
                ""
                if source_major == target.facts.major
                else f", as PostgreSQL {source_major} and {target.facts.major} both print them"
            )
            ui.ok(f"The copy matches {what}: its schema ({len(expected.schema)} objects{note}) and {expected.describe_rows()}")
            return f"counted: the schema ({len(expected.schema)} objects{note}) and {expected.describe_rows()}, as in {what}"

        return build_verify_swap(target, catalog, ui, build=build, verify=verify, properties=props, restored=restored)
