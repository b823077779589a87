"""Restores are exact, verified, undoable, and never leave staging half-done."""

from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from lib.config import load_settings
from lib.pg.locks import DatabaseLock
from lib.pg.target import open_target
from lib.points.manifest import manifest_digest
from tests.helpers import archive_file, deep_state, schema_dump, wait_for

MIGRATION = """
INSERT INTO customers (email, name) SELECT 'new' || g || '@example.com', 'New ' || g FROM generate_series(1, 50) g;
UPDATE "Sales Ops"."Order ""Lines"" Ü" SET status = 'cancelled' WHERE id % 3 = 0;
DELETE FROM measurements WHERE city = 'Tainan';
ALTER TABLE customers ADD COLUMN legacy_code text;
DROP VIEW customer_totals;
CREATE TABLE migration_log (id int);
SELECT setval('invoice_no', 5000);
SELECT lo_unlink(lo) FROM attachments WHERE id = 1;
DROP POLICY documents_reader ON documents;
COMMENT ON TABLE customers IS 'changed';
"""


def databases(server) -> set[str]:
    conn = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def test_restore_is_exact_and_can_be_undone_exactly(staging):
    before_schema, before_state = schema_dump(staging.server, staging.name), deep_state(staging.server, staging.name)
    point_id = staging.create_point("Before migration test", "--migration-id", "client_migration")
    assert point_id.startswith("rb_client_migration_")

    staging.sql(MIGRATION)
    migrated_schema, migrated_state = schema_dump(staging.server, staging.name), deep_state(staging.server, staging.name)
    assert migrated_state != before_state

    result = staging.run_json("rollback_manager.py", "restore", point_id, "--yes")
    assert result["mode"] == "swap" and result["verified"].startswith("counted: ")
    assert schema_dump(staging.server, staging.name) == before_schema
    assert deep_state(staging.server, staging.name) == before_state

    # the migrated state was kept as a point: restoring it undoes the rollback, exactly
    undo = staging.run_json("rollback_manager.py", "restore", result["before_point_id"], "--yes")
    assert undo["mode"] == "swap"
    assert schema_dump(staging.server, staging.name) == migrated_schema
    assert deep_state(staging.server, staging.name) == migrated_state

    # and the original point still restores after that
    staging.run_json("rollback_manager.py", "restore", point_id, "--yes")
    assert deep_state(staging.server, staging.name) == before_state
    assert not any(name.endswith("_rb_restoring") for name in databases(staging.server))


def test_database_level_settings_come_back(staging):
    staging.sql(f"ALTER DATABASE \"{staging.name}\" SET work_mem = '7MB'")
    staging.sql(f"COMMENT ON DATABASE \"{staging.name}\" IS 'staging for V2 import'")
    point_id = staging.create_point()
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert staging.sql("SHOW work_mem")[0][0] == "7MB"
    assert (
        staging.sql("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = current_database()")[0][0]
        == "staging for V2 import"
    )


def test_no_terminal_and_no_yes_refuses_before_anything_changes(staging):
    point_id = staging.create_point()
    staging.sql("DELETE FROM customers WHERE id > 100")
    result = staging.run("rollback_manager.py", "restore", point_id)
    assert result.returncode == 2
    assert "--yes" in result.stderr and "no terminal" in result.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 100
    assert [p["id"] for p in staging.run_json("rollback_manager.py", "list")] == [point_id]


def test_connected_sessions_are_named_and_ended_with_yes(staging):
    point_id = staging.create_point()
    idle = psycopg2.connect(staging.url, application_name="night-migration")
    idle.autocommit = True
    try:
        refused = staging.run("rollback_manager.py", "restore", point_id)
        assert refused.returncode == 2
        assert "night-migration" in refused.stderr and "will be disconnected" in refused.stderr
        with idle.cursor() as cur:
            cur.execute("SELECT 1")  # still alive: nothing was done

        done = staging.run("rollback_manager.py", "restore", point_id, "--yes", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["sessions_terminated"] == 1
        with pytest.raises(psycopg2.OperationalError), idle.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        idle.close()


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_archive_is_refused_with_exit_3_naming_good_points(staging, damage):
    good = staging.create_point("Good one")
    bad = staging.create_point("Bad one")
    archive = archive_file(staging.backup_dir / bad)
    data = archive.read_bytes()
    archive.write_bytes(data[:-100] if damage == "truncate" else data[:200] + b"X" + data[201:])
    staging.sql("DELETE FROM customers")

    result = staging.run("rollback_manager.py", "restore", bad, "--yes")
    assert result.returncode == 3
    assert str(archive) in result.stderr
    assert good in result.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 0  # untouched
    assert staging.run("rollback_manager.py", "verify", bad).returncode == 3
    assert staging.run("rollback_manager.py", "verify", good).returncode == 0


def test_a_restore_that_fails_before_the_swap_leaves_staging_as_it_was(staging):
    """pg_restore stops at the first error (a role the archive needs is gone)."""
    staging.sql("DROP ROLE IF EXISTS rollback_test_owner")
    staging.sql("CREATE ROLE rollback_test_owner")
    staging.sql("CREATE TABLE owned_elsewhere (x int); ALTER TABLE owned_elsewhere OWNER TO rollback_test_owner")
    point_id = staging.create_point()
    staging.sql("DROP TABLE owned_elsewhere; DROP ROLE rollback_test_owner")
    staging.sql("INSERT INTO customers (email, name) VALUES ('after@x', 'after')")
    state = deep_state(staging.server, staging.name)

    result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 1
    assert "rollback_test_owner" in result.stderr
    assert "Traceback" not in result.stderr
    assert deep_state(staging.server, staging.name) == state
    assert not any(n.endswith("_rb_restoring") for n in databases(staging.server))
    assert [p["id"] for p in staging.run_json("rollback_manager.py", "list")] == [point_id]


def test_a_point_that_does_not_match_its_rebuilt_copy_is_refused_with_exit_3(staging):
    point_id = staging.create_point()
    manifest_path = staging.backup_dir / point_id / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint"]["row_counts"]["public.customers"] = 999
    manifest["manifest_sha256"] = manifest_digest(manifest)  # as if the point had been written so: only the rebuild can tell
    manifest_path.write_text(json.dumps(manifest))
    staging.sql("DELETE FROM customers WHERE id > 5")

    result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 3
    assert "public.customers: 999 rows recorded, 300 found" in result.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 5
    assert not any(n.endswith("_rb_restoring") for n in databases(staging.server))


OWNED_SCHEMA = '''
CREATE TABLE plain (id int PRIMARY KEY, v text, doc jsonb);
CREATE SEQUENCE tickets START 10;
CREATE VIEW plain_view AS SELECT id, upper(v) AS v FROM plain;
CREATE FUNCTION twice(x int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 2 * x';
CREATE SCHEMA "Reports Ü";
CREATE TABLE "Reports Ü"."Daily ""Totals""" (day date PRIMARY KEY, total numeric);
COMMENT ON TABLE plain IS 'owned by the staging role';
INSERT INTO plain SELECT g, 'v' || g, jsonb_build_object('g', g) FROM generate_series(1, 100) g;
INSERT INTO "Reports Ü"."Daily ""Totals""" VALUES ('2024-01-01', 1.5);
SELECT setval('tickets', 42);
SELECT lo_from_bytea(0, 'blob');
'''


def test_without_the_right_to_create_databases_the_restore_runs_in_place_in_one_transaction(server, new_staging):
    staging = new_staging(server, "owned")
    role = f"owner_{staging.name}"[:60]
    db = f"{staging.name}_own"
    admin = server.connect()
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'owner-pw-123' NOCREATEDB")
        cur.execute(f'CREATE DATABASE "{db}" OWNER "{role}" TEMPLATE template0')
    owner = psycopg2.connect(server.url(db, user=role, password="owner-pw-123"))
    owner.autocommit = True
    with owner.cursor() as cur:
        cur.execute(OWNED_SCHEMA)
    owner.close()
    env = {"STAGING_DATABASE_URL": server.url(db, user=role, password="owner-pw-123")}
    try:
        before_schema, before = schema_dump(server, db), deep_state(server, db)
        point_id = staging.run_json("create_rollback_point.py", "owner point", env=env)["id"]
        conn = server.connect(db, user=role, password="owner-pw-123")  # the migration runs as that role
        with conn.cursor() as cur:
            cur.execute("DELETE FROM plain WHERE id > 10; CREATE TABLE junk (x int); SELECT setval('tickets', 99)")
        conn.close()
        result = staging.run("rollback_manager.py", "restore", point_id, "--yes", "--json", env=env)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["mode"] == "in-place"
        assert "may not create or rename databases" in result.stderr
        assert deep_state(server, db) == before
        assert schema_dump(server, db) == before_schema
        listed = {p["id"]: p for p in staging.run_json("rollback_manager.py", "list", env=env)}
        assert listed[out["before_point_id"]]["method"] == "dump"
        assert listed[out["before_point_id"]]["kind"] == "before_rollback"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            cur.execute(f'DROP ROLE IF EXISTS "{role}"')
        admin.close()


def test_a_second_operation_fails_at_once_with_exit_4_naming_the_holder(staging):
    point_id = staging.create_point()
    settings = load_settings()
    target = open_target(settings)
    try:
        with DatabaseLock(
            target.maint, target.facts.system_identifier, staging.name, folder=settings.backup_dir, doing="restore"
        ):
            started = time.monotonic()
            result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
            assert time.monotonic() - started < 30
            assert result.returncode == 4
            assert "restore by process" in result.stderr
            # from another machine: a different backup folder, only the server lock is shared
            other = staging.run("create_rollback_point.py", "x", env={"BACKUP_DIR": str(staging.backup_dir.parent / "other")})
            assert other.returncode == 4
            assert "server session pid" in other.stderr
    finally:
        target.close()
    assert staging.run("rollback_manager.py", "restore", point_id, "--yes").returncode == 0


def test_restore_of_a_point_of_another_database_is_refused(staging, new_staging):
    other = new_staging(staging.server, "other")
    point_id = staging.create_point()
    other_env = {"STAGING_DATABASE_URL": other.url}
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes", env=other_env)
    assert result.returncode == 2
    assert f"is of database {staging.name!r}" in result.stderr
    compared = staging.run("rollback_manager.py", "diff", point_id, env=other_env)  # nor compared with it
    assert compared.returncode == 2 and f"is of database {staging.name!r}" in compared.stderr
    assert compared.stdout == ""


@pytest.mark.german
def test_sessions_arriving_during_the_restore_do_not_break_it(staging):
    """Clients keep connecting and querying while staging is restored. Each one sees the
    old staging or the restored one, never a half-built copy; the only errors allowed are
    those of the swap itself: a connection refused while staging takes none (no SQLSTATE:
    it fails before a session exists), and a session ended by the swap (57P01, or a
    closed connection)."""
    point_id = staging.create_point()
    staging.sql("DELETE FROM customers WHERE id > 100")
    stop = threading.Event()
    seen: list[int] = []
    errors: list[tuple[str, str, str | None, str]] = []

    def hammer():
        while not stop.is_set():
            try:
                conn = psycopg2.connect(staging.url, connect_timeout=2)
            except psycopg2.Error as exc:
                errors.append(("connect", type(exc).__name__, exc.pgcode, str(exc)))
                time.sleep(0.01)
                continue
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT count(*) FROM customers")
                    seen.append(cur.fetchone()[0])
            except psycopg2.Error as exc:
                errors.append(("query", type(exc).__name__, exc.pgcode, str(exc)))
            finally:
                conn.close()
            time.sleep(0.01)

    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    try:
        wait_for(lambda: seen, timeout=30, what="the first session's answer", every=0.01)
        result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
        answered = len(seen)
        wait_for(lambda: len(seen) > answered, timeout=30, what="a session's answer after the restore", every=0.01)
    finally:
        stop.set()
        t.join()
    assert result.returncode == 0, result.stderr
    assert seen and set(seen) <= {100, 300}, sorted(set(seen))
    assert seen[-1] == 300
    unexpected = [
        e
        for e in errors
        if not (
            (e[0] == "connect" and e[1] == "OperationalError" and e[2] is None)
            or (e[0] == "query" and (e[2] == "57P01" or (e[1] == "OperationalError" and e[2] is None)))
        )
    ]
    assert unexpected == []
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 300
    assert staging.sql("SELECT datallowconn FROM pg_database WHERE datname = current_database()")[0][0] is True


def test_database_url_is_taken_before_or_after_the_command(staging):
    point_id = staging.create_point()
    no_env = {"STAGING_DATABASE_URL": ""}
    staging.sql("DELETE FROM customers WHERE id > 100")
    after = staging.run("rollback_manager.py", "restore", point_id, "--database-url", staging.url, "--yes", env=no_env)
    assert after.returncode == 0, after.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 300
    before = staging.run("rollback_manager.py", "--database-url", staging.url, "list", "--json", env=no_env)
    assert before.returncode == 0 and point_id in before.stdout
    unset = staging.run("rollback_manager.py", "restore", point_id, "--yes", env=no_env)
    assert unset.returncode == 2 and "STAGING_DATABASE_URL is not set" in unset.stderr


# ------------------------------------------------------------------ commands around the swap


def _recorder(log: Path, code: int = 0) -> str:
    """A command line that appends what it was told to ``log`` and exits ``code``."""
    body = (
        "import os, sys; e = os.environ; "
        f"open({str(log)!r}, 'a').write(' '.join([e['ROLLBACK_PHASE'], e['ROLLBACK_DATABASE'], e['ROLLBACK_POINT_ID'], "
        "e.get('ROLLBACK_SWAPPED', '-'), str(any('DATABASE_URL' in k for k in e)), e.get('PGPASSFILE', '-')]) + '\\n'); "
        f"print('pooler said no', file=sys.stderr) if {code} else None; sys.exit({code})"
    )
    # the URL is an argument it ignores: a pooler's admin URL with a password, which must never be shown
    return shlex.join([sys.executable, "-c", body, "postgresql://pgbouncer:hook-pw-123@pooler/pgbouncer"])


def test_commands_run_just_before_and_after_the_swap(staging, tmp_path):
    point_id = staging.create_point()
    log = tmp_path / "hooks.log"
    env = {"ROLLBACK_BEFORE_SWAP": _recorder(log), "ROLLBACK_AFTER_SWAP": _recorder(log), "PGPASSFILE": "/the/operators/pgpass"}
    staging.sql("DELETE FROM customers WHERE id > 100")
    restored = staging.run("rollback_manager.py", "restore", point_id, "--yes", env=env)
    assert restored.returncode == 0, restored.stderr
    assert "Just before the swap:" in restored.stderr and "pgbouncer:***@pooler" in restored.stderr
    # no toolkit URL (and no password) reaches it; the operator's own PG* variables do
    assert log.read_text().splitlines() == [
        f"before_swap {staging.name} {point_id} - False /the/operators/pgpass",
        f"after_swap {staging.name} {point_id} 1 False /the/operators/pgpass",
    ]
    written = [p.read_text(errors="replace") for p in staging.log_dir.rglob("*") if p.is_file()]
    assert all("hook-pw-123" not in text for text in [restored.stderr, restored.stdout, *written])
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 300


def test_a_failing_command_before_the_swap_leaves_staging_untouched_and_resumes(staging, tmp_path):
    point_id = staging.create_point()
    staging.sql("DELETE FROM customers WHERE id > 100")
    before = deep_state(staging.server, staging.name)
    listed = [p["id"] for p in staging.run_json("rollback_manager.py", "list")]
    log = tmp_path / "hooks.log"
    env = {"ROLLBACK_BEFORE_SWAP": _recorder(log, code=3), "ROLLBACK_AFTER_SWAP": _recorder(log)}
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes", env=env)
    assert result.returncode == 1
    assert "exited with code 3: pooler said no" in result.stderr and "Nothing was swapped" in result.stderr
    assert log.read_text().splitlines()[-1] == f"after_swap {staging.name} {point_id} 0 False -"  # resumed all the same
    assert deep_state(staging.server, staging.name) == before
    assert [p["id"] for p in staging.run_json("rollback_manager.py", "list")] == listed
    assert not staging.sql("SELECT 1 FROM pg_database WHERE datname LIKE %s", (f"{staging.name}_rb_restoring%",))


def test_a_failing_command_after_the_swap_is_loud_and_exits_1(staging, tmp_path):
    point_id = staging.create_point()
    staging.sql("DELETE FROM customers WHERE id > 100")
    env = {"ROLLBACK_AFTER_SWAP": _recorder(tmp_path / "hooks.log", code=4)}
    result = staging.run("quick_rollback.py", "--yes", "--json", env=env)
    assert result.returncode == 1
    outcome = json.loads(result.stdout)
    assert outcome["point_id"] == point_id and outcome["before_point_id"]
    assert "is restored, but the command after the swap" in outcome["after_swap_failed"]
    assert "run it by hand now" in result.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 300
    last = staging.run_json("rollback_manager.py", "audit")[-1]  # the audit entry says so too
    assert last["point_id"] == point_id and "the command after the swap" in last["after_swap_failed"]


def test_a_command_past_its_time_is_stopped_with_everything_it_started(staging, tmp_path):
    point_id = staging.create_point()
    pid_file = tmp_path / "child.pid"
    wrapper = shlex.join(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"])
    env = {"ROLLBACK_BEFORE_SWAP": wrapper, "ROLLBACK_HOOK_TIMEOUT": "1"}
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes", env=env)
    assert result.returncode == 1 and "Nothing was swapped" in result.stderr
    child = int(pid_file.read_text())
    wait_for(lambda: not _running(child), timeout=5, what=f"the command's child {child} to be stopped too")


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_command_that_cannot_be_split_is_refused_before_anything(staging):
    point_id = staging.create_point()
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes", env={"ROLLBACK_BEFORE_SWAP": "psql -c 'PAUSE"})
    assert result.returncode == 2 and "ROLLBACK_BEFORE_SWAP cannot be split" in result.stderr


def test_states_kept_before_rollbacks_have_a_retention_of_their_own(staging):
    point_id = staging.create_point("before the migrations")
    env = {"KEEP_BEFORE_STATES": "2"}
    outputs = []
    for n in range(3):
        staging.sql(f"DELETE FROM customers WHERE id > {200 - n}")
        restored = staging.run("rollback_manager.py", "restore", point_id, "--yes", "--json", env=env)
        assert restored.returncode == 0, restored.stderr
        outputs.append((json.loads(restored.stdout)["before_point_id"], restored.stderr))
    listed = staging.run_json("rollback_manager.py", "list")
    befores = [p["id"] for p in listed if p["kind"] == "before_rollback"]
    assert befores == [outputs[1][0], outputs[2][0]]  # the newest two
    assert point_id in [p["id"] for p in listed]  # a point taken on purpose is never retired by this
    assert f"Removed {outputs[0][0]}" in outputs[2][1] and "KEEP_BEFORE_STATES" in outputs[2][1]
    assert "Removed" not in outputs[1][1]
    gone = outputs[0][0]
    wait_for(
        lambda: not staging.sql("SELECT 1 FROM pg_database WHERE datname = %s", (gone,)),
        timeout=30,
        what=f"the database of {gone} to be dropped in the background",
        every=0.25,
    )
    trail = [e for e in _audit(staging) if e.get("retired_before_states")]
    assert [e["retired_before_states"] for e in trail] == [[gone]]
    kept_all = staging.run("rollback_manager.py", "restore", point_id, "--yes", env={"KEEP_BEFORE_STATES": "0"})
    assert kept_all.returncode == 0 and "Removed" not in kept_all.stderr


def _audit(staging) -> list[dict]:
    return [json.loads(line) for line in (staging.log_dir / "rollback_audit.jsonl").read_text().splitlines()]
