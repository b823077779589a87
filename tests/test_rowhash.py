"""Row hashes tell apart every two values that print differently, on every major: the
``columns`` way takes a column as it is only where its type's hash is exact, and its text
where equal values can print differently (lib/pg/rowhash.py)."""

from __future__ import annotations

from contextlib import closing

import pytest

from lib.pg import fingerprint
from lib.pg.fingerprint import table_content
from lib.pg.rowhash import COLUMNS, ROW_HASHES, row_hash_for

# column type, a value, a value equal to it by the type's equality (or its hash) that prints differently
EQUAL_BUT_PRINTED_APART = [
    ("numeric", "1.0", "1.00"),
    ("numeric[]", "{1.0}", "{1.00}"),
    ("float8", "0", "-0"),
    ("float4", "0", "-0"),
    ("jsonb", '{"a": 1.0}', '{"a": 1.00}'),
    ("interval", "1 day", "24 hours"),
    ("bpchar", "a", "a "),
    ("padded", "a", "a "),  # a domain over bpchar
    ("timetz", "12:00+01", "11:00+00"),
    ("text", "", None),
    ("int4", "0", None),
    ("numeric(6,2)", "1.5", "1.25"),
    ("char(3)", "a", "b"),
    ("mood", "sad", "happy"),
    ("uuid", "00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002"),
    ("timestamptz", "2026-01-01 00:00+00", "infinity"),
    ("bytea", "\\x00", "\\x0000"),
]


@pytest.fixture
def scratch(server):
    conn = server.connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP SCHEMA IF EXISTS rowhash CASCADE; CREATE SCHEMA rowhash")
        cur.execute("CREATE TYPE rowhash.mood AS ENUM ('sad', 'happy')")
        cur.execute("CREATE DOMAIN rowhash.padded AS bpchar")
    try:
        yield conn
    finally:
        with conn.cursor() as cur:
            cur.execute("DROP SCHEMA rowhash CASCADE")
        conn.close()


def _contents(conn, column_type: str, values: list) -> list[dict]:
    """For each value in turn, the table's content by every way of hashing."""
    with conn.cursor() as cur:
        cur.execute("SET search_path = rowhash, public")
        cur.execute(f"CREATE TABLE rowhash.t (id int, v {column_type}, w text DEFAULT 'same')")
        found = []
        for value in values:
            cur.execute("TRUNCATE rowhash.t")
            cur.execute("INSERT INTO rowhash.t (id, v) VALUES (1, %s)", (value,))
            found.append({way: table_content(conn, "rowhash", "t", way) for way in ROW_HASHES})
        cur.execute("DROP TABLE rowhash.t")
        cur.execute("RESET search_path")
    return found


@pytest.mark.parametrize(("column_type", "a", "b"), EQUAL_BUT_PRINTED_APART, ids=[c[0] for c in EQUAL_BUT_PRINTED_APART])
def test_values_that_print_differently_hash_differently(scratch, column_type, a, b):
    same_a, again_a, other = _contents(scratch, column_type, [a, a, b])
    assert same_a == again_a  # the same row hashes the same every time
    for way in ROW_HASHES:
        assert same_a[way] != other[way], f"{way}: {a!r} and {b!r} as {column_type}"


@pytest.mark.servers(15)  # Debian's build has ICU (the embedded 18 has not)
@pytest.mark.parametrize("column_type", ['text COLLATE "ci"', 'char(3) COLLATE "ci"', "bpchar COLLATE ci", "ci_text"])
def test_a_nondeterministic_collation_is_hashed_by_its_text(scratch, column_type):
    with scratch.cursor() as cur:
        cur.execute("CREATE COLLATION rowhash.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
        cur.execute("CREATE DOMAIN rowhash.ci_text AS text COLLATE rowhash.ci")
    upper, lower = _contents(scratch, column_type, ["A", "a"])
    assert upper[COLUMNS] != lower[COLUMNS]


SWAPS = [
    ("text", "'a'", "'b'"),
    ("int", "1", "2"),
    ("text", "'a'", "NULL"),
    ("numeric", "1.5", "2.5"),
]


@pytest.mark.parametrize(("column_type", "a", "b"), SWAPS, ids=[f"{c}-{b}" for c, _, b in SWAPS])
def test_values_swapped_between_rows_change_the_tables_hash(scratch, column_type, a, b):
    """A row's columns combine linearly in hash_record_extended: without mixing each row's
    hash again, values swapped between rows would leave the table's sum unchanged."""
    with scratch.cursor() as cur:
        cur.execute(f"CREATE TABLE rowhash.s (id int, v {column_type})")
        cur.execute(f"INSERT INTO rowhash.s VALUES (1, {a}), (2, {b})")
        before = {way: table_content(scratch, "rowhash", "s", way) for way in ROW_HASHES}
        cur.execute(f"UPDATE rowhash.s SET v = CASE id WHEN 1 THEN {b} ELSE {a} END")
        after = {way: table_content(scratch, "rowhash", "s", way) for way in ROW_HASHES}
    for way in ROW_HASHES:
        assert before[way] != after[way], way


def test_the_server_hashes_columns_from_14_on(server):
    with closing(server.connect()) as conn:
        assert row_hash_for(conn) == (COLUMNS if server.major >= 14 else "hashtext")


def test_a_table_read_in_chunks_hashes_as_read_whole(scratch, monkeypatch):
    """A background reading pauses between chunks of pages: the chunks' sums are the whole's."""
    monkeypatch.setattr(fingerprint, "CHUNK_BLOCKS", 3)
    with scratch.cursor() as cur:
        cur.execute(
            "CREATE TABLE rowhash.big AS SELECT g AS id, repeat('x', g % 300) AS pad, (g % 7)::text::bpchar AS c "
            "FROM generate_series(1, 3000) g"
        )
        cur.execute("SELECT pg_relation_size('rowhash.big') / current_setting('block_size')::int")
        blocks = cur.fetchone()[0]
    assert blocks > 10
    pauses = []
    for way in ROW_HASHES:
        whole = table_content(scratch, "rowhash", "big", way)
        chunked = table_content(scratch, "rowhash", "big", way, pause=lambda: pauses.append(1))
        assert chunked == whole and whole.startswith("3000:"), way
    assert len(pauses) == len(ROW_HASHES) * -(-blocks // 3)


def test_a_background_reading_stops_for_a_foreground_operation_and_reads_whole_after(scratch, server):
    """read_rows(yield_to=key) stops before its next chunk while another session holds the
    lock ``key`` (every operation on staging holds its DatabaseLock), so that the
    background lets go of everything at once; once the lock is free it reads every row."""
    from lib.errors import Yielded
    from lib.points.reading import read_rows

    key = 4242424242
    with scratch.cursor() as cur:
        cur.execute("CREATE TABLE rowhash.r AS SELECT g AS id FROM generate_series(1, 1000) g")
        cur.execute("SELECT pg_advisory_lock(%s)", (key,))
    with closing(server.connect()) as reader:
        with pytest.raises(Yielded):
            read_rows(reader, "the test", background=True, yield_to=key)
        with scratch.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
        reading = read_rows(reader, "the test", background=True, yield_to=key)
    assert reading.row_counts["rowhash.r"] == 1000
