"""The one way a command that changes anything starts: ``with operation(...) as op``
opens staging (refusing a staging URL that is really V2), writes the audit entry when
it ends, takes the database's one lock, and finishes what an interrupted run left
(the "state before" point of a restore killed after its swap). Create, restore,
partial rollback, delete, cleanup, reset and a production migration all start here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from lib.audit import AuditRecord, audited
from lib.config import Settings
from lib.interaction import Confirmer, Reporter
from lib.pg.locks import DatabaseLock
from lib.pg.target import Target, confirm_change, open_target
from lib.points.catalog import Catalog
from lib.restore.leftovers import finish_interrupted


@dataclass
class Operation:
    settings: Settings
    name: str
    target: Target
    catalog: Catalog
    record: AuditRecord
    ui: Reporter
    ask: Confirmer
    leftovers: list[str]  # what killed runs left, finished (or, in a dry run, found) before it started

    def confirm_change(self, question: str, *, what: str) -> None:
        """Before staging changes: asked through the caller's Confirmer (a protected database's name must be typed)."""
        confirm_change(self.target, self.ask, question, what=what)

    def record_swap(self, result, **more) -> None:
        """What a restore that swapped staging leaves in the audit entry: its mode, the state
        kept before, how long staging was unavailable, and a command after the swap that failed."""
        facts = {
            "mode": result.mode,
            "before_point_id": result.before_point_id,
            "unavailable_seconds": result.unavailable_seconds,
            "verified": result.verified,  # the level its check reached, as said
        }
        if result.after_swap_failed:
            facts["after_swap_failed"] = result.after_swap_failed
        self.record.set(**{**facts, **more})


@contextmanager
def operation(
    settings: Settings,
    name: str,
    *,
    ui: Reporter,
    ask: Confirmer,
    point_id: str | None = None,
    migration_id: str | None = None,
    check_v2: bool = True,
    audit: bool = True,
    sweep: bool = False,
    dry_run: bool = False,
) -> Iterator[Operation]:
    """``sweep``: cleanup, which also removes every database of this catalog that nothing
    owns, and says what it did in ``Operation.leftovers`` rather than as it goes.
    ``dry_run``: a cleanup's dry run, which finds what it would do and changes nothing.
    ``audit=False``: a migration, which writes its own start and end events."""
    catalog = Catalog(settings.backup_dir).ensure()
    with open_target(settings, check_v2=check_v2, ui=ui) as target:
        record_cm = (
            audited(settings.log_dir, name, target.masked, point_id, migration_id)
            if audit
            else nullcontext(AuditRecord(name, target.masked, point_id, migration_id))
        )
        with (
            record_cm as record,
            DatabaseLock(target.maint, target.facts.system_identifier, target.dbname, folder=catalog.root, doing=name),
        ):
            left = finish_interrupted(target, catalog, dry_run=dry_run, everything=sweep)
            if not sweep:
                for line in left:
                    ui.info(f"Finished what an interrupted run left: {line}")
            yield Operation(settings, name, target, catalog, record, ui, ask, left)
