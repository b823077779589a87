"""How far long work has come, as PostgreSQL and the client tools tell it.

Two sources. The server's progress views, pg_stat_progress_copy (PostgreSQL 14 and
later) and pg_stat_progress_create_index, read by a ``ProgressPoller`` in a thread of
its own, each time on a new, short-lived connection to the maintenance database (never
to the database being built: it is renamed when done). And the lines pg_dump and
pg_restore print with --verbose, one as each table or archive entry starts or ends,
in English since every tool runs with LC_MESSAGES=C, read by a tracker as they come.

A tracker turns both into ``done`` against a ``total`` that the Reporter shows with an
ETA. Nothing here may make the work it watches fail or wait: an error while reading
is logged at debug and the reading skipped, and the poller is never waited for."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
from psycopg2 import sql

from lib.config import ConnInfo, redact
from lib.interaction import Tick
from lib.pg.db import execute, query
from lib.pg.fingerprint import USER_NAMESPACES, split_qualified

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
_READ_OPTIONS = "-c statement_timeout=2000 -c lock_timeout=1000"


def application_name(what: str) -> str:
    """The name this process's sessions of one kind carry, so the poller finds them and only them."""
    return f"rollback-toolkit {what} {os.getpid()}"


def named_sessions(app: str) -> dict[str, str]:
    """The environment that gives a client tool's sessions the application name ``app``."""
    return {"PGAPPNAME": app}


# ---------------------------------------------------------------- the server's views


@dataclass(frozen=True)
class Copying:
    """One COPY under way (pg_stat_progress_copy)."""

    pid: int
    relid: int  # 0 for COPY (query)
    command: str  # "COPY FROM" or "COPY TO"
    tuples: int
    bytes_done: int


@dataclass(frozen=True)
class Indexing:
    """One index build under way (pg_stat_progress_create_index)."""

    pid: int
    phase: str
    blocks: tuple[int, int]  # done, total
    tuples: tuple[int, int]

    @property
    def fraction(self) -> float | None:
        """Of the phase under way, where PostgreSQL counts it: blocks scanned, tuples loaded."""
        if "loading tuples" in self.phase:
            done, total = self.tuples
        elif "scanning" in self.phase:
            done, total = self.blocks
        else:
            return None
        return min(done / total, 1.0) if total else None

    def describe(self) -> str:
        phase = self.phase.removeprefix("building index: ")
        return phase + (f" {self.fraction:.0%}" if self.fraction is not None else "")


@dataclass(frozen=True)
class Reading:
    at: float  # time.monotonic() when the reading began
    copies: tuple[Copying, ...] = ()
    indexes: tuple[Indexing, ...] = ()

    def rows(self, command: str) -> int:
        return sum(c.tuples for c in self.copies if c.command == command)


_COPIES = """
    SELECT p.pid, p.relid::bigint, p.command, p.tuples_processed, p.bytes_processed
      FROM pg_stat_progress_copy p JOIN pg_stat_activity a ON a.pid = p.pid
     WHERE p.datname = %(db)s AND a.application_name = %(app)s"""

_INDEXES = """
    SELECT p.pid, p.phase, p.blocks_done, p.blocks_total, p.tuples_done, p.tuples_total
      FROM pg_stat_progress_create_index p JOIN pg_stat_activity a ON a.pid = p.pid
     WHERE p.datname = %(db)s AND a.application_name = %(app)s"""


def read_progress(conn, dbname: str, app: str) -> Reading:
    """What ``app``'s sessions on ``dbname`` are copying and indexing now."""
    at = time.monotonic()
    params = {"db": dbname, "app": app}
    copies = tuple(Copying(*row) for row in _view(conn, _COPIES, params))
    indexes = tuple(Indexing(r[0], r[1], (r[2], r[3]), (r[4], r[5])) for r in _view(conn, _INDEXES, params))
    return Reading(at, copies, indexes)


def _view(conn, statement: str, params: dict) -> list[tuple]:
    try:
        return query(conn, statement, params)
    except psycopg2.errors.UndefinedTable:  # pg_stat_progress_copy is new in PostgreSQL 14
        return []


class ProgressPoller:
    """Reads the progress of ``app``'s sessions on ``dbname`` every ``every`` seconds in a
    thread, on a new connection to the database ``via`` each time; ``latest`` is the last
    reading that succeeded. Leaving the ``with`` block stops it without waiting."""

    def __init__(self, info: ConnInfo, via: str, dbname: str, app: str, every: float = POLL_SECONDS) -> None:
        self.info, self.via, self.dbname, self.app, self.every = info, via, dbname, app, every
        self.latest: Reading | None = None
        self._stop = threading.Event()

    def __enter__(self) -> ProgressPoller:
        threading.Thread(target=self._run, name=f"progress of {self.dbname}", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # a reading under way ends on its own; nothing waits for it

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            reading = self.read_once()
            if reading is not None and not self._stop.is_set():
                self.latest = reading

    def read_once(self) -> Reading | None:
        """One reading, or None (logged at debug) when the server could not be asked."""
        try:
            kwargs = self.info.connect_kwargs(self.via)
            options = f"{kwargs.get('options', '')} {_READ_OPTIONS}".strip()
            kwargs.update(application_name="rollback-toolkit progress", connect_timeout="3", options=options)
            conn = psycopg2.connect(**kwargs)
            try:
                conn.autocommit = True
                return read_progress(conn, self.dbname, self.app)
            finally:
                conn.close()
        except Exception as exc:  # noqa: BLE001 - progress is news: it never fails the work
            log.debug("progress of %s not read: %s", self.dbname, redact(str(exc).strip()))
            return None


def indexing_detail(reading: Reading | None) -> str | None:
    """'building an index: scanning table 45%', or 'building 3 indexes: …'."""
    if reading is None or not reading.indexes:
        return None
    builds = reading.indexes
    head = "building an index" if len(builds) == 1 else f"building {len(builds)} indexes"
    return f"{head}: " + ", ".join(b.describe() for b in builds[:3])


# ---------------------------------------------------------------- sizes and estimates


@dataclass(frozen=True)
class TableSize:
    oid: int
    key: str  # schema.name, as pg_dump and pg_restore print it
    name: str
    size: int  # bytes on disk, TOAST included, indexes not
    rows: float  # the statistics' estimate; 0 or less: not known


def table_sizes(conn) -> list[TableSize]:
    """The tables whose rows pg_dump reads, with their size on disk: O(relations), no row read.
    In a savepoint, so that the transaction survives a failure (then: nothing known)."""
    statement = f"""
        SELECT c.oid, n.nspname || '.' || c.relname, c.relname, pg_table_size(c.oid),
               CASE WHEN c.relpages > 0 THEN c.reltuples / c.relpages * (pg_relation_size(c.oid) / 8192) ELSE -1 END
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND c.relpersistence <> 't' AND {USER_NAMESPACES}
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                            AND d.objid = c.oid AND d.deptype = 'e')"""

    def sizes():
        # a table locked by someone else is not waited for here: the progress is not worth the dump's time
        previous = query(conn, "SELECT current_setting('lock_timeout'), set_config('lock_timeout', '200ms', true)")[0][0]
        try:
            return query(conn, statement)
        finally:
            query(conn, "SELECT set_config('lock_timeout', %s, true)", (previous,))

    rows = _guarded(conn, sizes) or []
    return [TableSize(int(r[0]), r[1], r[2], int(r[3] or 0), float(r[4])) for r in rows]


def estimated_rows(conn, tables: list[tuple[str, str]]) -> int | None:
    """About how many rows the (schema, name) ``tables`` hold: the statistics' density
    times the current size where ANALYZE or VACUUM left one, else the planner's estimate.
    O(relations), no row read; None when it cannot be told."""
    if not tables:
        return None

    def estimate() -> int:
        found = query(
            conn,
            "SELECT s, n, c.reltuples, c.relpages, pg_relation_size(c.oid) FROM unnest(%s::text[], %s::text[]) AS t(s, n) "
            "JOIN pg_class c ON c.oid = (quote_ident(s) || '.' || quote_ident(n))::regclass",
            ([t[0] for t in tables], [t[1] for t in tables]),
        )
        total = 0.0
        for schema, name, tuples, pages, size in found:
            total += tuples / pages * (size // 8192) if pages > 0 and tuples >= 0 else _planned_rows(conn, schema, name)
        return round(total)

    return _guarded(conn, estimate)


def _planned_rows(conn, schema: str, name: str) -> float:
    statement = sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM ONLY {}.{}").format(sql.Identifier(schema), sql.Identifier(name))
    plan = query(conn, statement)[0][0]
    return float(plan[0]["Plan"]["Plan Rows"])


def _guarded(conn, work: Callable):
    """``work()`` inside a savepoint of ``conn``'s transaction: an error is logged at debug
    and rolled back to it, so the transaction (a snapshot, say) lives on."""
    savepoint = not conn.autocommit
    try:
        if savepoint:
            execute(conn, "SAVEPOINT progress_estimate")
        result = work()
        if savepoint:
            execute(conn, "RELEASE SAVEPOINT progress_estimate")
        return result
    except psycopg2.Error as exc:
        log.debug("no estimate for the progress: %s", str(exc).strip())
        if savepoint:
            execute(conn, "ROLLBACK TO SAVEPOINT progress_estimate")
        return None


# ---------------------------------------------------------------- what the tools print

# pg_dump's and pg_restore's --verbose lines (pg_log_info), kept out of the stderr a
# failure reports, which holds their warnings and errors only. A tool writes a line's
# "pg_dump:", the space and the message separately, so the lines of parallel jobs, each
# a process of its own, can come with those pieces moved ("pg_dump:pg_dump: finished …"
# and " dumping …" on the next line): the messages themselves are whole, and are read.
_PREFIXES = re.compile(r"^(?:\s*(?:pg_dump|pg_restore):)*\s*")
_CHATTER = re.compile(
    r"^(reading|identifying|finding|flagging|saving|last built-in|executing|dumping|finished|launching|processing|"
    r"creating|entering|connecting|restoring|restored|setting|disabling|enabling|implied|dropping) "
)


class Tracker:
    """``done`` against ``total`` (in ``unit``) of one piece of work. ``line`` reads a
    line the tool printed on stderr and says whether it was a progress line, kept out
    of the stderr a failure reports."""

    unit = "rows"
    estimated = False
    total: float | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.changed_at = 0.0  # when a piece last finished: readings older than that are stale

    def line(self, text: str) -> bool:
        message = _PREFIXES.sub("", text)
        if not _CHATTER.match(message):
            return False
        with self._lock:
            self.read(message)
        return True

    def read(self, message: str) -> None:
        """One progress message (the line without the tool's name), under the lock."""

    def touched(self) -> None:
        self.changed_at = time.monotonic()

    def done(self, reading: Reading | None) -> float:
        return 0.0

    def detail(self, reading: Reading | None) -> str | None:
        return indexing_detail(reading)

    def moving(self, reading: Reading | None, command: str) -> int:
        """Rows the COPYs under way have processed, from a reading newer than the last piece that finished."""
        return reading.rows(command) if reading is not None and reading.at >= self.changed_at else 0


class RowsLoaded(Tracker):
    """Rows of pieces that finished (``add``), plus those COPY FROM is loading now."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.loaded = 0
        self.pieces = 0

    def add(self, rows: int) -> None:
        with self._lock:
            self.loaded += rows
            self.pieces += 1
            self.touched()

    def done(self, reading: Reading | None) -> float:
        return min(self.loaded + self.moving(reading, "COPY FROM"), self.total or 0)


_DUMPING = re.compile(r'^dumping contents of table "(.*)"$')
_DUMPED = re.compile(r"^finished item \d+ TABLE DATA (.*)$")


class DumpTracker(Tracker):
    """pg_dump --verbose prints a line as each table starts and, by parallel jobs, as each
    ends. Done in bytes of the tables' size on disk, the ones under way by their share of
    rows copied (pg_stat_progress_copy): an estimate."""

    unit = "B"
    estimated = True

    def __init__(self, tables: list[TableSize], *, parallel: bool) -> None:
        super().__init__()
        self.tables = {t.key: t for t in tables}
        self.by_oid = {t.oid: t for t in tables}
        self.total = sum(t.size for t in tables) or None
        self.parallel = parallel
        self.started: list[str] = []
        self.finished: set[str] = set()

    def read(self, message: str) -> None:
        if start := _DUMPING.match(message):
            if not self.parallel and self.started:
                self.finished.add(self.started[-1])  # one job: a table starts when the one before has ended
            self.started.append(start.group(1))
        elif end := _DUMPED.match(message):  # by parallel jobs: the table's name, without its schema
            self._finish_named(end.group(1))

    def _finish_named(self, name: str) -> None:
        for key in self.started:
            table = self.tables.get(key)
            if key not in self.finished and table is not None and table.name == name:
                self.finished.add(key)
                return

    def done(self, reading: Reading | None) -> float:
        with self._lock:
            finished = sum(self.tables[k].size for k in self.finished if k in self.tables)
            under_way = {k for k in self.started if k not in self.finished}
        moving = 0.0
        for copy in reading.copies if reading is not None else ():
            table = self.by_oid.get(copy.relid)
            if copy.command == "COPY TO" and table is not None and table.key in under_way:
                moving += table.size * _share(copy, table)
        return min(finished + moving, self.total or 0)


def _share(copy: Copying, table: TableSize) -> float:
    if table.rows > 0:
        return min(copy.tuples / table.rows, 0.99)
    return min(copy.bytes_done / table.size, 0.99) if table.size else 0.0


_LISTED = re.compile(r"^(\d+); \d+ \d+ (.*)$")
_ITEM = re.compile(r"^(?:processing|finished|processing missed) item (\d+) ")
_DATA = re.compile(r'^(?:processing data for table|creating MATERIALIZED VIEW DATA) "(.*)"$')
_ENTRY = re.compile(
    r"^(?:creating [A-Z]|processing data for table |processing (?:BLOBS|LARGE OBJECTS)|"
    r"executing (?:SEQUENCE SET|BLOBS?|BLOB METADATA|LARGE OBJECTS) )"
)
_DATA_KINDS = ("TABLE DATA ", "MATERIALIZED VIEW DATA ")


def listed_entries(listing: str) -> dict[int, str]:
    """``pg_restore --list``: each entry's dump id and its description ('TABLE DATA public orders owner')."""
    return {int(m.group(1)): m.group(2) for line in listing.splitlines() if (m := _LISTED.match(line))}


class RestoreTracker(Tracker):
    """pg_restore --verbose prints a line per archive entry: by one job as each starts,
    by parallel jobs with its dump id as each ends. Done in rows where the point's row
    counts are known (finished tables, plus what COPY is loading now), else in entries
    against the table of contents."""

    def __init__(self, listing: str | None, rows: dict[str, int] | None) -> None:
        super().__init__()
        self.listed = listed_entries(listing or "")
        self.rows = rows or {}
        self.unit = "rows" if self.rows else "entries"
        self.total = sum(self.rows.values()) if self.rows else (len(self.listed) or None)
        self.data_ids = _data_entries(self.listed, self.rows)
        self.printed = {".".join(_names(key)): key for key in self.rows}  # "schema.name" as pg_restore prints it
        self.parallel = False
        self.started = 0  # by one job: entries begun
        self.done_ids: set[int] = set()
        self.current: str | None = None  # by one job: the table whose rows are loading
        self.loaded = 0

    @property
    def entries_done(self) -> int:
        return len(self.done_ids) if self.parallel else max(self.started - 1, 0)

    def read(self, message: str) -> None:
        if item := _ITEM.match(message):
            self.parallel = True
            self._finish_id(int(item.group(1)))
        elif not self.parallel and _ENTRY.match(message):
            self._finish_current()
            self.started += 1
            data = _DATA.match(message)
            self.current = self.printed.get(data.group(1), data.group(1)) if data else None

    def _finish_id(self, dump_id: int) -> None:
        if dump_id in self.listed and dump_id not in self.done_ids:
            self.done_ids.add(dump_id)
            self.loaded += self.rows.get(self.data_ids.get(dump_id, ""), 0)
            self.touched()

    def _finish_current(self) -> None:
        if self.current is not None:
            self.loaded += self.rows.get(self.current, 0)
            self.current = None
            self.touched()

    def done(self, reading: Reading | None) -> float:
        if self.unit == "rows":
            return min(self.loaded + self.moving(reading, "COPY FROM"), self.total or 0)
        return min(self.entries_done, self.total or 0)

    def detail(self, reading: Reading | None) -> str | None:
        parts = [f"{self.entries_done} of {len(self.listed)} entries"] if self.unit == "rows" and self.listed else []
        building = indexing_detail(reading)
        return "; ".join([*parts, building] if building else parts) or None


def _names(key: str) -> tuple[str, ...]:
    """A row-count key's schema and name as the client tools print them: unquoted."""
    try:
        return split_qualified(key)
    except ValueError:
        return (key,)


def _data_entries(listed: dict[int, str], rows: dict[str, int]) -> dict[int, str]:
    """Dump id -> 'schema.table' for the entries that load rows. The listing separates
    schema, name and owner by spaces, which names may hold too: the longest run of words
    that names a counted table wins."""
    spaced = {" ".join(_names(key)): key for key in rows}
    found = {}
    for dump_id, text in listed.items():
        kind = next((k for k in _DATA_KINDS if text.startswith(k)), None)
        if kind is None:
            continue
        words = text[len(kind) :].split(" ")
        key = next((spaced[w] for n in range(len(words), 0, -1) if (w := " ".join(words[:n])) in spaced), None)
        if key is not None:
            found[dump_id] = key
    return found


class Watch:
    """The ``on_tick`` of a running tool: the tracker's ``done`` (never going back) and
    detail, given to the Reporter's tick. A failure here is logged at debug, never raised."""

    EVERY = 0.5  # seconds: a tool's on_tick comes four times a second

    def __init__(self, tick: Tick, tracker: Tracker, poller: ProgressPoller | None = None, note: Callable[[], str] | None = None):
        self.tick, self.tracker, self.poller, self.note = tick, tracker, poller, note
        self.shown = 0.0
        self._at = float("-inf")

    def __call__(self, _elapsed: float = 0.0) -> None:
        if time.monotonic() - self._at < self.EVERY:
            return
        self._at = time.monotonic()
        try:
            reading = self.poller.latest if self.poller is not None else None
            self.shown = max(self.shown, self.tracker.done(reading))
            notes = [self.tracker.detail(reading), self.note() if self.note else None]
            self.tick("; ".join(n for n in notes if n) or None, done=self.shown)
        except Exception as exc:  # noqa: BLE001 - progress is news: it never fails the work
            log.debug("progress not shown: %s", exc)

    def finished(self) -> None:
        """The work ended well: all of it done."""
        if self.tracker.total:
            self.shown = self.tracker.total
            self.tick(None, done=self.shown)
