"""What restoring a point would undo, and the partial rollback built on it.

Both sides are read as COPY text over the columns they share, keyed by staging's
primary key: rows only in staging were added since the point, rows only in the
point were deleted, rows under the same key with other content were changed. The
point side comes from a data point's files, a template point's database, or a dump
point rebuilt in a temporary database beside staging.

The toolkit's own schema (the ledger of applied migrations) is left out on both sides:
a restore puts it back with the point, but it is bookkeeping, not the data a rollback is
asked about, and a partial rollback leaves it as it is."""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from psycopg2 import sql

from lib.errors import DiffTimeout
from lib.interaction import Reporter, Silent
from lib.pg.db import TOOLKIT_SCHEMA, connection, query
from lib.pg.fingerprint import schema_lines
from lib.pg.target import Target
from lib.points import crypto
from lib.points.catalog import Point
from lib.points.manifest import TableEntry
from lib.points.methods import data as data_method
from lib.points.methods import registry
from lib.points.methods.data import Table

log = logging.getLogger(__name__)


# schema_lines() of the toolkit's schema and the objects in it, which it names qualified
_TOOLKIT_LINE = re.compile(rf"^(schema|comment schema) {TOOLKIT_SCHEMA}[ :]|\b{TOOLKIT_SCHEMA}\.")


def _outside_toolkit(tables: list[Table]) -> list[Table]:
    return [t for t in tables if t.schema != TOOLKIT_SCHEMA]


def _schema_outside_toolkit(lines: list[str]) -> list[str]:
    return [line for line in lines if not _TOOLKIT_LINE.search(line)]


@dataclass
class TableDiff:
    table: str
    has_primary_key: bool
    point_rows: int
    current_rows: int
    added: int | None = None
    deleted: int | None = None
    changed: int | None = None
    note: str = ""

    def summary(self) -> str:
        if not self.has_primary_key:
            return f"{self.table}: {self.point_rows} -> {self.current_rows} rows (no primary key: counts only){self.note}"
        return f"{self.table}: {self.added} added, {self.deleted} deleted, {self.changed} changed{self.note}"

    @property
    def touched(self) -> bool:
        if not self.has_primary_key:
            return self.point_rows != self.current_rows
        return bool(self.added or self.deleted or self.changed) or bool(self.note)


@dataclass
class Diff:
    point_id: str
    tables: list[TableDiff] = field(default_factory=list)
    tables_added: list[str] = field(default_factory=list)
    tables_dropped: list[str] = field(default_factory=list)
    schema_objects_added: int | None = None
    schema_objects_dropped: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [t.summary() for t in self.tables if t.touched]
        out += [f"{t}: table added since the point (restoring drops it)" for t in self.tables_added]
        out += [f"{t}: table dropped since the point (restoring brings it back)" for t in self.tables_dropped]
        if self.schema_objects_added is not None and (self.schema_objects_added or self.schema_objects_dropped):
            out.append(f"schema: {self.schema_objects_added} object(s) added, {self.schema_objects_dropped} dropped or changed")
        return out or ["nothing: staging matches the point"]


def primary_key(conn, table: Table) -> list[str]:
    rows = query(
        conn,
        """
        SELECT a.attname FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
         WHERE i.indrelid = to_regclass(%s) AND i.indisprimary
         ORDER BY array_position(i.indkey, a.attnum)""",
        (data_method.quoted(table),),
    )
    return [r[0] for r in rows]


class _Lines:
    """A write() sink for copy_expert that hands complete lines to a callback."""

    def __init__(self, on_line) -> None:
        self.on_line = on_line
        self.rest = b""

    def write(self, data) -> int:
        chunk = self.rest + (data.encode() if isinstance(data, str) else data)
        *lines, self.rest = chunk.split(b"\n")
        for line in lines:
            self.on_line(line)
        return len(data)


def copy_lines(conn, table: Table, cols: list[str], on_line) -> None:
    statement = sql.SQL("COPY (SELECT {} FROM ONLY {}) TO STDOUT").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in cols), table.ident()
    )
    with conn.cursor() as cur:
        cur.copy_expert(statement.as_string(conn), _Lines(on_line))


class PointSide:
    """Rows and columns of the point's tables, wherever the point keeps them."""

    def __init__(self, point: Point, conn=None, settings=None) -> None:
        self.point = point
        self.conn = conn  # a connection to the point's data, for template and dump points
        self.settings = settings  # for the key of an encrypted data point

    def tables(self) -> list[Table]:
        if self.conn is None:
            return _outside_toolkit([Table(e.schema, e.name) for e in self.point.manifest.tables or ()])
        return _outside_toolkit(data_method.all_tables(self.conn))

    def columns(self, table: Table) -> list[str]:
        if self.conn is None:
            entry = self._entry(table)
            return [c[0] for c in entry.columns if not c[2]]
        return [c[0] for c in data_method.columns(self.conn, table) if not c[2]]

    def _entry(self, table: Table) -> TableEntry:
        return next(e for e in self.point.manifest.tables if e.schema == table.schema and e.name == table.name)

    def rows(self, table: Table, cols: list[str], on_line) -> None:
        """Lines of COPY text over ``cols`` (a subset of the point's columns, in order)."""
        if self.conn is not None:
            copy_lines(self.conn, table, cols, on_line)
            return
        entry = self._entry(table)
        stored = [c[0] for c in entry.columns if not c[2]]
        keep = [stored.index(c) for c in cols]
        whole = keep == list(range(len(stored)))
        with crypto.payload(self.point, entry.file, self.settings) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as fh:
            for raw in fh:
                line = raw.rstrip(b"\n")
                if not whole:
                    fields = line.split(b"\t")
                    line = b"\t".join(fields[i] for i in keep)
                on_line(line)

    def schema_lines(self) -> list[str] | None:
        return _schema_outside_toolkit(schema_lines(self.conn)) if self.conn is not None else None


@contextmanager
def point_side(target: Target, point: Point, ui: Reporter) -> Iterator[PointSide]:
    """The point's data: its files, or a connection to its copy (opened, or rebuilt beside staging)."""
    with registry.of(point).open_for_reading(target, point, ui) as conn:
        yield PointSide(point, conn, settings=target.settings)


def _key_hash(line: bytes, key_positions: list[int]) -> tuple[bytes, bytes]:
    fields = line.split(b"\t")
    return b"\t".join(fields[i] for i in key_positions), hashlib.blake2b(line, digest_size=12).digest()


def compute(target: Target, point: Point, ui: Reporter, *, deadline: float | None = None) -> Diff:
    result = Diff(point.id)
    with point_side(target, point, ui) as side, connection(target.info, application_name="rollback-toolkit diff") as current:
        point_tables = {t.key: t for t in side.tables()}
        if not registry.of(point).whole_database:  # a point of its tables: the rest is not its business
            current_tables = {
                k: t for k, t in point_tables.items() if query(current, "SELECT to_regclass(%s)", (data_method.quoted(t),))[0][0]
            }
        else:
            current_tables = {t.key: t for t in _outside_toolkit(data_method.all_tables(current))}
        result.tables_added = sorted(set(current_tables) - set(point_tables))
        result.tables_dropped = sorted(set(point_tables) - set(current_tables))
        ours = side.schema_lines()
        if ours is not None:
            theirs = set(_schema_outside_toolkit(schema_lines(current)))
            result.schema_objects_added = len(theirs - set(ours))
            result.schema_objects_dropped = len(set(ours) - theirs)
        for key in sorted(set(point_tables) & set(current_tables)):
            if deadline is not None and time.monotonic() > deadline:
                raise DiffTimeout("The diff took too long.")
            result.tables.append(_table_diff(side, current, point_tables[key]))
    return result


def _table_diff(side: PointSide, current, table: Table) -> TableDiff:
    current_cols = [c[0] for c in data_method.columns(current, table) if not c[2]]
    point_cols = side.columns(table)
    cols = [c for c in point_cols if c in current_cols]
    pk = primary_key(current, table)
    has_pk = bool(pk) and all(c in cols for c in pk)
    positions = [cols.index(c) for c in pk] if has_pk else []
    before: dict[bytes, bytes] = {}
    counts = {"point": 0, "current": 0, "added": 0, "changed": 0, "kept": 0}

    def take_point_line(line: bytes) -> None:
        counts["point"] += 1
        if has_pk:
            k, h = _key_hash(line, positions)
            before[k] = h

    def take_current_line(line: bytes) -> None:
        counts["current"] += 1
        if not has_pk:
            return
        k, h = _key_hash(line, positions)
        old = before.get(k)
        if old is None:
            counts["added"] += 1
        else:
            counts["kept"] += 1
            if old != h:
                counts["changed"] += 1

    side.rows(table, cols, take_point_line)
    copy_lines(current, table, cols, take_current_line)
    diff = TableDiff(table.key, has_pk, counts["point"], counts["current"])
    if has_pk:
        diff.added, diff.changed = counts["added"], counts["changed"]
        diff.deleted = counts["point"] - counts["kept"]
    dropped_cols = [c for c in point_cols if c not in current_cols]
    added_cols = [c for c in current_cols if c not in point_cols]
    if dropped_cols or added_cols:
        diff.note = " (columns " + ", ".join([f"+{c}" for c in added_cols] + [f"-{c}" for c in dropped_cols]) + ")"
    return diff


def summary_for_confirmation(target: Target, point: Point, ui: Reporter, budget_seconds: float = 5.0) -> list[str]:
    """One line per table touched, or why not; never fails a restore."""
    if registry.of(point).read_by_rebuilding:
        return [f"not computed (a dump point is rebuilt to compare: `rollback_manager.py diff {point.id}`)"]
    try:
        return compute(target, point, Silent(), deadline=time.monotonic() + budget_seconds).lines()
    except DiffTimeout:
        return [f"not computed within {budget_seconds:.0f} s (`rollback_manager.py diff {point.id}` computes it)"]
    except Exception as exc:  # noqa: BLE001 - a preview must never stop a rollback
        log.warning("diff preview failed: %s", exc)
        return ["not computed (see the log)"]
