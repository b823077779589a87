"""How one row of a table becomes a 64-bit number, summed over the table to compare two
copies' rows without sorting them (lib/pg/fingerprint.py ``table_content``).

Three ways, each named in the baselines it made, as a baseline is only ever compared with
a reading made the same way:

- ``md5``: the first 60 bits of the md5 of the row's text (every column as PostgreSQL
  prints it). Baselines read before the others existed carry it.
- ``hashtext``: PostgreSQL's own 64-bit ``hashtextextended`` of the row's text; about
  40 % of md5's cost. Used on servers before 14.
- ``columns`` (14 and later): ``hash_record_extended`` over the row's columns, mixed
  once more by ``hashint8extended`` (the record hash is linear in its columns), each
  column taken as it is where its type's hash is exact (equal hashes input only for
  identical values: integers, booleans, bytea, uuid, dates and times, text under a
  deterministic collation, numeric and char with a declared scale or length) and as
  its text otherwise (unconstrained numeric, where 1.0 = 1.00; floats, where -0 = 0;
  jsonb, where 1.0 = 1.00 inside; intervals, where '1 day' = '24 hours'; enums, whose
  hash is of an oid that a copy made by a dump would not keep; everything else).
  Printing a row is what costs: this prints only the columns that need it, and is two
  to three times faster than ``hashtext`` on ordinary tables.

Every way tells a changed row apart with the odds of a 60- or 64-bit collision, and
none of them is a defence against someone crafting a collision on purpose.
"""

from __future__ import annotations

from psycopg2 import sql

from lib.pg.db import query

MD5, HASHTEXT, COLUMNS = "md5", "hashtext", "columns"
ROW_HASHES = (MD5, HASHTEXT, COLUMNS)

# type oids whose hash is exact, taken as they are (bool, bytea, "char", name, int8,
# int2, int4, text, oid, varchar, date, time, timestamp, timestamptz, uuid)
_EXACT = {16, 17, 18, 19, 20, 21, 23, 25, 26, 1043, 1082, 1083, 1114, 1184, 2950}
_WITH_TYPMOD = {1042, 1700}  # bpchar and numeric: exact only with a declared length or scale
_COLLATABLE = {19, 25, 1042, 1043}


def row_hash_for(conn) -> str:
    """The way new readings on this server hash rows."""
    return COLUMNS if conn.server_version >= 140000 else HASHTEXT


def _columns(conn, schema: str, name: str) -> sql.Composable:
    rows = query(
        conn,
        """
        SELECT a.attname, a.atttypid::int, a.atttypmod, t.typtype, coalesce(co.collisdeterministic, true)
          FROM pg_attribute a
          JOIN pg_type t ON t.oid = a.atttypid
          LEFT JOIN pg_collation co ON co.oid = a.attcollation
         WHERE a.attrelid = (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                              WHERE n.nspname = %s AND c.relname = %s)
           AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum""",
        (schema, name),
    )
    if not rows:
        return sql.SQL("0::bigint")
    parts = []
    for column, type_oid, typmod, typtype, deterministic in rows:
        ident = sql.SQL("t.{}").format(sql.Identifier(column))
        exact = (type_oid in _EXACT or (type_oid in _WITH_TYPMOD and typmod >= 0)) and (
            deterministic or type_oid not in _COLLATABLE
        )
        # format('%L') prints through the type's output function (a cast to text may drop
        # a bpchar's trailing blanks); ::text is cheaper and exact for everything else. The
        # text is hashed under "C": a column's nondeterministic collation would hash 'A' as 'a'
        printed = "format('%L', {})" if type_oid == 1042 or typtype == "d" else "{}::text"
        text = sql.SQL("(" + printed + ' COLLATE "C")')
        parts.append(ident if exact else text.format(ident))
    # hash_record_extended combines its columns linearly (h * 31 + column), so a sum of it
    # over the rows would be a sum per column, blind to values swapped between rows: each
    # row's hash is mixed once more (hashint8extended) before the sum
    return sql.SQL("hashint8extended(hash_record_extended(ROW({}), 0), 0)").format(sql.SQL(", ").join(parts))


def row_hash_sql(conn, schema: str, name: str, row_hash: str) -> sql.Composable:
    """The expression over ``t`` (a row of ``schema.name``) that hashes it ``row_hash``'s way."""
    if row_hash == MD5:
        return sql.SQL("('x' || substr(md5(t::text), 1, 15))::bit(60)::bigint")
    if row_hash == HASHTEXT:
        return sql.SQL("hashtextextended(t::text, 0)")
    if row_hash == COLUMNS:
        return _columns(conn, schema, name)
    raise ValueError(f"unknown row hash {row_hash!r}")
