"""Restoring a point without ever leaving staging half-restored.

Swap mode (the role may create and rename databases): build the point's state
in a new database beside staging, verify it against the manifest, then in one
short step disable connections to staging, end its sessions and rename both
databases in one transaction. The old staging stays on the server, sealed, as a
point of its own, so the restore can be undone with the same command.

In-place mode (it may not): keep the current state as a dump point first, then
empty staging and restore in a single transaction: all or nothing.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import time
from dataclasses import dataclass, field

import psycopg2

from lib import faults
from lib.config import redact
from lib.errors import CatalogError, ConfigError, CopyRejected, DatabaseError, RollbackError, VerificationError
from lib.files import age, utc_now
from lib.interaction import Reporter
from lib.pg.codes import OBJECT_IN_USE
from lib.pg.db import (
    Session,
    apply_database_properties,
    connection,
    database_properties,
    derived_name,
    execute,
    not_owned,
    refuse_prepared_transactions,
    rename_database,
    replication_ties,
    sessions_on,
    set_allow_connections,
    terminate_sessions,
)
from lib.pg.fingerprint import compare, counted_tables, emptied_by_recovery, fingerprint_like, is_physical
from lib.pg.retry import retry_on
from lib.pg.target import Target
from lib.points import copies, crypto, intents
from lib.points.catalog import (
    PENDING,
    TMP_PREFIX,
    Catalog,
    Point,
    PointWriter,
    check_files,
    read_pending,
    refuse_damaged_manifest,
)
from lib.points.manifest import Kind, Manifest, thawed
from lib.points.methods import registry
from lib.points.methods.base import SWAP, TABLES, Built
from lib.points.methods.data import restore_in_transaction
from lib.points.methods.dump import database_section
from lib.points.methods.template import TemplateMethod
from lib.process import OperatorCommand

log = logging.getLogger(__name__)

ASIDE_SUFFIX = "_rb_restoring"
IN_PLACE = "in-place"  # a restore mode of its own: emptied and restored in one transaction, where renaming is not allowed


@dataclass
class RestorePlan:
    point: Point
    mode: str  # SWAP, TABLES or IN_PLACE
    sessions: list[Session]
    reason: str = ""
    ties: list[str] = field(default_factory=list)  # replication slots and subscriptions a swap leaves behind

    def describe(self, target: Target) -> str:
        p = self.point
        lines = [
            f"Restore database [bold]{target.dbname}[/] on {target.info.server_label()} "
            f"(PostgreSQL {target.facts.major}) to point [bold]{p.id}[/]",
            f"  taken {(p.manifest.created_at_text or '?')[:19].replace('T', ' ')} UTC ({age(p.manifest.created_at_text)}) — "
            f"{p.manifest.description or 'no description'} ({p.method})",
        ]
        if self.mode == TABLES:
            lines.append(
                f"  Its {len(p.manifest.tables or ())} table(s) are emptied and refilled in one transaction; "
                "the rest of the database is untouched and sessions stay connected. "
                "Their current data is first kept as a data point (undo: restore that point)."
            )
            return "\n".join(lines)
        if self.mode == SWAP:
            lines.append(
                "  The point is rebuilt beside staging and read first (its catalog, then every page and row); staging is then swapped "
                "in one short step, and its current state kept as a new point (undo: restore that point)."
            )
            lines += hook_lines(target)
        else:
            lines.append(f"  In place, in one transaction ({self.reason}); the current state is first kept as a dump point.")
        if self.ties:
            lines.append(
                f"  Tied to {target.dbname} by its oid, these stay with the state kept before (--force): " + "; ".join(self.ties)
            )
        if self.sessions:
            lines.append(f"  These {len(self.sessions)} session(s) on {target.dbname} will be disconnected:")
            lines += [f"    - {s.describe()}" for s in self.sessions]
        else:
            lines.append(f"  No sessions are connected to {target.dbname} now.")
        return "\n".join(lines)

    def keeping_before(self, target: Target) -> str:
        """What a restore in one transaction keeps first, as the step says it."""
        if self.mode == TABLES:
            return f"Keeping the current data of {len(self.point.manifest.tables or ())} table(s) as a data point first"
        return f"Keeping the current state of {target.dbname} as a dump point first"


@dataclass
class RestoreResult:
    point_id: str
    database: str
    mode: str
    before_point_id: str | None
    unavailable_seconds: float | None
    sessions_terminated: int
    verified: str | None = None  # the level the check reached, as said (lib/points/reading.py)
    tool: str | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    after_swap_failed: str | None = None  # ROLLBACK_AFTER_SWAP did not succeed: the restore is done, the hook is not

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def hook_lines(target: Target) -> list[str]:
    """The commands configured around the swap, as a confirmation shows them."""
    s = target.settings
    return [
        f"  {label}: {redact(shlex.join(argv))}"
        for label, argv in (("Just before the swap", s.before_swap), ("Just after it (also if it fails)", s.after_swap))
        if argv
    ]


def _run_hook(target: Target, ui: Reporter, phase: str, argv: tuple[str, ...], facts: dict[str, str]) -> str | None:
    """ROLLBACK_BEFORE_SWAP / ROLLBACK_AFTER_SWAP: None when it succeeded (or there is none)."""
    if not argv:
        return None
    env = {
        "ROLLBACK_PHASE": phase,
        "ROLLBACK_DATABASE": target.dbname,
        "ROLLBACK_HOST": target.info.host or "",
        "ROLLBACK_PORT": str(target.info.port or ""),
        **facts,
    }
    shown = redact(shlex.join(argv))
    ui.step(f"Running the command {phase.replace('_', ' ')}: {shown}")
    problem = OperatorCommand(argv, env=env).outcome(target.settings.hook_timeout)
    problem = redact(problem) if problem else None
    log.info("%s command %s: %s", phase, shown, problem or "succeeded")
    return problem


def refuse_other_database(target: Target, point: Point) -> None:
    """A point of another database is neither restored into staging nor compared with it."""
    if point.database_name != target.dbname:
        raise ConfigError(
            f"Point {point.id} is of database {point.database_name!r}, but staging is {target.dbname!r}.",
            "Pass --database-url for that database, or choose a point of this one (`rollback_manager.py list`).",
        )


def check_point_usable(target: Target, catalog: Catalog, point: Point) -> None:
    """Before anything is touched: the point is of this database, complete, and intact."""
    m = point.manifest
    refuse_damaged_manifest(point)
    if not m.is_completed:
        raise ConfigError(f"Point {point.id} is not complete (status: {m.status}).", "Use another point.")
    refuse_other_database(target, point)
    problems = check_files(point)
    if problems:
        raise VerificationError(
            f"Point {point.id} failed its checksums: " + "; ".join(problems) + ". Nothing was changed.",
            earlier_points_hint(target, catalog, point),
        )
    crypto.check_point_keys(point, target.settings)  # a missing or wrong key: refused here, nothing touched
    refuse_prepared_transactions(target.maint, target.dbname, f"restore {target.dbname}")
    registry.of(point).check_usable(target, point)


def earlier_points_hint(target: Target, catalog: Catalog, point: Point) -> str:
    """The points of staging older than ``point`` whose files are intact, as a next step."""
    m = point.manifest
    good = [
        p
        for p in catalog.points()
        if p.id != point.id
        and p.database_name == target.dbname
        and (p.manifest.created_at_text or "") <= (m.created_at_text or "")
        and p.manifest.is_completed
        and not check_files(p)
    ]
    return _earlier_points_hint(good)


def _earlier_points_hint(good: list[Point]) -> str:
    """Points taken on purpose first (what someone rolling back wants), newest first; the
    states kept before rollbacks (post-migration states) after them."""
    if not good:
        return "No earlier point of this database verifies; `python3 reset_staging.py` rebuilds staging from V2."
    taken = [p.id for p in reversed(good) if p.manifest.kind != Kind.BEFORE_ROLLBACK][:5]
    kept = [p.id for p in reversed(good) if p.manifest.kind == Kind.BEFORE_ROLLBACK][:3]
    hint = f"Earlier points that verify, newest first: {', '.join(taken)}." if taken else ""
    if kept:
        hint += f" States kept before earlier rollbacks (after a migration, not before one): {', '.join(kept)}."
    return hint.strip()


def refuse_replication_ties(target: Target, ties: list[str], *, force: bool, doing: str) -> None:
    """A swap by rename cannot take logical replication slots and subscriptions along:
    PostgreSQL ties them to the database's oid, so they stay with the state kept before."""
    if ties and not force:
        raise ConfigError(
            f"Refusing to {doing}: {target.dbname} has " + "; ".join(ties) + ". A restore swaps in another database, and "
            "these stay tied to the old one, kept as the 'state before' point: replication from or to staging stops "
            "until they are recreated on the new staging. Nothing was changed.",
            "Add --force to go ahead anyway (then drop them on the old database, or recreate them on staging), "
            "or drop them first.",
        )


def restore_plan(target: Target, point: Point) -> RestorePlan:
    f = target.facts
    method = registry.of(point)
    if method.restore_mode == TABLES:
        return RestorePlan(point, TABLES, [])
    sessions = sessions_on(target.maint, target.dbname, own=False)
    if target.may_swap:
        return RestorePlan(point, SWAP, sessions, ties=replication_ties(target.maint, target.dbname))
    if not method.can_restore_in_place():
        raise ConfigError(
            f"Role {f.current_user} may not create or rename databases, which restoring the database copy {point.id} needs.",
            "Run it as the database owner with CREATEDB, or as a superuser; or restore a dump point.",
        )
    with connection(target.info, target.dbname, application_name="rollback-toolkit restore plan") as conn:
        count, named = not_owned(conn)
    if count:
        raise ConfigError(
            f"Role {f.current_user} may not restore {target.dbname} in place: a restore in place drops and makes "
            f"again every object of the point, which only their owner may, and {count} are not the role's: "
            f"{', '.join(named)}{' …' if count > len(named) else ''}. Nothing was changed.",
            f"Run it as their owner (or a superuser); or make the role own them: ALTER DATABASE {target.dbname} OWNER TO "
            f"{f.current_user}; then, as the old owner, REASSIGN OWNED BY <old owner> TO {f.current_user}; "
            "`python3 check_setup.py` checks it.",
        )
    reason = f"role {f.current_user} may not create or rename databases"
    return RestorePlan(point, IN_PLACE, sessions, reason)


def swap_databases(target: Target, aside: str, before: str, attempts: int = 3) -> tuple[float, int]:
    """Staging becomes ``before`` and ``aside`` becomes staging, in one transaction.

    Returns how long staging refused connections, and how many sessions ended.
    """
    maint, name = target.maint, target.dbname
    started = time.monotonic()
    set_allow_connections(maint, name, False)
    ended = 0

    def attempt(_n: int) -> None:
        nonlocal ended
        ended += len(terminate_sessions(maint, name))
        execute(maint, "BEGIN")
        try:
            rename_database(maint, name, before)
            faults.pause("between renames")
            rename_database(maint, aside, name)
        except BaseException:  # a failure or Ctrl-C between the renames: neither happened
            execute(maint, "ROLLBACK")
            raise
        execute(maint, "COMMIT")

    try:
        retry_on({OBJECT_IN_USE}, attempts, attempt, what=f"swapping {aside} in for {name}")
    except psycopg2.Error as exc:
        set_allow_connections(maint, name, True)
        raise DatabaseError(f"Could not swap {aside} in for {name}: {str(exc).strip()}") from None
    except BaseException:
        set_allow_connections(maint, name, True)
        raise
    return time.monotonic() - started, ended


def restore_swap(
    target: Target, catalog: Catalog, rplan: RestorePlan, ui: Reporter, *, catalog_only: bool = False
) -> RestoreResult:
    """Rebuilt beside staging, checked by its catalog, then read (every page, every row
    against the point) unless ``catalog_only``; swapped in."""
    point = rplan.point
    method = registry.of(point)
    untouched = f"Staging {target.dbname} was not touched."
    built: list[Built] = []

    def build(aside: str) -> str | None:
        built.append(method.build_beside(target, point, aside, ui))
        return built[0].tool

    def verify(conn) -> str:
        try:
            level = verify_restored(conn, point, ui, untouched=untouched)
            if catalog_only:
                ui.warn("The copy was not read (--catalog-check-only): a changed or damaged page would not be seen.")
                return f"{level}; not read (--catalog-check-only)"
            read = method.read_copy(target, point, conn, built[0], ui)
        except VerificationError as exc:
            message = exc.message if exc.message.endswith(untouched) else f"{exc.message} {untouched}"
            raise CopyRejected(message, earlier_points_hint(target, catalog, point)) from None
        if read:
            ui.ok(f"The copy matches the point ({read})")
        return read or level

    return build_verify_swap(
        target,
        catalog,
        ui,
        build=build,
        verify=verify,
        properties=thawed(point.manifest.database.properties),
        restored=point.id,
    )


def verify_restored(conn, point: Point, ui: Reporter, *, untouched: str) -> str:
    """Against the point's manifest; a bare archive (restore --file) against its own
    table of contents, since nothing else was recorded. Returns the level reached."""
    if point.manifest.fingerprint is None:
        found = len(counted_tables(conn))
        want = point.manifest.archive_table_count or 0
        if found < want:
            raise VerificationError(
                f"The archive lists data for {want} tables, the restored database has {found}. {untouched}",
                "Check the archive with `rollback_manager.py info --file`.",
            )
        ui.ok(f"Restored without an error; all {want} tables of the archive's table of contents are there")
        return f"tables: all {want} tables of the archive's table of contents are there (nothing else was recorded)"
    ui.step(f"Checking the rebuilt copy against the manifest of {point.id}")
    expected = thawed(point.manifest.fingerprint)
    found = fingerprint_like(conn, expected)
    problems = compare(expected, found)
    emptied = emptied_by_recovery(expected.get("relations") or {}, found.relations or {})
    if emptied:
        ui.warn(
            "These UNLOGGED tables come back empty, as PostgreSQL's crash recovery left them in the point "
            "(every logged table is restored exactly): "
            + ", ".join(n for n in emptied if n in (point.manifest.unlogged_tables or emptied))
        )
    if problems:
        raise VerificationError(
            f"The rebuilt copy of {point.id} does not match its manifest: " + "; ".join(problems[:10]) + f". {untouched}",
            "Try an earlier point (`python3 rollback_manager.py list`).",
        )
    if is_physical(expected):
        ui.ok("The copy's catalog matches the point (schema digest, every relation's file and size, sequences, large objects)")
        return "catalog: schema digest, every relation's file and size, sequences, large objects"
    sequences = "sequences, " if "sequences" in expected else ""  # a point may say why it recorded none
    ui.ok(f"Rebuilt copy matches the point (schema digest, row counts, {sequences}large objects)")
    return f"counted: schema digest, every table's row count, {sequences}large objects"


def build_verify_swap(
    target: Target, catalog: Catalog, ui: Reporter, *, build, verify, properties: dict, restored: str
) -> RestoreResult:
    """The one way staging is replaced: build beside it, verify, swap names in one
    transaction, keep the old staging as a point. Any failure before the swap drops
    what was built and leaves staging exactly as it was. Call within an operation
    (lib/operations/scaffold.py), which finished what interrupted runs left."""
    aside = derived_name(target.dbname, ASIDE_SUFFIX)  # one left by an interrupted restore is gone (the scaffold)
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[step] = round(now - clock, 3)
        clock = now

    with intents.new_database(target, aside, f"{restored} rebuilt beside {target.dbname}") as new:
        tool = build(aside)
        intents.mark(target, aside, f"{restored} rebuilt beside {target.dbname}")
        lap("build")
        with connection(target.info, aside, application_name="rollback-toolkit verify") as conn:
            level = verify(conn)
        lap("verify")
        try:
            apply_database_properties(target.maint, aside, properties)
        except psycopg2.Error as exc:
            raise DatabaseError(
                f"Could not give the rebuilt copy {target.dbname}'s database properties (its settings, its roles' "
                f"settings in it, rights, comment): {str(exc).strip().splitlines()[0]}. Staging {target.dbname} was "
                "not touched.",
                "Run it as a superuser (a role's settings in a database need CREATEROLE on that role), "
                "or remove the setting that cannot be given.",
            ) from None
        current_props = database_properties(target.maint, target.dbname).as_dict()
        description = f"state before rollback to {restored}"
        facts = {"ROLLBACK_POINT_ID": restored}
        swapped, after_problem = False, None
        try:
            problem = _run_hook(target, ui, "before_swap", target.settings.before_swap, facts)
            if problem:
                raise RollbackError(
                    f"The command before the swap (ROLLBACK_BEFORE_SWAP) failed: {problem}. Nothing was swapped: "
                    f"staging {target.dbname} was not touched, and the copy built beside it was dropped.",
                    "Fix the command (run it by hand to see why), or unset ROLLBACK_BEFORE_SWAP, then run the restore again.",
                )
            with catalog.writing(f"before rollback {target.dbname}") as writer:
                before = derived_name(writer.id, "")
                kept = _before_state(target, writer.id, before, description, current_props, restored)
                writer.pending(kept)  # killed after the swap: the next run finishes this point
                lap("prepare swap")
                unavailable, ended = swap_databases(target, aside, before)
                swapped = True
                new.own()  # it is staging now
                lap("swap")
                ui.ok(f"{target.dbname} swapped in ({unavailable:.2f} s without connections, {ended} session(s) ended)")
                after_problem = _run_hook(
                    target, ui, "after_swap", target.settings.after_swap, {**facts, "ROLLBACK_SWAPPED": "1"}
                )
                faults.pause("after swap")
                before_point = _keep_before_state(target, writer, kept)
                lap("keep state before")
        finally:
            if not swapped:  # the pooler paused before a swap that did not happen is resumed all the same
                problem = _run_hook(target, ui, "after_swap", target.settings.after_swap, {**facts, "ROLLBACK_SWAPPED": "0"})
                if problem:
                    ui.warn(f"The command after the swap (ROLLBACK_AFTER_SWAP) failed too: {problem}. Run it by hand.")
    log.info("restore timings: %s", timings)
    result = RestoreResult(
        restored, target.dbname, "swap", before_point.id, round(unavailable, 3), ended, tool=tool, timings=timings, verified=level
    )
    if after_problem:
        result.after_swap_failed = (
            f"Staging {target.dbname} is restored, but the command after the swap (ROLLBACK_AFTER_SWAP) failed: "
            f"{after_problem}. Whatever it was to resume (a paused pooler?) is not resumed: run it by hand now."
        )
    return result


def _before_state(target: Target, point_id: str, before: str, description: str, props: dict, restored_id: str) -> Manifest:
    """The manifest of the state a swap keeps, but for its fingerprint (read once it is sealed)."""
    return Manifest(
        id=point_id,
        description=description,
        kind=Kind.BEFORE_ROLLBACK,
        restored_point=restored_id,
        method=TemplateMethod.name,
        template_database=before,
        database=database_section(target, props),
    )


def _keep_before_state(target: Target, writer, kept: Manifest) -> Point:
    before = kept.template_database
    copies.seal(target, before, writer.id, kept.description)
    try:
        fp = copies.read_physical(target, before)
    except RollbackError as exc:
        raise DatabaseError(
            f"Staging was restored, but the previous state, kept as database {before!r}, could not be read: {exc.message}",
            f"Nothing is lost: database {before!r} holds it. See ROLLBACK_GUIDE.md, 'Recovering by hand'.",
        ) from None
    return writer.commit(kept.replaced(created_at_text=utc_now().isoformat(timespec="milliseconds"), fingerprint=fp.as_dict()))


def recover_pending(target: Target, catalog: Catalog) -> list[str]:
    """Finish the 'state before rollback' points of restores killed after their swap: the
    database is there, only its manifest is missing. A folder whose swap never happened
    is removed. Call with staging's lock held; returns what was done, as sentences."""
    done = []
    for folder in list(catalog.pending):
        try:
            kept = read_pending(folder)
        except (OSError, ValueError, CatalogError):
            continue
        db = kept.database
        if db.name != target.dbname or db.system_identifier not in (None, target.facts.system_identifier):
            continue  # another staging's: left for its own runs
        catalog.pending.remove(folder)
        point_id = folder.name[len(TMP_PREFIX) :]
        state = copies.database_state(target.maint, kept.template_database)
        if state is None or state["invalid"]:
            shutil.rmtree(folder, ignore_errors=True)
            done.append(f"unfinished point folder {folder} (the swap it was made for did not happen)")
            continue
        writer = PointWriter(catalog, point_id, folder)
        (folder / PENDING).unlink()
        _keep_before_state(target, writer, kept)
        done.append(f"point {point_id}, the state before an interrupted restore, recovered and listed")
    return done


def restore_data(target: Target, rplan: RestorePlan, ui: Reporter, before: Point) -> RestoreResult:
    """The point's tables emptied and refilled in one transaction; ``before`` keeps their current data."""
    point = rplan.point
    tables = point.manifest.tables or ()
    mode = restore_in_transaction(target, point, ui)
    ui.ok(f"{len(tables)} table(s) restored and their row counts checked before the commit")
    return RestoreResult(
        point.id, target.dbname, TABLES, before.id, None, 0, notes=[mode], verified="counted: every table's row count"
    )


def restore_in_place(target: Target, rplan: RestorePlan, ui: Reporter, before: Point) -> RestoreResult:
    """Staging emptied and restored in one transaction; ``before`` keeps its current state."""
    point = rplan.point
    if rplan.sessions:
        terminate_sessions(target.maint, target.dbname)
    tool = registry.of(point).restore_in_place(target, point, ui)
    with connection(target.info, application_name="rollback-toolkit verify") as conn:
        try:
            level = verify_restored(conn, point, ui, untouched="Staging was restored in place and differs.")
        except VerificationError as exc:
            raise VerificationError(
                exc.message,
                f"Its previous state is point {before.id}: `python3 rollback_manager.py restore {before.id}` puts it back.",
            ) from None
    return RestoreResult(
        point.id,
        target.dbname,
        IN_PLACE,
        before.id,
        None,
        len(rplan.sessions),
        tool=tool,
        notes=[rplan.reason],
        verified=level,
    )
