"""Reading a database copy, and the level a check of it reaches.

A check of a copy against its point reaches one of three levels, and says which:

- ``catalog``: the copy's catalog is the point's (schema digest, every relation's
  file node and size, sequences, the number of large objects). No page is read: a
  page changed in place, a corrupted page or a missing file passes.
- ``pages``: every page of every table, its TOAST and every materialized view is read
  by the server, which checks each page's header and, where the cluster has data
  checksums, its checksum as it reads it; a missing relation file fails the read.
  Index pages are not read.
- ``rows``: the pages, and every row hashed and compared with the point's baseline
  (read from the point itself, while nobody else could write to it). A row changed in
  place is caught, with or without checksums.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import psycopg2

from lib import faults
from lib.errors import CopyDamaged, Yielded
from lib.pg.codes import is_damage
from lib.pg.db import query
from lib.pg.fingerprint import (
    LARGE_OBJECTS,
    USER_NAMESPACES,
    Fingerprint,
    compare,
    counted_tables,
    large_object_content,
    qualified,
    table_content,
)
from lib.pg.locks import held
from lib.pg.rowhash import row_hash_for

CATALOG = "catalog"
PAGES = "pages"
ROWS = "rows"


@dataclass
class Reading:
    """Every row of a database, read in one snapshot: exact counts and content hashes."""

    row_counts: dict[str, int] = field(default_factory=dict)
    content: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0
    row_hash: str = ""  # how its rows were hashed (lib/pg/rowhash.py)

    @property
    def total_rows(self) -> int:
        return sum(self.row_counts.values())

    def emptied(self, row_counts: dict | None, unlogged: set[str]) -> list[str]:
        """The UNLOGGED tables that had rows in the baseline and have none now: emptied by
        PostgreSQL's crash recovery, not changed."""
        return sorted(t for t in unlogged if (row_counts or {}).get(t) and self.row_counts.get(t) == 0)

    def differences(self, row_counts: dict | None, content: dict | None, unlogged: set[str] = frozenset()) -> list[str]:
        """Where this reading differs from a baseline's counts and hashes, as sentences
        (UNLOGGED tables that crash recovery emptied are not differences)."""
        skip = set(self.emptied(row_counts, unlogged))
        want_counts = {t: n for t, n in (row_counts or {}).items() if t not in skip}
        want_content = {t: h for t, h in (content or {}).items() if t not in skip}
        found = Fingerprint(
            schema_digest="",
            schema_objects=0,
            row_counts={t: n for t, n in self.row_counts.items() if t not in skip},
            sequences={},
            large_objects=0,
            content={t: h for t, h in self.content.items() if t not in skip},
        )
        return compare({"row_counts": want_counts, "content": want_content}, found)


def table_bytes(conn) -> dict[tuple[str, str], int]:
    """Each counted table's size on disk with its TOAST: what reading it costs, in O(relations)."""
    rows = query(
        conn,
        f"""
        SELECT n.nspname, c.relname, pg_table_size(c.oid)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE (c.relkind = 'r' OR (c.relkind = 'm' AND c.relispopulated)) AND {USER_NAMESPACES}""",
    )
    return {(r[0], r[1]): int(r[2] or 0) for r in rows}


Tick = Callable[[int, str], None]  # bytes read so far (by this reader), the table being read


def read_rows(
    conn,
    what: str,
    tick: Tick | None = None,
    *,
    background: bool = False,
    row_hash: str | None = None,
    yield_to: int | None = None,
    stop: threading.Event | None = None,
) -> Reading:
    """Every row of the database ``conn`` is connected to, in one read-only snapshot
    (repeatable read), table by table, each row hashed ``row_hash``'s way (that of the
    baseline it is compared with; by default, the server's: lib/pg/rowhash.py). A page or
    file the server cannot read raises CopyDamaged naming ``what`` and the relation.
    ``background``: without parallel workers, so that a foreground command (a point, a
    rollback) keeps the cores. With ``yield_to`` (the advisory lock key every operation
    on staging holds), a table is read a chunk at a time, and Yielded is raised before a
    chunk when an operation holds that lock (or ``stop`` is set: the reading beside this
    one stopped), so that the caller lets go of everything the operation may need and
    reads again after it."""
    started = time.monotonic()
    was = conn.autocommit
    conn.autocommit = False
    conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
    reading = Reading(row_hash=row_hash or row_hash_for(conn))
    pause = None
    if yield_to is not None:

        def pause() -> None:
            if (stop is not None and stop.is_set()) or held(conn, yield_to):
                raise Yielded(f"{what}: an operation on staging started, or the reading beside this one stopped")

    table = "the catalog"
    try:
        if background:
            query(conn, "SET LOCAL max_parallel_workers_per_gather = 0")
        sizes = table_bytes(conn)
        for schema, name in counted_tables(conn):
            table = qualified(schema, name)
            if tick:
                tick(reading.bytes, table)
            faults.pause("reading rows")
            content = table_content(conn, schema, name, reading.row_hash, pause=pause)
            reading.content[table] = content
            reading.row_counts[table] = int(content.split(":", 1)[0])
            reading.bytes += sizes.get((schema, name), 0)
        table = "the large objects"
        reading.content[LARGE_OBJECTS] = large_object_content(conn)
    except psycopg2.Error as exc:
        conn.rollback()
        if is_damage(exc):
            raise damaged(what, table, exc) from None
        raise
    finally:
        if not conn.closed:
            conn.rollback()
            conn.autocommit = was
    if tick:
        tick(reading.bytes, "")
    reading.seconds = round(time.monotonic() - started, 3)
    return reading


def damaged(what: str, relation: str, exc: psycopg2.Error) -> CopyDamaged:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CopyDamaged(
        f"Reading {what} failed at {relation}: {first}. Its storage is damaged (a page that fails its checksum "
        "or header check, or a missing file); nothing read from it is used.",
        "Use an earlier point (`python3 rollback_manager.py list`).",
    )


def read_side_by_side(
    first,
    first_what: str,
    second,
    second_what: str,
    tick: Tick | None = None,
    *,
    background: bool = False,
    yield_to: int | None = None,
) -> tuple[Reading, Reading]:
    """Two databases read at once, one thread each (the server does the work): a point
    and its copy cost one read's time where there are two cores. ``tick`` gets the
    bytes both have read; ``background`` and ``yield_to`` as read_rows."""
    done = [0, 0]

    def side(i: int) -> Tick | None:
        if tick is None:
            return None

        def report(read: int, table: str) -> None:
            done[i] = read
            tick(done[0] + done[1], table)

        return report

    stop = threading.Event()
    options = {"background": background, "yield_to": yield_to, "stop": stop}
    with ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(read_rows, first, first_what, side(0), **options)
        b = pool.submit(read_rows, second, second_what, side(1), **options)
        try:
            wait((a, b), return_when=FIRST_EXCEPTION)  # one side failing stops the other at once
            failed = [f.exception() for f in (a, b) if f.done() and f.exception() is not None]
            if failed:
                raise failed[0]
            return a.result(), b.result()
        except BaseException:
            stop.set()
            for conn in (first, second):
                try:
                    conn.cancel()
                except psycopg2.Error:
                    pass
            raise


def database_bytes(conn) -> int:
    return sum(table_bytes(conn).values())
