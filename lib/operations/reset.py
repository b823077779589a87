"""reset_staging.py's command: staging rebuilt from V2, the last resort. V2 is only
read; the copy is built beside staging (lib/restore/rebuild.py), checked against V2's
rows, sequences and schema, and swapped in like any restore."""

from __future__ import annotations

from lib.config import Settings, usable_cores
from lib.errors import ConfigError
from lib.interaction import Confirmer, Reporter
from lib.operations import background
from lib.operations.scaffold import operation
from lib.pg.db import (
    database_properties,
    refuse_prepared_transactions,
    replication_ties,
)
from lib.restore.rebuild import describe, rebuild_from, v2_facts
from lib.restore.swap import RestoreResult, refuse_replication_ties


def reset_staging(
    settings: Settings, ui: Reporter, ask: Confirmer, *, jobs: int | None = None, force: bool = False
) -> RestoreResult:
    jobs = jobs or usable_cores()
    v2, v2_major, v2_size = v2_facts(settings)
    with operation(settings, "reset", ui=ui, ask=ask) as op:  # refuses a staging URL that is V2
        target, f = op.target, op.target.facts
        if not target.may_swap:
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
        result = rebuild_from(target, op.catalog, ui, v2, v2_major, props=props, jobs=jobs, restored="V2", what="V2")
        op.record_swap(result, mode="reset from V2")
        background.retire_before_states(op)
    background.after_restore(settings, None, result.before_point_id)  # the kept state's rows, read in the background
    result.mode = "reset from V2"
    return result
