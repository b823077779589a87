"""Fingerprints of a database: its schema read from the catalogs, exact per-table row
counts, sequence positions, large objects and, on request, per-table content hashes.

The schema is one list of catalog objects (``schema_objects``): queried rows whose
fields are the catalog's own text (pg_get_*def, format_type, pg_describe_object), never
OIDs, beside the facts decisions are made on (the namespace, whether an extension owns
the object, a constraint's type). Two views are printed from it: ``schema_lines``,
exact, whose digest a faithful copy on the same server shares whatever client tool
wrote it; and ``portable_schema_lines``, what two majors print alike, to compare a
database with its copy on another major.

Tables and sequences are named by ``qualified`` keys (``public.orders``,
``"Sales Ops"."Order Items"``), quoted by PostgreSQL's rules for every major alike, and
read back only by ``split_qualified``: a name may hold spaces, quotes and dots.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from psycopg2 import sql

from lib.pg.db import query, scalar
from lib.pg.rowhash import row_hash_for, row_hash_sql

log = logging.getLogger(__name__)

USER_NAMESPACES = """
    n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
    AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
"""

# ---------------------------------------------------------------- names

# Keywords a name must be quoted for (every category but unreserved): PostgreSQL 18's,
# which hold 14-17's. Fixed here, not asked of the server, so that a key is the same on
# every major: 16 made system_user a keyword, 17 json_table and others.
_KEYWORD_WORDS = """
    all analyse analyze and any array as asc asymmetric authorization between bigint binary bit boolean both case cast
    char character check coalesce collate collation column concurrently constraint create cross current_catalog
    current_date current_role current_schema current_time current_timestamp current_user dec decimal default deferrable
    desc distinct do else end except exists extract false fetch float for foreign freeze from full grant greatest group
    grouping having ilike in initially inner inout int integer intersect interval into is isnull join json json_array
    json_arrayagg json_exists json_object json_objectagg json_query json_scalar json_serialize json_table json_value
    lateral leading least left like limit localtime localtimestamp merge_action national natural nchar none normalize not
    notnull null nullif numeric offset on only or order out outer overlaps overlay placing position precision primary
    real references returning right row select session_user setof similar smallint some substring symmetric system_user
    table tablesample then time timestamp to trailing treat trim true union unique user using values varchar variadic
    verbose when where window with xmlattributes xmlconcat xmlelement xmlexists xmlforest xmlnamespaces xmlparse xmlpi
    xmlroot xmlserialize xmltable
    """
KEYWORDS = frozenset(_KEYWORD_WORDS.split())
TOAST_SUFFIX = " (toast)"  # relation_files' key of a table's TOAST: the table's, then this
_PLAIN_START = frozenset("abcdefghijklmnopqrstuvwxyz_")
_PLAIN = _PLAIN_START | frozenset("0123456789")


def quote_ident(name: str) -> str:
    """``name`` as SQL writes it: bare where PostgreSQL's quote_ident leaves it bare
    (lower-case letters, digits and underscores, not a keyword), quoted otherwise."""
    if name and name[0] in _PLAIN_START and all(ch in _PLAIN for ch in name) and name not in KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, name: str) -> str:
    """The key of a table or sequence: ``public.orders``, ``"Sales Ops"."Order Items"``."""
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def _identifiers(key: str) -> list[str]:
    """The dot-separated identifiers of ``key``, each quoted ("" for a quote) or bare; a
    bare one runs to the next dot. ValueError where a quoted one is not closed or is
    followed by anything but a dot."""
    parts, at = [], 0
    while True:
        if key.startswith('"', at):
            chunks, at = [], at + 1
            while True:
                end = key.find('"', at)
                if end < 0:
                    raise ValueError(f"unclosed quote in {key!r}")
                chunks.append(key[at:end])
                if key.startswith('""', end):
                    chunks.append('"')
                    at = end + 2
                    continue
                at = end + 1
                break
            parts.append("".join(chunks))
        else:
            end = key.find(".", at)
            end = len(key) if end < 0 else end
            parts.append(key[at:end])
            at = end
        if at == len(key):
            return parts
        if key[at] != ".":
            raise ValueError(f"{key!r} has text after a quoted name")
        at += 1


def split_qualified(key: str) -> tuple[str, str]:
    """(schema, name) of a key that ``qualified`` wrote, the one way keys are read back.
    Also reads the keys of points taken before keys were quoted (``Sales Ops.Order Items``):
    where those do not make two names (a name with a dot or a leading quote), they are
    split at the first dot, as they were written."""
    if "." not in key:
        raise ValueError(f"{key!r} names no schema")
    try:
        parts = _identifiers(key)
    except ValueError:
        parts = []
    if len(parts) == 2:
        return parts[0], parts[1]
    schema, _, name = key.partition(".")
    return schema, name


def current_key(key: str, *, relation: bool = False) -> str:
    """A key a point recorded, as ``qualified`` writes it now (points taken before keys
    were quoted wrote ``Sales Ops.Order Items``). ``relation``: a key of
    ``relation_files``, whose TOAST entries end in " (toast)". Keys that name no table
    ("<large objects>") stay as they are."""
    suffix = TOAST_SUFFIX if relation and key.endswith(TOAST_SUFFIX) else ""
    try:
        return qualified(*split_qualified(key.removesuffix(suffix))) + suffix
    except ValueError:
        return key


def rekeyed(recorded: Mapping, found: Iterable[str] = (), *, relation: bool = False) -> dict:
    """A recorded mapping by table or sequence, under the keys read now. A key ``found``
    now stays as it is. A key an older toolkit wrote plainly (schema, a dot, the name,
    unquoted) is matched to the one key found that names a table that way, which also
    settles the names with dots that a plain key leaves ambiguous; the rest are read by
    ``current_key``."""
    found = set(found)
    plainly: dict[str, str | None] = {}
    if not relation:  # relation keys were written quoted (by the server) from the start
        for key in found:
            with suppress(ValueError):
                plain = ".".join(split_qualified(key))
                plainly[plain] = None if plain in plainly else key  # two tables written alike: neither
    out = {}
    for key, value in recorded.items():
        out[key if key in found else plainly.get(key) or current_key(key, relation=relation)] = value
    return out


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


# ---------------------------------------------------------------- the schema, from the catalogs


def _member(catalog: str, oid: str) -> str:
    """SQL: is the object an extension's (pg_depend, deptype 'e')?"""
    return f"EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = '{catalog}'::regclass AND x.objid = {oid} AND x.deptype = 'e')"


def _portable_acl(acl: str) -> str:
    """SQL: an ACL as the rights it grants (aclexplode), grouped by grantee and grantor,
    without MAINTAIN (17 added it to every owner's rights); NULL for the defaults."""
    return f"""CASE WHEN {acl} IS NOT NULL THEN '{{' || coalesce((
        SELECT string_agg(rights, ',' ORDER BY rights) FROM (
            SELECT format('%s=%s/%s', CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                          string_agg(a.privilege_type || CASE WHEN a.is_grantable THEN '*' ELSE '' END, ' '
                                     ORDER BY a.privilege_type),
                          quote_ident(pg_get_userbyid(a.grantor))) AS rights
              FROM aclexplode({acl}) a WHERE a.privilege_type <> 'MAINTAIN'
             GROUP BY a.grantee, a.grantor) granted), '') || '}}' END"""


@dataclass(frozen=True)
class _Kind:
    """One kind of catalog object: how its rows are read and printed.

    ``columns`` are SQL expressions printed as format('%s', ...) prints them; ``line``
    and ``portable`` are str.format templates over them (and over ``portable_columns``,
    read only for the portable view). Every statement also reads the facts: ``namespace``
    (the schema's own name), ``contype`` and, for the portable view, ``member``."""

    name: str
    line: str
    columns: Mapping[str, str]
    source: str
    portable: str | None = None  # None: as ``line``
    portable_columns: Mapping[str, str] = field(default_factory=dict)
    namespace: str = "NULL"
    contype: str = "NULL"
    member: str = "false"

    def statement(self, portable: bool) -> str:
        wanted = {k: f"format('%s', {v})" for k, v in self.columns.items()}
        wanted.update({k: (v if portable else "NULL") for k, v in self.portable_columns.items()})
        wanted.update(namespace=self.namespace, contype=self.contype, member=self.member if portable else "false")
        return "SELECT " + ",\n       ".join(f'{v} AS "{k}"' for k, v in wanted.items()) + "\n" + self.source


_RELATION_NAME = "format('%I.%I', n.nspname, c.relname)"

KINDS: tuple[_Kind, ...] = (
    _Kind(
        "schema",
        "{name} owner={owner} acl={acl}",
        {"name": "format('%I', n.nspname)", "owner": "pg_get_userbyid(n.nspowner)", "acl": "n.nspacl::text"},
        f"FROM pg_namespace n WHERE {USER_NAMESPACES}",
        portable="{name} owner={owner} acl={portable_acl}",
        portable_columns={"portable_acl": _portable_acl("n.nspacl")},
        namespace="n.nspname",
        member=_member("pg_namespace", "n.oid"),
    ),
    _Kind(
        "relation",
        "{name} kind={kind} owner={owner} persistence={persistence} acl={acl} options={options} rls={rls}/{force_rls} "
        "replident={replident} part={part} bound={bound}",
        {
            "name": _RELATION_NAME,
            "kind": "c.relkind",
            "owner": "pg_get_userbyid(c.relowner)",
            "persistence": "c.relpersistence",
            "acl": "c.relacl::text",
            "options": "c.reloptions::text",
            "rls": "c.relrowsecurity",
            "force_rls": "c.relforcerowsecurity",
            "replident": "c.relreplident",
            "part": "CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END",
            "bound": "pg_get_expr(c.relpartbound, c.oid)",
        },
        f"""FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c', 'S') AND {USER_NAMESPACES}""",
        portable="{name} kind={kind} owner={owner} persistence={persistence} acl={portable_acl} options={options} "
        "rls={rls}/{force_rls} replident={replident} part={part} bound={bound}",
        portable_columns={"portable_acl": _portable_acl("c.relacl")},
        namespace="n.nspname",
        member=_member("pg_class", "c.oid"),
    ),
    _Kind(
        "column",
        "{table} #{position} {name} {type} notnull={notnull} default={default} identity={identity} generated={generated} "
        "collation={collation} acl={acl}",
        {
            "table": _RELATION_NAME,
            "position": "row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum)",
            "name": "format('%I', a.attname)",
            "type": "format_type(a.atttypid, a.atttypmod)",
            "notnull": "a.attnotnull",
            "default": "pg_get_expr(d.adbin, d.adrelid)",
            "identity": "a.attidentity",
            "generated": "a.attgenerated",
            "collation": "CASE WHEN a.attcollation <> 0 THEN (SELECT collname FROM pg_collation WHERE oid = a.attcollation) END",
            "acl": "a.attacl::text",
        },
        f"""FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attnum > 0 AND NOT a.attisdropped
           AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c') AND {USER_NAMESPACES}""",
        portable="{table} #{position} {name} {portable_type} notnull={notnull} default={default} identity={identity} "
        "generated={generated} collation={collation} acl={portable_acl}",
        portable_columns={
            "portable_acl": _portable_acl("a.attacl"),
            # a built-in type as every major prints it: with every identifier quoted, 15 quotes "json", which 18 (where
            # JSON is a keyword) prints bare; a built-in type's name never holds a quote of its own
            "portable_type": "CASE WHEN (SELECT typnamespace FROM pg_type WHERE oid = a.atttypid) = 'pg_catalog'::regnamespace "
            "THEN replace(format_type(a.atttypid, a.atttypmod), '\"', '') ELSE format_type(a.atttypid, a.atttypmod) END",
        },
        namespace="n.nspname",
        member=_member("pg_class", "c.oid"),
    ),
    _Kind(
        "constraint",
        "{name} on {table}/{domain}: {definition}",
        {
            "name": "format('%I', co.conname)",
            "table": """coalesce((SELECT format('%I.%I', n2.nspname, c.relname) FROM pg_class c
                                  JOIN pg_namespace n2 ON n2.oid = c.relnamespace WHERE c.oid = co.conrelid), '')""",
            "domain": "coalesce(format_type(nullif(co.contypid, 0), NULL), '')",
            "definition": "pg_get_constraintdef(co.oid)",
        },
        f"FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace WHERE {USER_NAMESPACES}",
        namespace="n.nspname",
        contype="co.contype",
        member=f"({_member('pg_class', 'co.conrelid')} OR {_member('pg_type', 'co.contypid')})",
    ),
    _Kind(
        "index",
        "{definition}",
        {"definition": "pg_get_indexdef(i.indexrelid)"},
        f"""FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE {USER_NAMESPACES}""",
        namespace="n.nspname",
        member=f"({_member('pg_class', 'i.indrelid')} OR {_member('pg_class', 'i.indexrelid')})",
    ),
    _Kind(
        "view",
        "{name} {definition}",
        {"name": _RELATION_NAME, "definition": "pg_get_viewdef(c.oid)"},
        f"""FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('v', 'm') AND {USER_NAMESPACES}""",
        portable="{name}",  # its text: 16 stopped qualifying column names; its columns are compared
        namespace="n.nspname",
        member=_member("pg_class", "c.oid"),
    ),
    _Kind(
        "function",
        "{signature} owner={owner} acl={acl} {definition}",
        {
            "signature": "p.oid::regprocedure::text",
            "owner": "pg_get_userbyid(p.proowner)",
            "acl": "p.proacl::text",
            "definition": "CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) ELSE p.prokind::text END",
        },
        f"FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {USER_NAMESPACES}",
        portable="{signature} owner={owner} acl={portable_acl} {definition}",
        portable_columns={"portable_acl": _portable_acl("p.proacl")},
        namespace="n.nspname",
        member=_member("pg_proc", "p.oid"),
    ),
    _Kind(
        "trigger",
        "{definition} enabled={enabled}",
        {"definition": "pg_get_triggerdef(t.oid)", "enabled": "t.tgenabled"},
        f"""FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT t.tgisinternal AND {USER_NAMESPACES}""",
        namespace="n.nspname",
        member=_member("pg_class", "c.oid"),
    ),
    _Kind(
        "rule",
        "{table} {definition}",
        {"table": _RELATION_NAME, "definition": "pg_get_ruledef(r.oid)"},
        """FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE r.rulename <> '_RETURN' AND n.nspname NOT IN ('pg_catalog', 'information_schema')""",  # pg_rules' rows
        namespace="n.nspname",
        member=_member("pg_class", "c.oid"),
    ),
    _Kind(
        "policy",
        "{table} {name} {permissive} {command} roles={roles} using={using} check={check}",
        {
            "table": "format('%I.%I', p.schemaname, p.tablename)",
            "name": "format('%I', p.policyname)",
            "permissive": "p.permissive",
            "command": "p.cmd",
            "roles": "p.roles::text",
            "using": "p.qual",
            "check": "p.with_check",
        },
        """FROM pg_policies p JOIN pg_namespace n ON n.nspname = p.schemaname
          JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename""",
        namespace="n.nspname",
        member=_member("pg_class", "c.oid"),
    ),
    _Kind(
        "sequence",
        "{name} {type} start={start} inc={increment} min={min} max={max} cache={cache} cycle={cycle}",
        {
            "name": _RELATION_NAME,
            "type": "format_type(s.seqtypid, NULL)",
            "start": "s.seqstart",
            "increment": "s.seqincrement",
            "min": "s.seqmin",
            "max": "s.seqmax",
            "cache": "s.seqcache",
            "cycle": "s.seqcycle",
        },
        f"""FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NAMESPACES}""",
        namespace="n.nspname",
        member=_member("pg_class", "c.oid"),
    ),
    _Kind(
        "type",
        "{name} kind={kind} owner={owner} labels={labels}",
        {
            "name": "format_type(t.oid, NULL)",
            "kind": "t.typtype",
            "owner": "pg_get_userbyid(t.typowner)",
            "labels": """(SELECT string_agg(quote_literal(e.enumlabel), ',' ORDER BY e.enumsortorder)
                            FROM pg_enum e WHERE e.enumtypid = t.oid)""",
        },
        f"""FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE t.typtype IN ('e', 'd', 'r', 'm') AND {USER_NAMESPACES}""",
        # a domain's NOT NULL: 18 lists it as a constraint too, which the portable view leaves out
        portable="{name} kind={kind} owner={owner} labels={labels} notnull={notnull}",
        portable_columns={"notnull": "CASE WHEN t.typtype = 'd' THEN format('%s', t.typnotnull) END"},
        namespace="n.nspname",
        member=_member("pg_type", "t.oid"),
    ),
    _Kind(
        "extension",
        "{name} {version} in {schema}",
        {"name": "format('%I', e.extname)", "version": "e.extversion", "schema": "format('%I', n.nspname)"},
        "FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace",
        portable="{name} in {schema}",  # versions differ between majors
    ),
    _Kind(
        "comment",
        "{object}: {description}",
        {"object": "pg_describe_object(classoid, objoid, objsubid)", "description": "description"},
        f"""FROM pg_description
         -- comments on user schemas whatever their oid (public's is below 16384 until an
         -- in-place restore recreates it), on other objects only past the built-in oids
         WHERE CASE WHEN classoid = 'pg_namespace'::regclass
                    THEN objoid IN (SELECT n.oid FROM pg_namespace n WHERE {USER_NAMESPACES})
                    ELSE objoid >= 16384 END""",
        member="EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = classoid AND x.objid = objoid AND x.deptype = 'e')",
    ),
    _Kind(
        "inherits",
        "{child} inherits {parent} #{position}",
        {"child": "i.inhrelid::regclass::text", "parent": "i.inhparent::regclass::text", "position": "i.inhseqno"},
        f"""FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NAMESPACES}""",
        namespace="n.nspname",
        member=_member("pg_class", "c.oid"),
    ),
    _Kind(
        "default_acl",
        "{role} {objects} {acl}",
        {"role": "pg_get_userbyid(defaclrole)", "objects": "defaclobjtype", "acl": "defaclacl::text"},
        "FROM pg_default_acl",
        portable="{role} {objects} {portable_acl}",
        portable_columns={"portable_acl": _portable_acl("defaclacl")},
    ),
)


@dataclass(frozen=True)
class SchemaObject:
    """One catalog object as read: its kind, its fields as the catalog prints them, and
    the facts the views decide on."""

    kind: str
    fields: Mapping[str, str | None]
    namespace: str | None  # the schema it is in, by its own name; None for what is in none
    contype: str | None  # a constraint's type ('c', 'f', 'n', 'p', 'u', 't', 'x')
    extension_member: bool  # read for the portable view only

    def _printed(self, template: str) -> str:
        return f"{self.kind} " + template.format_map({k: "" if v is None else v for k, v in self.fields.items()})

    @property
    def line(self) -> str:
        return self._printed(_BY_NAME[self.kind].line)

    @property
    def portable_line(self) -> str:
        return self._printed(_BY_NAME[self.kind].portable or _BY_NAME[self.kind].line)

    @property
    def alike_across_majors(self) -> bool:
        """Printed alike by every major, or left out of the portable view: objects
        extensions own (their versions differ between majors), NOT NULL constraints (18
        lists them as constraints, of columns and of domains; the columns and domains
        say NOT NULL on every major) and the public schema (15 changed its owner and
        rights)."""
        return not (
            self.extension_member
            or (self.kind == "constraint" and self.contype == "n")
            or (self.kind == "schema" and self.namespace == "public")
        )


_BY_NAME = {kind.name: kind for kind in KINDS}


DEFAULT_SEARCH_PATH = '"$user", public'


@contextmanager
def _settings(conn, wanted: Mapping[str, str]) -> Iterator[None]:
    """Session settings for a while, put back after."""
    before = {name: scalar(conn, "SELECT current_setting(%s)", (name,)) for name in wanted}
    changed = [name for name, value in wanted.items() if before[name] != value]
    for name in changed:
        scalar(conn, "SELECT set_config(%s, %s, false)", (name, wanted[name]))
    try:
        yield
    finally:
        for name in changed:
            scalar(conn, "SELECT set_config(%s, %s, false)", (name, before[name]))


def schema_objects(conn, *, portable: bool = False) -> list[SchemaObject]:
    """Every catalog object of the database's own schemas. The catalog's text names
    objects relative to the search_path and quotes names by quote_all_identifiers; a
    database or role setting must not change a digest, so both are read at PostgreSQL's
    defaults, whatever the session's are. ``portable``: read for the view two majors
    print alike, with every identifier quoted (which names need quotes depends on the
    major's keywords) and the facts that view leaves objects out by."""
    wanted = {"search_path": DEFAULT_SEARCH_PATH, "quote_all_identifiers": "on" if portable else "off"}
    found = []
    with _settings(conn, wanted), conn.cursor() as cur:
        for kind in KINDS:
            cur.execute(kind.statement(portable))
            names = [d.name for d in cur.description]
            for row in cur.fetchall():
                values = dict(zip(names, row, strict=True))
                found.append(
                    SchemaObject(
                        kind=kind.name,
                        fields={k: values[k] for k in (*kind.columns, *kind.portable_columns)},
                        namespace=values["namespace"],
                        contype=values["contype"],
                        extension_member=bool(values["member"]),
                    )
                )
    return found


def schema_lines(conn) -> list[str]:
    """The schema, exactly, as this server prints it: what a schema digest is made of."""
    return sorted(o.line for o in schema_objects(conn))


def portable_schema_lines(conn) -> list[str]:
    """The schema as two majors print it alike (14 to 18), to compare a database with
    its copy on another major: every identifier quoted, rights without MAINTAIN (17
    added it to every owner's rights), extensions without their versions, views
    without their text (16 stopped qualifying column names; their names and columns
    stay compared), and what SchemaObject.alike_across_majors leaves out."""
    return sorted(o.portable_line for o in schema_objects(conn, portable=True) if o.alike_across_majors)


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


CHUNK_BLOCKS = 4096  # 32 MiB of a table read at a time by a reading that yields (see table_content)


def table_content(conn, schema: str, name: str, row_hash: str | None = None, *, pause: Callable[[], None] | None = None) -> str:
    """Order-independent hash of every row of one table: ``count:sum`` of each row's hash,
    made ``row_hash``'s way (lib/pg/rowhash.py; by default, this server's). With ``pause``
    (on 14 and later, which scan a range of pages by itself), the table is read
    CHUNK_BLOCKS pages at a time and ``pause`` called before each: a background reading
    stops there when a foreground operation starts. Sums add up, so the result is the same."""
    expression = row_hash_sql(conn, schema, name, row_hash or row_hash_for(conn))
    table = sql.SQL("SELECT count(*), coalesce(sum({}), 0) FROM ONLY {}.{} t").format(
        expression, sql.Identifier(schema), sql.Identifier(name)
    )
    if pause is None or conn.server_version < 140000:
        if pause is not None:
            pause()  # before 14 a range of pages costs a whole scan: the table is read whole
        count, total = query(conn, table)[0]
        return f"{count}:{int(total)}"
    blocks = scalar(
        conn,
        "SELECT pg_relation_size(c.oid) / current_setting('block_size')::int "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    )
    count = total = 0
    for first in range(0, max(int(blocks), 1), CHUNK_BLOCKS):
        pause()
        last = first + CHUNK_BLOCKS >= blocks  # open-ended: pages past the size read at the start too
        bounds = sql.SQL(" WHERE t.ctid >= {}::tid").format(sql.Literal(f"({first},0)"))
        if not last:
            bounds += sql.SQL(" AND t.ctid < {}::tid").format(sql.Literal(f"({first + CHUNK_BLOCKS},0)"))
        n, h = query(conn, table + bounds)[0]  # no parameters: the row hash may hold format('%L', ...)
        count, total = count + int(n), total + int(h)
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
    each table's TOAST under the table's key and " (toast)"): [file node, bytes of its
    main fork], and "unlogged" third for an UNLOGGED one (crash recovery empties those,
    point copies included). A copy made by the server has the same; a table truncated, rewritten or
    grown behind the toolkit's back has not."""
    rows = query(
        conn,
        f"""
        SELECT n.nspname, c.relname, '', pg_relation_filenode(c.oid), pg_relation_size(c.oid), c.relpersistence = 'u'
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'i', 'm', 'S') AND {USER_NAMESPACES}
        UNION ALL
        SELECT n.nspname, c.relname, '{TOAST_SUFFIX}', pg_relation_filenode(c.reltoastrelid), pg_relation_size(c.reltoastrelid),
               c.relpersistence = 'u'
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.reltoastrelid <> 0 AND {USER_NAMESPACES}""",
    )
    return {
        qualified(schema, name) + suffix: [int(node or 0), int(size)] + (["unlogged"] if unlogged else [])
        for schema, name, suffix, node, size, unlogged in rows
    }


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
    database's, as sentences; only what was recorded is compared. Recorded keys are read
    as ``current_key`` reads them, so a point taken before keys were quoted compares alike."""
    problems: list[str] = []
    if "schema_digest" in expected and expected["schema_digest"] != actual.schema_digest:
        problems.append(
            f"schema digest differs ({expected.get('schema_objects')} objects recorded, {actual.schema_objects} found)"
        )
    if "row_counts" in expected and actual.row_counts is not None:
        want = rekeyed(expected["row_counts"], actual.row_counts)
        for table in sorted(set(want) | set(actual.row_counts)):
            a, b = want.get(table), actual.row_counts.get(table)
            if a != b:
                problems.append(
                    f"{table}: {a if a is not None else 'absent'} rows recorded, {b if b is not None else 'absent'} found"
                )
    if "relations" in expected and actual.relations is not None:
        problems += _file_differences(rekeyed(expected["relations"], actual.relations, relation=True), actual.relations)
    if "content" in expected and actual.content:
        want_content = rekeyed(expected["content"], actual.content)
        for table in sorted(set(want_content) | set(actual.content)):
            if want_content.get(table) != actual.content.get(table):
                problems.append(f"{table}: the rows' content differs from what was read before")
    want_seq = rekeyed(expected["sequences"], actual.sequences) if expected.get("sequences") is not None else None
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
