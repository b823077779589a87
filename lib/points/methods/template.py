"""Points kept as databases on staging's own server, with connections disabled so
nobody writes to them by accident; restored by a server-side copy."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg2

from lib import faults
from lib.errors import ConfigError, ConfirmationRefused, VerificationError
from lib.files import human_size, utc_now
from lib.interaction import Confirmer, Reporter
from lib.pg.codes import OBJECT_IN_USE, sqlstate
from lib.pg.db import (
    database_properties,
    derived_name,
    drop_database,
    refuse_prepared_transactions,
    sessions_on,
    terminate_sessions,
)
from lib.pg.fingerprint import compare, fingerprint_like, is_physical
from lib.pg.retry import retry_on
from lib.pg.target import Target
from lib.points import intents, spare
from lib.points.catalog import Catalog, Point
from lib.points.copies import (
    copy_choice,
    copy_database,
    copy_error,
    database_state,
    invalid_databases,
    mark_ready,
    opened,
    read_physical,
    seal,
    seal_mark,
)
from lib.points.manifest import Baseline, Kind, Manifest, VerificationLevel, thawed
from lib.points.methods.base import Built, FollowUp, Method, Taken, TakeRequest
from lib.points.methods.dump import database_section
from lib.points.reading import CATALOG, PAGES, ROWS, Reading, database_bytes, read_rows, read_side_by_side

log = logging.getLogger(__name__)


def _point_database(target: Target, point: Point) -> str:
    name = point.manifest.template_database or ""
    state = database_state(target.maint, name) if name else None
    if state is None:
        raise VerificationError(
            f"The database {name!r} that holds point {point.id} does not exist on {target.info.server_label()}.",
            "The point cannot be restored; delete it with `python3 rollback_manager.py delete "
            f"{point.id}` and use another point.",
        )
    if state["invalid"]:
        raise VerificationError(
            f"The database {name!r} that holds point {point.id} is invalid (an interrupted DROP DATABASE left it).",
            "Drop it by hand (DROP DATABASE) and use another point.",
        )
    return name


def changed_outside(target: Target, point: Point) -> str | None:
    """Why the point's database may have been changed outside the toolkit (its seal was
    broken: lib/points/copies.py SealMark), or None."""
    mark = seal_mark(target, point.manifest.template_database or "")
    return None if mark is None or mark.trusted() else mark.why_changed()


def refuse_changed(target: Target, point: Point, doing: str) -> None:
    why = changed_outside(target, point)
    if why:
        raise VerificationError(
            f"Point {point.id}'s database {point.manifest.template_database!r} may have been changed outside the "
            f"toolkit: {why}. Refusing to {doing}; nothing was changed.",
            "Use another point (`python3 rollback_manager.py list`), or add --force to use it all the same "
            "(its rows are then compared with the baseline read when it was taken, where there is one).",
        )


def _baseline_from(reading: Reading) -> Baseline:
    return Baseline(
        row_counts=reading.row_counts,
        content=reading.content,
        read_at=utc_now().isoformat(timespec="seconds"),
        row_hash=reading.row_hash,
    )


def _baseline_unknown(point: Point, why: str) -> Baseline:
    return point.record_verification(baseline=Baseline(unknown=why)).baseline


def baseline_readable(target: Target, point: Point) -> str | None:
    """Why the point's own rows can no longer be its baseline, or None: a baseline is read
    only from a point database nobody else could have written since it was taken."""
    mark = seal_mark(target, point.manifest.template_database or "")
    if mark is None:
        return "its database is gone"
    if not mark.trusted():
        return f"its database may have been changed: {mark.why_changed()}"
    if mark.interrupted:
        return "a reading of its database was killed, and the database stood open to connections until it was sealed again"
    return None


def read_baseline(target: Target, point: Point, copy_name: str | None = None) -> tuple[Baseline, Reading | None]:
    """Every row of a point's database, in one snapshot, as its baseline; with
    ``copy_name`` (its spare), that copy is read beside it and returned, to be compared.
    Never from a database that may have been written since the point was taken: then the
    baseline is recorded unknown, with the reason, and no copy is read."""
    why = baseline_readable(target, point)
    if why:
        return _baseline_unknown(point, why), None
    name = point.manifest.template_database
    with opened(target, name) as conn:
        if copy_name is None:
            base, copy = read_rows(conn, f"point {point.id}", background=True, yield_to=target.lock_key), None
        else:
            with opened(target, copy_name) as copy_conn:
                base, copy = read_side_by_side(
                    conn,
                    f"point {point.id}",
                    copy_conn,
                    f"the copy {copy_name}",
                    background=True,
                    yield_to=target.lock_key,
                )
    why = baseline_readable(target, point)  # a session that was not a reader, found when the last one left
    if why:
        return _baseline_unknown(point, why), None
    return point.record_verification(baseline=_baseline_from(base)).baseline, copy


def read_copy(target: Target, point: Point, conn, what: str, ui: Reporter) -> str:
    """Every row of a copy of the point (``conn`` is connected to it), compared with the
    point's baseline; where none has been read yet, the point is read beside the copy
    and becomes it. Returns the level reached, as output and the audit say it."""
    total = database_bytes(conn)
    baseline = point.verification.baseline
    if baseline is None and not baseline_readable(target, point):
        with (
            ui.progress(
                f"Reading every row of {what} and of point {point.id}", total=2 * total, unit="B", estimated=True
            ) as tick,
            opened(target, point.manifest.template_database) as point_conn,
        ):
            base, found = read_side_by_side(
                point_conn, f"point {point.id}", conn, what, lambda done, table: tick(table or None, done=done)
            )
        why = baseline_readable(target, point)
        if why:
            raise VerificationError(
                f"Point {point.id} may have been changed while it was read: {why}. Nothing was changed.",
                "Use another point (`python3 rollback_manager.py list`).",
            )
        baseline = point.record_verification(baseline=_baseline_from(base)).baseline
        _compare_with(point, found, baseline, what)
        return f"{ROWS}: {found.total_rows} rows read, every one matching the point read beside it"
    with ui.progress(f"Reading every row of {what}", total=total, unit="B", estimated=True) as tick:
        found = read_rows(conn, what, lambda done, table: tick(table or None, done=done), row_hash=_hashed_with(baseline))
    if baseline is None or not baseline.known:
        why = (baseline.unknown if baseline else None) or baseline_readable(target, point)
        return f"{PAGES}: every table page read; rows not compared, there is no baseline ({why})"
    _compare_with(point, found, baseline, what)
    return f"{ROWS}: {found.total_rows} rows read, every one matching the baseline read {baseline.read_at}"


def _hashed_with(baseline: Baseline | None) -> str | None:
    """How a reading compared with ``baseline`` hashes its rows: as the baseline did
    (None: the server's way, for a reading that may become the baseline)."""
    return baseline.hashed_with if baseline is not None and baseline.known else None


def unlogged_of(point: Point) -> set[str]:
    """The point's UNLOGGED tables, as its manifest recorded them."""
    relations = (point.manifest.fingerprint or {}).get("relations") or {}
    marked = {name for name, v in relations.items() if len(v) > 2 and v[2] == "unlogged" and not name.endswith(" (toast)")}
    return marked | set(point.manifest.unlogged_tables or ())


def _compare_with(point: Point, found: Reading, baseline: Baseline, what: str) -> None:
    problems = found.differences(thawed(baseline.row_counts), thawed(baseline.content), unlogged_of(point))
    if problems:
        raise VerificationError(
            f"The rows of {what} differ from point {point.id}'s baseline: " + "; ".join(problems[:10]) + ".",
            "The point or its copy was changed after the point was taken: use an earlier point "
            "(`python3 rollback_manager.py list`).",
        )


def ready_spare(target: Target, point: Point, name: str) -> str | None:
    """Read a point's spare (held by the caller: lib/points/spare.py ``held``): every row
    against the point's baseline, the point itself read beside it where no baseline has
    been read yet; a spare that matches is marked ready. Returns when it was read (None:
    not ready, and why is logged)."""
    baseline = point.verification.baseline
    if baseline is None:
        baseline, found = read_baseline(target, point, name)
    elif baseline.known:
        with opened(target, name) as conn:
            found = read_rows(
                conn,
                f"the spare copy {name}",
                background=True,
                row_hash=baseline.hashed_with,
                yield_to=target.lock_key,
            )
    else:
        found = None
    if found is None or not baseline.known:
        log.info("spare %s of %s not marked ready: there is no baseline (%s)", name, point.id, baseline.unknown)
        return None
    _compare_with(point, found, baseline, f"the spare copy {name}")
    when = utc_now().isoformat(timespec="seconds")
    return when if mark_ready(target, name, when) else None


def verify_point_database(target: Target, point: Point, *, deep: bool = False) -> dict:
    """By its catalog (O(relations)): the database exists, is valid, sealed as the toolkit
    left it, and its schema digest, every relation's file node and size, sequences and
    large objects are the manifest's. With ``deep``, every row is read and compared with
    the baseline. Every problem found is named at once."""
    name = _point_database(target, point)
    why = changed_outside(target, point)
    problems = [f"it may have been changed outside the toolkit ({why})"] if why else []
    expected = thawed(point.manifest.fingerprint or {})
    with opened(target, name) as conn:
        problems += compare(expected, fingerprint_like(conn, expected))
        found = (
            read_rows(conn, f"point {point.id}'s database {name!r}", row_hash=_hashed_with(point.verification.baseline))
            if deep and len(problems) <= 1
            else None
        )
    result = {"database": name, "fingerprint": "matches the manifest", "verified": CATALOG if is_physical(expected) else ROWS}
    if found is not None:
        try:
            result.update(_deep_check(target, point, found))
        except VerificationError as exc:
            problems.append(exc.message)
    if problems:
        raise VerificationError(
            f"Point {point.id}'s database {name!r} is not as it was taken: " + "; ".join(problems[:10]) + ".",
            "Use another point (`python3 rollback_manager.py list`).",
        )
    return result


def _deep_check(target: Target, point: Point, found: Reading) -> dict:
    baseline = point.verification.baseline
    if baseline is None:
        why = baseline_readable(target, point)
        if why:
            _baseline_unknown(point, why)
            return {"verified": PAGES, "rows": f"{found.total_rows} read; no baseline can be read ({why})"}
        point.record_verification(baseline=_baseline_from(found))
        return {
            "verified": PAGES,
            "rows": f"{found.total_rows} read; no baseline had been read yet: it is now, for the next `verify --deep`",
        }
    if not baseline.known:
        return {
            "verified": PAGES,
            "rows": f"{found.total_rows} read; rows not compared, there is no baseline ({baseline.unknown})",
        }
    _compare_with(point, found, baseline, f"point {point.id}'s database")
    point.record_verification(level=VerificationLevel.DEEP, verified_at=utc_now().isoformat(timespec="seconds"))
    return {"verified": ROWS, "rows": f"{found.total_rows} rows match the baseline read on {baseline.read_at}"}


def preflight(target: Target, ui: Reporter, ask: Confirmer) -> None:
    """Before copying: rights, invalid databases, space, and the sessions that must end."""
    f = target.facts
    if not f.can_create_db:
        raise ConfigError(
            f"Role {f.current_user} may not create databases, which a template point needs.",
            "Use --method dump, or grant CREATEDB to the role.",
        ).only_this_method()
    invalid = invalid_databases(target.maint)
    if target.dbname in invalid:
        raise VerificationError(
            f"Database {target.dbname!r} is invalid (an interrupted DROP DATABASE left it) and cannot be a source.",
            "Drop it and restore a point, or rebuild staging.",
        )
    if invalid:
        ui.warn("Invalid databases on this server (left by interrupted drops; never used as sources): " + ", ".join(invalid))
    refuse_prepared_transactions(target.maint, target.dbname, "copy it")
    ui.info(f"  The copy needs about {human_size(f.database_size)} of free space on the server.")
    sessions = sessions_on(target.maint, target.dbname, own=False)
    if sessions:
        ui.info(f"  A copy needs {target.dbname} to itself; these {len(sessions)} session(s) will be disconnected:")
        for s in sessions:
            ui.info(f"    - {s.describe()}")
        try:
            ask.confirm("Disconnect them and take the point?", what=f"disconnect the sessions on {target.dbname}")
        except ConfirmationRefused as exc:
            raise exc.only_this_method() from None  # a dump point needs nobody disconnected


COPY_ATTEMPTS = 5


def copy_staging(target: Target, new_name: str) -> int:
    """CREATE DATABASE new TEMPLATE staging: the source must have no other sessions, so
    end them and try again when one slips in (55006). Staging's connections are never
    disabled, so a killed copy leaves staging fully usable. Returns sessions ended."""
    ended = 0

    def attempt(_n: int) -> None:
        nonlocal ended
        ended += len(terminate_sessions(target.maint, target.dbname))
        faults.pause("before copy")
        copy_database(target, target.dbname, new_name, None)

    try:
        retry_on({OBJECT_IN_USE}, COPY_ATTEMPTS, attempt, what=f"copying {target.dbname}")
    except psycopg2.Error as exc:
        raise copy_error(target, exc, target.dbname, attempts=COPY_ATTEMPTS if sqlstate(exc) == OBJECT_IN_USE else 1) from None
    return ended


def drop_orphans(target: Target, point_ids: list[str], dry_run: bool = False) -> list[str]:
    """Databases of creations that were killed before their manifest was written; returns their names."""
    found = []
    for point_id in point_ids:
        name = derived_name(point_id, "")
        if database_state(target.maint, name) is not None:
            found.append(name)
            if not dry_run:
                log.info("dropping %s, left by an interrupted template point", name)
                drop_database(target.maint, name)
    return found


def take(target: Target, catalog: Catalog, ui: Reporter, ask: Confirmer, *, label: str, base: Mapping[str, Any]) -> Point:
    preflight(target, ui, ask)
    started = utc_now()
    with catalog.writing(label) as writer:
        manifest = Manifest(id=writer.id, **base)
        name = derived_name(writer.id, "")
        with intents.new_database(target, name, "template point copy", point_id=writer.id) as new:
            clock = time.monotonic()
            with ui.progress(f"Copying {target.dbname} to {name} on the server"):
                ended = copy_staging(target, name)
            copy_seconds = time.monotonic() - clock
            faults.pause("after copy")
            seal(target, name, writer.id, manifest.description or "")
            fp = read_physical(target, name)
            props = database_properties(target.maint, target.dbname).as_dict()
            point = writer.commit(
                manifest.replaced(
                    created_at_text=started.isoformat(timespec="milliseconds"),
                    method=TemplateMethod.name,
                    template_database=name,
                    database=database_section(target, props),
                    fingerprint=fp.as_dict(),
                    sessions_terminated=ended,
                    copy=copy_choice(target).as_dict(),
                    copy_seconds=round(copy_seconds, 3),
                    duration_seconds=round((utc_now() - started).total_seconds(), 3),
                )
            )
            new.own()
        return point


class TemplateMethod(Method):
    """A copy of staging on its own server: taken and restored by the server, checked by
    its catalog when taken, its rows read in the background as the baseline, and every
    copy of it read against that baseline before it is swapped in (lib/points/reading.py)."""

    name = "template"
    level = CATALOG
    unlogged_note = (
        "PostgreSQL empties them at a server crash, in staging and in this point's copy alike: "
        "restored after one, they come back empty (every logged table exactly)"
    )
    holds_database = True
    encryptable = False

    def take(self, request: TakeRequest) -> Taken:
        r = request
        point = take(r.target, r.catalog, r.ui, r.ask, label=r.label, base=r.base)
        notes = ["every row of its copy is read in the background, as the baseline its copies are read against before a swap"]
        if self.wants_spare(r.target.settings, point):
            notes.insert(
                0,
                "a spare copy is being prepared in the background, so a quick rollback is only a swap (it needs the "
                "database's size once more on the server; ROLLBACK_SPARE=0 turns it off)",
            )
        return Taken(point, [FollowUp("after-point", (point.id,), tuple(notes))])

    @staticmethod
    def wants_spare(settings, point: Point) -> bool:
        return spare.enabled(settings) and point.manifest.kind == Kind.MANUAL

    def follow_up_after_restore(self, settings, point: Point) -> bool:
        return self.wants_spare(settings, point)

    def verified_level(self, point: Point) -> str:
        return ROWS if point.verification.level == VerificationLevel.DEEP else self.level

    def verify(self, point: Point, settings, ui: Reporter, target: Target | None, *, deep: bool) -> dict:
        found = verify_point_database(target, point, deep=deep)
        ui.ok(
            f"Database copy matches the manifest ({CATALOG}: schema digest, every relation's file and size, sequences)"
            + (f"; {found['rows']}" if found.get("rows") else "")
        )
        return found

    def describe_verification(self, point: Point) -> str:
        found = point.verification
        if found.level == VerificationLevel.DEEP:
            return f"{ROWS}: every row matched its baseline {found.verified_at}"
        baseline = found.baseline
        if baseline is None:
            rows = "rows not read yet (the background reads them)"
        elif baseline.known:
            rows = f"rows read as the baseline {baseline.read_at}"
        else:
            rows = f"no baseline: {baseline.unknown}"
        return f"{CATALOG}: schema digest, every relation's file and size, sequences; {rows}"

    def describe_rows(self, point: Point) -> str:
        fp = point.manifest.fingerprint or {}
        baseline = point.verification.baseline
        counts = point.manifest.row_counts or (baseline.row_counts if baseline else None)
        if counts is None:
            return f"not counted yet ({len(fp.get('relations', {}))} relations checked by the catalog)"
        return f"{sum(counts.values())} in {len(counts)} tables"

    def lives_on(self, target: Target, point: Point) -> bool:
        return point.manifest.database.system_identifier in (None, target.facts.system_identifier)

    def check_usable(self, target: Target, point: Point) -> None:
        m = point.manifest
        if not self.lives_on(target, point):
            raise ConfigError(
                f"Point {point.id} is a database copy on another server ({m.database.server}).",
                "Restore it against that server, or choose a dump point.",
            )
        state = database_state(target.maint, m.template_database or "")
        if state is None or state["invalid"]:
            raise VerificationError(
                f"Point {point.id}'s database {m.template_database!r} is "
                f"{'missing' if state is None else 'invalid (an interrupted DROP left it)'}. Nothing was changed.",
                "Choose another point (`python3 rollback_manager.py list`).",
            )

    def present(self, target: Target, point: Point) -> bool:
        state = database_state(target.maint, point.manifest.template_database or "")
        return state is not None and not state["invalid"]

    def check_unchanged(self, target: Target, point: Point, doing: str) -> None:
        refuse_changed(target, point, doing)

    def build_beside(self, target: Target, point: Point, aside: str, ui: Reporter) -> Built:
        source = point.manifest.template_database
        if spare.enabled(target.settings):
            claimed = spare.claim(target, point, aside)
            if claimed.taken:
                ui.step(
                    f"Using the spare copy of {point.id} prepared in the background"
                    + (f" ({claimed.note})" if claimed.note else "")
                )
                return Built("spare copy", read=claimed.read)
            if claimed.note:
                ui.info(f"  {claimed.note}; copying the point itself")
        owner = point.manifest.database.properties.get("owner")
        with ui.progress(f"Copying {source} into {aside} on the server"):
            try:
                copy_database(target, source, aside, owner)
            except psycopg2.Error as exc:
                raise copy_error(target, exc, source) from None
        return Built()

    def read_copy(self, target: Target, point: Point, conn, built: Built, ui: Reporter) -> str | None:
        if built.read:
            return built.read
        return read_copy(target, point, conn, "the copy built beside staging", ui)

    def drop(self, target: Target, point: Point) -> None:
        name = point.manifest.template_database
        if name:
            drop_database(target.maint, name)
        spare.drop(target, point)

    @contextmanager
    def open_for_reading(self, target: Target, point: Point, ui: Reporter) -> Iterator[object | None]:
        with opened(target, point.manifest.template_database) as conn:
            yield conn
