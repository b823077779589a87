"""Undo of one captured run (lib/undo): only the run's writes are captured, the undo
puts back exactly what the run changed, keeps every other session's writes, and refuses
(changing nothing) where someone changed a row after the run."""

from __future__ import annotations

from contextlib import closing

import pytest

from lib.errors import UndoRefused
from lib.undo import capture, revert

SCHEMA_SQL = """
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE parent (id int PRIMARY KEY, name text NOT NULL, price numeric, note jsonb, m mood, raw bytea,
                     tags text[], f float8, total numeric GENERATED ALWAYS AS (price * 2) STORED);
CREATE TABLE child (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, parent_id int NOT NULL REFERENCES parent(id),
                    body text);
CREATE TABLE nokey (v int);
INSERT INTO parent (id, name, price, note, m, raw, tags, f) VALUES
  (1, 'one', 1.0, '{"a": 1.0}', 'sad', '\\x00', '{x}', -0.0),
  (2, 'two', 'NaN', null, 'happy', '\\x0102', '{}', 'Infinity'),
  (3, 'three', 3.00, '[]', null, null, null, 1e-300);
INSERT INTO child (parent_id, body) SELECT 1 + g % 3, repeat('b', g * 500) FROM generate_series(1, 6) g;
"""

RUN = "run-001"


def _state(conn) -> dict:
    with conn.cursor() as cur:
        cur.execute("SELECT p::text FROM parent p ORDER BY id")
        parents = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT c::text FROM child c ORDER BY id")
        return {"parent": parents, "child": [r[0] for r in cur.fetchall()]}


@pytest.fixture
def db(staging):
    staging.sql(SCHEMA_SQL)
    with closing(staging.server.connect(staging.name)) as conn:
        conn.autocommit = True
        yield staging, conn


def _capture(conn, tables=(("public", "parent"), ("public", "child"), ("public", "nokey"))):
    usable, without = capture.plan(conn, RUN, list(tables))
    capture.install(conn, RUN, usable)
    return usable, without


def _migrate(staging, statements: list[str]) -> None:
    with closing(staging.server.connect(staging.name)) as run:
        run.autocommit = True
        capture.mark(run, RUN)
        with run.cursor() as cur:
            for s in statements:
                cur.execute(s)


MIGRATION = [
    "INSERT INTO parent (id, name, price) VALUES (10, 'ten', 10.50)",
    "INSERT INTO child (parent_id, body) VALUES (10, 'new child'), (2, 'another')",
    "UPDATE parent SET price = 1.00, note = '{\"a\": 1.00}', name = 'uno' WHERE id = 1",
    "UPDATE child SET body = upper(body) WHERE parent_id = 3",
    "DELETE FROM child WHERE parent_id = 2 AND body LIKE 'bb%'",
    "UPDATE parent SET name = 'ten!' WHERE id = 10",
]


def test_a_table_without_a_key_is_named_and_left_out(db):
    staging, conn = db
    usable, without = _capture(conn)
    assert without == [("public", "nokey")] and {t.name for t in usable} == {"parent", "child"}


@pytest.mark.servers("14", "15", "16", "18")  # the majors the undo is built for
def test_undo_puts_back_exactly_what_the_run_changed_and_keeps_other_sessions_writes(db):
    staging, conn = db
    _capture(conn)
    before = _state(conn)
    _migrate(staging, MIGRATION)
    # another session writes the same tables meanwhile, with nothing to do with the run
    staging.sql("INSERT INTO parent (id, name, price) VALUES (20, 'theirs', 2)")
    staging.sql("UPDATE parent SET name = 'theirs too' WHERE id = 3")
    staging.sql("INSERT INTO child (parent_id, body) VALUES (20, 'their child')")
    theirs = _state(conn)
    assert theirs != before
    capture.finish(conn, RUN)

    dry = revert.undo(conn, RUN, dry_run=True)
    assert not dry.applied and not dry.conflicts and _state(conn) == theirs
    done = revert.undo(conn, RUN)
    assert done.applied and not done.conflicts
    assert done.deleted == {"public.parent": 1, "public.child": 2}
    after = _state(conn)
    # every row the run touched is as before it, every row the other session wrote as it wrote it
    expected_parent = list(before["parent"])
    expected_parent[2] = expected_parent[2].replace("three", '"theirs too"')
    assert after["parent"][:3] == expected_parent
    assert after["parent"][3].startswith("(20,theirs,")
    assert [c for c in after["child"] if "their child" not in c] == before["child"]
    with pytest.raises(UndoRefused, match="undone already"):
        revert.undo(conn, RUN)


def test_a_row_changed_after_the_run_is_a_conflict_and_nothing_changes(db):
    staging, conn = db
    _capture(conn)
    _migrate(staging, MIGRATION)
    capture.finish(conn, RUN)
    staging.sql("UPDATE parent SET name = 'someone else' WHERE id = 1")
    changed = _state(conn)
    result = revert.undo(conn, RUN)
    assert not result.applied and _state(conn) == changed
    assert [(c.table, c.key) for c in result.conflicts] == [("public.parent", {"id": 1})]
    assert "someone else" in result.conflicts[0].now and "uno" in result.conflicts[0].run_wrote
    skipped = revert.undo(conn, RUN, skip_conflicts=True)
    assert skipped.applied and len(skipped.conflicts) == 1
    assert staging.sql("SELECT name FROM parent WHERE id = 1") == [("someone else",)]
    assert staging.sql("SELECT count(*) FROM parent WHERE id = 10") == [(0,)]


def test_only_the_runs_own_session_is_captured_and_a_truncate_refuses_the_undo(db):
    staging, conn = db
    _capture(conn)
    staging.sql("INSERT INTO parent (id, name) VALUES (30, 'not the run')")
    log = capture.log_name(RUN, "public", "parent")
    assert staging.sql(f'SELECT count(*) FROM rollback_toolkit."{log}"') == [(0,)]
    staging.sql("TRUNCATE child")
    with pytest.raises(UndoRefused, match="still being captured"):
        revert.undo(conn, RUN)
    capture.finish(conn, RUN)
    with pytest.raises(UndoRefused, match="truncated"):
        revert.undo(conn, RUN)


def test_the_tables_own_triggers_do_not_fire_again_and_stay_as_they_were(db):
    staging, conn = db
    staging.sql(
        "CREATE TABLE audit_trail (what text);"
        "CREATE FUNCTION note_it() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO audit_trail VALUES (TG_OP); RETURN NULL; END $$;"
        "CREATE TRIGGER noted AFTER INSERT OR UPDATE OR DELETE ON parent FOR EACH ROW EXECUTE FUNCTION note_it();"
        "ALTER TABLE parent ENABLE ALWAYS TRIGGER noted"
    )
    _capture(conn, (("public", "parent"),))
    _migrate(staging, ["INSERT INTO parent (id, name) VALUES (40, 'forty')", "UPDATE parent SET name = 'x' WHERE id = 2"])
    capture.finish(conn, RUN)
    written = staging.sql("SELECT count(*) FROM audit_trail")
    assert written == [(2,)]
    assert revert.undo(conn, RUN).applied
    assert staging.sql("SELECT count(*) FROM audit_trail") == written  # not fired by the undo
    assert staging.sql("SELECT tgenabled FROM pg_trigger WHERE tgname = 'noted'") == [("A",)]


def test_rows_that_moved_between_partitions_move_back(db):
    staging, conn = db
    staging.sql(
        "CREATE TABLE events (id int, region text, body text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);"
        "CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');"
        "CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');"
        "INSERT INTO events SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'e' || g FROM generate_series(1, 10) g"
    )
    before = staging.sql("SELECT tableoid::regclass::text, e::text FROM events e ORDER BY id")
    _capture(conn, (("public", "events"),))
    _migrate(
        staging,
        [
            "UPDATE events SET body = body || '!' WHERE id <= 4",
            "DELETE FROM events WHERE id = 5",
            "INSERT INTO events VALUES (11, 'eu', 'new')",
        ],
    )
    # a key change that moves rows to the other partition counts as a delete and an insert
    with closing(staging.server.connect(staging.name)) as run:
        run.autocommit = True
        capture.mark(run, RUN)
        with run.cursor() as cur:
            cur.execute("UPDATE events SET region = 'eu' WHERE id IN (7, 9)")
    capture.finish(conn, RUN)
    assert staging.sql("SELECT count(*) FROM events_eu") == [(8,)]
    result = revert.undo(conn, RUN)
    assert result.applied and not result.conflicts
    assert staging.sql("SELECT tableoid::regclass::text, e::text FROM events e ORDER BY id") == before


def test_a_row_another_sessions_row_refers_to_is_a_conflict_not_a_failure(db):
    """The run inserted parent 10; another session then gave it a child. Deleting it
    would break that foreign key: a conflict with the server's reason, and with
    --skip-conflicts everything else is undone and parent 10 stays as it is now (a
    conflicting row is left alone whole: the run's later update of it stays too)."""
    staging, conn = db
    _capture(conn)
    _migrate(staging, MIGRATION)
    capture.finish(conn, RUN)
    staging.sql("INSERT INTO child (parent_id, body) VALUES (10, 'theirs, under the run''s parent')")
    refused = revert.undo(conn, RUN)
    assert not refused.applied
    assert [(c.table, c.key) for c in refused.conflicts] == [("public.parent", {"id": 10})]
    assert "foreign key" in refused.conflicts[0].why
    done = revert.undo(conn, RUN, skip_conflicts=True)
    assert done.applied and len(done.conflicts) == 1
    assert staging.sql("SELECT name FROM parent WHERE id IN (1, 10) ORDER BY id") == [("one",), ("ten!",)]


def test_a_row_a_not_valid_constraint_was_never_checked_on_comes_back_and_the_constraint_stays_not_valid(db):
    """Found by the generated schemas: the run deleted a row that breaks a NOT VALID
    CHECK (and one that breaks a NOT VALID foreign key); putting them back must not
    check them, and the constraints stay as they were, comments included."""
    staging, conn = db
    staging.sql(
        "INSERT INTO parent (id, name, price) VALUES (90, 'cheap%{}', -5);"
        "ALTER TABLE parent ADD CONSTRAINT positive CHECK (price >= 0 AND name NOT LIKE '%{}%') NOT VALID;"
        "COMMENT ON CONSTRAINT positive ON parent IS 'new rows only';"
        "CREATE TABLE orphan (id int PRIMARY KEY, parent_id int); INSERT INTO orphan VALUES (1, 999);"
        "ALTER TABLE orphan ADD CONSTRAINT to_parent FOREIGN KEY (parent_id) REFERENCES parent (id) NOT VALID"
    )
    constraints = "SELECT conname, pg_get_constraintdef(oid), convalidated, obj_description(oid, 'pg_constraint') FROM pg_constraint WHERE conname IN ('positive', 'to_parent') ORDER BY 1"
    shape = staging.sql(constraints)
    _capture(conn, (("public", "parent"), ("public", "orphan")))
    before = staging.sql("SELECT p::text FROM parent p ORDER BY id") + staging.sql("SELECT o::text FROM orphan o")
    _migrate(staging, ["DELETE FROM parent WHERE id = 90", "DELETE FROM orphan", "UPDATE parent SET price = 1 WHERE id = 1"])
    capture.finish(conn, RUN)
    done = revert.undo(conn, RUN)
    assert done.applied and not done.conflicts
    assert staging.sql("SELECT p::text FROM parent p ORDER BY id") + staging.sql("SELECT o::text FROM orphan o") == before
    assert staging.sql(constraints) == shape


# ---------------------------------------------------------------- found by a review (each failed before its fix)


def _rows(staging, table: str) -> list:
    return [r[0] for r in staging.sql(f"SELECT x::text FROM {table} x ORDER BY 1")]


def _run_and_undo(staging, conn, tables, statements, *, session=(), then=(), **undo):
    """The statements as the run (after ``session`` settings of its own), captured, then
    ``then`` by another session, then the undo."""
    usable, _ = capture.plan(conn, RUN, list(tables))
    capture.install(conn, RUN, usable)
    _migrate(staging, [*session, *statements])
    capture.finish(conn, RUN)
    for statement in then:
        staging.sql(statement)
    return revert.undo(conn, RUN, **undo)


@pytest.mark.servers("14", "15", "16", "18")  # the majors the undo is built for
def test_deleting_a_row_the_run_inserted_never_cascades_into_another_sessions_rows(db):
    staging, conn = db
    staging.sql(
        "CREATE TABLE p (id int PRIMARY KEY, v text);"
        "CREATE TABLE c (id int PRIMARY KEY, p int REFERENCES p ON DELETE CASCADE);"
        "CREATE TABLE d (id int PRIMARY KEY, p int REFERENCES p ON DELETE SET NULL)"
    )
    usable, _ = capture.plan(conn, RUN, [("public", "p"), ("public", "c"), ("public", "d")])
    capture.install(conn, RUN, usable)
    # the run: a parent and its child, then the parent again (so p is written last)
    _migrate(
        staging,
        ["INSERT INTO p VALUES (10, 'a'), (11, 'b')", "INSERT INTO c VALUES (1, 10)", "UPDATE p SET v = 'a2' WHERE id = 10"],
    )
    capture.finish(conn, RUN)
    staging.sql("INSERT INTO c VALUES (2, 11); INSERT INTO d VALUES (3, 11)")  # another session's rows under p 11
    refused = revert.undo(conn, RUN)
    assert not refused.applied and [(c.table, c.key) for c in refused.conflicts] == [("public.p", {"id": 11})]
    assert "refers to it" in refused.conflicts[0].why
    done = revert.undo(conn, RUN, skip_conflicts=True)
    assert done.applied and done.deleted == {"public.p": 1, "public.c": 1, "public.d": 0}
    assert _rows(staging, "p") == ["(11,b)"] and _rows(staging, "c") == ["(2,11)"] and _rows(staging, "d") == ["(3,11)"]


def test_a_primary_keys_include_columns_are_not_its_key(db):
    staging, conn = db
    staging.sql(
        "CREATE TABLE p (id int, payload text, PRIMARY KEY (id) INCLUDE (payload)); INSERT INTO p VALUES (1, 'a');"
        "CREATE TABLE c (id int PRIMARY KEY, p int REFERENCES p ON DELETE CASCADE); INSERT INTO c VALUES (7, 1)"
    )
    done = _run_and_undo(staging, conn, [("public", "p")], ["UPDATE p SET payload = 'b'"])
    assert done.applied and done.restored == {"public.p": 1} and not done.deleted.get("public.p")
    assert _rows(staging, "p") == ["(1,a)"] and _rows(staging, "c") == ["(7,1)"]


def test_columns_named_like_the_undos_own_aliases_and_quotes(db):
    staging, conn = db
    staging.sql(
        'CREATE TABLE odd ("id$f$" int PRIMARY KEY, n int, o int, s int, t timestamptz, "x$rb0$" text);'
        "INSERT INTO odd VALUES (1, 1, 1, 1, '2024-01-01 00:00+00', 'q'), (2, 2, 2, 2, NULL, NULL)"
    )
    before = _rows(staging, "odd")
    done = _run_and_undo(
        staging,
        conn,
        [("public", "odd")],
        [
            "INSERT INTO odd VALUES (3, 3, 3, 3, now(), '$rb0$')",
            "UPDATE odd SET n = 9, t = t + interval '1 day' WHERE \"id$f$\" = 1",
            'DELETE FROM odd WHERE "id$f$" = 2',
        ],
    )
    assert done.applied and not done.conflicts and _rows(staging, "odd") == before


@pytest.mark.servers("14", "15", "16", "18")  # the majors the undo is built for
def test_the_runs_own_session_settings_change_no_value(db):
    staging, conn = db
    staging.sql(
        "CREATE TABLE m (id int PRIMARY KEY, d date, ts timestamptz, f float8, i interval, b bytea, cash money);"
        "INSERT INTO m VALUES (1, '2024-02-01', '2024-02-01 10:00+00', 0.1 + 0.2, '1 day 2 hours', '\\xdead', 12.34),"
        "                     (2, '2024-03-04', '2024-03-04 23:30+00', 1e-300, '-3 mons', '\\x00', 0)"
    )
    before = _rows(staging, "m")
    done = _run_and_undo(
        staging,
        conn,
        [("public", "m")],
        ["DELETE FROM m WHERE id = 1", "UPDATE m SET f = 2 WHERE id = 2"],
        session=[
            "SET DateStyle = 'SQL, DMY'",
            "SET TimeZone = 'Asia/Tokyo'",
            "SET extra_float_digits = 0",
            "SET IntervalStyle = 'sql_standard'",
            "SET bytea_output = 'escape'",
        ],
    )
    assert done.applied and not done.conflicts and _rows(staging, "m") == before


def test_a_deferred_foreign_key_is_a_conflict_not_a_failure_at_commit(db):
    staging, conn = db
    staging.sql(
        "CREATE TABLE p (id int PRIMARY KEY);"
        "CREATE TABLE c (id int PRIMARY KEY, p int REFERENCES p DEFERRABLE INITIALLY DEFERRED)"
    )
    refused = _run_and_undo(staging, conn, [("public", "p")], ["INSERT INTO p VALUES (5)"], then=["INSERT INTO c VALUES (1, 5)"])
    assert not refused.applied and [c.key for c in refused.conflicts] == [{"id": 5}]
    assert _rows(staging, "p") == ["(5)"]


@pytest.mark.servers("14", "15", "16", "18")  # the majors the undo is built for
def test_a_drop_by_the_run_is_schema_changed_and_refuses_the_undo(db):
    staging, conn = db
    staging.sql("CREATE TABLE u (id int PRIMARY KEY, email text); CREATE UNIQUE INDEX u_email ON u (email)")
    with pytest.raises(UndoRefused, match="DROP index public.u_email"):
        _run_and_undo(staging, conn, [("public", "u")], ["DROP INDEX u_email", "INSERT INTO u VALUES (1, 'a'), (2, 'a')"])
    assert staging.sql("SELECT count(*) FROM u") == [(2,)]  # nothing was changed
