"""Names that need quotes (spaces, quotes, dots, capitals, non-ASCII letters, keywords),
a domain's NOT NULL, a NOT VALID CHECK that old rows break, and a database with no
tables, through every path: reset across majors, template, dump and data points and
their restores, simple_rollback.py, and verification. Schemas are compared as catalog
rows, keys of tables and sequences are quoted where SQL needs it and read back by one
parser."""

from __future__ import annotations

import json

import psycopg2
import pytest

from lib.config import ConnInfo
from lib.pg.db import connection
from lib.pg.fingerprint import (
    Fingerprint,
    compare,
    current_key,
    portable_schema_lines,
    qualified,
    quote_ident,
    rekeyed,
    schema_lines,
    split_qualified,
)
from lib.points.manifest import manifest_digest
from tests.helpers import deep_state

HOSTILE = """
CREATE SCHEMA "a.b";
CREATE SCHEMA "Ünïcode ""Q"" Schema";
CREATE SCHEMA "select";
CREATE DOMAIN "a.b".d AS integer NOT NULL CHECK (VALUE > 0);
CREATE TABLE "a.b".t (id serial PRIMARY KEY, "Display Name" text NOT NULL, amount "a.b".d, json_value int NOT NULL DEFAULT 1);
CREATE TABLE "Ünïcode ""Q"" Schema"."Tåble ""x"".y" (
    "Id" bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    "order" text NOT NULL,
    "user" int,
    "Ärger spalte" numeric CHECK ("Ärger spalte" >= 0)
);
CREATE TABLE "select"."from" ("where" int PRIMARY KEY, "table" text NOT NULL);
CREATE TABLE "select"."from child" ("where" int REFERENCES "select"."from", note text);
CREATE SEQUENCE "a.b"."Seq.With Dot" START 5;
CREATE TABLE public.json_table ("system_user" int CHECK ("system_user" > 0));
CREATE TABLE public."checked.rows" (id int PRIMARY KEY, qty int);
INSERT INTO public."checked.rows" VALUES (1, 5), (2, -3), (3, -7);
ALTER TABLE public."checked.rows" ADD CONSTRAINT "qty positive" CHECK (qty > 0) NOT VALID;
COMMENT ON CONSTRAINT "qty positive" ON public."checked.rows" IS 'new rows only';
CREATE TABLE "a.b"."Readings" (day int, value int) PARTITION BY RANGE (day);
CREATE TABLE "a.b"."Readings 1" PARTITION OF "a.b"."Readings" FOR VALUES FROM (0) TO (100);
INSERT INTO "a.b"."Readings" SELECT g, g - 10 FROM generate_series(0, 30) g;
ALTER TABLE "a.b"."Readings" ADD CONSTRAINT value_not_negative CHECK (value >= 0) NOT VALID;
GRANT USAGE ON SCHEMA "a.b" TO rollback_test_reader;
GRANT SELECT ON "a.b".t TO rollback_test_reader;
ALTER DEFAULT PRIVILEGES GRANT SELECT, INSERT ON TABLES TO rollback_test_reader;
INSERT INTO "a.b".t ("Display Name", amount) SELECT 'name ' || g, g FROM generate_series(1, 40) g;
INSERT INTO "Ünïcode ""Q"" Schema"."Tåble ""x"".y" ("order", "user", "Ärger spalte")
SELECT 'o' || g, g, g FROM generate_series(1, 25) g;
INSERT INTO "select"."from" SELECT g, 't' || g FROM generate_series(1, 10) g;
INSERT INTO "select"."from child" SELECT g % 10 + 1, 'n' || g FROM generate_series(1, 30) g;
INSERT INTO public.json_table SELECT g FROM generate_series(1, 7) g;
SELECT setval('"a.b"."Seq.With Dot"', 42, true);
"""

MIGRATION = """
DELETE FROM "a.b".t WHERE id > 20;
INSERT INTO "a.b".t ("Display Name", amount) VALUES ('added', 1);
UPDATE "Ünïcode ""Q"" Schema"."Tåble ""x"".y" SET "order" = 'changed' WHERE "Id" % 2 = 0;
DELETE FROM "select"."from child" WHERE "where" > 5;
DELETE FROM "select"."from" WHERE "where" > 5;
DELETE FROM public."checked.rows" WHERE qty < 0;
INSERT INTO public."checked.rows" VALUES (4, 9);
DELETE FROM "a.b"."Readings" WHERE value < 0;
DELETE FROM public.json_table;
SELECT setval('"a.b"."Seq.With Dot"', 99, true);
"""

# the keys fingerprints give the tables above, as SQL writes them
KEYS = {
    '"a.b".t': 40,
    '"Ünïcode ""Q"" Schema"."Tåble ""x"".y"': 25,
    '"select"."from"': 10,
    '"select"."from child"': 30,
    'public."json_table"': 7,  # a keyword since 17: quoted for every major
    'public."checked.rows"': 3,
    '"a.b"."Readings 1"': 31,
}


def rows_and_sequences(state: dict) -> dict:
    """Rows, sequences and content, without the materialized view whose avg() depends on
    the physical order rows were loaded in (see tests/test_reset.py)."""
    content = {k: v for k, v in state["content"].items() if k != "public.city_stats"}
    return {"row_counts": state["row_counts"], "sequences": state["sequences"], "content": content}


def catalog_facts(staging) -> dict:
    """What the hostile objects must keep: the NOT VALID CHECKs (still not validated,
    their rows still there), the comment on one, the domain's NOT NULL."""
    return {
        "not valid": staging.sql(
            "SELECT conrelid::regclass::text, conname, convalidated FROM pg_constraint "
            "WHERE conname IN ('qty positive', 'value_not_negative') ORDER BY 1, 2"
        ),
        "comment": staging.sql("SELECT obj_description(oid, 'pg_constraint') FROM pg_constraint WHERE conname = 'qty positive'"),
        "broken rows": staging.sql(
            'SELECT (SELECT count(*) FROM public."checked.rows" WHERE qty <= 0), '
            '(SELECT count(*) FROM "a.b"."Readings" WHERE value < 0)'
        ),
        "domain not null": staging.sql("SELECT typnotnull FROM pg_type WHERE typname = 'd'"),
    }


def assert_constraints_still_hold(staging) -> None:
    """The NOT VALID CHECK still refuses new rows that break it; the domain still refuses NULL."""
    with pytest.raises(psycopg2.errors.CheckViolation):
        staging.sql('INSERT INTO public."checked.rows" VALUES (100, -1)')
    with pytest.raises(psycopg2.errors.CheckViolation):
        staging.sql('INSERT INTO "a.b"."Readings" VALUES (50, -1)')
    with pytest.raises(psycopg2.errors.NotNullViolation):
        staging.sql("""INSERT INTO "a.b".t ("Display Name", amount) VALUES ('x', NULL)""")


# ------------------------------------------------------------------ keys, without a server


@pytest.mark.unit
@pytest.mark.parametrize(
    "schema, name, key",
    [
        ("public", "t", "public.t"),
        ("public", "t_id_seq2", "public.t_id_seq2"),
        ("a.b", "t", '"a.b".t'),
        ("a", "b.t", 'a."b.t"'),
        ("Sales Ops", 'Order "Lines" Ü', '"Sales Ops"."Order ""Lines"" Ü"'),
        ("public", "Orders", 'public."Orders"'),
        ("public", "order", 'public."order"'),
        ("public", "json_table", 'public."json_table"'),  # a keyword since 17: quoted for every major alike
        ("select", "from", '"select"."from"'),
        ("public", "1st", 'public."1st"'),
        ("public", "price$", 'public."price$"'),
        ("ünï", "tåble", '"ünï"."tåble"'),
        ("x", '"', 'x.""""'),
        ("public", "", 'public.""'),
    ],
)
def test_keys_are_quoted_as_sql_writes_them_and_read_back_exactly(schema, name, key):
    assert qualified(schema, name) == key
    assert split_qualified(key) == (schema, name)
    assert current_key(key) == key


@pytest.mark.unit
def test_quote_ident_leaves_plain_names_and_unreserved_keywords_bare():
    assert [quote_ident(n) for n in ("customers", "_x9", "name", "data", "User")] == [
        "customers",
        "_x9",
        "name",
        "data",
        '"User"',
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    "old, now",
    [
        ("public.customers", "public.customers"),
        ('Sales Ops.Order "Lines" Ü', '"Sales Ops"."Order ""Lines"" Ü"'),
        ("public.Orders", 'public."Orders"'),
        ("public.checked.rows", 'public."checked.rows"'),  # split at the first dot, as it was written
        ("<large objects>", "<large objects>"),
    ],
)
def test_keys_points_recorded_before_quoting_are_read_as_today(old, now):
    assert current_key(old) == now


@pytest.mark.unit
def test_a_fingerprint_recorded_with_unquoted_keys_still_compares_alike():
    now = Fingerprint(
        schema_digest="d",
        schema_objects=3,
        row_counts={'"Sales Ops"."Order ""Lines"" Ü"': 1200, "public.customers": 300},
        sequences={'public."Orders_id_seq"': [42, True]},
        large_objects=0,
        content={'"Sales Ops"."Order ""Lines"" Ü"': "1200:77", "<large objects>": "0:0"},
        relations={'"Sales Ops"."Order ""Lines"" Ü"': [16400, 8192], '"Sales Ops"."Order ""Lines"" Ü" (toast)': [16403, 0]},
    )
    recorded = {
        "schema_digest": "d",
        "row_counts": {'Sales Ops.Order "Lines" Ü': 1200, "public.customers": 300},
        "sequences": {"public.Orders_id_seq": [42, True]},
        "content": {'Sales Ops.Order "Lines" Ü': "1200:77", "<large objects>": "0:0"},
        "relations": {'"Sales Ops"."Order ""Lines"" Ü"': [16400, 8192], '"Sales Ops"."Order ""Lines"" Ü" (toast)': [16403, 0]},
    }
    assert compare(recorded, now) == []
    recorded["row_counts"]["public.customers"] = 299
    assert compare(recorded, now) == ["public.customers: 299 rows recorded, 300 found"]
    assert rekeyed({"public.Orders": 1}) == {'public."Orders"': 1}


@pytest.mark.unit
def test_plain_keys_with_dots_are_matched_to_the_table_found_that_they_name():
    assert rekeyed({"a.b.t": 1, "public.x": 2}, ['"a.b".t', "public.x"]) == {'"a.b".t': 1, "public.x": 2}
    assert rekeyed({"a.b.t": 1}, ['a."b.t"']) == {'a."b.t"': 1}
    # two tables a plain key could name: neither is guessed, the key is split at its first dot as written
    assert rekeyed({"a.b.c": 1}, ['"a.b".c', 'a."b.c"']) == {'a."b.c"': 1}


# ------------------------------------------------------------------ the portable view


def test_the_portable_view_is_alike_across_majors_and_still_sees_what_differs(pg15, pg18, new_staging):
    old, new = new_staging(pg15, "port15"), new_staging(pg18, "port18")
    for side in (old, new):
        side.sql(HOSTILE)

    def portable(side) -> list[str]:
        with connection(ConnInfo.parse(side.url)) as conn:
            return portable_schema_lines(conn)

    assert portable(old) == portable(new)
    # 18 lists NOT NULL as constraints; the portable view compares the columns and domains
    assert any("NOT NULL" in line and "Display Name" in line for line in schema_lines_of(new))
    assert not any(line.startswith("constraint") and "NOT NULL" in line for line in portable(new))
    new.sql('ALTER DOMAIN "a.b".d DROP NOT NULL; ALTER TABLE "a.b".t ALTER COLUMN "Display Name" DROP NOT NULL')
    differ = sorted(set(portable(old)) ^ set(portable(new)))
    assert len(differ) == 4, differ
    assert [line.split(" ", 1)[0] for line in differ] == ["column", "column", "type", "type"]
    assert any("notnull=t" in line and '"a.b"."d"' in line for line in differ)


def schema_lines_of(side) -> list[str]:
    with connection(ConnInfo.parse(side.url)) as conn:
        return schema_lines(conn)


# ------------------------------------------------------------------ reset from V2


@pytest.mark.parametrize("v2_major, staging_major", [(15, 18), (16, 18), (18, 18)])
def test_reset_copies_hostile_names_across_majors(servers, new_staging, v2_major, staging_major):
    from tests.conftest import get_server

    v2 = new_staging(get_server(servers, v2_major), "v2hostile", core_only=v2_major == 16)
    v2.sql(HOSTILE)
    staging = new_staging(get_server(servers, staging_major), "stghostile")
    staging.sql('CREATE SCHEMA "a.b"; CREATE TABLE "a.b".junk (x int)')
    v2_state = deep_state(v2.server, v2.name)
    assert {k: v2_state["row_counts"][k] for k in KEYS} == KEYS

    result = staging.run("reset_staging.py", "--yes", "--json", env={"V2_DATABASE_URL": v2.url})
    assert result.returncode == 0, result.stderr
    assert "The copy matches V2: its schema" in result.stderr
    assert rows_and_sequences(deep_state(staging.server, staging.name)) == rows_and_sequences(v2_state)
    with connection(ConnInfo.parse(v2.url)) as a, connection(ConnInfo.parse(staging.url)) as b:
        assert portable_schema_lines(b) == portable_schema_lines(a)
    assert staging.sql('SELECT last_value FROM "a.b"."Seq.With Dot"')[0][0] == 42
    assert catalog_facts(staging) == catalog_facts(v2)
    assert_constraints_still_hold(staging)
    undo = staging.run("rollback_manager.py", "restore", json.loads(result.stdout)["before_point_id"], "--yes")
    assert undo.returncode == 0, undo.stderr
    assert staging.sql("SELECT to_regclass('\"a.b\".junk') IS NOT NULL")[0][0]


# ------------------------------------------------------------------ points and their restores


@pytest.mark.parametrize("method", ["template", "dump"])
def test_template_and_dump_points_restore_hostile_names_exactly(staging, method):
    staging.sql(HOSTILE)
    before, facts = deep_state(staging.server, staging.name), catalog_facts(staging)
    point_id = staging.create_point("hostile", "--method", method)
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    if method == "dump":
        assert {k: manifest["fingerprint"]["row_counts"][k] for k in KEYS} == KEYS
    staging.sql(MIGRATION)

    verified = staging.run("rollback_manager.py", "verify", point_id, "--deep")
    assert verified.returncode == 0, verified.stderr
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert deep_state(staging.server, staging.name) == before
    assert catalog_facts(staging) == facts
    assert_constraints_still_hold(staging)


def test_a_data_point_restores_hostile_names_and_rows_a_not_valid_check_refuses(staging, monkeypatch):
    from rollback_manager import SyncRollbackManager

    staging.sql(HOSTILE)
    before, facts = deep_state(staging.server, staging.name), catalog_facts(staging)
    created = staging.run_json("simple_rollback.py", "create", "hostile")
    manifest = json.loads((staging.backup_dir / created["id"] / "manifest.json").read_text())
    assert {k: manifest["fingerprint"]["row_counts"][k] for k in KEYS} == KEYS
    assert manifest["fingerprint"]["sequences"]['"a.b"."Seq.With Dot"'] == [42, True]
    assert staging.run("rollback_manager.py", "verify", created["id"]).returncode == 0
    staging.sql(MIGRATION)
    check = SyncRollbackManager(staging.url).verify_rollback(created["id"])
    assert not check.matches and check.tables['public."checked.rows"']["actual_rows"] == 2

    result = staging.run("simple_rollback.py", "restore", created["id"], "--yes", "--json")
    assert result.returncode == 0, result.stderr
    assert deep_state(staging.server, staging.name) == before  # rows, sequences, and the schema digest
    assert catalog_facts(staging) == facts  # NOT VALID still, with its comment; the old rows back
    assert SyncRollbackManager(staging.url).verify_rollback(created["id"]).matches
    assert_constraints_still_hold(staging)
    # and the state before the restore, a data point of its own, comes back too
    undo = staging.run("simple_rollback.py", "restore", json.loads(result.stdout)["before_point_id"], "--yes")
    assert undo.returncode == 0, undo.stderr
    assert staging.sql('SELECT count(*) FROM public."checked.rows"')[0][0] == 2


def test_a_point_of_one_partition_sets_its_parents_not_valid_check_aside(staging):
    staging.sql(HOSTILE)
    point_id = staging.run_json("create_rollback_point.py", "one partition", "--method", "data", "--table", '"a.b"."Readings 1"')[
        "id"
    ]
    before, facts = deep_state(staging.server, staging.name), catalog_facts(staging)
    staging.sql('DELETE FROM "a.b"."Readings"')
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert deep_state(staging.server, staging.name)["row_counts"] == before["row_counts"]
    assert catalog_facts(staging) == facts
    assert_constraints_still_hold(staging)


def test_without_superuser_rights_a_not_valid_foreign_key_keeps_its_orphans(server, new_staging):
    """Triggers stay on for a plain role (dependency order), so a NOT VALID foreign key
    would refuse the point's orphan rows: it is set aside too, and put back NOT VALID."""
    staging = new_staging(server, "plainfk")
    role = f"p_{staging.name}"[:60]
    db = f"{staging.name}_p"
    staging.sql(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'plain-pw-123'")
    staging.sql(f'CREATE DATABASE "{db}" OWNER "{role}"')
    try:
        url = server.url(db, user=role, password="plain-pw-123")
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                'CREATE SCHEMA "Köln.Süd"; CREATE TABLE "Köln.Süd"."Kunden" (id int PRIMARY KEY);'
                'CREATE TABLE "Köln.Süd"."Bestellungen" (id int, kunde int, menge int);'
                'INSERT INTO "Köln.Süd"."Kunden" VALUES (1), (2);'
                'INSERT INTO "Köln.Süd"."Bestellungen" VALUES (1, 1, 3), (2, 99, -1);'
                'ALTER TABLE "Köln.Süd"."Bestellungen" ADD CONSTRAINT kunde_fk FOREIGN KEY (kunde) '
                'REFERENCES "Köln.Süd"."Kunden" NOT VALID;'
                'ALTER TABLE "Köln.Süd"."Bestellungen" ADD CONSTRAINT menge_pos CHECK (menge > 0) NOT VALID'
            )
        env = {"STAGING_DATABASE_URL": url}
        before = deep_state(server, db)
        point_id = staging.run_json("simple_rollback.py", "create", "orphans", env=env)["id"]
        with conn.cursor() as cur:
            cur.execute('DELETE FROM "Köln.Süd"."Bestellungen"; DELETE FROM "Köln.Süd"."Kunden" WHERE id = 2')
        result = staging.run("simple_rollback.py", "restore", point_id, "--yes", "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["notes"] == ["dependency order"]
        assert deep_state(server, db) == before
        with conn.cursor() as cur:
            cur.execute("SELECT conname, convalidated FROM pg_constraint WHERE conname IN ('kunde_fk', 'menge_pos') ORDER BY 1")
            assert cur.fetchall() == [("kunde_fk", False), ("menge_pos", False)]
            with pytest.raises(psycopg2.errors.ForeignKeyViolation):
                cur.execute('INSERT INTO "Köln.Süd"."Bestellungen" VALUES (3, 77, 1)')
        conn.close()
    finally:
        staging.sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        staging.sql(f'DROP ROLE IF EXISTS "{role}"')


def test_a_data_point_of_a_database_without_tables_restores(staging):
    db = f"{staging.name}_empty"
    staging.sql(f'CREATE DATABASE "{db}"')
    env = {"STAGING_DATABASE_URL": staging.server.url(db)}
    created = staging.run_json("simple_rollback.py", "create", "nothing yet", env=env)
    assert staging.run("rollback_manager.py", "verify", created["id"], env=env).returncode == 0
    result = staging.run("simple_rollback.py", "restore", created["id"], "--yes", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["point_id"] == created["id"]


@pytest.mark.parametrize("method", ["dump", "data"])
def test_a_point_recorded_with_unquoted_keys_still_verifies_and_restores(staging, method):
    """Points taken before keys were quoted named tables plainly (Sales Ops.Order "Lines" Ü):
    their row counts and sequences are read under today's keys."""
    staging.sql(HOSTILE)
    before = deep_state(staging.server, staging.name)
    point_id = staging.create_point("old keys", "--method", method)
    path = staging.backup_dir / point_id / "manifest.json"
    written = json.loads(path.read_text())
    fp = written["fingerprint"]
    for section in ("row_counts", "sequences"):  # as the toolkit wrote them then: schema, a dot, the name
        fp[section] = {".".join(split_qualified(k)): v for k, v in fp[section].items()}
    assert fp["row_counts"]['Sales Ops.Order "Lines" Ü'] == 1200 and fp["row_counts"]["a.b.t"] == 40
    assert fp["sequences"]["a.b.Seq.With Dot"] == [42, True]
    written["manifest_sha256"] = manifest_digest(written)
    path.write_text(json.dumps(written, indent=2))
    staging.sql(MIGRATION)
    verified = staging.run("rollback_manager.py", "verify", point_id, "--deep")
    assert verified.returncode == 0, verified.stderr
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert deep_state(staging.server, staging.name) == before


def test_a_partitioned_table_with_a_foreign_key_is_restored_through_its_partitions(staging):
    """The foreign key of a partitioned table is its partitions' too: the point holds the
    partitions, and the parent, which holds no rows, is not a table outside the point."""
    staging.sql(
        'CREATE TABLE "Orders by Year" (id int, customer_id bigint REFERENCES customers, year int) PARTITION BY LIST (year);'
        'CREATE TABLE "Orders 2024" PARTITION OF "Orders by Year" FOR VALUES IN (2024);'
        'INSERT INTO "Orders by Year" SELECT g, g, 2024 FROM generate_series(1, 30) g'
    )
    before = deep_state(staging.server, staging.name)
    table_level = staging.run_json("create_rollback_point.py", "customers", "--method", "data", "--table", "customers")
    assert "public.Orders 2024" in table_level["table"]
    whole = staging.run_json("simple_rollback.py", "create", "everything")["id"]
    staging.sql('DELETE FROM "Orders by Year" WHERE id > 10')
    for point_id in (table_level["id"], whole):
        result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
        assert result.returncode == 0, result.stderr
        assert deep_state(staging.server, staging.name)["row_counts"] == before["row_counts"]
