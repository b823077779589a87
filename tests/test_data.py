"""Data points (COPY, pure Python): simple_rollback.py, table-level points, schema guard."""

from __future__ import annotations

import json

from tests.helpers import deep_state

DATA_MIGRATION = """
INSERT INTO customers (email, name) SELECT 'new' || g || '@example.com', 'New ' || g FROM generate_series(1, 40) g;
UPDATE "Sales Ops"."Order ""Lines"" Ü" SET status = 'cancelled', note = 'changed' WHERE id % 3 = 0;
DELETE FROM "Sales Ops"."Order ""Lines"" Ü" WHERE id % 5 = 0;
DELETE FROM measurements WHERE city = 'Tainan';
INSERT INTO child_log VALUES (3, 'more', 'x');
UPDATE scratch SET v = '\\x00ff' WHERE k = 'k1';
SELECT setval('invoice_no', 9000);
"""

NO_TOOLS = {"PATH": "/nonexistent", "PG_BIN_DIR": "/nonexistent", "PG_BIN_DIR_ONLY": "1"}


def without_large_objects(state: dict) -> dict:
    state = json.loads(json.dumps(state))
    state["content"].pop("<large objects>", None)
    return state


def test_simple_rollback_works_with_no_client_binaries_and_restores_every_row(staging):
    before = deep_state(staging.server, staging.name)
    created = staging.run_json("simple_rollback.py", "create", "Before migration", env=NO_TOOLS)
    assert created["method"] == "data"
    staging.sql(DATA_MIGRATION)
    assert deep_state(staging.server, staging.name) != before

    listed = staging.run_json("simple_rollback.py", "list", env=NO_TOOLS)
    assert [p["id"] for p in listed] == [created["id"]]
    assert staging.run("rollback_manager.py", "verify", created["id"], env=NO_TOOLS).returncode == 0

    result = staging.run("simple_rollback.py", "restore", "--yes", "--json", env=NO_TOOLS)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["mode"] == "data"
    assert deep_state(staging.server, staging.name) == before  # rows, sequences, schema digest
    # the state before was kept as a data point: undo gives the migrated rows back
    undo = staging.run("rollback_manager.py", "restore", out["before_point_id"], "--yes", env=NO_TOOLS)
    assert undo.returncode == 0, undo.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 340
    assert staging.sql("SELECT last_value FROM invoice_no")[0][0] == 9000


def test_a_changed_column_is_refused_by_name(staging):
    point_id = staging.run_json("create_rollback_point.py", "data", "--method", "data")["id"]
    staging.sql("ALTER TABLE customers ADD COLUMN legacy_code text; ALTER TABLE documents DROP COLUMN body")
    staging.sql("DELETE FROM scratch")
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 3
    assert "legacy_code added" in result.stderr and "body dropped" in result.stderr
    assert staging.sql("SELECT count(*) FROM scratch")[0][0] == 0  # nothing was changed


def test_table_level_points_restore_only_their_tables(staging):
    created = staging.run_json("rollback_manager.py", "backup", "documents", "scratch", "--description", "Pre-deployment backup")
    assert created["table"] == "public.documents, public.scratch"
    staging.sql("DELETE FROM documents; DELETE FROM scratch WHERE k <> 'k1'; DELETE FROM parent_log")
    result = staging.run("rollback_manager.py", "restore", created["id"], "--yes")
    assert result.returncode == 0, result.stderr
    assert staging.sql("SELECT count(*) FROM documents")[0][0] == 2
    assert staging.sql("SELECT count(*) FROM scratch")[0][0] == 50
    assert staging.sql("SELECT count(*) FROM ONLY parent_log")[0][0] == 0  # not in the point: untouched
    # quick rollback never takes a table-level point for the whole of staging
    quick = staging.run("quick_rollback.py", "--yes")
    assert quick.returncode == 1 and "no usable rollback point" in quick.stderr


def test_tables_that_reference_the_chosen_ones_are_taken_with_them(staging):
    created = staging.run_json("create_rollback_point.py", "customers only", "--table", "customers")
    assert created["table"].startswith("public.customers, Sales Ops.Order") and "Lines" in created["table"]
    staging.sql("UPDATE customers SET name = 'x'")
    result = staging.run("rollback_manager.py", "restore", created["id"], "--yes")
    assert result.returncode == 0, result.stderr
    assert staging.sql("SELECT count(*) FROM customers WHERE name = 'x'")[0][0] == 0


def test_a_reference_added_after_the_point_is_refused(staging):
    point_id = staging.run_json("create_rollback_point.py", "documents only", "--table", "documents")["id"]
    staging.sql("CREATE TABLE doc_links (doc int REFERENCES documents (id)); UPDATE documents SET body = 'x'")
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 2
    assert "doc_links" in result.stderr
    assert [p["id"] for p in staging.run_json("rollback_manager.py", "list")] == [point_id]  # no 'before' point either
    assert staging.sql("SELECT count(*) FROM documents WHERE body = 'x'")[0][0] == 2


def test_a_damaged_data_file_fails_verification(staging):
    point_id = staging.run_json("create_rollback_point.py", "d", "--method", "data")["id"]
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    path = staging.backup_dir / point_id / manifest["tables"][0]["file"]
    path.write_bytes(path.read_bytes()[:-8])
    assert staging.run("rollback_manager.py", "verify", point_id).returncode == 3
    assert staging.run("rollback_manager.py", "restore", point_id, "--yes").returncode == 3


def test_unknown_table_is_named(staging):
    result = staging.run("create_rollback_point.py", "x", "--table", "no_such_table")
    assert result.returncode == 2 and "no_such_table" in result.stderr


FK_CHAIN = """
CREATE TABLE regions (id int PRIMARY KEY, name text);
CREATE TABLE shops (id int PRIMARY KEY, region_id int REFERENCES regions, name text);
CREATE TABLE sales (shop_id int REFERENCES shops, day date, amount numeric, PRIMARY KEY (shop_id, day));
INSERT INTO regions SELECT g, 'r' || g FROM generate_series(1, 5) g;
INSERT INTO shops SELECT g, 1 + g % 5, 's' || g FROM generate_series(1, 50) g;
INSERT INTO sales SELECT 1 + g % 50, DATE '2024-01-01' + g / 50, g FROM generate_series(1, 2000) g;
"""


def test_without_superuser_rights_tables_are_refilled_in_dependency_order(server, new_staging):
    import psycopg2

    staging = new_staging(server, "plainrole")
    role = f"p_{staging.name}"[:60]
    db = f"{staging.name}_p"
    staging.sql(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'plain-pw-123'")
    staging.sql(f'CREATE DATABASE "{db}" OWNER "{role}"')
    try:
        url = server.url(db, user=role, password="plain-pw-123")
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(FK_CHAIN)
        env = {"STAGING_DATABASE_URL": url, **NO_TOOLS}
        before = deep_state(server, db)
        point_id = staging.run_json("simple_rollback.py", "create", "chain", env=env)["id"]
        with conn.cursor() as cur:
            cur.execute(
                "DELETE FROM sales WHERE amount > 100; UPDATE shops SET name = 'renamed'; INSERT INTO regions VALUES (9, 'new')"
            )
        conn.close()
        result = staging.run("simple_rollback.py", "restore", point_id, "--yes", "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["notes"] == ["dependency order"]
        assert deep_state(server, db) == before
    finally:
        staging.sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        staging.sql(f'DROP ROLE IF EXISTS "{role}"')


def test_tables_are_found_as_people_type_them(staging):
    staging.sql('CREATE SCHEMA "Sales-EU"; CREATE TABLE "Sales-EU"."Order Items" (id int PRIMARY KEY, what text)')
    staging.sql("""INSERT INTO "Sales-EU"."Order Items" SELECT g, 'item ' || g FROM generate_series(1, 25) g""")
    for typed in ("Sales-EU.Order Items", '"Sales-EU"."Order Items"', "sales-eu.order items", "Order Items"):
        created = staging.run_json("create_rollback_point.py", "items", "--method", "data", "--table", typed)
        assert created["table"] == "Sales-EU.Order Items", typed
    staging.sql('DELETE FROM "Sales-EU"."Order Items" WHERE id > 5')
    result = staging.run("rollback_manager.py", "restore", created["id"], "--yes")
    assert result.returncode == 0, result.stderr
    assert staging.sql('SELECT count(*) FROM "Sales-EU"."Order Items"')[0][0] == 25


def test_an_ambiguous_table_name_lists_what_it_could_mean(staging):
    staging.sql('CREATE SCHEMA "a.b"; CREATE TABLE "a.b".c (id int); CREATE SCHEMA a; CREATE TABLE a."b.c" (id int)')
    result = staging.run("create_rollback_point.py", "which", "--method", "data", "--table", "a.b.c")
    assert result.returncode == 2, result.stderr
    assert '"a"."b.c"' in result.stderr and '"a.b"."c"' in result.stderr and "Which table?" in result.stderr
    assert staging.run_json("rollback_manager.py", "list") == []


def test_system_catalogs_are_refused_for_data_points_backups_and_partial_rollbacks(staging):
    for args in (
        ["create_rollback_point.py", "roles", "--method", "data", "--table", "pg_catalog.pg_authid"],
        ["rollback_manager.py", "backup", "pg_authid"],
        ["rollback_manager.py", "backup", "information_schema.sql_features"],
    ):
        result = staging.run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "system catalog" in result.stderr and "never copies or writes" in result.stderr
    assert staging.run_json("rollback_manager.py", "list") == []
    assert not list(staging.backup_dir.glob("*/table_*")) if staging.backup_dir.exists() else True
    point = staging.create_point("whole", "--method", "data")
    partial = staging.run(
        "rollback_manager.py", "restore", point, "--type", "partial", "--table", "pg_catalog.pg_authid", "--yes"
    )
    assert partial.returncode == 2 and "system catalog" in partial.stderr
