"""Rebuilding staging from V2, the last resort.

V2 is only read: its sessions are read-only (default_transaction_read_only) and the
staging URL must not resolve to it. V2 is streamed with pg_dump (chosen for V2's
major) straight into pg_restore (chosen for the archive and staging's major) into a
new database beside staging, with no intermediate file; the row counts are compared
with V2's, counted in the very snapshot pg_dump read, and only then is the new
database swapped in. The old staging is kept as a point, as after any restore."""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from lib.audit import audited
from lib.cli.console import UI
from lib.config import Settings
from lib.errors import ConfigError, VerificationError
from lib.pg.db import (
    connection,
    create_database_like,
    database_properties,
    query,
    refuse_prepared_transactions,
    replication_ties,
    scalar,
    sessions_on,
    snapshot_session,
)
from lib.pg.fingerprint import portable_schema_lines, row_counts, schema_differences, schema_lines, sequence_positions
from lib.pg.locks import operation_lock
from lib.pg.target import Target, confirm_change, open_target
from lib.pg.tools import candidates_for_archive, candidates_for_server, companion, run_pipeline, run_tool, try_each
from lib.points.catalog import Catalog, human_size
from lib.points.methods import data as data_method
from lib.points.methods.data import Table
from lib.points.methods.dump import restore_script
from lib.restore.swap import RestoreResult, build_verify_swap, refuse_replication_ties

log = logging.getLogger(__name__)

INDEX_MEMORY = "512MB"  # per index-building session; the server default (64MB) makes large indexes spill


def _v2_facts(settings: Settings):
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
    sessions = sessions_on(target.maint, target.dbname)
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


def _copy_v2(target: Target, v2, v2_major: int, aside: str, snapshot: str, ui: UI, jobs: int, sequences: dict) -> str:
    dumps = candidates_for_server("pg_dump", v2_major, target.settings)

    def attempt_dump(dump_tool):
        restores = candidates_for_archive("pg_restore", dump_tool.major, target.settings)

        def attempt_restore(restore_tool):
            common = ["--format=custom", "--compress=0", f"--snapshot={snapshot}"]
            if restore_tool.major > target.facts.major:
                # tools newer than staging's server: through the SQL script, filtered for it
                _dump_then_script(target, v2, dump_tool, [*common, *v2.tool_args()], restore_tool, aside)
            else:
                _stream_then_index(target, v2, dump_tool, restore_tool, common, aside, jobs, ui, sequences)
            return restore_tool

        return try_each(restores, attempt_restore)[1]

    dump_tool, restore_tool = try_each(dumps, attempt_dump)
    return f"{dump_tool.path} ({dump_tool.version}) | {restore_tool.path} ({restore_tool.version})"


def _stream_then_index(
    target: Target, v2, dump_tool, restore_tool, common: list[str], aside: str, jobs: int, ui: UI, sequences: dict
) -> None:
    """Schema first; then every table's rows streamed from V2 by ``jobs`` COPY pipes at
    once (large tables split by block ranges), sequences and large objects, all in the
    same snapshot and with no intermediate file; then indexes, constraints and the rest
    built by ``jobs`` workers from a small schema-only archive."""
    staging_args = ["--exit-on-error", *target.info.tool_args(aside)]
    with ui.progress(f"Creating V2's tables in {aside}"):
        run_pipeline(
            dump_tool,
            [*common, "--section=pre-data", *v2.tool_args()],
            restore_tool,
            staging_args,
            target.info,
            producer_conn=v2,
            producer_readonly=True,
        )
    snapshot = next(a.split("=", 1)[1] for a in common if a.startswith("--snapshot="))
    units = _copy_units(v2, snapshot, jobs)
    with ui.progress(f"Streaming {len(units)} part(s) of V2's tables with {jobs} pipe(s)") as tick:
        _run_units(target, v2, dump_tool, restore_tool, units, aside, snapshot, jobs, tick)
    with connection(target.info, aside, application_name="rollback-toolkit reset") as conn:
        for key, (last, called) in sequences.items():
            schema, _, name = key.partition(".")
            query(conn, "SELECT setval(%s::regclass, %s, %s)", (data_method.quoted(Table(schema, name)), last, called))
    with ui.progress("Copying large objects"):
        run_pipeline(
            dump_tool,
            [*common, "--section=data", "--exclude-table-data=*.*", *v2.tool_args()],
            restore_tool,
            staging_args,
            target.info,
            producer_conn=v2,
            producer_readonly=True,
        )
    with (
        tempfile.TemporaryDirectory(prefix=f"rollback-reset-{os.getpid()}-") as tmp,
        ui.progress(f"Building indexes and constraints with {jobs} worker(s)"),
    ):
        post = Path(tmp) / "post-data.dump"
        run_tool(dump_tool, [*common, "--section=post-data", f"--file={post}", *v2.tool_args()], v2, readonly=True)
        run_tool(
            restore_tool,
            ["--exit-on-error", f"--jobs={jobs}", *target.info.tool_args(aside), str(post)],
            target.info,
            options=f"-c maintenance_work_mem={INDEX_MEMORY}",
        )


SPLIT_PAGES = 16384  # 128 MB of 8 kB blocks per part of a large table


def _copy_units(v2, snapshot: str, jobs: int) -> list[tuple[Table, list[str], str]]:
    """(table, columns, block-range condition) for every part to copy, largest first."""
    with snapshot_session(v2, application_name="rollback-toolkit v2 plan", snapshot=snapshot) as conn:
        tid_ranges = scalar(conn, "SELECT current_setting('server_version_num')::int") >= 140000
        units = []
        for table in data_method.all_tables(conn):
            cols = [c[0] for c in data_method.columns(conn, table) if not c[2]]
            pages = scalar(conn, "SELECT pg_relation_size(to_regclass(%s)) / 8192", (data_method.quoted(table),)) or 0
            if tid_ranges and pages > SPLIT_PAGES and jobs > 1:
                starts = list(range(0, pages, SPLIT_PAGES))
                for n, first in enumerate(starts):
                    upper = "" if n == len(starts) - 1 else f" AND ctid < '({first + SPLIT_PAGES},0)'::tid"
                    units.append((table, cols, f"ctid >= '({first},0)'::tid{upper}", SPLIT_PAGES))
            else:
                units.append((table, cols, "", pages))
    units.sort(key=lambda u: -u[3])
    return [u[:3] for u in units]


def _run_units(target: Target, v2, dump_tool, restore_tool, units, aside: str, snapshot: str, jobs: int, tick) -> None:
    v2_psql = companion(dump_tool, "psql", target.settings)
    staging_psql = companion(restore_tool, "psql", target.settings)
    quiet = ["--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"]

    def copy_one(unit) -> None:
        table, cols, where = unit
        column_list = ", ".join('"' + c.replace('"', '""') + '"' for c in cols)
        condition = f" WHERE {where}" if where else ""
        name = data_method.quoted(table)
        out = [
            *quiet,
            "-c",
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            "-c",
            f"SET TRANSACTION SNAPSHOT '{snapshot}'",
            "-c",
            f"COPY (SELECT {column_list} FROM ONLY {name}{condition}) TO STDOUT",
            "-c",
            "COMMIT",
            *v2.tool_args(),
        ]
        into = [*quiet, "-c", f"COPY {name} ({column_list}) FROM STDIN", *target.info.tool_args(aside)]
        run_pipeline(v2_psql, out, staging_psql, into, target.info, producer_conn=v2, producer_readonly=True)

    done = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(copy_one, unit) for unit in units]
        try:
            for future in as_completed(futures):
                future.result()
                done += 1
                tick(f"{done}/{len(units)} parts")
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _dump_then_script(target: Target, v2, dump_tool, dump_args, restore_tool, aside: str) -> None:
    """pg_dump newer than staging's server: archive to a private temporary file, then
    its SQL script, filtered for the older server, into psql."""
    with tempfile.TemporaryDirectory(prefix=f"rollback-reset-{os.getpid()}-") as tmp:
        archive = Path(tmp) / "v2.dump"
        env_args = [*dump_args, f"--file={archive}"]
        run_tool(dump_tool, env_args, v2, readonly=True)
        restore_script(target, restore_tool, [str(archive)], aside, single_transaction=False)


def reset_staging(settings: Settings, ui: UI, *, assume_yes: bool, jobs: int | None = None, force: bool = False) -> RestoreResult:
    jobs = jobs or max(1, os.cpu_count() or 1)
    v2, v2_major, v2_size = _v2_facts(settings)
    catalog = Catalog(settings.backup_dir).ensure()
    with open_target(settings) as target:  # refuses a staging URL that is V2
        f = target.facts
        if not (f.is_superuser or (f.can_create_db and f.is_db_owner)):
            raise ConfigError(
                f"Role {f.current_user} may not create and rename databases, which rebuilding staging needs.",
                "Run it as staging's owner with CREATEDB, or as a superuser.",
            )
        with audited(settings.log_dir, "reset", target.masked) as record:
            with operation_lock(catalog.root, target.maint, f.system_identifier, target.dbname, "reset"):
                refuse_prepared_transactions(target.maint, target.dbname, f"rebuild {target.dbname}")
                ties = replication_ties(target.maint, target.dbname)
                refuse_replication_ties(target, ties, force=force, doing=f"rebuild {target.dbname}")
                ui.info(describe(target, v2, v2_major, v2_size))
                confirm_change(
                    target, ui, "Rebuild staging from V2?", assume_yes=assume_yes, what=f"rebuild {target.dbname} from V2"
                )
                props = database_properties(target.maint, target.dbname).as_dict()
                with snapshot_session(v2, application_name="rollback-toolkit v2 snapshot") as snap:
                    snapshot = query(snap, "SELECT pg_export_snapshot()")[0][0]
                    expected = row_counts(snap)
                    sequences = sequence_positions(snap)
                    # the same major prints the schema alike; across majors, what both print alike
                    read_schema = schema_lines if v2_major == f.major else portable_schema_lines
                    schema = read_schema(snap)

                    def build(aside: str) -> str:
                        create_database_like(target.maint, aside, props, f.major)
                        return _copy_v2(target, v2, v2_major, aside, snapshot, ui, jobs, sequences)

                    def verify(conn) -> None:
                        got = row_counts(conn)
                        problems = [
                            f"{t}: V2 has {expected.get(t)}, the copy {got.get(t)}"
                            for t in sorted(set(expected) | set(got))
                            if expected.get(t) != got.get(t)
                        ]
                        got_sequences = sequence_positions(conn)
                        problems += [
                            f"sequence {q}: V2 at {sequences.get(q)}, the copy at {got_sequences.get(q)}"
                            for q in sorted(set(sequences) | set(got_sequences))
                            if sequences.get(q) != got_sequences.get(q)
                        ]
                        problems += [f"schema {line}" for line in schema_differences(schema, read_schema(conn))]
                        if problems:
                            raise VerificationError(
                                "The copy of V2 does not match V2: "
                                + "; ".join(problems[:10])
                                + f". Staging {target.dbname} was not touched."
                            )
                        ui.ok(
                            f"The copy matches V2: its schema ({len(schema)} objects"
                            + ("" if v2_major == f.major else f", as PostgreSQL {v2_major} and {f.major} both print them")
                            + f") and {sum(got.values())} rows in {len(got)} tables"
                        )

                    result = build_verify_swap(target, catalog, ui, build=build, verify=verify, properties=props, restored="V2")
                record.set(before_point_id=result.before_point_id)
    result.mode = "reset from V2"
    return result
