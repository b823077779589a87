"""Restores from a pgBackRest repository, within an operation (lib/operations/scaffold.py):
to a pitr point or to a moment, beside staging then swapped (the default), or the
whole cluster in place. The work itself is lib/restore/pitr_recovery.py's."""

from __future__ import annotations

from lib.errors import ConfigError
from lib.operations import background
from lib.operations.scaffold import Operation
from lib.pg.db import connection, replication_ties, sessions_on
from lib.points.catalog import Point
from lib.points.manifest import Kind, thawed
from lib.points.methods import pitr as pitr_method
from lib.points.methods import registry
from lib.points.methods.base import REPOSITORY
from lib.restore import pitr_recovery as pitr
from lib.restore.swap import RestoreResult, hook_lines, refuse_replication_ties


def recovery_for(op: Operation, point: Point | None, *, to_time: str | None, to_lsn: str | None) -> pitr.Recovery:
    if point is not None:
        return pitr.for_point(point)
    _, repo = pitr_method.repository_for(op.target, needed_for="Restoring to a moment")
    return pitr.for_moment(op.target, repo, op.ui, at_time=to_time, at_lsn=to_lsn)


def restore(op: Operation, recovery: pitr.Recovery, *, point: Point | None, in_place: bool, force: bool) -> RestoreResult:
    if point is not None:  # the backup and the WAL it needs, before anything is asked or touched
        _, repo = pitr_method.repository_for(op.target, needed_for="Restoring a pitr point")
        pitr_method.point_in_repository(repo, point)
    if in_place:
        return _in_place(op, recovery, point)
    target, ui = op.target, op.ui
    refuse_replication_ties(target, replication_ties(target.maint, target.dbname), force=force, doing=f"restore {target.dbname}")
    ui.info(_describe_beside(op, recovery))
    op.confirm_change("Go ahead?", what=f"restore {target.dbname}")
    result = pitr.restore_beside(target, op.catalog, ui, recovery, jobs=op.settings.restore_jobs)
    op.record_swap(result)
    background.retire_before_states(op)
    background.after_restore(op.settings, None, result.before_point_id)  # the kept state's rows
    return result


def _describe_beside(op: Operation, recovery: pitr.Recovery) -> str:
    target = op.target
    sessions = sessions_on(target.maint, target.dbname, own=False)
    lines = [
        f"Restore database [bold]{target.dbname}[/] on {target.info.server_label()} to {recovery.label}, from pgBackRest.",
        "  The cluster is restored to it beside staging (only this database), recovered on a private server, and "
        "staging's database copied from it and checked; staging is then swapped in one short step and its current "
        "state kept as a new point (undo: restore that point). The other databases keep running.",
    ]
    lines += hook_lines(target)
    if sessions:
        lines.append(f"  These {len(sessions)} session(s) on {target.dbname} will be disconnected at the swap:")
        lines += [f"    - {s.describe()}" for s in sessions]
    return "\n".join(lines)


def _in_place(op: Operation, recovery: pitr.Recovery, point: Point | None) -> RestoreResult:
    """The whole cluster back: every database on it is named, and each protected one's name
    must be typed. The current state is kept first as a pitr point (undo: restore it, in
    place again, or beside)."""
    target, ui = op.target, op.ui
    databases = pitr.databases_on(target)
    ui.info(
        f"Restore the WHOLE cluster of {target.dbname} on {target.info.server_label()} to {recovery.label}, in place: "
        "the server is stopped, pgBackRest brings every file back (--delta), and it is started again. "
        f"Every database on it goes back: {', '.join(databases)}. The current state is kept first as a pitr point "
        f"of {target.dbname} (undo: restore that point)."
    )
    for name in databases:
        if name in op.settings.protected_databases:
            op.ask.confirm(f"Restore {name} too?", what=f"restore the cluster holding {name}", protected=name)
    op.confirm_change("Stop the cluster and restore all of it?", what=f"restore the cluster of {target.dbname} in place")
    restored = point.id if point else recovery.label
    before = pitr_method.take(
        target,
        op.catalog,
        ui,
        label=f"before in-place restore to {restored}",
        base={
            "description": f"state before in-place restore to {restored}",
            "kind": Kind.BEFORE_ROLLBACK,
            "restored_point": restored,
        },
    )
    op.record.set(before_point_id=before.id)
    done = pitr.restore_in_place(target, ui, recovery)
    if point is not None:
        with connection(target.info, application_name="rollback-toolkit pitr check") as conn:
            pitr.set_sequences(conn, thawed(point.manifest.sequences or {}))
            conn.commit()
            pitr.check_schema(conn, point)
        ui.ok(f"The cluster is back at {recovery.label}; {target.dbname} matches the point's schema and sequences")
    else:
        stopped = "the last commit before it" if recovery.kind == "time" else "that position"
        ui.ok(f"The cluster is back at {recovery.label} (recovery stopped at {stopped})")
    op.record.set(mode="pitr in place", cluster=done["cluster"], databases=databases)
    checked = "catalog: the point's schema and sequences" if point is not None else None  # a moment records nothing to check
    return RestoreResult(
        point.id if point else recovery.label, target.dbname, "pitr in place", before.id, None, 0, verified=checked
    )


def refuse_for_other_methods(point: Point, *, in_place: bool) -> None:
    if in_place and registry.of(point).restore_mode != REPOSITORY:
        raise ConfigError(
            f"--in-place restores a pitr point (the whole cluster, from pgBackRest); {point.id} is a {point.method} point.",
            "Leave --in-place out: other points are restored beside staging and swapped.",
        )
