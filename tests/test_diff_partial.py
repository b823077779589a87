"""diff (what a rollback undoes), partial rollback, restore from a file, and --type transaction."""

from __future__ import annotations

import json
import shutil

import pytest

ORDER_LINES = '"Sales Ops"."Order ""Lines"" Ü"'
KNOWN_CHANGES = f"""
INSERT INTO customers (email, name) SELECT 'n' || g || '@x', 'New ' || g FROM generate_series(1, 40) g;
INSERT INTO {ORDER_LINES} (customer_id, amount, "Qty Ordered")
    SELECT id, 9.99, 1 FROM customers WHERE email LIKE 'n%@x' AND id % 2 = 0;
UPDATE {ORDER_LINES} SET note = 'changed' WHERE id BETWEEN 1 AND 7;
DELETE FROM {ORDER_LINES} WHERE id BETWEEN 8 AND 12;
DELETE FROM documents WHERE owner_name = 'bob';
INSERT INTO parent_log VALUES (9, 'no primary key here');
CREATE TABLE migration_log (id int);
"""


@pytest.mark.parametrize("method", ["data", "template", "dump"])
def test_diff_counts_match_known_changes(staging, method):
    point_id = staging.create_point("Before migration", "--method", method, "--yes")
    staging.sql(KNOWN_CHANGES)
    result = staging.run_json("rollback_manager.py", "diff", point_id)
    tables = {t["table"]: t for t in result["tables"]}
    assert (
        tables["public.customers"]["added"],
        tables["public.customers"]["deleted"],
        tables["public.customers"]["changed"],
    ) == (40, 0, 0)
    assert tables["public.audit_events"]["added"] == 40  # written by the customers trigger
    lines = tables[ORDER_LINES]  # tables are named as SQL writes them
    assert (lines["added"], lines["deleted"], lines["changed"]) == (20, 5, 7)
    assert tables["public.documents"]["deleted"] == 1
    assert tables["public.parent_log"]["has_primary_key"] is False
    assert (tables["public.parent_log"]["point_rows"], tables["public.parent_log"]["current_rows"]) == (1, 2)
    assert tables["public.scratch"]["added"] == tables["public.scratch"]["changed"] == 0
    if method != "data":
        assert result["tables_added"] == ["public.migration_log"]
        assert result["schema_objects_added"] >= 1
    human = staging.run("rollback_manager.py", "diff", point_id)
    assert "public.customers: 40 added, 0 deleted, 0 changed" in human.stdout


def test_the_restore_confirmation_shows_what_it_undoes(staging):
    point_id = staging.create_point("Before migration", "--method", "template")
    staging.sql(KNOWN_CHANGES)
    asked = staging.run("rollback_manager.py", "restore", point_id)
    assert asked.returncode == 2
    assert "What it undoes" in asked.stderr and "public.customers: 40 added" in asked.stderr


@pytest.mark.parametrize("method", ["data", "template", "dump"])
def test_partial_rollback_removes_only_added_rows(staging, method):
    point_id = staging.create_point("Before migration", "--method", method, "--yes")
    staging.sql(KNOWN_CHANGES)
    scope = ["--table", "customers", "--table", "audit_events", "--table", ORDER_LINES]

    refused = staging.run("rollback_manager.py", "restore", point_id, "--type", "partial")
    assert refused.returncode == 2 and "without a primary key" in refused.stderr and "public.parent_log" in refused.stderr

    asked = staging.run("rollback_manager.py", "restore", point_id, "--type", "partial", *scope)
    assert asked.returncode == 2
    assert "public.customers: 40 row(s) added since the point would be deleted" in asked.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 340  # nothing deleted yet

    done = staging.run("rollback_manager.py", "restore", point_id, "--type", "partial", *scope, "--yes", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["deleted"] == {"public.customers": 40, "public.audit_events": 40, ORDER_LINES: 20}
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 300
    assert staging.sql(f"SELECT count(*) FROM {ORDER_LINES}")[0][0] == 1195  # deletions are not undone
    assert staging.sql(f"SELECT count(*) FROM {ORDER_LINES} WHERE note = 'changed'")[0][0] == 7  # changes kept
    assert staging.sql("SELECT count(*) FROM ONLY parent_log")[0][0] == 2  # out of scope: untouched

    undo = staging.run("rollback_manager.py", "restore", out["before_point_id"], "--yes")
    assert undo.returncode == 0, undo.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 340


def test_restore_straight_from_an_archive_file_or_a_point_folder(staging, tmp_path):
    dump_id = staging.create_point("dump", "--method", "dump")
    data_id = staging.create_point("data", "--method", "data")
    archive = tmp_path / "elsewhere.dir"
    shutil.copytree(staging.backup_dir / dump_id / "database.dir", archive)
    folder = tmp_path / "data-point"
    shutil.copytree(staging.backup_dir / data_id, folder)

    staging.sql("DELETE FROM customers WHERE id > 100")
    from_archive = staging.run("rollback_manager.py", "restore", "--type", "backup", "--file", str(archive), "--yes")
    assert from_archive.returncode == 0, from_archive.stderr
    assert "tables of the archive's table of contents are there" in from_archive.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 300

    staging.sql("DELETE FROM documents")
    from_folder = staging.run("rollback_manager.py", "restore", "--type", "backup", "--file", str(folder), "--yes")
    assert from_folder.returncode == 0, from_folder.stderr
    assert staging.sql("SELECT count(*) FROM documents")[0][0] == 2

    missing = staging.run("rollback_manager.py", "restore", "--type", "backup", "--yes")
    assert missing.returncode == 2 and "--file" in missing.stderr


def test_transaction_type_explains_itself(staging):
    result = staging.run("rollback_manager.py", "restore", "rb_x", "--type", "transaction")
    assert result.returncode == 2 and "inside a running migration" in result.stderr


def test_composite_primary_keys_and_foreign_key_chains(staging):
    from tests.test_data import FK_CHAIN

    staging.sql(FK_CHAIN)
    point_id = staging.create_point("chain", "--method", "template")
    staging.sql(
        "INSERT INTO regions VALUES (6, 'r6'); INSERT INTO shops VALUES (51, 6, 's51');"
        "INSERT INTO sales SELECT 51, DATE '2030-01-01' + g, g FROM generate_series(1, 9) g;"
        "UPDATE sales SET amount = -1 WHERE shop_id = 2 AND day = DATE '2024-01-01';"
    )
    diff = {t["table"]: t for t in staging.run_json("rollback_manager.py", "diff", point_id)["tables"]}
    assert (diff["public.sales"]["added"], diff["public.sales"]["changed"]) == (9, 1)
    scope = ["--table", "regions", "--table", "shops", "--table", "sales"]
    done = staging.run_json("rollback_manager.py", "restore", point_id, "--type", "partial", *scope, "--yes")
    assert done["deleted"] == {"public.regions": 1, "public.shops": 1, "public.sales": 9}
    assert staging.sql("SELECT amount FROM sales WHERE shop_id = 2 AND day = DATE '2024-01-01'")[0][0] == -1
