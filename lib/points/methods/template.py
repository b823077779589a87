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
from lib.pg.fingerprint import compare, fingerprint, fingerprint_like, is_physical
from lib.pg.locks import CountLock
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
    opened,
    read_physical,
    seal,
)
from lib.points.manifest import Baseline, Kind, Manifest, VerificationLevel, thawed
from lib.points.methods.base import FollowUp, Method, Taken, TakeRequest
from lib.points.methods.dump import database_section

log = logging.getLogger(__name__)


def read_baseline(target: Target, point: Point, name: str) -> Baseline:
    """Every row of a point's database (exact counts and content hashes): the background
    reads them once, as the baseline `verify --deep` compares with later. Held under a
    CountLock, so a check that finds the database open to connections knows why; a
    foreground copy of the database ends this session (the background yields)."""
    with CountLock(target.maint, target.facts.system_identifier, name), opened(target, name) as conn:
        fp = fingerprint(conn, deep=True)
    return point.record_verification(baseline=_baseline_of(fp)).baseline


def _baseline_of(fp) -> Baseline:
    return Baseline(row_counts=fp.row_counts, content=fp.content, read_at=utc_now().isoformat(timespec="seconds"))


def verify_point_database(target: Target, point: Point, *, deep: bool = False) -> dict:
    """Physically (O(relations)): the database exists, is valid and sealed, and its
    schema digest, every relation's file node and size, sequences and large objects are
    the manifest's. With ``deep``, every row is read and compared with the baseline the
    background read when the point was taken."""
    name = point.manifest.template_database
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
    counting = CountLock(target.maint, target.facts.system_identifier, name)
    if state["allow_connections"] and counting.try_acquire() is None:
        counting.release()
        raise VerificationError(
            f"Point {point.id}'s database {name!r} takes connections, and it should be sealed: someone may have changed it.",
            f"Use another point, or check it with `python3 rollback_manager.py verify {point.id} --deep`.",
        )
    expected = thawed(point.manifest.fingerprint or {})
    with opened(target, name) as conn:
        found = fingerprint_like(conn, expected)
        problems = compare(expected, found)
        result = {
            "database": name,
            "fingerprint": "matches the manifest",
            "verified": "physical" if is_physical(expected) else "deep",
        }
        if deep and not problems:
            result.update(_deep_check(point, conn, problems))
    if problems:
        raise VerificationError(
            f"Point {point.id}'s database {name!r} no longer matches its manifest: " + "; ".join(problems[:10]) + ".",
            "Someone changed it; use another point.",
        )
    return result


def _deep_check(point: Point, conn, problems: list[str]) -> dict:
    """Every row against the baseline (``problems`` grows where they differ)."""
    baseline = point.verification.baseline
    now = fingerprint(conn, deep=True)
    if not baseline:
        point.record_verification(baseline=_baseline_of(now))
        return {"rows": f"{now.total_rows} read; no baseline had been read yet: it is now, for the next `verify --deep`"}
    problems += compare({"row_counts": thawed(baseline.row_counts), "content": thawed(baseline.content)}, now)
    if not problems:
        point.record_verification(level=VerificationLevel.DEEP, verified_at=utc_now().isoformat(timespec="seconds"))
        return {"verified": "deep", "rows": f"{now.total_rows} rows match the baseline read on {baseline.read_at}"}
    return {}


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
    sessions = sessions_on(target.maint, target.dbname)
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
    """A copy of staging on its own server: taken and restored by the server, checked
    by the catalog (physical), its rows read in the background as the baseline."""

    name = "template"
    level = "physical"
    holds_database = True
    encryptable = False

    def take(self, request: TakeRequest) -> Taken:
        r = request
        point = take(r.target, r.catalog, r.ui, r.ask, label=r.label, base=r.base)
        notes = ["every row of its copy is read in the background, as the baseline `verify --deep` compares with"]
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
        found = point.verification.level
        return self.level if found is None else found

    def verify(self, point: Point, settings, ui: Reporter, target: Target | None, *, deep: bool) -> dict:
        found = verify_point_database(target, point, deep=deep)
        ui.ok(
            "Database copy matches the manifest: schema digest, every relation's file and size, sequences"
            + (f"; {found['rows']}" if found.get("rows") else "")
        )
        return found

    def describe_verification(self, point: Point) -> str:
        found = point.verification
        if found.level == VerificationLevel.DEEP:
            return f"deep: every row matched its baseline {found.verified_at}"
        return "physical: schema digest, every relation's file and size, sequences" + (
            "; rows read as the baseline" if found.baseline else "; rows not read yet (the background reads them)"
        )

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

    def build_beside(self, target: Target, point: Point, aside: str, ui: Reporter) -> str | None:
        source = point.manifest.template_database
        if spare.enabled(target.settings):
            with ui.progress(f"Taking the spare copy of {point.id} (waiting if it is still being prepared)"):
                claimed = spare.claim(target, point, aside)
            if claimed:
                ui.step(f"Using the spare copy of {point.id} prepared in the background")
                return "spare copy"
        owner = point.manifest.database.properties.get("owner")
        with ui.progress(f"Copying {source} into {aside} on the server"):
            try:
                copy_database(target, source, aside, owner)
            except psycopg2.Error as exc:
                raise copy_error(target, exc, source) from None
        return None

    def drop(self, target: Target, point: Point) -> None:
        name = point.manifest.template_database
        if name:
            drop_database(target.maint, name)
        spare.drop(target, point)

    @contextmanager
    def open_for_reading(self, target: Target, point: Point, ui: Reporter) -> Iterator[object | None]:
        with opened(target, point.manifest.template_database) as conn:
            yield conn
