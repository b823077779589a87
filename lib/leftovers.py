"""What interrupted runs left behind (kill -9, a power cut): half-written point
folders, the databases a killed restore, diff or template copy was building, and
private temporary files. Only what no live run can still be using is touched:
folders and files by the liveness of the process that made them, databases of
staging while holding its operation lock (no other operation on it is running)."""

from __future__ import annotations

import logging

from .catalog import Catalog
from .db import database_exists, derived_name, drop_database
from .diff import DIFF_SUFFIX
from .methods import template as template_method
from .pgtools import dead_temporaries
from .restore import ASIDE_SUFFIX, recover_pending
from .target import Target

log = logging.getLogger(__name__)


def remove(target: Target, catalog: Catalog, *, dry_run: bool) -> list[str]:
    """Call with staging's lock held. Returns what was (or would be) done, as sentences."""
    verb = "Would remove" if dry_run else "Removed"
    found = [f"{verb} unfinished point folder {p}" for p in catalog.remove_stale_temporaries(dry_run=dry_run)]
    if dry_run:
        found += [f"Would finish unfinished point folder {p} (or remove it if its swap did not happen)" for p in catalog.pending]
    else:
        found += [line[0].upper() + line[1:] for line in recover_pending(target, catalog)]
    for name in [derived_name(target.dbname, ASIDE_SUFFIX), derived_name(target.dbname, DIFF_SUFFIX)]:
        if database_exists(target.maint, name):
            found.append(f"{verb} database {name}, left by an interrupted restore, reset or diff")
            if not dry_run:
                drop_database(target.maint, name)
    for name in template_method.drop_orphans(target, catalog.stale_ids, dry_run=dry_run):
        found.append(f"{verb} database {name}, the copy of a point whose creation was interrupted")
    found += [f"{verb} {line}" for line in dead_temporaries(dry_run)]
    for line in found:
        log.info("%s", line)
    return found
