"""Hostile schemas for the property tests (tests/test_generated_schemas.py).

``schemas()`` is a Hypothesis strategy for a ``GeneratedSchema``: the SQL that builds
a schema with its rows in an empty database, and the statements that change those rows
afterwards, as a migration would. What it builds is chosen by ``features`` (a set of
FEATURES); names, types, values, row counts and the changes are drawn, each shrinking
towards the plain case (``public``, a lower-case word, integer, no rows), so that a
failure shrinks to the few objects that cause it.

Always drawn: zero to two schemas besides public and zero to two plain tables, keyed
by a text key, serial, identity, a composite key or nothing, with columns of any type
(NOT NULL, DEFAULT) and a few rows. Every name (schemas, tables, columns, constraints,
types, functions, triggers, policies) is hostile: spaces, quotes, dots, capitals,
non-ASCII letters, reserved words. The types (BUILTIN_TYPES) come with edge values:
numeric NaN and infinities, float infinities, NaN and -0, empty arrays, arrays with
NULLs and other lower bounds, ranges and multiranges, jsonb, json, bytea, inet, cidr,
macaddr, tsvector, a type without equality (point), text that COPY must escape, and
values stored out of line. The features add: user types (an enum with an added label,
a domain with a CHECK, a domain NOT NULL, a composite type), identity columns, a
stored generated column, a partitioned table (default partition, a partition attached
with its own column order, a partition partitioned again), inheritance, a table
without a key holding duplicate rows, foreign keys (self-referencing, a deferrable
cycle of two tables, one NOT VALID over orphans), views and materialized views (with
and without data), functions and a procedure, triggers (each enabled as usual, always,
for replicas only or disabled), comments, row-level security, a NOT VALID CHECK over
rows that violate it, a standalone sequence, a table of no columns, a dropped column,
an UNLOGGED table, and a table with a column of every type.

``database_state()`` reads back what a restore must bring back: every table's rows as
an md5 of its rows' text in a fixed order, every sequence's position, and a listing of
the catalogs. It owes nothing to the toolkit's own fingerprint (lib/pg/fingerprint.py),
so a bug there cannot hide a bug in a restore."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import strategies as st
from psycopg2 import sql

# ---------------------------------------------------------------- SQL text


def quote(name: str) -> str:
    """An identifier as SQL writes it: always quoted, inner quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A string constant (standard_conforming_strings, the default since 9.1)."""
    return "'" + text.replace("'", "''") + "'"


def qualified(schema: str, name: str) -> str:
    return f"{quote(schema)}.{quote(name)}"


# ---------------------------------------------------------------- names

PLAIN_WORDS = ("orders", "line", "x", "data", "log", "kunde")
RESERVED_WORDS = (
    "select", "table", "user", "order", "group", "from", "check", "default",
    "limit", "all", "end", "primary", "references", "only", "window", "analyse",
)  # fmt: skip
FOREIGN_WORDS = ("Ü", "é", "straße", "客户", "Ωμέγα", "naïve", "データ", "ñandú")
# between words: a plain underscore first (what shrinking goes to), then what breaks
# naive quoting and splitting: spaces, dots, quotes, and a quote-dot-quote that reads
# like two quoted names
JOINERS = ("_", " ", ".", '"', "'", "-", " . ", '"."')
ENDINGS = ("", " ", ".", '"')  # a name that ends in a space is not the same name trimmed


@st.composite
def identifiers(draw) -> str:
    """A name for a schema, table, column or any other object: one to three words
    (plain, reserved, non-ASCII) joined by hostile characters, in any case. At most 37
    bytes, so that a numbered suffix still fits PostgreSQL's 63."""
    word = st.one_of(st.sampled_from(PLAIN_WORDS), st.sampled_from(RESERVED_WORDS), st.sampled_from(FOREIGN_WORDS))
    words = draw(st.lists(word, min_size=1, max_size=3))
    name = words[0]
    for more in words[1:]:
        name += draw(st.sampled_from(JOINERS)) + more
    name += draw(st.sampled_from(ENDINGS))
    return draw(st.sampled_from((str, str.title, str.upper)))(name)


class Names:
    """Fresh names: unique within a space (a schema's relations and types, a table's
    columns), where PostgreSQL needs them unique; a repeat gets a number."""

    def __init__(self, draw) -> None:
        self.draw = draw
        self.taken: set[tuple[str, str]] = set()

    def __call__(self, space: str) -> str:
        name = base = self.draw(identifiers())
        n = 2
        while (space, name) in self.taken:
            name, n = f"{base} {n}", n + 1
        self.taken.add((space, name))
        return name


# ---------------------------------------------------------------- types and values


@dataclass(frozen=True)
class ColumnType:
    """A type as DDL writes it, and SQL expressions of that type, edge values first."""

    sql: str
    values: tuple[str, ...]
    nullable: bool = True  # False for a domain NOT NULL


def typed(sql_type: str, *texts: str) -> ColumnType:
    return ColumnType(sql_type, tuple(f"{literal(t)}::{sql_type}" for t in texts))


TEXT_VALUES = (
    "", "it's", 'dq"uote', "back\\slash", "tab\there\nnew line", "\\N", "\\.", "NULL",
    "客户 Ü ß ✓", "a,b;c|d", "(1,2)", "{}",
)  # fmt: skip
TEXT = ColumnType("text", (*(literal(t) for t in TEXT_VALUES), f"repeat({literal('€ü')}, 3000)"))
BUILTIN_TYPES = (
    typed("integer", "0", "-2147483648", "2147483647", "42"),
    TEXT,
    typed("bigint", "-9223372036854775808", "9223372036854775807", "-1"),
    typed("smallint", "-32768", "32767"),
    typed("numeric", "NaN", "Infinity", "-Infinity", "-0.00", "123456789012345678901234567890.123456789", "1e-20"),
    typed("numeric(7,3)", "1234.567", "-0.001", "NaN"),
    typed("real", "Infinity", "-Infinity", "NaN", "-0", "1.17549435e-38", "3.4028235e38"),
    typed("double precision", "Infinity", "-Infinity", "NaN", "-0", "4.9e-324", "1.7976931348623157e308", "0.1"),
    typed("varchar(12)", "", "twelve chars"),
    typed("character(3)", "a", "", "abc"),
    typed("boolean", "true", "false"),
    typed("date", "infinity", "-infinity", "4713-01-01 BC", "5874897-12-31", "2000-02-29"),
    typed("timestamp", "infinity", "-infinity", "294276-12-31 23:59:59.999999", "4713-01-01 00:00:00 BC"),
    typed("timestamptz", "infinity", "-infinity", "1999-12-31 23:59:59.5+14", "2000-01-01 00:00:00.000001-12"),
    typed("interval", "-178000000 years", "1 mon -1 day 00:00:00.000001", "0"),
    typed("time", "24:00:00", "00:00:00.000001"),
    typed("timetz", "24:00:00+1559", "00:00:00-1559"),
    typed("uuid", "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"),
    typed("jsonb", "{}", "[]", "null", '{"a": [1, null, "x"], "": {"é": true}}', "1e300", '"\\u00e9 \\" q"'),
    typed("json", ' { "a" : 1 , "a" : 2 } ', "[]"),
    typed("bytea", "\\x", "\\x00", "\\xdeadbeef00ff"),
    typed("inet", "192.168.0.1/24", "::1", "::ffff:1.2.3.4"),
    typed("cidr", "10.0.0.0/8", "2001:db8::/32"),
    typed("macaddr", "08:00:2b:01:02:03", "ff:ff:ff:ff:ff:ff"),
    typed("macaddr8", "08:00:2b:01:02:03:04:05"),
    typed("tsvector", "", "a fat cat", "'quoted '' word':1A,2B b:3"),
    typed("bit varying(8)", "", "1010"),
    typed("bit(4)", "1010"),
    typed("point", "(0,0)", "(-0,NaN)", "(Infinity,-Infinity)"),  # no equality operator
    typed("integer[]", "{}", "{NULL}", "{1,NULL,3}", "{{1,2},{3,4}}", "[0:1]={5,6}"),
    typed("text[]", "{}", '{"",NULL,"a b","q\\"uote","NULL"}'),
    typed("numeric[]", "{NaN,Infinity,NULL}"),
    typed("int4range", "empty", "[1,5)", "(,)", "[3,3]"),
    typed("numrange", "(,1.5]", "empty"),
    typed("tstzrange", "[-infinity,infinity)", "empty"),
    typed("daterange", "[2000-01-01,infinity)"),
    typed("int4multirange", "{}", "{[1,3),[5,7)}"),
)
ENUM_LABELS = ("new", "paid ✓", "it's", 'dq"', "Ü", " lead", "UPPER", "a,b", "NULL", "")
KEY_PREFIXES = ("k", "it's", "Ü ß", "a,b", "\\N", "", " ", "(")
COMMENTS = ("a comment", "", "it's", "line\nbreak", "客户 ✓", "\\x00 not bytes", "-- not a comment */")
SMALL = ("-3", "0", "1", "7", "1000")
POSITIVE = ("1", "7", "1000")


# ---------------------------------------------------------------- the model


@dataclass
class Column:
    name: str
    type: ColumnType
    clause: str = ""  # NOT NULL, DEFAULT, PRIMARY KEY, GENERATED ..., REFERENCES ...
    given: bool = True  # an INSERT gives it a value (not an identity ALWAYS or a generated column)
    not_null: bool = False
    inherited: bool = False  # from a parent: not in this table's CREATE TABLE
    per_row: Callable[[int], str] | None = None  # the value of row i where its place decides it (keys)
    for_changes: tuple[str, ...] | None = None  # what rows added later take, where it differs

    def values(self) -> st.SearchStrategy[str]:
        choices = st.sampled_from(self.type.values)
        return choices if self.not_null or not self.type.nullable else st.one_of(choices, st.just("NULL"))


@dataclass
class Table:
    schema: str
    name: str
    columns: list[Column] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)  # table constraints in CREATE TABLE
    suffix: str = ""  # INHERITS (...), PARTITION BY ...
    unlogged: bool = False
    key: Column | None = None  # one column whose values are unique
    number: Column | None = None  # a small integer column (generated columns and checks use it)
    rows: list[list[str]] = field(default_factory=list)
    then: list[str] = field(default_factory=list)  # right after CREATE TABLE (partitions)

    @property
    def ident(self) -> str:
        return qualified(self.schema, self.name)

    def given(self) -> list[Column]:
        return [c for c in self.columns if c.given]

    def create(self) -> str:
        parts = [f"{quote(c.name)} {c.type.sql}{' ' + c.clause if c.clause else ''}" for c in self.columns if not c.inherited]
        kind = "UNLOGGED TABLE" if self.unlogged else "TABLE"
        return f"CREATE {kind} {self.ident} ({', '.join(parts + self.constraints)}){self.suffix}"

    def insert(self, values: list[str]) -> str:
        columns = self.given()
        if not columns:
            return f"INSERT INTO {self.ident} DEFAULT VALUES"
        return f"INSERT INTO {self.ident} ({', '.join(quote(c.name) for c in columns)}) VALUES ({', '.join(values)})"


class Builder:
    """One schema being drawn: its statements by phase, its tables, and the changes."""

    PHASES = ("schemas", "types", "functions", "sequences", "tables", "rows", "after rows", "late", "comments", "positions")

    def __init__(self, draw) -> None:
        self.draw = draw
        self.name = Names(draw)
        self.statements: dict[str, list[str]] = {p: [] for p in self.PHASES}
        self.types: list[ColumnType] = list(BUILTIN_TYPES)
        self.schemas = ["public"]
        self.tables: list[Table] = []  # in creation order; rows drawn for each
        self.base: list[Table] = []  # the plain tables features may add to
        self.shape_last: list[Callable[[], None]] = []  # once every feature has made its objects
        self.after_rows: list[Callable[[], None]] = []
        self.late: list[Callable[[], None]] = []
        self.commentable: list[str] = []
        self.changes: list[str] = []  # always made, last: each adds a row no one had
        self.optional_changes: list[str] = []  # drawn, made first: updates and deletes

    def emit(self, phase: str, statement: str) -> None:
        self.statements[phase].append(statement)

    def schema(self) -> str:
        return self.draw(st.sampled_from(self.schemas))

    def table(self) -> Table:
        schema = self.schema()
        t = Table(schema, self.name(schema))
        self.commentable.append(f"TABLE {t.ident}")
        return t

    def column(self, table: Table, type_: ColumnType, **kwargs) -> Column:
        c = Column(self.name(table.ident), type_, **kwargs)
        table.columns.append(c)
        return c

    def comment_column(self, table: Table, column: Column) -> None:
        self.commentable.append(f"COLUMN {table.ident}.{quote(column.name)}")

    def target(self) -> Table:
        """A plain table for a feature to add to: one of the base tables, or a new one."""
        if not self.base:
            base_table(self)
        return self.draw(st.sampled_from(self.base))

    def number_column(self, table: Table) -> Column:
        if table.number is None:
            table.number = self.column(table, ColumnType("integer", SMALL))
            self.comment_column(table, table.number)
        return table.number

    def new_row(self, table: Table, i: int, *, later: bool = False, override: dict[str, str] | None = None) -> list[str]:
        """Row ``i``'s values for the columns an INSERT gives; ``later``: a row added after the point."""
        return [self.value(c, i, later, override or {}) for c in table.given()]

    def value(self, c: Column, i: int, later: bool, override: dict[str, str]) -> str:
        if c.name in override:
            return override[c.name]
        if later and c.for_changes is not None:
            return self.draw(st.sampled_from(c.for_changes))
        return c.per_row(i) if c.per_row else self.draw(c.values())

    def add_rows(self, table: Table, count: int) -> None:
        start = len(table.rows)
        table.rows += [self.new_row(table, start + i) for i in range(count)]

    def update(self, table: Table, values: dict[str, str], where: str) -> str:
        """An UPDATE of the rows ``where`` says; columns whose later rows obey a rule of
        their own (a NOT VALID check) are set to obey it too, as an update must."""
        for c in table.given():
            if c.for_changes is not None and c.name not in values:
                values[c.name] = self.draw(st.sampled_from(c.for_changes))
        assignments = ", ".join(f"{quote(name)} = {value}" for name, value in values.items())
        return f"UPDATE ONLY {table.ident} SET {assignments} WHERE {where}"

    def ctid(self, table: Table, pick: str = "min") -> str:
        return f"ctid = (SELECT {pick}(ctid) FROM ONLY {table.ident})"

    def plain_changes(self, table: Table) -> None:
        """A row added (always; two where the table has no key, so that a deleted row
        cannot be the one added again), and one updated and one deleted (drawn)."""
        for _ in range(1 if table.key else 2):
            self.changes.append(table.insert(self.new_row(table, 1000 + len(self.changes), later=True)))
        data = [c for c in table.given() if c.per_row is None]
        if data:
            c = self.draw(st.sampled_from(data))
            self.optional_changes.append(self.update(table, {c.name: self.value(c, 0, True, {})}, self.ctid(table, "max")))
        self.optional_changes.append(f"DELETE FROM ONLY {table.ident} WHERE {self.ctid(table)}")


# ---------------------------------------------------------------- plain tables

KEYS = ("natural", "serial", "none", "composite", "identity always", "identity by default")


def base_table(b: Builder, *, key: str | None = None) -> Table:
    """A plain table: a key of one of KEYS, a few columns of any type, a few rows."""
    t = b.table()
    key = key or b.draw(st.sampled_from(KEYS))
    if key == "natural":
        prefix = b.draw(st.sampled_from(KEY_PREFIXES))
        t.key = b.column(t, TEXT, clause="PRIMARY KEY", per_row=lambda i: literal(f"{prefix} {i}"))
    elif key == "serial":
        t.key = b.column(t, ColumnType("serial", ()), clause="PRIMARY KEY", given=False)
    elif key == "identity always":
        t.key = b.column(t, ColumnType("bigint", ()), clause="GENERATED ALWAYS AS IDENTITY PRIMARY KEY", given=False)
    elif key == "identity by default":
        clause = "GENERATED BY DEFAULT AS IDENTITY (START WITH 100 INCREMENT BY 7) PRIMARY KEY"
        t.key = b.column(t, ColumnType("integer", ()), clause=clause, given=False)
    elif key == "composite":
        a = b.column(t, ColumnType("integer", ()), per_row=str)
        c = b.column(t, TEXT, not_null=True)
        t.constraints.append(f"CONSTRAINT {quote(b.name(t.schema))} PRIMARY KEY ({quote(a.name)}, {quote(c.name)})")
    for _ in range(b.draw(st.integers(1 if key == "none" else 0, 3))):
        type_ = b.draw(st.sampled_from(b.types))
        not_null = type_.nullable and b.draw(st.booleans())
        default = f"DEFAULT {b.draw(st.sampled_from(type_.values))}" if b.draw(st.booleans()) else ""
        c = b.column(t, type_, not_null=not_null, clause=" ".join(filter(None, ["NOT NULL" if not_null else "", default])))
        b.comment_column(t, c)
    b.tables.append(t)
    b.base.append(t)
    b.late.append(lambda: b.plain_changes(t))
    return t


def add_plain_rows(b: Builder, t: Table) -> None:
    b.add_rows(t, b.draw(st.integers(0, 4)))


# ---------------------------------------------------------------- features


def user_types(b: Builder) -> None:
    """An enum with a label added before another, a domain with a named CHECK, a domain
    NOT NULL, a composite type; each used by a column."""
    s = b.schema()
    enum = qualified(s, b.name(s))
    labels = b.draw(st.lists(st.sampled_from(ENUM_LABELS), min_size=1, max_size=4, unique=True))
    b.emit("types", f"CREATE TYPE {enum} AS ENUM ({', '.join(literal(x) for x in labels)})")
    added = [x for x in ENUM_LABELS if x not in labels][0]
    b.emit("types", f"ALTER TYPE {enum} ADD VALUE {literal(added)} BEFORE {literal(labels[0])}")
    b.commentable.append(f"TYPE {enum}")

    s = b.schema()
    money = qualified(s, b.name(s))
    b.emit("types", f"CREATE DOMAIN {money} AS numeric(12,2) CONSTRAINT {quote(b.name(s))} CHECK (VALUE >= 0)")
    b.commentable.append(f"DOMAIN {money}")

    s = b.schema()
    word = qualified(s, b.name(s))
    b.emit("types", f"CREATE DOMAIN {word} AS text NOT NULL CHECK (VALUE <> '')")

    s = b.schema()
    composite = qualified(s, b.name(s))
    fields = [b.name(composite) for _ in range(3)]
    b.emit(
        "types", f"CREATE TYPE {composite} AS ({quote(fields[0])} integer, {quote(fields[1])} text, {quote(fields[2])} numeric)"
    )
    b.commentable.append(f"COLUMN {composite}.{quote(fields[1])}")
    fields_values = [st.sampled_from(("NULL", *t.values)) for t in (BUILTIN_TYPES[0], TEXT, BUILTIN_TYPES[4])]
    drawn = b.draw(st.lists(st.tuples(*fields_values), min_size=1, max_size=3))
    rows = [("NULL", "NULL", "NULL"), *drawn]  # all fields NULL: not the same as a NULL composite
    new = [
        ColumnType(enum, tuple(f"{literal(x)}::{enum}" for x in [*labels, added])),
        ColumnType(money, tuple(f"{literal(v)}::{money}" for v in ("0", "0.01", "9999999999.99"))),
        ColumnType(word, tuple(f"{literal(v)}::{word}" for v in ("x", "it's", "客户")), nullable=False),
        ColumnType(composite, tuple(f"ROW({x}, {y}, {z})::{composite}" for x, y, z in rows)),
    ]
    b.types += new
    t = b.target()
    for type_ in new:
        b.comment_column(t, b.column(t, type_))


def identity(b: Builder) -> None:
    """Identity columns: ALWAYS as the key, BY DEFAULT with a start and an increment."""
    t = base_table(b, key="identity always")
    b.column(
        t, ColumnType("smallint", ()), clause="GENERATED BY DEFAULT AS IDENTITY (START WITH -5 INCREMENT BY -3)", given=False
    )


def generated(b: Builder) -> None:
    t = b.target()
    n = b.number_column(t)
    c = b.column(t, ColumnType("integer", ()), clause=f"GENERATED ALWAYS AS ({quote(n.name)} * 2 + 1) STORED", given=False)
    b.comment_column(t, c)


def partitioned(b: Builder) -> None:
    """Range partitions, one attached with its own column order and a dropped column, one
    partitioned again by list with a default, and a default partition; partitions in any
    schema; a primary key over both partition keys, or none."""
    p = b.table()
    k = b.column(p, ColumnType("integer", ()), not_null=True, clause="NOT NULL", per_row=str)
    d = b.column(p, ColumnType("text", tuple(literal(x) for x in KEY_PREFIXES)), not_null=True, clause="NOT NULL")
    v = b.column(p, b.draw(st.sampled_from(b.types)))
    p.suffix = f" PARTITION BY RANGE ({quote(k.name)})"
    if b.draw(st.booleans()):
        p.constraints.append(f"CONSTRAINT {quote(b.name(p.schema))} PRIMARY KEY ({quote(k.name)}, {quote(d.name)})")
    b.tables.append(p)

    def part(bounds: str, suffix: str = "") -> str:
        s = b.schema()
        name = qualified(s, b.name(s))
        p.then.append(f"CREATE TABLE {name} PARTITION OF {p.ident} {bounds}{suffix}")
        return name

    low = part("FOR VALUES FROM (MINVALUE) TO (0)")
    s = b.schema()
    middle = qualified(s, b.name(s))
    junk = b.name(p.ident)
    own = ", ".join(f"{quote(c.name)} {c.type.sql}{' NOT NULL' if 'NOT NULL' in c.clause else ''}" for c in (v, d, k))
    p.then.append(f"CREATE TABLE {middle} ({quote(junk)} integer, {own})")
    p.then.append(f"ALTER TABLE {middle} DROP COLUMN {quote(junk)}")
    p.then.append(f"ALTER TABLE {p.ident} ATTACH PARTITION {middle} FOR VALUES FROM (0) TO (100)")
    upper = part("FOR VALUES FROM (100) TO (200)", f" PARTITION BY LIST ({quote(d.name)})")
    s = b.schema()
    listed = qualified(s, b.name(s))
    chosen = b.draw(st.lists(st.sampled_from(KEY_PREFIXES), min_size=1, max_size=3, unique=True))
    p.then.append(f"CREATE TABLE {listed} PARTITION OF {upper} FOR VALUES IN ({', '.join(literal(x) for x in chosen)})")
    part_default = qualified(s, b.name(s))
    p.then.append(f"CREATE TABLE {part_default} PARTITION OF {upper} DEFAULT")
    last = part("DEFAULT")
    b.commentable += [f"TABLE {low}", f"TABLE {last}"]

    keys = b.draw(st.lists(st.integers(-50, 300), max_size=6, unique=True))
    p.rows = [b.new_row(p, key) for key in keys]
    kq = quote(k.name)

    def changes() -> None:
        b.changes += [p.insert(b.new_row(p, key, later=True)) for key in (-1000, 5000)]
        b.optional_changes.append(f"UPDATE {p.ident} SET {kq} = {kq} + 1000 WHERE {kq} = (SELECT min({kq}) FROM {p.ident})")
        b.optional_changes.append(f"DELETE FROM {p.ident} WHERE {kq} = (SELECT max({kq}) FROM {p.ident} WHERE {kq} < 1000)")

    b.late.append(changes)


def inheritance(b: Builder) -> None:
    """A parent with a CHECK its children inherit, a child with a column of its own (in
    any schema) and an empty child; rows in each."""
    parent = b.table()
    b.column(parent, ColumnType("integer", ()), per_row=str)
    msg = b.column(parent, TEXT)
    parent.constraints.append(f"CONSTRAINT {quote(b.name(parent.ident))} CHECK ({quote(parent.columns[0].name)} > -100000)")
    b.tables.append(parent)
    children = []
    for extra in (True, False):
        child = b.table()
        child.columns = [Column(c.name, c.type, inherited=True, per_row=c.per_row) for c in parent.columns]
        b.name.taken |= {(child.ident, c.name) for c in parent.columns}
        if extra:
            b.comment_column(child, b.column(child, b.draw(st.sampled_from(b.types))))
        child.suffix = f" INHERITS ({parent.ident})"
        b.tables.append(child)
        children.append(child)
    for table, most in ((parent, 3), (children[0], 3), (children[1], 2)):
        b.add_rows(table, b.draw(st.integers(0, most)))

    def changes() -> None:
        b.changes.append(children[0].insert(b.new_row(children[0], 2000, later=True)))
        b.optional_changes.append(f"DELETE FROM ONLY {parent.ident} WHERE {b.ctid(parent)}")
        value = b.draw(msg.values())
        first = quote(parent.columns[0].name)
        b.optional_changes.append(
            f"UPDATE {parent.ident} SET {quote(msg.name)} = {value} WHERE {first} = (SELECT min({first}) FROM {parent.ident})"
        )

    b.late.append(changes)


def duplicates(b: Builder) -> None:
    """A table without a key whose rows repeat."""
    t = b.table()
    for _ in range(b.draw(st.integers(1, 3))):
        b.column(t, b.draw(st.sampled_from(b.types)))
    b.tables.append(t)
    drafts = [b.new_row(t, i) for i in range(b.draw(st.integers(1, 3)))]
    t.rows = [row for row in drafts for _ in range(b.draw(st.integers(2, 3)))]

    def changes() -> None:
        b.changes += [t.insert(drafts[0])] * 2
        b.optional_changes.append(f"DELETE FROM ONLY {t.ident} WHERE {b.ctid(t)}")

    b.late.append(changes)


def foreign_keys(b: Builder) -> None:
    """A self-referencing foreign key whose rows form a cycle; two tables whose
    deferrable foreign keys point at each other; a foreign key added NOT VALID over
    rows that reference nothing."""
    # self-referencing
    keyed = [t for t in b.base if t.key is not None]
    t = b.draw(st.sampled_from(keyed)) if keyed else base_table(b, key="serial")
    key = t.key
    ref_type = {"serial": "integer", "bigint": "bigint"}.get(key.type.sql, key.type.sql)
    action = b.draw(st.sampled_from(("NO ACTION", "CASCADE", "SET NULL")))
    timing = b.draw(st.sampled_from(("", " DEFERRABLE", " DEFERRABLE INITIALLY DEFERRED")))
    fk_name = b.name(t.ident)
    parent = b.column(
        t,
        ColumnType(ref_type, ("NULL",)),
        clause=f"CONSTRAINT {quote(fk_name)} REFERENCES {t.ident} ({quote(key.name)}) ON DELETE {action}{timing}",
    )
    b.commentable.append(f"CONSTRAINT {quote(fk_name)} ON {t.ident}")
    kq, pq = quote(key.name), quote(parent.name)

    def link() -> None:
        b.emit(
            "after rows",
            f"UPDATE ONLY {t.ident} AS x SET {pq} = nxt.k FROM (SELECT {kq} AS me, coalesce(lead({kq}) OVER (ORDER BY {kq}), "
            f"min({kq}) OVER ()) AS k FROM ONLY {t.ident}) AS nxt WHERE x.{kq} = nxt.me",
        )

    b.after_rows.append(link)

    # a cycle of two tables, each row of one referencing a row of the other
    count = b.draw(st.integers(1, 3))
    a, c = b.table(), b.table()
    for table in (a, c):
        table.key = b.column(table, ColumnType("integer", ()), clause="PRIMARY KEY", per_row=lambda i: str(i + 1))
        b.column(table, ColumnType("integer", ()), per_row=lambda i, n=count: str(i % n + 1), for_changes=("NULL",))
        b.comment_column(table, b.column(table, TEXT))
        b.tables.append(table)
        b.add_rows(table, count)
    names = []
    for one, other, action in ((a, c, "SET NULL"), (c, a, "CASCADE")):
        timing = b.draw(st.sampled_from((" DEFERRABLE INITIALLY DEFERRED", " DEFERRABLE INITIALLY IMMEDIATE")))
        names.append(name := b.name(one.ident))
        b.after_rows.append(
            lambda one=one, other=other, name=name, action=action, timing=timing: b.emit(
                "after rows",
                f"ALTER TABLE {one.ident} ADD CONSTRAINT {quote(name)} FOREIGN KEY ({quote(one.columns[1].name)}) "
                f"REFERENCES {other.ident} ({quote(other.key.name)}) ON DELETE {action}{timing}",
            )
        )

    # NOT VALID over orphans
    orphans = b.table()
    ref = b.column(orphans, ColumnType("integer", ()), per_row=lambda i: str(i + 1), for_changes=("NULL", "1"))
    b.column(orphans, TEXT)
    b.tables.append(orphans)
    b.add_rows(orphans, count + 2)
    not_valid = b.name(orphans.ident)
    b.after_rows.append(
        lambda: b.emit(
            "after rows",
            f"ALTER TABLE {orphans.ident} ADD CONSTRAINT {quote(not_valid)} FOREIGN KEY ({quote(ref.name)}) "
            f"REFERENCES {a.ident} ({quote(a.key.name)}) NOT VALID",
        )
    )

    def changes() -> None:
        for table in (a, c, orphans):
            b.changes.append(table.insert(b.new_row(table, 1000 + len(b.changes), later=True)))
        b.optional_changes.append(f"DELETE FROM {c.ident} WHERE {quote(c.key.name)} = {count}")
        b.optional_changes.append(b.update(t, {parent.name: "NULL"}, b.ctid(t)))

    b.late.append(changes)


def views(b: Builder) -> None:
    """A view naming its columns, a view over it, a materialized view with data and an
    index, and one without data."""
    t = b.target()

    def make() -> None:
        s = b.schema()
        view = qualified(s, b.name(s))
        cols = t.columns[:2]
        aliases = ", ".join(quote(b.name(view)) for _ in cols)
        barrier = b.draw(st.sampled_from(("", " WITH (security_barrier = true)")))
        b.emit(
            "late",
            f"CREATE VIEW {view} ({aliases}){barrier} AS SELECT {', '.join(quote(c.name) for c in cols)} FROM ONLY {t.ident}",
        )
        s = b.schema()
        over = qualified(s, b.name(s))
        b.emit("late", f"CREATE VIEW {over} AS SELECT count(*) AS {quote(b.name(over))} FROM {view}")
        s = b.schema()
        mat = qualified(s, b.name(s))
        rows = quote(b.name(mat))
        b.emit("late", f"CREATE MATERIALIZED VIEW {mat} AS SELECT count(*) AS {rows} FROM ONLY {t.ident} WITH DATA")
        b.emit("late", f"CREATE UNIQUE INDEX {quote(b.name(s))} ON {mat} ({rows})")
        s = b.schema()
        empty = qualified(s, b.name(s))
        b.emit("late", f"CREATE MATERIALIZED VIEW {empty} AS SELECT {quote(cols[0].name)} FROM ONLY {t.ident} WITH NO DATA")
        b.commentable += [f"VIEW {view}", f"VIEW {over}", f"MATERIALIZED VIEW {mat}", f"MATERIALIZED VIEW {empty}"]

    b.late.append(make)


def functions(b: Builder) -> None:
    """A SQL function with a named, defaulted argument, a PL/pgSQL one of the same name,
    a procedure, a column default that calls the first, and a function returning a
    table's rows."""
    s = b.schema()
    name = qualified(s, b.name(f"function {s}"))
    arg = quote(b.name(name))
    b.emit(
        "functions",
        f"CREATE FUNCTION {name}(a integer, {arg} text DEFAULT 'it''s') RETURNS text LANGUAGE sql IMMUTABLE "
        f"AS $body$ SELECT {arg} || ':' || a::text $body$",
    )
    b.emit(
        "functions",
        f"CREATE FUNCTION {name}(a text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $body$ BEGIN RETURN reverse(a); END $body$",
    )
    s = b.schema()
    procedure = qualified(s, b.name(f"function {s}"))
    b.emit(
        "functions",
        f"CREATE PROCEDURE {procedure}(INOUT x integer) LANGUAGE plpgsql AS $body$ BEGIN x := x + 1; END $body$",
    )
    b.commentable += [f"FUNCTION {name}(integer, text)", f"FUNCTION {name}(text)", f"PROCEDURE {procedure}(integer)"]
    t = b.target()
    b.comment_column(t, b.column(t, ColumnType("text", ()), clause=f"DEFAULT {name}(7)", given=False))

    def rows_of() -> None:
        s = b.schema()
        fn = qualified(s, b.name(f"function {s}"))
        b.emit(
            "late",
            f"CREATE FUNCTION {fn}() RETURNS SETOF {t.ident} LANGUAGE sql STABLE AS $body$ SELECT * FROM ONLY {t.ident} $body$",
        )
        b.commentable.append(f"FUNCTION {fn}()")

    b.late.append(rows_of)


ENABLED = ("", "ENABLE ALWAYS", "ENABLE REPLICA", "DISABLE")


def triggers(b: Builder) -> None:
    """An audit trigger writing each change to another table, a BEFORE trigger that
    changes the row, a TRUNCATE trigger; each enabled as drawn (always, replica only,
    disabled or as usual)."""
    t = b.target()
    note = b.column(t, TEXT)
    log = b.table()
    for _ in range(3):
        b.column(log, TEXT)
    b.tables.append(log)
    s = b.schema()
    audit, touch, truncated = (qualified(s, b.name(f"function {s}")) for _ in range(3))
    b.emit(
        "functions",
        f"CREATE FUNCTION {audit}() RETURNS trigger LANGUAGE plpgsql AS $body$ BEGIN "
        f"INSERT INTO {log.ident} VALUES (TG_OP, TG_TABLE_NAME, CASE WHEN TG_OP = 'DELETE' THEN OLD::text ELSE NEW::text END); "
        "RETURN NULL; END $body$",
    )
    b.emit(
        "functions",
        f"CREATE FUNCTION {touch}() RETURNS trigger LANGUAGE plpgsql AS $body$ BEGIN "
        f"NEW.{quote(note.name)} := coalesce(NEW.{quote(note.name)}, '') || '+'; RETURN NEW; END $body$",
    )
    b.emit(
        "functions",
        f"CREATE FUNCTION {truncated}() RETURNS trigger LANGUAGE plpgsql AS $body$ BEGIN "
        f"INSERT INTO {log.ident} VALUES (TG_OP, TG_TABLE_NAME, NULL); RETURN NULL; END $body$",
    )
    made = [
        (b.name(t.ident), f"AFTER INSERT OR UPDATE OR DELETE ON {t.ident} FOR EACH ROW EXECUTE FUNCTION {audit}()"),
        (b.name(t.ident), f"BEFORE INSERT OR UPDATE ON {t.ident} FOR EACH ROW EXECUTE FUNCTION {touch}()"),
        (b.name(t.ident), f"AFTER TRUNCATE ON {t.ident} FOR EACH STATEMENT EXECUTE FUNCTION {truncated}()"),
    ]

    def create() -> None:
        for name, what in made:
            b.emit("after rows", f"CREATE TRIGGER {quote(name)} {what}")
            mode = b.draw(st.sampled_from(ENABLED))
            if mode:
                b.emit("after rows", f"ALTER TABLE {t.ident} {mode} TRIGGER {quote(name)}")
            b.commentable.append(f"TRIGGER {quote(name)} ON {t.ident}")

    b.after_rows.append(create)


def row_security(b: Builder) -> None:
    """Row-level security enabled (and forced, or not), a permissive policy for everyone
    and a restrictive one that hides every row from a role."""
    t = b.target()

    def create() -> None:
        b.emit("after rows", f"ALTER TABLE {t.ident} ENABLE ROW LEVEL SECURITY")
        if b.draw(st.booleans()):
            b.emit("after rows", f"ALTER TABLE {t.ident} FORCE ROW LEVEL SECURITY")
        everyone, hidden = b.name(t.ident), b.name(t.ident)
        b.emit(
            "after rows",
            f"CREATE POLICY {quote(everyone)} ON {t.ident} AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true)",
        )
        b.emit(
            "after rows",
            f"CREATE POLICY {quote(hidden)} ON {t.ident} AS RESTRICTIVE FOR SELECT TO rollback_test_reader USING (false)",
        )
        b.commentable += [f"POLICY {quote(everyone)} ON {t.ident}", f"POLICY {quote(hidden)} ON {t.ident}"]

    b.after_rows.append(create)


def not_valid_check(b: Builder) -> None:
    """A CHECK added NOT VALID after rows that violate it were written; rows added later obey it."""
    t = b.target()
    n = b.number_column(t)
    name = b.name(t.ident)

    def create() -> None:
        t.rows.append(b.new_row(t, len(t.rows), override={n.name: "-1"}))  # at least one row that violates it
        b.emit("rows", t.insert(t.rows[-1]))
        b.emit("after rows", f"ALTER TABLE {t.ident} ADD CONSTRAINT {quote(name)} CHECK ({quote(n.name)} > 0) NOT VALID")
        n.for_changes = POSITIVE
        b.commentable.append(f"CONSTRAINT {quote(name)} ON {t.ident}")

    b.after_rows.append(create)


def sequence(b: Builder) -> None:
    """A standalone sequence: smallint, descending, cycling; untouched, advanced, or set
    to be called next."""
    s = b.schema()
    seq = qualified(s, b.name(s))
    b.emit("sequences", f"CREATE SEQUENCE {seq} AS smallint INCREMENT BY -3 MINVALUE -32768 MAXVALUE 10 START WITH 7 CYCLE")
    position = b.draw(st.sampled_from(("untouched", "advanced", "set, not called")))
    if position == "advanced":
        b.emit("positions", f"SELECT nextval({literal(seq)}) FROM generate_series(1, 3)")
    elif position == "set, not called":
        b.emit("positions", f"SELECT setval({literal(seq)}, -20, false)")
    b.commentable.append(f"SEQUENCE {seq}")
    b.changes.append(f"SELECT nextval({literal(seq)})")


def no_columns(b: Builder) -> None:
    """A table of no columns at all, holding rows."""
    t = b.table()
    b.tables.append(t)
    t.rows = [[] for _ in range(b.draw(st.integers(0, 3)))]
    b.changes += [t.insert([])] * 2
    b.optional_changes.append(f"DELETE FROM ONLY {t.ident} WHERE {b.ctid(t)}")


def dropped_column(b: Builder) -> None:
    """A column dropped after rows were written: the table keeps a hole where it was."""
    t = b.target()
    gone = b.column(t, b.draw(st.sampled_from(b.types)))

    def drop() -> None:
        b.emit("after rows", f"ALTER TABLE {t.ident} DROP COLUMN {quote(gone.name)}")
        t.columns.remove(gone)

    b.after_rows.append(drop)


def comments(b: Builder) -> None:
    """Comments (quotes, newlines, non-ASCII, empty) on what the other features made:
    written last, by schemas(), once every object is known."""


def every_type(b: Builder) -> None:
    """A table with a column of every type above (the user types too, where drawn), so
    that each appears in every example that has this feature, with a few rows of edge
    values and NULLs."""
    t = b.table()
    b.column(t, ColumnType("integer", ()), clause="PRIMARY KEY", per_row=str)
    t.key = t.columns[0]

    def columns() -> None:  # after the user types were made
        for type_ in b.types:
            b.column(t, type_)
        b.add_rows(t, b.draw(st.integers(1, 3)))

    b.tables.append(t)
    b.late.append(lambda: b.plain_changes(t))
    b.shape_last.append(columns)


def unlogged(b: Builder) -> None:
    """An UNLOGGED table (its rows are copied too)."""
    t = base_table(b)
    t.unlogged = True


FEATURES: dict[str, Callable[[Builder], None]] = {
    "types": user_types,
    "identity": identity,
    "generated": generated,
    "partitioned": partitioned,
    "inheritance": inheritance,
    "duplicates": duplicates,
    "foreign keys": foreign_keys,
    "views": views,
    "functions": functions,
    "triggers": triggers,
    "comments": comments,
    "row security": row_security,
    "not valid check": not_valid_check,
    "sequence": sequence,
    "no columns": no_columns,
    "dropped column": dropped_column,
    "unlogged": unlogged,
    "every type": every_type,
}
ALL_FEATURES = frozenset(FEATURES)


def feature_sets() -> st.SearchStrategy[frozenset[str]]:
    """Any subset, shrinking towards none: a failure shrinks to the features that cause it."""
    return st.frozensets(st.sampled_from(sorted(FEATURES)))


# ---------------------------------------------------------------- the strategy


@dataclass(frozen=True)
class GeneratedSchema:
    """The statements that build a schema and its rows in an empty database, one by one
    (autocommit), and the changes made to it afterwards, each on its own."""

    features: frozenset[str]
    setup: tuple[str, ...]
    changes: tuple[str, ...]

    def script(self) -> str:
        """A script psql runs as it is (to reproduce a failure by hand)."""
        lines = [f"-- features: {', '.join(sorted(self.features)) or 'none'}", *(s + ";" for s in self.setup)]
        lines += ["-- the changes after the point", *(s + ";" for s in self.changes)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"GeneratedSchema(\n{self.script()}\n)"

    def _repr_pretty_(self, printer, cycle) -> None:  # how Hypothesis prints a falsifying example
        printer.text(repr(self))


@st.composite
def schemas(draw, features: st.SearchStrategy[frozenset[str]] | None = None) -> GeneratedSchema:
    chosen = draw(feature_sets() if features is None else features)
    b = Builder(draw)
    for _ in range(draw(st.integers(0, 2))):
        name = b.name("schemas")
        b.schemas.append(name)
        b.emit("schemas", f"CREATE SCHEMA {quote(name)}")
        b.commentable.append(f"SCHEMA {quote(name)}")
    for _ in range(draw(st.integers(0, 2))):
        base_table(b)
    for name in sorted(chosen):
        FEATURES[name](b)
    for step in b.shape_last:
        step()

    for t in b.base:
        add_plain_rows(b, t)
    for t in b.tables:
        b.emit("tables", t.create())
        b.statements["tables"] += t.then
        b.statements["rows"] += [t.insert(row) for row in t.rows]
    for step in b.after_rows:
        step()
    for step in b.late:
        step()
    if "comments" in chosen:
        for what in b.commentable:
            b.emit("comments", f"COMMENT ON {what} IS {literal(draw(st.sampled_from(COMMENTS)))}")
    optional = draw(st.sets(st.integers(0, len(b.optional_changes) - 1))) if b.optional_changes else set()
    changes = [c for i, c in enumerate(b.optional_changes) if i in optional] + b.changes
    setup = tuple(s for phase in Builder.PHASES for s in b.statements[phase])
    return GeneratedSchema(chosen, setup, tuple(changes))


# ---------------------------------------------------------------- reading a database back

SESSION = (
    "SET TimeZone = 'UTC'",
    "SET DateStyle = 'ISO, YMD'",
    "SET IntervalStyle = 'postgres'",
    "SET extra_float_digits = 1",
    "SET bytea_output = 'hex'",
    "SET search_path = pg_catalog",  # every user object written with its schema
)
USER = "{n}.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND {n}.nspname NOT LIKE 'pg\\_%temp\\_%'"

# NO INHERIT means something for CHECK (and 18's NOT NULL) constraints only: pg_dump
# remakes a partition's primary key with ALTER TABLE ONLY, which sets connoinherit.
CATALOG = {
    "schemas": f"SELECT n.nspname FROM pg_namespace n WHERE {USER.format(n='n')}",
    "relations": f"""
        SELECT n.nspname, c.relname, c.relkind::text, c.relpersistence::text, c.relrowsecurity, c.relforcerowsecurity,
               c.relispopulated, c.relreplident::text, CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
               pg_get_expr(c.relpartbound, c.oid), c.reloptions::text,
               array(SELECT i.inhparent::regclass::text FROM pg_inherits i WHERE i.inhrelid = c.oid ORDER BY i.inhseqno)::text
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'c', 'f') AND {USER.format(n="n")}""",
    "columns": f"""
        SELECT n.nspname, c.relname, row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum), a.attname,
               format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
               a.attidentity::text, a.attgenerated::text, co.collname, a.attislocal, a.attinhcount
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          LEFT JOIN pg_collation co ON co.oid = a.attcollation
         WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'c', 'f') AND {USER.format(n="n")}""",
    "constraints": f"""
        SELECT n.nspname, coalesce(c.relname, t.typname), co.conname, co.contype::text, pg_get_constraintdef(co.oid),
               co.condeferrable, co.condeferred, co.convalidated, co.conislocal, co.coninhcount,
               CASE WHEN co.contype IN ('c', 'n') THEN co.connoinherit END
          FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace
          LEFT JOIN pg_class c ON c.oid = co.conrelid LEFT JOIN pg_type t ON t.oid = co.contypid
         WHERE {USER.format(n="n")} {{not_null}}""",
    "indexes": f"""
        SELECT n.nspname, c.relname, pg_get_indexdef(i.indexrelid), i.indisprimary, i.indisunique
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE {USER.format(n="n")}""",
    "views": f"""
        SELECT n.nspname, c.relname, {{view_text}}
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('v', 'm') AND {USER.format(n="n")}""",
    "functions": f"""
        SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), p.prokind::text,
               CASE WHEN p.prokind <> 'a' THEN pg_get_functiondef(p.oid) END
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE {USER.format(n="n")}""",
    "triggers": f"""
        SELECT n.nspname, c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT t.tgisinternal AND {USER.format(n="n")}""",
    "policies": f"""
        SELECT n.nspname, c.relname, p.polname, p.polcmd::text, p.polpermissive,
               array(SELECT CASE WHEN r = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(r) END FROM unnest(p.polroles) r ORDER BY 1)::text,
               pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
          FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE {USER.format(n="n")}""",
    "enums": f"""
        SELECT n.nspname, t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder)::text
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_enum e ON e.enumtypid = t.oid
         WHERE {USER.format(n="n")} GROUP BY 1, 2""",
    "domains": f"""
        SELECT n.nspname, t.typname, format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typdefault
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE t.typtype = 'd' AND {USER.format(n="n")}""",
    "sequences": f"""
        SELECT n.nspname, c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmax, s.seqmin,
               s.seqcache, s.seqcycle,
               (SELECT d.refobjid::regclass::text || '.' || quote_ident(a.attname) || ' ' || d.deptype::text FROM pg_depend d
                  JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i'))
          FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE {USER.format(n="n")}""",
    "comments": """
        SELECT o.type, o.identity, d.description
          FROM pg_description d, pg_identify_object(d.classoid, d.objoid, d.objsubid) o
         WHERE d.objoid >= 16384""",
}


def _rows(cur, statement) -> list:
    cur.execute(statement)
    return cur.fetchall()


def database_state(conn, *, portable: bool = False) -> dict:
    """Rows (of tables, views and populated materialized views), sequence positions and
    catalogs of a database, to compare two states.

    ``portable``: what must match across two majors (15 and 18), and only that left
    out. PostgreSQL 18 keeps a named NOT NULL constraint in pg_constraint for each NOT
    NULL column (17 for domains too) where 15 keeps only the flag: those rows are left
    out, the flags (attnotnull, typnotnull) are compared on both. 16 stopped qualifying
    column names in a view's text: a view's text is left out, its columns and the rows
    it shows are compared on both."""
    with conn.cursor() as cur:
        for setting in SESSION:
            cur.execute(setting)
        state: dict = {}
        for kind, statement in CATALOG.items():
            statement = statement.replace("{not_null}", "AND co.contype <> 'n'" if portable else "")
            statement = statement.replace("{view_text}", "NULL" if portable else "pg_get_viewdef(c.oid)")
            state[kind] = sorted(tuple(str(v) for v in row) for row in _rows(cur, statement))
        rows, positions = {}, {}
        relations = _rows(
            cur,
            f"""SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE (c.relkind IN ('r', 'v', 'S') OR (c.relkind = 'm' AND c.relispopulated)) AND {USER.format(n="n")}""",
        )
        for schema, name, kind in relations:
            relation = sql.Identifier(schema, name)
            if kind == "S":
                cur.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(relation))
                positions[f"{schema}.{name}"] = cur.fetchone()
            else:
                cur.execute(
                    sql.SQL(
                        "SELECT count(*), md5(coalesce(string_agg(_row::text, E'\\n' ORDER BY _row::text COLLATE \"C\"), '')) "
                        "FROM ONLY {} AS _row"
                    ).format(relation)
                )
                rows[f"{schema}.{name}"] = cur.fetchone()
        state["rows"] = rows
        state["sequence positions"] = positions
    return state


def differences(expected: dict, actual: dict) -> list[str]:
    """What differs between two states, one line each: what is missing, what is extra."""
    found = []
    for kind in sorted(set(expected) | set(actual)):
        want, got = expected.get(kind), actual.get(kind)
        if want == got:
            continue
        if isinstance(want, dict) and isinstance(got, dict):
            for key in sorted(set(want) | set(got)):
                if want.get(key) != got.get(key):
                    found.append(f"{kind} {key}: expected {want.get(key)}, found {got.get(key)}")
        else:
            want_set, got_set = set(want or []), set(got or [])
            found += [f"{kind} missing: {row}" for row in sorted(want_set - got_set)]
            found += [f"{kind} extra: {row}" for row in sorted(got_set - want_set)]
    return found
