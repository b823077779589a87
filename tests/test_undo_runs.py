"""A production run captured for an undo, end to end through the scripts: the undo puts
back exactly what the run changed while another session writes the same tables, the
ledger, --status and the audit say so, a second undo is refused, a kill -9 during the
undo changes nothing, and what the undo cannot do (schema changed, keyless tables,
conflicts) it refuses with the way out."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from contextlib import closing
from decimal import Decimal

import psycopg2
import pytest

from lib.undo import capture
from tests.conftest import ROOT
from tests.helpers import wait_for

LINES = '"Sales Ops"."Order ""Lines"" Ü"'

MIGRATION = f'''"""Fix customers: new ones, corrected names, two removed."""

TABLES = ["customers", {LINES!r}, "audit_events"]


def migrate(ctx):
    with ctx.staging.cursor() as cur:
        cur.execute(
            "INSERT INTO customers (email, name, tags) "
            "SELECT 'migrated' || g || '@x', 'M ' || g, '[1, 2.50]' FROM generate_series(1, 50) g"
        )
        cur.execute("UPDATE customers SET name = name || ' (fixed)', profile = profile || '{{\\"f\\": 1.0}}' WHERE id <= 20")
        cur.execute("DELETE FROM customers WHERE id IN (21, 22)")  # their order lines go by the cascade
        cur.execute("SELECT pg_sleep(0.5)")
        cur.execute(
            {f"INSERT INTO {LINES} (customer_id, amount, note) SELECT id, 9.99, 'migrated' FROM customers WHERE email LIKE 'migrated%'"!r}
        )
'''

MINE = "SELECT c::text FROM customers c WHERE email NOT LIKE 'other-%%' AND id <> 250 ORDER BY id"
LINES_MINE = f"SELECT l::text FROM {LINES} l WHERE note IS DISTINCT FROM 'other' ORDER BY id"


def _setup(staging, tmp_path):
    staging.sql(f"INSERT INTO {LINES} (customer_id, amount, note) SELECT g, g, 'old' FROM generate_series(18, 24) g")
    path = tmp_path / "003_fix_customers.py"
    path.write_text(MIGRATION)
    staging.env["ROLLBACK_UNDO"] = "on"
    return path


class Writer(threading.Thread):
    """Another session: inserts its own customers and order lines and updates customer
    250, over and over, until stopped; remembers what it wrote."""

    def __init__(self, staging) -> None:
        super().__init__(daemon=True)
        self.staging = staging
        self.stop = threading.Event()
        self.emails: list[str] = []
        self.name_250: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with closing(self.staging.connect()) as conn:
                conn.autocommit = True
                n = 0
                while not self.stop.is_set():
                    n += 1
                    with conn.cursor() as cur:
                        cur.execute("INSERT INTO customers (email, name) VALUES (%s, 'other') RETURNING id", (f"other-{n}@x",))
                        new_id = cur.fetchone()[0]
                        cur.execute(f"INSERT INTO {LINES} (customer_id, amount, note) VALUES (%s, 1, 'other')", (new_id,))
                        cur.execute("UPDATE customers SET name = %s WHERE id = 250", (f"other {n}",))
                    self.emails.append(f"other-{n}@x")
                    self.name_250 = f"other {n}"
                    time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc


@pytest.mark.servers("14", "15", "16", "18")  # the majors the undo is built for
def test_a_run_is_undone_exactly_while_another_session_writes_the_same_tables(staging, tmp_path):
    path = _setup(staging, tmp_path)
    before, lines_before = staging.sql(MINE), staging.sql(LINES_MINE)
    audit_before = staging.sql("SELECT count(*) FROM audit_events")[0][0]
    writer = Writer(staging)
    writer.start()
    try:
        run = staging.run("run_migration.py", str(path), "--production", "--yes", "--json")
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["outcome"] == "succeeded" and report["undo_run"]
        assert staging.sql("SELECT count(*) FROM customers WHERE email LIKE 'migrated%'") == [(50,)]
        status = staging.run_json("run_migration.py", "--status", str(path))
        assert [(r["run_id"], r["undo"]) for r in status["runs"]] == [(report["undo_run"], "available")]

        dry = staging.run_json("rollback_manager.py", "undo", "003_fix_customers", "--dry-run")
        assert dry["deleted"]["public.customers"] == 50 and dry["restored"]["public.customers"] == 20
        assert dry["reinserted"]["public.customers"] == 2 and dry["conflicts"] == []
        assert staging.sql("SELECT count(*) FROM customers WHERE email LIKE 'migrated%'") == [(50,)]  # a dry run

        undo = staging.run("rollback_manager.py", "undo", report["undo_run"], "--yes", "--json")
        assert undo.returncode == 0, undo.stderr
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.error is None and len(writer.emails) > 5
    done = json.loads(undo.stdout)
    assert done["applied"] and done["reinserted"]['Sales Ops.Order "Lines" Ü'] >= 2
    # every row the run touched is as it was before it, the cascade's order lines included
    assert staging.sql(MINE) == before
    assert staging.sql(LINES_MINE) == lines_before
    # every row the other session wrote is as it wrote it
    emails = {r[0] for r in staging.sql("SELECT email FROM customers WHERE email LIKE 'other-%'")}
    assert emails == set(writer.emails)
    assert staging.sql("SELECT name FROM customers WHERE id = 250") == [(writer.name_250,)]
    assert staging.sql(f"SELECT count(*) FROM {LINES} WHERE note = 'other'") == [(len(writer.emails),)]
    # the run's trigger rows went with it; the other session's stay (one per insert and update)
    assert staging.sql("SELECT count(*) FROM audit_events")[0][0] == audit_before + 2 * len(writer.emails)
    assert staging.sql("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'rb\\_undo\\_%'") == [(0,)]

    again = staging.run("rollback_manager.py", "undo", report["undo_run"], "--yes")
    assert again.returncode != 0 and "was undone already" in again.stderr and "run the migration again" in again.stderr
    status = staging.run_json("run_migration.py", "--status", str(path))
    assert status["runs"][0]["undo"] == "undone"
    mine = next(m for m in status["migrations"] if m["migration_id"] == "003_fix_customers")
    assert mine["state"] == "rolled back" and "undo of run" in mine["detail"]
    entries = staging.run_json("rollback_manager.py", "audit", "--limit", "0")
    entry = next(e for e in entries if e["event"] == "undo")
    assert entry["outcome"] == "succeeded" and entry["run_id"] == report["undo_run"]
    assert entry["deleted"]["public.customers"] == 50 and entry["conflicts"] == 0


def test_a_conflict_changes_nothing_until_skipped_and_is_audited(staging, tmp_path):
    path = _setup(staging, tmp_path)
    run = staging.run_json("run_migration.py", str(path), "--production", "--yes")
    staging.sql("UPDATE customers SET name = 'changed by a colleague' WHERE id = 3")
    state = staging.sql("SELECT c::text FROM customers c ORDER BY id")
    refused = staging.run("rollback_manager.py", "undo", run["undo_run"], "--yes")
    assert refused.returncode != 0
    assert "1 row(s) it wrote were changed after it" in refused.stderr and "--skip-conflicts" in refused.stderr
    assert "changed by a colleague" in refused.stderr  # what is there now is shown
    assert staging.sql("SELECT c::text FROM customers c ORDER BY id") == state
    skipped = staging.run_json("rollback_manager.py", "undo", run["undo_run"], "--yes", "--skip-conflicts")
    assert len(skipped["conflicts"]) == 1 and skipped["conflicts"][0]["key"] == {"id": 3}
    assert staging.sql("SELECT name FROM customers WHERE id = 3") == [("changed by a colleague",)]
    assert staging.sql("SELECT count(*) FROM customers WHERE email LIKE 'migrated%'") == [(0,)]
    entries = staging.run_json("rollback_manager.py", "audit")
    entry = next(e for e in entries if e["event"] == "undo" and e["outcome"] == "succeeded")
    assert entry["conflicts"] == 1 and entry["conflicts_skipped"] == ['public.customers {"id": 3}']


def test_a_kill_9_during_the_undo_leaves_staging_as_before_the_undo(staging, tmp_path):
    path = _setup(staging, tmp_path)
    run = staging.run_json("run_migration.py", str(path), "--production", "--yes")
    state = staging.sql("SELECT c::text FROM customers c ORDER BY id")
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "rollback_manager.py"), "undo", run["undo_run"], "--yes"],
        env={**staging.env, "ROLLBACK_FAULT_PAUSE": "undo applied", "ROLLBACK_FAULT_READY": str(ready)},
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(ready.exists, timeout=120, what="the undo to have put every row back", process=proc, every=0.05)
    proc.kill()
    proc.wait(30)
    wait_for(
        lambda: staging.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rollback-toolkit undo'") == [(0,)],
        timeout=30,
        what="the killed undo's session to end",
    )
    assert staging.sql("SELECT c::text FROM customers c ORDER BY id") == state
    assert staging.sql("SELECT undone_at FROM rollback_toolkit.undo_runs") == [(None,)]
    # and the undo can be made afterwards
    done = staging.run_json("rollback_manager.py", "undo", run["undo_run"], "--yes")
    assert done["applied"] and staging.sql("SELECT count(*) FROM customers WHERE email LIKE 'migrated%'") == [(0,)]


def test_keyless_tables_refuse_a_production_run_unless_told_and_a_write_to_one_makes_the_undo_unavailable(staging, tmp_path):
    staging.env["ROLLBACK_UNDO"] = "on"
    path = tmp_path / "004_logs.sql"
    path.write_text(
        "-- Write a log line\nINSERT INTO parent_log VALUES (1, 'migrated'); UPDATE customers SET name = 'x' WHERE id = 1;\n"
    )
    refused = staging.run("run_migration.py", str(path), "--production", "--yes")
    assert refused.returncode != 0
    assert "public.parent_log" in refused.stderr and "--undo-keyed-only" in refused.stderr and "--no-undo" in refused.stderr
    assert staging.run_json("rollback_manager.py", "list") == []  # refused before the point
    run = staging.run_json("run_migration.py", str(path), "--production", "--yes", "--undo-keyed-only")
    assert run["outcome"] == "succeeded"
    undo = staging.run("rollback_manager.py", "undo", run["undo_run"], "--yes")
    assert undo.returncode != 0 and "public.parent_log" in undo.stderr and "Restore the run's point" in undo.stderr
    assert staging.sql("SELECT name FROM customers WHERE id = 1") == [("x",)]


def test_a_run_that_changed_the_schema_or_a_killed_run_is_refused_and_its_triggers_removed(staging, tmp_path):
    staging.env["ROLLBACK_UNDO"] = "on"
    path = tmp_path / "005_schema.py"
    path.write_text(
        '"""Add a column and fill it."""\nTABLES = ["customers", "audit_events"]\n\n\ndef migrate(ctx):\n'
        "    with ctx.staging.cursor() as cur:\n"
        '        cur.execute("ALTER TABLE customers ADD COLUMN region text")\n'
        "        cur.execute(\"UPDATE customers SET region = 'eu'\")\n"
    )
    run = staging.run_json("run_migration.py", str(path), "--production", "--yes")
    undo = staging.run("rollback_manager.py", "undo", run["undo_run"], "--yes")
    assert undo.returncode != 0 and "Restore the run's point instead" in undo.stderr
    assert "ALTER TABLE" in undo.stderr or "columns of public.customers changed" in undo.stderr

    # a run killed while captured: the next command removes its triggers, and what it
    # committed before it died can be undone
    with closing(staging.connect()) as conn:
        conn.autocommit = True
        usable, _ = capture.plan(conn, "killed-run", [("public", "customers")])
        capture.install(conn, "killed-run", usable)
        capture.mark(conn, "killed-run")
        with conn.cursor() as cur:
            cur.execute("INSERT INTO customers (email, name) VALUES ('before-the-kill@x', 'k')")
    capture.marker(staging.backup_dir, "killed-run").touch()
    assert staging.sql("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'rb\\_undo\\_%'")[0][0] == 4
    early = staging.run("rollback_manager.py", "undo", "killed-run", "--yes", "--dry-run")
    assert early.returncode == 0, early.stderr  # the operation ended the capture first
    assert "Removed the capture triggers of the interrupted run killed-run" in early.stderr
    assert staging.sql("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'rb\\_undo\\_%'") == [(0,)]
    done = staging.run_json("rollback_manager.py", "undo", "killed-run", "--yes")
    assert done["deleted"] == {"public.customers": 1}
    assert staging.sql("SELECT count(*) FROM customers WHERE email = 'before-the-kill@x'") == [(0,)]


@pytest.mark.parametrize("wanted", ["no-such-run"])
def test_an_unknown_run_is_a_clear_error(staging, wanted):
    result = staging.run("rollback_manager.py", "undo", wanted, "--yes")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no undo log" in result.stderr or "no captured run" in result.stderr


@pytest.mark.servers("14", "15", "16", "18")  # the majors the undo is built for
def test_a_role_that_owns_staging_without_being_superuser_captures_and_undoes(staging, tmp_path):
    """As on a managed service: the migration's role owns its database and tables, and
    may not create event triggers; schema changes are then found by the catalog digest."""
    owner, password, db = "undo_owner", "owner-pw-7", f"{staging.name}_owned"
    with closing(staging.server.connect()) as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute(f"SELECT 1 FROM pg_roles WHERE rolname = '{owner}'")
        if not cur.fetchone():
            cur.execute(f"CREATE ROLE {owner} LOGIN PASSWORD '{password}' NOSUPERUSER CREATEDB")
        cur.execute(f'CREATE DATABASE "{db}" OWNER {owner}')
    url = staging.server.url(db, user=owner, password=password)
    env = {**staging.env, "STAGING_DATABASE_URL": url, "ROLLBACK_UNDO": "on"}
    with closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute(
            "CREATE TABLE items (id int PRIMARY KEY, price numeric, note text);"
            "INSERT INTO items SELECT g, g * 1.5, 'n' || g FROM generate_series(1, 100) g"
        )
    path = tmp_path / "006_prices.sql"
    path.write_text("-- Raise prices\nUPDATE items SET price = price * 2 WHERE id <= 10; DELETE FROM items WHERE id = 50;\n")

    def run(*args: str):
        return subprocess.run(
            [sys.executable, str(ROOT / args[0]), *args[1:]],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    done = run("run_migration.py", str(path), "--production", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    undo = run("rollback_manager.py", "undo", report["undo_run"], "--yes", "--json")
    assert undo.returncode == 0, undo.stderr
    with closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), sum(price) FROM items")
        assert cur.fetchone() == (100, sum(Decimal(g) * Decimal("1.5") for g in range(1, 101)))
    # a column added by a run (no event trigger for this role): the digest refuses the undo
    path.write_text("-- Add a column\nALTER TABLE items ADD COLUMN region text; UPDATE items SET region = 'eu';\n")
    changed = run("run_migration.py", str(path), "--production", "--yes", "--json")
    assert changed.returncode == 0, changed.stderr
    refused = run("rollback_manager.py", "undo", json.loads(changed.stdout)["undo_run"], "--yes")
    assert refused.returncode != 0 and "columns of public.items changed" in refused.stderr
    with closing(staging.server.connect()) as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def test_check_setup_says_what_a_production_runs_undo_needs(staging):
    on = staging.run("check_setup.py", "--json", env={"ROLLBACK_UNDO": "on"})
    assert on.stdout, on.stderr
    found = {f["item"]: f for f in json.loads(on.stdout)}["undo log"]
    assert found["status"] == "warn" and "public.parent_log" in found["detail"] and "--undo-keyed-only" in found["fix"]
    staging.sql("DROP ROLE IF EXISTS undo_reader; CREATE ROLE undo_reader LOGIN PASSWORD 'reader-pw-3'")
    staging.sql(
        f'GRANT CONNECT, CREATE ON DATABASE "{staging.name}" TO undo_reader; GRANT SELECT ON ALL TABLES IN SCHEMA public TO undo_reader'
    )
    url = staging.server.url(staging.name, user="undo_reader", password="reader-pw-3")
    reader = staging.run("check_setup.py", "--json", env={"ROLLBACK_UNDO": "keyed", "STAGING_DATABASE_URL": url})
    assert reader.stdout, reader.stderr
    found = {f["item"]: f for f in json.loads(reader.stdout)}["undo log"]
    assert found["status"] == "fail" and "may not put triggers on" in found["detail"] and "TRIGGER ON them" in found["fix"]
    off = staging.run("check_setup.py", "--json", env={"ROLLBACK_UNDO": "off"})
    assert {f["item"]: f for f in json.loads(off.stdout)}["undo log"]["status"] == "ok"
    staging.sql(
        f'REVOKE ALL ON DATABASE "{staging.name}" FROM undo_reader; REVOKE ALL ON ALL TABLES IN SCHEMA public FROM undo_reader'
    )
