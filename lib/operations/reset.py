"""reset_staging.py's command: staging rebuilt from V2, the last resort. V2 is only
read; the copy is built beside staging (lib/restore/reset.py), checked against V2's
rows, sequences and schema, and swapped in like any restore."""

from __future__ import annotations

import os

from lib.config import Settings
from lib.errors import ConfigError
from lib.operations import background
from lib.operations.scaffold import operation
from lib.pg.db import (
    create_database_like,
    database_properties,
    query,
    refuse_prepared_transactions,
    replication_ties,
    snapshot_session,
)
from lib.pg.fingerprint import portable_schema_lines, row_counts, schema_lines, sequence_positions
from lib.ports import Confirmer, Reporter
from lib.restore.reset import V2State, copy_v2, describe, v2_facts
from lib.restore.swap import RestoreResult, build_verify_swap, refuse_replication_ties


def reset_staging(
    settings: Settings, ui: Reporter, ask: Confirmer, *, jobs: int | None = None, force: bool = False
) -> RestoreResult:
    jobs = jobs or max(1, os.cpu_count() or 1)
    v2, v2_major, v2_size = v2_facts(settings)
    with operation(settings, "reset", ui=ui, ask=ask) as op:  # refuses a staging URL that is V2
        target, f = op.target, op.target.facts
        if not (f.is_superuser or (f.can_create_db and f.is_db_owner)):
            raise ConfigError(
                f"Role {f.current_user} may not create and rename databases, which rebuilding staging needs.",
                "Run it as staging's owner with CREATEDB, or as a superuser.",
            )
        refuse_prepared_transactions(target.maint, target.dbname, f"rebuild {target.dbname}")
        refuse_replication_ties(
            target, replication_ties(target.maint, target.dbname), force=force, doing=f"rebuild {target.dbname}"
        )
        ui.info(describe(target, v2, v2_major, v2_size))
        op.confirm_change("Rebuild staging from V2?", what=f"rebuild {target.dbname} from V2")
        props = database_properties(target.maint, target.dbname).as_dict()
        with snapshot_session(v2, application_name="rollback-toolkit v2 snapshot") as snap:
            snapshot = query(snap, "SELECT pg_export_snapshot()")[0][0]
            expected = V2State(
                row_counts(snap),
                sequence_positions(snap),
                # the same major prints the schema alike; across majors, what both print alike
                schema_lines if v2_major == f.major else portable_schema_lines,
            )
            expected.schema = expected.read_schema(snap)

            def build(aside: str) -> str:
                create_database_like(target.maint, aside, props, f.major)
                return copy_v2(target, v2, v2_major, aside, snapshot, ui, jobs, expected)

            def verify(conn) -> None:
                expected.check(conn, target.dbname)
                note = "" if v2_major == f.major else f", as PostgreSQL {v2_major} and {f.major} both print them"
                ui.ok(f"The copy matches V2: its schema ({len(expected.schema)} objects{note}) and {expected.describe_rows()}")

            result = build_verify_swap(target, op.catalog, ui, build=build, verify=verify, properties=props, restored="V2")
        op.record.set(before_point_id=result.before_point_id)
    background.after_restore(settings, None, result.before_point_id)  # the kept state's rows, read in the background
    result.mode = "reset from V2"
    return result
