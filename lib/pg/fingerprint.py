"""Fingerprints of a database: a schema digest read from the catalogs, exact
per-table row counts, sequence positions, large objects and, on request,
per-table content hashes.

The digest is built from catalog text (pg_get_*def, format_type, pg_describe_object),
never from OIDs, so a faithful copy on the same server digests the same, whatever
client tool wrote it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from psycopg2 import sql

from lib.pg.db import query, scalar

log = logging.getLogger(__name__)

USER_NAMESPACES = """
    n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
    AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
"""

_SCHEMA_QUERIES = {
    "schema": f"""
        SELECT format('%I owner=%s acl=%s', n.nspname, pg_get_userbyid(n.nspowner), n.nspacl::text)
          FROM pg_namespace n WHERE {USER_NAMESPACES}""",
    "relation": f"""
        SELECT format('%I.%I kind=%s owner=%s persistence=%s acl=%s options=%s rls=%s/%s replident=%s part=%s bound=%s',
                      n.nspname, c.relname, c.relkind, pg_get_userbyid(c.relowner), c.relpersistence,
                      c.relacl::text, c.reloptions::text, c.relrowsecurity, c.relforcerowsecurity,
                      c.relreplident,
                      CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
                      pg_get_expr(c.relpartbound, c.oid))
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c', 'S') AND {USER_NAMESPACES}""",
    "column": f"""
        SELECT format('%I.%I #%s %I %s notnull=%s default=%s identity=%s generated=%s collation=%s acl=%s',
                      n.nspname, c.relname,
                      row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum),
                      a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                      pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
                      CASE WHEN a.attcollation <> 0 THEN (SELECT collname FROM pg_collation WHERE oid = a.attcollation) END,
                      a.attacl::text)
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attnum > 0 AND NOT a.attisdropped
           AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c') AND {USER_NAMESPACES}""",
    "constraint": f"""
        SELECT format('%I on %s/%s: %s', co.conname,
                      coalesce((SELECT format('%I.%I', n2.nspname, c.relname) FROM pg_class c
                                  JOIN pg_namespace n2 ON n2.oid = c.relnamespace WHERE c.oid = co.conrelid), ''),
                      coalesce(format_type(nullif(co.contypid, 0), NULL), ''),
                      pg_get_constraintdef(co.oid))
          FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace
         WHERE {USER_NAMESPACES}""",
    "index": f"""
        SELECT pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE {USER_NAMESPACES}""",
    "view": f"""
        SELECT format('%I.%I %s', n.nspname, c.relname, pg_get_viewdef(c.oid))
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('v', 'm') AND {USER_NAMESPACES}""",
    "function": f"""
        SELECT format('%s owner=%s acl=%s %s', p.oid::regprocedure::text, pg_get_userbyid(p.proowner),
                      p.proacl::text,
                      CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) ELSE p.prokind::text END)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE {USER_NAMESPACES}""",
    "trigger": f"""
        SELECT format('%s enabled=%s', pg_get_triggerdef(t.oid), t.tgenabled)
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT t.tgisinternal AND {USER_NAMESPACES}""",
    "rule": """
        SELECT format('%I.%I %s', schemaname, tablename, definition) FROM pg_rules
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema')""",
    "policy": """
        SELECT format('%I.%I %I %s %s roles=%s using=%s check=%s', schemaname, tablename, policyname,
                      permissive, cmd, roles::text, qual, with_check)
          FROM pg_policies""",
    "sequence": f"""
        SELECT format('%I.%I %s start=%s inc=%s min=%s max=%s cache=%s cycle=%s',
                      n.nspname, c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement,
                      s.seqmin, s.seqmax, s.seqcache, s.seqcycle)
          FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NAMESPACES}""",
    "type": f"""
        SELECT format('%s kind=%s owner=%s labels=%s', format_type(t.oid, NULL), t.typtype,
                      pg_get_userbyid(t.typowner),
                      (SELECT string_agg(quote_literal(e.enumlabel), ',' ORDER BY e.enumsortorder)
                         FROM pg_enum e WHERE e.enumtypid = t.oid))
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE t.typtype IN ('e', 'd', 'r', 'm') AND {USER_NAMESPACES}""",
    "extension": """
        SELECT format('%I %s in %I', e.extname, e.extversion, n.nspname)
          FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace""",
    "comment": f"""
        SELECT format('%s: %s', pg_describe_object(classoid, objoid, objsubid), description)
          FROM pg_description
         -- comments on user schemas whatever their oid (public's is below 16384 until an
         -- in-place restore recreates it), on other objects only past the built-in oids
         WHERE CASE WHEN classoid = 'pg_namespace'::regclass
                    THEN objoid IN (SELECT n.oid FROM pg_namespace n WHERE {USER_NAMESPACES})
                    ELSE objoid >= 16384 END""",
    "inherits": f"""
        SELECT format('%s inherits %s #%s', i.inhrelid::regclass::text, i.inhparent::regclass::text, i.inhseqno)
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NAMESPACES}""",
    "default_acl": """
        SELECT format('%s %s %s', pg_get_userbyid(defaclrole), defaclobjtype, defaclacl::text)
          FROM pg_default_acl""",
}


@dataclass
class Fingerprint:
    """What a database is, as far as it was read. A logical fingerprint counts rows
    (``row_counts``; with ``content``, hashes every row). A physical one reads only the
    catalog, in O(relations): every relation's file node and size (``relations``),
    enough for a copy the server made of its own files."""

    schema_digest: str
    schema_objects: int
    row_counts: dict[str, int] | None
    sequences: dict[str, list]
    large_objects: int
    content: dict[str, str] = field(default_factory=dict)
    relations: dict[str, list] | None = None

    def as_dict(self) -> dict:
        d = {
            "schema_digest": self.schema_digest,
            "schema_objects": self.schema_objects,
            "sequences": self.sequences,
            "large_objects": self.large_objects,
        }
        if self.row_counts is not None:
            d["row_counts"] = self.row_counts
        if self.relations is not None:
            d["kind"] = "physical"
            d["relations"] = self.relations
        if self.content:
            d["content"] = self.content
        return d

    @property
    def total_rows(self) -> int:
        return sum((self.row_counts or {}).values())


DEFAULT_SEARCH_PATH = '"$user", public'


@contextmanager
def default_search_path(conn) -> Iterator[None]:
    """The catalog's text (pg_get_*def, regprocedure) names objects relative to the
    search_path; a database or role setting must not change a digest, so it is read
    under PostgreSQL's default search_path, whatever the session's is."""
    before = scalar(conn, "SELECT current_setting('search_path')")
    if before == DEFAULT_SEARCH_PATH:
        yield
        return
    scalar(conn, "SELECT set_config('search_path', %s, false)", (DEFAULT_SEARCH_PATH,))
    try:
        yield
    finally:
        scalar(conn, "SELECT set_config('search_path', %s, false)", (before,))


def schema_lines(conn) -> list[str]:
    lines: list[str] = []
    with default_search_path(conn):
        for kind, statement in _SCHEMA_QUERIES.items():
            lines += [f"{kind} {row[0]}" for row in query(conn, statement)]
    return sorted(lines)


_EXTENSION_MEMBERS = """
    SELECT 'function ' || p.oid::regprocedure::text || ' '
      FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
    UNION ALL
    SELECT 'type ' || format_type(t.oid, NULL) || ' '
      FROM pg_type t JOIN pg_depend d ON d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'"""


def portable_schema_lines(conn) -> list[str]:
    """The schema as two majors print it alike, to compare a database with its copy on
    another major. Left out or evened out, and only that: the objects extensions own
    (their versions differ between majors), NOT NULL constraints (18 lists them as
    constraints; the columns say NOT NULL on every major), the text of view
    definitions (16 stopped qualifying column names; the views' names and columns stay
    compared), the public schema's owner and rights (15 changed its defaults), and
    the MAINTAIN right (17 added it to every owner's rights)."""
    with default_search_path(conn):
        members = tuple(row[0] for row in query(conn, _EXTENSION_MEMBERS))
    out = []
    for line in schema_lines(conn):
        kind = line.split(" ", 1)[0]
        if line.startswith(members) or line.startswith("schema public "):
            continue
        if kind == "constraint" and re.search(r": NOT NULL \S+$", line):
            continue
        if kind == "extension":
            line = re.sub(r"^(extension \S+) \S+ in ", r"\1 in ", line)
        elif kind == "view":
            line = " ".join(line.split(" ", 2)[:2])
        line = re.sub(
            r"acl=\{[^}]*\}",
            lambda m: re.sub(r"=([A-Za-z*]*)/", lambda a: "=" + a.group(1).replace("m", "") + "/", m.group(0)),
            line,
        )
        out.append(line)
    return sorted(out)


def schema_differences(expected: list[str], actual: list[str], limit: int = 5) -> list[str]:
    """The first lines only one side has, as sentences."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    found = [f"missing: {line[:160]}" for line in missing[:limit]] + [f"unexpected: {line[:160]}" for line in extra[:limit]]
    if len(missing) + len(extra) > 2 * limit:
        found.append(f"{len(missing)} missing and {len(extra)} unexpected in all")
    return found


def counted_tables(conn) -> list[tuple[str, str]]:
    rows = query(
        conn,
        f"""
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE (c.relkind = 'r' OR (c.relkind = 'm' AND c.relispopulated)) AND {USER_NAMESPACES}
         ORDER BY 1, 2""",
    )
    return [(r[0], r[1]) for r in rows]


def qualified(schema: str, name: str) -> str:
    return f"{schema}.{name}"


def row_counts(conn) -> dict[str, int]:
    counts = {}
    for schema, name in counted_tables(conn):
        counts[qualified(schema, name)] = scalar(
            conn, sql.SQL("SELECT count(*) FROM ONLY {}.{}").format(sql.Identifier(schema), sql.Identifier(name))
        )
    return counts


def sequence_positions(conn) -> dict[str, list]:
    positions = {}
    seqs = query(
        conn,
        f"""
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'S' AND {USER_NAMESPACES} ORDER BY 1, 2""",
    )
    for schema, name in seqs:
        last, called = query(
            conn,
            sql.SQL("SELECT last_value, is_called FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(name)),
        )[0]
        positions[qualified(schema, name)] = [int(last), bool(called)]
    return positions


def table_content(conn, schema: str, name: str) -> str:
    """Order-independent hash of every row of one table: ``count:sum`` of 60-bit md5s."""
    count, total = query(
        conn,
        sql.SQL(
            "SELECT count(*), coalesce(sum(('x' || substr(md5(t::text), 1, 15))::bit(60)::bigint), 0) FROM ONLY {}.{} t"
        ).format(sql.Identifier(schema), sql.Identifier(name)),
    )[0]
    return f"{count}:{total}"


LARGE_OBJECTS = "<large objects>"


def large_object_content(conn) -> str:
    lo = query(
        conn,
        "SELECT count(*), coalesce(sum(('x' || substr(md5(oid::text || md5(lo_get(oid))), 1, 15))::bit(60)::bigint), 0) "
        "FROM pg_largeobject_metadata",
    )[0]
    return f"{lo[0]}:{lo[1]}"


def content_hashes(conn) -> dict[str, str]:
    """Order-independent hash of every row of every table, and of all large objects."""
    hashes = {qualified(schema, name): table_content(conn, schema, name) for schema, name in counted_tables(conn)}
    hashes[LARGE_OBJECTS] = large_object_content(conn)
    return hashes


def relation_files(conn) -> dict[str, list]:
    """Every relation with storage (tables, indexes, materialized views, sequences, and
    each table's TOAST under the table's name): [file node, bytes of its main fork], and
    "unlogged" third for an UNLOGGED one (crash recovery empties those, point copies
    included). A copy made by the server has the same; a table truncated, rewritten or
    grown behind the toolkit's back has not."""
    rows = query(
        conn,
        f"""
        SELECT format('%I.%I', n.nspname, c.relname), pg_relation_filenode(c.oid), pg_relation_size(c.oid),
               c.relpersistence = 'u'
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'i', 'm', 'S') AND {USER_NAMESPACES}
        UNION ALL
        SELECT format('%I.%I', n.nspname, c.relname) || ' (toast)', pg_relation_filenode(c.reltoastrelid),
               pg_relation_size(c.reltoastrelid), c.relpersistence = 'u'
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.reltoastrelid <> 0 AND {USER_NAMESPACES}""",
    )
    return {name: [int(node or 0), int(size)] + (["unlogged"] if unlogged else []) for name, node, size, unlogged in rows}


# An UNLOGGED relation as crash recovery leaves it: its main fork reset to its init fork
# (nothing for a heap, a metapage for an index).
EMPTIED_MAX_BYTES = 2 * 8192


def emptied_by_recovery(want: dict[str, list], found: dict[str, list]) -> list[str]:
    """The UNLOGGED relations recorded with rows that crash recovery has emptied since."""
    return sorted(
        name
        for name, a in want.items()
        if len(a) > 2 and a[2] == "unlogged" and name in found and found[name][1] != a[1] and found[name][1] <= EMPTIED_MAX_BYTES
    )


def physical_fingerprint(conn) -> Fingerprint:
    """The catalog's view of a database, in O(relations): no row is read."""
    lines = schema_lines(conn)
    return Fingerprint(
        schema_digest=hashlib.sha256("\n".join(lines).encode()).hexdigest(),
        schema_objects=len(lines),
        row_counts=None,
        sequences=sequence_positions(conn),
        large_objects=int(scalar(conn, "SELECT count(*) FROM pg_largeobject_metadata")),
        relations=relation_files(conn),
    )


def is_physical(expected: dict | None) -> bool:
    return bool(expected) and expected.get("kind") == "physical"


def fingerprint_like(conn, expected: dict) -> Fingerprint:
    """What ``expected`` can be compared with: physical for a physical one, counted otherwise."""
    return physical_fingerprint(conn) if is_physical(expected) else fingerprint(conn)


def fingerprint(conn, *, deep: bool = False) -> Fingerprint:
    """Read inside whatever transaction ``conn`` has open (a snapshot, when taking a point)."""
    lines = schema_lines(conn)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return Fingerprint(
        schema_digest=digest,
        schema_objects=len(lines),
        row_counts=row_counts(conn),
        sequences=sequence_positions(conn),
        large_objects=int(scalar(conn, "SELECT count(*) FROM pg_largeobject_metadata")),
        content=content_hashes(conn) if deep else {},
    )


def compare(expected: dict, actual: Fingerprint) -> list[str]:
    """Differences between a recorded fingerprint (of a manifest, or a baseline) and a
    database's, as sentences; only what was recorded is compared."""
    problems: list[str] = []
    if "schema_digest" in expected and expected["schema_digest"] != actual.schema_digest:
        problems.append(
            f"schema digest differs ({expected.get('schema_objects')} objects recorded, {actual.schema_objects} found)"
        )
    if "row_counts" in expected and actual.row_counts is not None:
        want = expected["row_counts"]
        for table in sorted(set(want) | set(actual.row_counts)):
            a, b = want.get(table), actual.row_counts.get(table)
            if a != b:
                problems.append(
                    f"{table}: {a if a is not None else 'absent'} rows recorded, {b if b is not None else 'absent'} found"
                )
    if "relations" in expected and actual.relations is not None:
        problems += _file_differences(expected["relations"], actual.relations)
    if "content" in expected and actual.content:
        for table in sorted(set(expected["content"]) | set(actual.content)):
            if expected["content"].get(table) != actual.content.get(table):
                problems.append(f"{table}: the rows' content differs from what was read before")
    want_seq = expected.get("sequences")
    for seq in sorted(set(want_seq or {}) | set(actual.sequences)) if want_seq is not None else []:
        if list(want_seq.get(seq) or []) != list(actual.sequences.get(seq) or []):
            problems.append(f"sequence {seq}: {want_seq.get(seq)} recorded, {actual.sequences.get(seq)} found")
    if "large_objects" in expected and expected["large_objects"] != actual.large_objects:
        problems.append(f"large objects: {expected.get('large_objects')} recorded, {actual.large_objects} found")
    return problems


def _file_differences(want: dict[str, list], found: dict[str, list]) -> list[str]:
    problems = []
    emptied = set(emptied_by_recovery(want, found))  # said apart: PostgreSQL's recovery, not a change
    for name in sorted((set(want) | set(found)) - emptied):
        a, b = want.get(name), found.get(name)
        if a is None or b is None:
            problems.append(
                f"{name}: {'absent' if a is None else 'recorded'} at the point, {'absent' if b is None else 'present'} now"
            )
        elif a[0] != b[0]:
            problems.append(f"{name}: its file was replaced (truncated or rewritten: file node {a[0]} recorded, {b[0]} found)")
        elif a[1] != b[1]:
            problems.append(f"{name}: {a[1]} bytes recorded, {b[1]} found (rows were added or removed)")
    return problems
