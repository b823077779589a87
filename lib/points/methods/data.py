"""Points of table data taken with COPY through psycopg2 alone: no pg_dump, no
client binaries, any server version. Data, not schema: a restore refuses when a
table's columns changed since the point.

Taken in one repeatable-read snapshot; each table is a gzip file of COPY text
(one line per row), checksummed by the catalog. Restored in one transaction:
the tables are truncated together, refilled, their sequences set and their row
counts checked before the commit. Constraints marked NOT VALID stay what they
were: promises about new rows, not about the rows the point holds (see
``_set_aside``)."""

from __future__ import annotations

import gzip
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2 import sql

from lib import faults
from lib.errors import CatalogError, ConfigError, DatabaseError, VerificationError
from lib.files import human_size, utc_now
from lib.interaction import Reporter
from lib.pg.codes import INSUFFICIENT_PRIVILEGE
from lib.pg.db import connection, database_properties, query, snapshot_session
from lib.pg.fingerprint import USER_NAMESPACES, qualified, rekeyed, schema_lines, split_qualified
from lib.pg.progress import estimated_rows
from lib.pg.target import Target
from lib.points import crypto
from lib.points.catalog import Catalog, Point
from lib.points.manifest import Manifest, TableEntry, thawed
from lib.points.methods.base import TABLES, Method, Taken, TakeRequest
from lib.points.methods.dump import check_free_space, database_section

log = logging.getLogger(__name__)

COMPRESS_LEVEL = 1  # fast: a rollback point is written while people wait


@dataclass(frozen=True)
class Table:
    schema: str
    name: str

    @property
    def key(self) -> str:
        """As fingerprints name it (``qualified``): ``public.orders``, ``"Sales Ops"."Order Items"``."""
        return qualified(self.schema, self.name)

    @property
    def label(self) -> str:
        """As people type it plainly (``Sales Ops.Order Items``): for the manifest's
        description of a point's tables, never read back."""
        return f"{self.schema}.{self.name}"

    def ident(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.name))


def all_tables(conn) -> list[Table]:
    """Ordinary tables and partitions, outside extensions."""
    rows = query(
        conn,
        f"""
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND c.relpersistence <> 't' AND {USER_NAMESPACES}
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                            AND d.objid = c.oid AND d.deptype = 'e')
         ORDER BY 1, 2""",
    )
    return [Table(s, n) for s, n in rows]


FORBIDDEN_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")

_BY_PLAIN_NAME = f"""
    SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
       AND (n.nspname || '.' || c.relname = %(name)s OR (c.relname = %(name)s AND {USER_NAMESPACES.replace("%", "%%")}))
     ORDER BY 2, 3"""


def _regclass(conn, name: str) -> int | None:
    """The relation ``name`` names in SQL syntax (quoted where needed, through the search_path)."""
    query(conn, "SAVEPOINT resolve")
    try:
        return query(conn, "SELECT to_regclass(%s)::oid", (name,))[0][0]
    except psycopg2.Error:  # not valid SQL syntax for a name: try it as typed
        query(conn, "ROLLBACK TO SAVEPOINT resolve")
        return None


def _plain_candidates(conn, name: str) -> list[tuple[int, str, str]]:
    """Relations ``name`` can mean typed plainly: 'Sales-EU.Order Items' is schema
    Sales-EU, table Order Items (or a table of that whole name); without a dot, a table of
    that name in any schema. Exact case first; where none, any case."""
    exact = query(conn, _BY_PLAIN_NAME, {"name": name})
    if exact:
        return exact
    folded = _BY_PLAIN_NAME.replace("n.nspname || '.' || c.relname =", "lower(n.nspname || '.' || c.relname) =").replace(
        "c.relname = %(name)s AND", "lower(c.relname) = %(name)s AND"
    )
    return query(conn, folded, {"name": name.lower()})


def resolve_tables(conn, names: list[str]) -> list[Table]:
    """Names as an operator types them: in SQL syntax (``customers``, ``sales.orders``,
    ``"Sales-EU"."Order Items"``), or plainly (``Sales-EU.Order Items``) where only one
    table can be meant; an ambiguous name lists what it could mean. System catalogs and
    extension members are refused: the toolkit never copies or writes them."""
    found, missing, ambiguous = [], [], []
    for name in names:
        oid = _regclass(conn, name)
        if oid is None:
            candidates = _plain_candidates(conn, name)
            if len(candidates) > 1:
                ambiguous.append(f"{name!r} could be " + " or ".join(quoted(Table(s, r)) for _, s, r in candidates))
                continue
            oid = candidates[0][0] if candidates else None
        if oid is None:
            missing.append(name)
            continue
        schema, rel, kind, member = query(
            conn,
            "SELECT n.nspname, c.relname, c.relkind, EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = "
            "'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s",
            (oid,),
        )[0]
        if schema in FORBIDDEN_SCHEMAS or schema.startswith(("pg_temp_", "pg_toast_temp_")) or member:
            raise ConfigError(
                f"{quoted(Table(schema, rel))} is "
                + ("part of an extension" if member else "a system catalog")
                + ", which the toolkit never copies or writes: it is PostgreSQL's own (and may hold secrets, "
                "such as pg_authid's password hashes). Nothing was done.",
                "Name your own tables (`\\dt` in psql lists them), or take a whole-database point.",
            )
        if kind == "p":
            leaves = query(
                conn,
                "SELECT n.nspname, c.relname FROM pg_partition_tree(%s::regclass) t "
                "JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE t.isleaf ORDER BY 1, 2",
                (oid,),
            )
            found += [Table(s, n) for s, n in leaves]
        elif kind == "r":
            found.append(Table(schema, rel))
        else:
            missing.append(f"{name} (not a table)")
    if ambiguous:
        raise ConfigError(
            "Which table? " + "; ".join(ambiguous) + ".",
            'Write the one you mean in SQL syntax, for example "Sales-EU"."Order Items".',
        )
    if missing:
        raise ConfigError(
            "No such table: " + ", ".join(missing) + ".",
            "Name tables as in SQL, schema-qualified where needed (for example sales.orders), or plainly as "
            "schema.table; `rollback_manager.py info <id>` lists a point's tables.",
        )
    return list(dict.fromkeys(found))


def columns(conn, table: Table) -> tuple[tuple[str, str, str], ...]:
    """(name, type, generated) in column order, as a data point's manifest holds them."""
    return tuple(
        (r[0], r[1], r[2])
        for r in query(
            conn,
            """
            SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated::text
              FROM pg_attribute a
             WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum""",
            (quoted(table),),
        )
    )


def quoted(table: Table) -> str:
    return '"{}"."{}"'.format(table.schema.replace('"', '""'), table.name.replace('"', '""'))


def regclasses(tables: list[Table]) -> list[str]:
    """The tables as a parameter for ``%s::regclass[]``: compared by oid, never by a printed name."""
    return [quoted(t) for t in tables]


def owned_sequences(conn, tables: list[Table]) -> list[Table]:
    rows = query(
        conn,
        """
        SELECT DISTINCT sn.nspname, s.relname
          FROM pg_depend d
          JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
          JOIN pg_namespace sn ON sn.oid = s.relnamespace
          JOIN pg_class t ON t.oid = d.refobjid
         WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
           AND d.deptype IN ('a', 'i') AND t.oid = ANY(%s::regclass[])
         ORDER BY 1, 2""",
        (regclasses(tables),),
    )
    return [Table(s, n) for s, n in rows]


def all_sequences(conn) -> list[Table]:
    rows = query(
        conn,
        f"""SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'S' AND {USER_NAMESPACES} ORDER BY 1, 2""",
    )
    return [Table(s, n) for s, n in rows]


class _RowCount:
    """Rows of COPY text passing through, told to ``report`` at most every REPORT_SECONDS:
    the toolkit streams every row itself, so it counts them exactly, with no query."""

    REPORT_SECONDS = 0.5

    def __init__(self, report: Callable[[int], None] | None) -> None:
        self.rows = 0
        self.report = report
        self._at = time.monotonic()

    def passing(self, chunk: bytes) -> None:
        self.rows += chunk.count(b"\n")
        if self.report is not None and time.monotonic() - self._at >= self.REPORT_SECONDS:
            self._at = time.monotonic()
            self.report(self.rows)


def _telling(tick, detail: str, before: int) -> Callable[[int], None]:
    """Rows of the table under way, told as the progress of all: ``before`` plus them."""
    return lambda rows: tick(detail, done=before + rows)


class _CountingGzip(_RowCount):
    """A file-like sink for copy_expert: gzip on disk, rows counted on the way."""

    def __init__(self, stream, report: Callable[[int], None] | None = None) -> None:
        super().__init__(report)
        self.handle = gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=COMPRESS_LEVEL)

    def write(self, data) -> int:
        chunk = data.encode() if isinstance(data, str) else data
        self.passing(chunk)
        return self.handle.write(chunk)

    def close(self) -> None:
        self.handle.close()


class _CountingReader(_RowCount):
    """A file-like source for copy_expert: rows counted as they go to the server."""

    def __init__(self, handle, report: Callable[[int], None] | None = None) -> None:
        super().__init__(report)
        self.handle = handle

    def read(self, size: int = -1) -> bytes:
        chunk = self.handle.read(size)
        self.passing(chunk)
        return chunk


def copy_columns(cols: tuple[tuple[str, str, str], ...]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(c[0]) for c in cols if not c[2])


def copy_into(table: Table, cols: tuple[tuple[str, str, str], ...]) -> sql.Composed:
    """COPY ... FROM STDIN of the columns a point wrote; a table without any (it has
    rows all the same) takes its rows without a column list."""
    if not any(not c[2] for c in cols):
        return sql.SQL("COPY {} FROM STDIN").format(table.ident())
    return sql.SQL("COPY {} ({}) FROM STDIN").format(table.ident(), copy_columns(cols))


def take(
    target: Target,
    catalog: Catalog,
    ui: Reporter,
    *,
    label: str,
    base: Mapping[str, Any],
    tables: list[str] | None = None,
) -> Point:
    to = crypto.recipients_if_asked(target.settings)  # refused before anything is written
    check_free_space(catalog.root, target.facts.database_size)
    started = utc_now()
    with snapshot_session(target.info, application_name="rollback-toolkit data point") as conn:
        chosen = resolve_tables(conn, tables) if tables else all_tables(conn)
        if tables:
            chosen, added = with_referencing_tables(conn, chosen)
            if added:
                ui.info(f"  Also in the point, because their foreign keys point into the tables asked for: {', '.join(added)}")
        sequences = owned_sequences(conn, chosen) if tables else all_sequences(conn)
        entries, counts = [], {}
        with catalog.writing(label) as writer:
            total = len(chosen)
            about = estimated_rows(conn, [(t.schema, t.name) for t in chosen])
            copied = 0
            with ui.progress(f"Copying {total} table(s) of {target.dbname}", total=about, unit="rows", estimated=True) as tick:
                for n, table in enumerate(chosen, start=1):
                    faults.pause("data copy")
                    cols = columns(conn, table)
                    filename = f"table_{n:04d}.copy.gz" + (crypto.SUFFIX if to else "")
                    path = writer.new_file(filename)
                    with crypto.encrypting(path, to) if to else open(path, "wb") as stream:
                        sink = _CountingGzip(stream, _telling(tick, f"{n}/{total}: {table.key}", copied))
                        try:
                            with conn.cursor() as cur:
                                cur.copy_expert(
                                    sql.SQL("COPY (SELECT {} FROM ONLY {}) TO STDOUT")
                                    .format(copy_columns(cols), table.ident())
                                    .as_string(conn),
                                    sink,
                                )
                        finally:
                            sink.close()
                    entries.append(TableEntry(schema=table.schema, name=table.name, file=filename, rows=sink.rows, columns=cols))
                    counts[table.key] = sink.rows
                    copied += sink.rows
                    tick(f"{n}/{total}: {table.key}, {sink.rows} rows", done=copied)
            positions = {}
            for seq in sequences:
                last, called = query(conn, sql.SQL("SELECT last_value, is_called FROM {}").format(seq.ident()))[0]
                positions[seq.key] = [int(last), bool(called)]
            lines = schema_lines(conn)
            props = database_properties(conn, target.dbname).as_dict()
            point = writer.commit(
                Manifest(
                    id=writer.id,
                    **base,
                    created_at_text=started.isoformat(timespec="milliseconds"),
                    method=DataMethod.name,
                    table=", ".join(t.label for t in chosen) if tables else None,
                    database=database_section(target, props),
                    tables=entries,
                    fingerprint={"row_counts": counts, "sequences": positions, "schema_objects": len(lines)},
                    encryption=crypto.manifest_section() if to else None,
                    duration_seconds=round((utc_now() - started).total_seconds(), 3),
                )
            )
    ui.step(f"{len(chosen)} table(s), {sum(counts.values())} rows, {human_size(point.size)} compressed")
    return point


def read_through(point: Point, settings) -> dict:
    """Decompress (and decrypt) every file and count its rows against the manifest."""
    counted = {}
    for entry in point.manifest.tables or ():
        path = point.file_path(entry.file)
        try:
            with crypto.payload(point, entry.file, settings) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                rows = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
        except (OSError, EOFError) as exc:
            raise VerificationError(f"{path} cannot be read: {exc}.", "Use an earlier point.") from None
        if rows != entry.rows:
            raise VerificationError(f"{path} holds {rows} rows, the manifest says {entry.rows}.", "Use an earlier point.")
        counted[qualified(entry.schema, entry.name)] = rows
    return {"archive": "read end to end", "tables": len(counted), "rows_read": counted}


def _check_columns(conn, point: Point) -> list[Table]:
    tables, changed, missing = [], [], []
    for entry in point.manifest.tables or ():
        table = Table(entry.schema, entry.name)
        if not query(conn, "SELECT to_regclass(%s)", (quoted(table),))[0][0]:
            missing.append(table.key)
            continue
        now = columns(conn, table)
        if now != entry.columns:
            before = {c[0]: c[1] for c in entry.columns}
            after = {c[0]: c[1] for c in now}
            diff = sorted(
                [f"{c} added" for c in after if c not in before]
                + [f"{c} dropped" for c in before if c not in after]
                + [f"{c} {before[c]} -> {after[c]}" for c in before if c in after and before[c] != after[c]]
            ) or ["column order or generation changed"]
            changed.append(f"{table.key} ({', '.join(diff)})")
        tables.append(table)
    if missing or changed:
        parts = ([f"tables gone: {', '.join(missing)}"] if missing else []) + (
            [f"columns changed: {'; '.join(changed)}"] if changed else []
        )
        raise VerificationError(
            f"Point {point.id} holds data, not schema, and the schema has changed since: "
            + "; ".join(parts)
            + ". Nothing was changed.",
            "Restore a dump or template point instead, or put the columns back first.",
        )
    return tables


def _outside_references(conn, tables: list[Table]) -> list[str]:
    """Tables outside the point whose foreign keys point into it: TRUNCATE would need CASCADE."""
    oids = regclasses(tables)
    rows = query(
        conn,
        """
        SELECT DISTINCT format('%%I.%%I', fn.nspname, f.relname)
          FROM pg_constraint c
          JOIN pg_class f ON f.oid = c.conrelid JOIN pg_namespace fn ON fn.oid = f.relnamespace
         WHERE c.contype = 'f' AND c.confrelid = ANY(%s::regclass[]) AND NOT c.conrelid = ANY(%s::regclass[])
           AND f.relkind <> 'p'  -- a partitioned table's rows are its partitions', whose own foreign keys name them""",
        (oids, oids),
    )
    return [r[0] for r in rows]


def with_referencing_tables(conn, tables: list[Table]) -> tuple[list[Table], list[str]]:
    """The tables, plus every table whose foreign keys point into them (transitively):
    restoring a table empties it, so the rows that reference it must come back too."""
    chosen, added = list(tables), []
    while True:
        outside = _outside_references(conn, chosen)
        if not outside:
            return chosen, added
        more = resolve_tables(conn, outside)
        chosen += [t for t in more if t not in chosen]
        added += outside


def check_restorable(conn, point: Point) -> list[Table]:
    """The point's tables still have its columns and nothing outside it references them."""
    tables = _check_columns(conn, point)
    outside = _outside_references(conn, tables)
    if outside:
        raise ConfigError(
            f"Tables outside point {point.id} reference its tables by foreign key: {', '.join(outside)}. Nothing was changed.",
            "Take a point that includes them (--table for each), or restore a full point.",
        )
    return tables


def preflight(target: Target, point: Point) -> None:
    with connection(target.info, application_name="rollback-toolkit data restore") as conn:
        check_restorable(conn, point)


def restore_in_transaction(target: Target, point: Point, ui: Reporter) -> str:
    """Truncate and refill the point's tables in one transaction; verify before commit."""
    with connection(target.info, autocommit=False, application_name="rollback-toolkit data restore") as conn:
        query(conn, "SET lock_timeout = '60s'")  # a session holding a lock fails us instead of hanging
        tables = check_restorable(conn, point)
        replica = True
        try:
            query(conn, "SAVEPOINT role_check")
            query(conn, "SET LOCAL session_replication_role = replica")
        except psycopg2.Error:
            query(conn, "ROLLBACK TO SAVEPOINT role_check")
            replica = False
        mode = "triggers and foreign-key checks off (session_replication_role = replica)" if replica else "dependency order"
        ordered = tables if replica else _dependency_order(conn, tables)
        by_table = {Table(e.schema, e.name): e for e in point.manifest.tables or ()}
        rows = sum(by_table[t].rows for t in tables)
        with ui.progress(f"Restoring {len(tables)} table(s) in one transaction ({mode})", total=rows, unit="rows") as tick:
            firing = _triggers_that_fire_anyway(conn, tables)
            _switch(conn, firing, on=False)
            if tables:
                query(conn, _truncate(conn, tables))
            # foreign keys check rows only while triggers are on
            not_valid = _not_valid_constraints(conn, tables, ("c", "n") if replica else ("c", "n", "f"))
            _set_aside(conn, not_valid, put_back=False)
            loaded = 0
            for n, table in enumerate(ordered, start=1):
                entry = by_table[table]
                with (
                    crypto.payload(point, entry.file, target.settings) as raw,
                    gzip.GzipFile(fileobj=raw, mode="rb") as fh,
                    conn.cursor() as cur,
                ):
                    source = _CountingReader(fh, _telling(tick, f"{n}/{len(tables)}: {table.key}", loaded))
                    cur.copy_expert(copy_into(table, entry.columns).as_string(conn), source)
                loaded += entry.rows
                tick(f"{n}/{len(tables)}: {table.key}", done=loaded)
            _set_aside(conn, not_valid, put_back=True)
            _switch(conn, firing, on=True)
            recorded = thawed((point.manifest.fingerprint or {}).get("sequences", {}))
            for key, (last, called) in rekeyed(recorded, (t.key for t in all_sequences(conn))).items():
                query(conn, "SELECT setval(%s::regclass, %s, %s)", (quoted(Table(*split_qualified(key))), last, called))
            problems = []
            for table in tables:
                got = query(conn, sql.SQL("SELECT count(*) FROM ONLY {}").format(table.ident()))[0][0]
                if got != by_table[table].rows:
                    problems.append(f"{table.key}: {got} rows, the point has {by_table[table].rows}")
            if problems:
                conn.rollback()
                raise VerificationError(
                    "The restored rows do not match the point: " + "; ".join(problems) + ". Rolled back; nothing was changed."
                )
            conn.commit()
    return mode


_ENABLED = {"A": sql.SQL("ENABLE ALWAYS TRIGGER"), "R": sql.SQL("ENABLE REPLICA TRIGGER")}


def _triggers_that_fire_anyway(conn, tables: list[Table]) -> list[tuple[Table, str, str]]:
    """The tables' own triggers enabled ALWAYS or REPLICA: session_replication_role =
    replica turns off only the ordinary ones, and a restore fires none (the rows it
    loads are the point's, not new ones), so these are switched off for the
    transaction and back on before it commits (ALTER TABLE: the tables' owner)."""
    if not tables:
        return []
    rows = query(
        conn,
        """
        SELECT n.nspname, c.relname, t.tgname, t.tgenabled::text
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE t.tgrelid = ANY(%s::regclass[]) AND NOT t.tgisinternal AND t.tgenabled IN ('A', 'R')
           AND t.tgparentid = 0""",
        (regclasses(tables),),
    )
    return [(Table(schema, name), trigger, enabled) for schema, name, trigger, enabled in rows]


def _switch(conn, triggers: list[tuple[Table, str, str]], *, on: bool) -> None:
    for table, trigger, enabled in triggers:
        how = _ENABLED[enabled] if on else sql.SQL("DISABLE TRIGGER")
        query(conn, sql.SQL("ALTER TABLE {} {} {}").format(table.ident(), how, sql.Identifier(trigger)))


def _truncate(conn, tables: list[Table]) -> sql.Composed:
    """TRUNCATE of the tables, ONLY each, together with the partitioned tables all of whose
    partitions they are: a foreign key of a partitioned table is checked on it, so
    emptying the table it references needs it named too (it holds no rows of its own)."""
    whole = [
        Table(s, n)
        for s, n in query(
            conn,
            """
            SELECT DISTINCT n.nspname, c.relname
              FROM unnest(%(tables)s::regclass[]) t, pg_partition_ancestors(t) a
              JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE a.relid <> t AND NOT EXISTS (SELECT 1 FROM pg_partition_tree(a.relid) l
                                                 WHERE l.isleaf AND NOT l.relid = ANY(%(tables)s::regclass[]))""",
            {"tables": regclasses(tables)},
        )
    ]
    names = [sql.SQL("ONLY {}").format(t.ident()) for t in tables] + [t.ident() for t in whole]
    return sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(names))


@dataclass(frozen=True)
class _NotValid:
    """A constraint marked NOT VALID, on the relation it is defined on."""

    schema: str
    table: str
    name: str
    definition: str  # pg_get_constraintdef: ends in NOT VALID
    comment: str | None
    depth: int  # how far above a restored table its relation is (0: the table itself)

    def on(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.table))


def _not_valid_constraints(conn, tables: list[Table], types: tuple[str, ...]) -> list[_NotValid]:
    """The NOT VALID constraints of ``types`` that check the tables' rows, where each is
    defined: on the table itself, or on the parent it inherits it from (a partitioned
    table's CHECK is its partitions')."""
    rows = query(
        conn,
        """
        WITH RECURSIVE up(relid, restored, depth) AS (
            SELECT t::oid, t::oid, 0 FROM unnest(%s::regclass[]) t
          UNION
            SELECT i.inhparent, up.restored, up.depth + 1 FROM pg_inherits i JOIN up ON i.inhrelid = up.relid)
        SELECT n.nspname, c.relname, co.conname, pg_get_constraintdef(co.oid), obj_description(co.oid, 'pg_constraint'),
               max(up.depth)
          FROM up
          JOIN pg_constraint co ON co.conrelid = up.relid
          JOIN pg_class c ON c.oid = co.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE co.conislocal AND NOT co.convalidated AND co.contype::text = ANY(%s)
           AND EXISTS (SELECT 1 FROM pg_constraint own WHERE own.conrelid = up.restored AND own.conname = co.conname
                          AND own.contype = co.contype AND NOT own.convalidated)
         GROUP BY co.oid, n.nspname, c.relname, co.conname""",
        (regclasses(tables), list(types)),
    )
    return [_NotValid(*row) for row in rows]


def _set_aside(conn, constraints: list[_NotValid], *, put_back: bool) -> None:
    """Drops the NOT VALID constraints before the rows are loaded; adds them back, NOT
    VALID as they were and with their comments, after (``put_back``), in the same
    transaction.

    NOT VALID promises that new rows are checked and old ones are not. The rows a point
    holds are old rows: a NOT VALID CHECK (or a NOT VALID NOT NULL on 18, or a NOT VALID
    foreign key while triggers are on) that rows broke when the point was taken would
    refuse them again, and the point could never come back. session_replication_role
    does not help: it turns off triggers (foreign keys), never CHECK or NOT NULL.
    Adding a constraint NOT VALID reads no row, so putting one back costs nothing per
    row; TRUNCATE already holds the tables' ACCESS EXCLUSIVE lock, so no session sees
    them without it. A parent's constraint is set aside on the parent (its other
    children lack it only inside this transaction, which nobody else sees)."""
    try:
        if not put_back:
            for c in sorted(constraints, key=lambda c: -c.depth):  # a parent's before its children's own
                query(conn, sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(c.on(), sql.Identifier(c.name)))
            return
        for c in sorted(constraints, key=lambda c: c.depth):  # a child's own before the parent's, which merges with it
            query(
                conn, sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(c.on(), sql.Identifier(c.name)) + sql.SQL(c.definition)
            )
            if c.comment is not None:
                query(
                    conn,
                    sql.SQL("COMMENT ON CONSTRAINT {} ON {} IS {}").format(
                        sql.Identifier(c.name), c.on(), sql.Literal(c.comment)
                    ),
                )
    except psycopg2.Error as exc:
        if exc.pgcode != INSUFFICIENT_PRIVILEGE:
            raise
        raise DatabaseError(
            f"Restoring the rows needs NOT VALID constraints set aside and put back "
            f"({', '.join(c.name for c in constraints)}), which only their tables' owner may do: "
            f"{(exc.pgerror or str(exc)).strip()}. Rolled back; nothing was changed.",
            "Restore as the tables' owner or as a superuser.",
        ) from None


def _dependency_order(conn, tables: list[Table]) -> list[Table]:
    """Referenced tables before the tables that reference them (self references ignored)."""
    by_oid = dict(
        zip(
            (
                r[0]
                for r in query(
                    conn, "SELECT t::oid FROM unnest(%s::regclass[]) WITH ORDINALITY u(t, i) ORDER BY i", (regclasses(tables),)
                )
            ),
            tables,
            strict=True,
        )
    )
    edges = query(
        conn,
        """
        SELECT c.conrelid, c.confrelid FROM pg_constraint c
         WHERE c.contype = 'f' AND c.conrelid <> c.confrelid
           AND c.conrelid = ANY(%s::oid[]) AND c.confrelid = ANY(%s::oid[])""",
        (list(by_oid), list(by_oid)),
    )
    needs = {t: {by_oid[ref] for child, ref in edges if by_oid[child] == t} for t in tables}
    ordered: list[Table] = []
    while needs:
        ready = sorted((t for t, deps in needs.items() if not deps), key=lambda t: t.key)
        if not ready:
            raise CatalogError(
                "The tables' foreign keys form a cycle: " + ", ".join(sorted(t.key for t in needs)) + ".",
                "Restore as a superuser (triggers off), or restore a dump or template point.",
            )
        for t in ready:
            ordered.append(t)
            del needs[t]
        for deps in needs.values():
            deps.difference_update(ready)
    return ordered


class DataMethod(Method):
    """Chosen tables (or all of them) as COPY files on this machine: restored table by
    table in one transaction, the rest of the database untouched."""

    name = "data"
    level = "counted"  # every row counted in the snapshot it was taken in
    restore_mode = TABLES
    whole_database = False
    verify_label = "Reading the data"

    def take(self, request: TakeRequest) -> Taken:
        r = request
        return Taken(take(r.target, r.catalog, r.ui, label=r.label, base=r.base, tables=r.tables))

    def needs_server_to_verify(self, deep: bool) -> bool:
        return False

    def verify(self, point: Point, settings, ui: Reporter, target: Target | None, *, deep: bool) -> dict:
        with ui.progress(f"Reading the data of {point.id} end to end"):
            result = read_through(point, settings)
        ui.ok("Every table file read end to end, row counts match")
        return result

    def describe_verification(self, point: Point) -> str:
        return "deep: every row was counted when it was taken"

    def check_restorable(self, target: Target, point: Point) -> None:
        preflight(target, point)

    def keeps_before(self, point: Point) -> list[str] | None:
        """What the state before a restore of ``point`` keeps: its tables for a point of
        chosen tables, everything (tables and sequences) for a whole-database one."""
        tables = [quoted(Table(t.schema, t.name)) for t in point.manifest.tables or ()]
        return tables if point.manifest.is_table_level else None

    @contextmanager
    def open_for_reading(self, target: Target, point: Point, ui: Reporter) -> Iterator[object | None]:
        yield None  # its files are read
