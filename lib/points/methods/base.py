"""What every way of taking and restoring a point offers: one interface, implemented
once per method (template.py, dump.py, data.py, pitr.py), chosen through the registry
(registry.py). Callers ask a method what it does; they never compare its name.

A method says:
- how it takes a point (``take``), and what follow-up work the operation schedules
  for it in the background (``Taken.follow_up``): the method starts nothing itself;
- the level of verification a point of it has when taken (``level``) and has passed
  since (``verified_level``), and how ``verify`` checks it, by level;
- how it is restored: rebuilt beside staging and swapped (``build_beside``), in place
  in one transaction (``restore_in_place``), table by table (``restore_mode`` TABLES),
  or from a pgBackRest repository (REPOSITORY);
- what it holds on the server and drops with the point (``drop``), and whether the
  point can be read for a diff (``open_for_reading``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lib.errors import ConfigError
from lib.interaction import Confirmer, Reporter
from lib.pg.target import Target
from lib.points.catalog import Catalog, Point

# how a method's points are restored
SWAP = "swap"  # rebuilt beside staging, verified, swapped in (in place in one transaction where renaming is not allowed)
TABLES = "data"  # its tables emptied and refilled in one transaction; the rest of the database untouched
REPOSITORY = "repository"  # recovered from a pgBackRest repository, beside staging or the whole cluster in place


@dataclass(frozen=True)
class TakeRequest:
    """What the operation hands a method to take a point, under staging's lock."""

    target: Target
    catalog: Catalog
    ui: Reporter
    ask: Confirmer
    label: str
    base: Mapping[str, Any]  # the new point's Manifest fields the operation sets: description, kind, created_by, ...
    tables: list[str] | None = None


@dataclass(frozen=True)
class FollowUp:
    """Background work the operation starts after a point: ``job`` of lib/operations/background.py
    for ``point_ids``, and what to tell the person about it."""

    job: str
    point_ids: tuple[str, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Built:
    """What built a copy beside staging (a client tool, a spare copy), and the level it
    was already read at when that was done ahead (a spare read in the background)."""

    tool: str | None = None
    read: str | None = None


@dataclass
class Taken:
    point: Point
    follow_up: list[FollowUp] = field(default_factory=list)


class Method(ABC):
    name: ClassVar[str]
    level: ClassVar[str]  # the check a point has when taken: "catalog", "counted" (rows) or "repository"
    restore_mode: ClassVar[str] = SWAP
    holds_database: ClassVar[bool] = False  # a database on staging's server (dropped with the point)
    whole_database: ClassVar[bool] = True  # False: only the tables it was taken of
    read_by_rebuilding: ClassVar[bool] = False  # read for a diff only by rebuilding it beside staging
    encryptable: ClassVar[bool] = True
    verify_label: ClassVar[str] = ""  # the progress line of a plain verify

    # ---- taking --------------------------------------------------------------

    @abstractmethod
    def take(self, request: TakeRequest) -> Taken: ...

    # ---- verifying -----------------------------------------------------------

    def verified_level(self, point: Point) -> str:
        """The deepest verification the point has passed."""
        return self.level

    def needs_server_to_verify(self, deep: bool) -> bool:
        return True

    @abstractmethod
    def verify(self, point: Point, settings, ui: Reporter, target: Target | None, *, deep: bool) -> dict:
        """Check the point itself (its checksums were checked before), saying what was
        read through ``ui.ok``; raises VerificationError. ``target`` is None when
        ``needs_server_to_verify(deep)`` is False."""

    def describe_verification(self, point: Point) -> str:
        """Which verification the point has passed, and when, for `info`."""
        return self.level

    def describe_rows(self, point: Point) -> str:
        counts = point.manifest.row_counts
        return f"{sum(counts.values())} in {len(counts)} tables" if counts is not None else "not counted"

    # ---- restoring -----------------------------------------------------------

    def check_usable(self, target: Target, point: Point) -> None:  # noqa: B027 - most methods need nothing more
        """Before a restore touches anything: what this method needs on the server."""

    # What a point of this method holds of staging's UNLOGGED tables, said when it is taken.
    unlogged_note: ClassVar[str] = "their rows are in the point as they are now, and a restore brings them back"

    def check_unchanged(self, target: Target, point: Point, doing: str) -> None:  # noqa: B027 - most hold nothing to open
        """Refused (VerificationError) when what the point holds may have been changed
        outside the toolkit since it was taken; --force skips this."""

    def build_beside(self, target: Target, point: Point, aside: str, ui: Reporter) -> Built:
        """The point rebuilt as database ``aside`` on staging's server; says what built it."""
        raise ConfigError(f"A {self.name} point is not rebuilt beside staging.")

    def read_copy(self, target: Target, point: Point, conn, built: Built, ui: Reporter) -> str | None:
        """After the catalog check, what a copy built beside staging (``conn``) is read
        against, before it is swapped in: returns the level reached, as said (None: this
        method's rebuild is checked by the catalog check alone, which says its level)."""
        return None

    def can_restore_in_place(self) -> bool:
        return False

    def restore_in_place(self, target: Target, point: Point, ui: Reporter) -> str:
        """Staging emptied and the point restored into it in one transaction; returns what restored it."""
        raise ConfigError(f"A {self.name} point is not restored in place.")

    def keeps_before(self, point: Point) -> list[str] | None:
        """What the state kept before a restore in one transaction holds: None for all of staging."""
        return None

    def check_restorable(self, target: Target, point: Point) -> None:  # noqa: B027 - most methods need nothing
        """Before the state before is kept: whatever would make this restore fail on staging as it is now."""

    # ---- the rest of a point's life ------------------------------------------

    def drop(self, target: Target, point: Point) -> None:  # noqa: B027 - a point on disk only: its folder is all
        """What the point holds outside its folder (a database copy, a spare)."""

    def lives_on(self, target: Target, point: Point) -> bool:
        """Whether what the point holds outside its folder is on ``target``'s server."""
        return True

    def follow_up_after_restore(self, settings, point: Point) -> bool:
        """Whether the background prepares this point again after it was restored (its next spare)."""
        return False

    @contextmanager
    def open_for_reading(self, target: Target, point: Point, ui: Reporter) -> Iterator[object | None]:
        """A connection to the point's data for a diff, or None where its files are read instead."""
        raise ConfigError(f"Point {point.id} has method {self.name!r}, which diff does not read.")
        yield None  # pragma: no cover
