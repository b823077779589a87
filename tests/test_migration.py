"""run_migration.py and the Python API of seed 000, on real servers with the demo's
V2 and staging samples: dry runs change nothing, thresholds and crashes roll back,
--rollback finds the right point, and the audit trail tells the story."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

import psycopg2
import pytest

from lib.cli import sample
from lib.errors import ConfigError
from tests.conftest import ROOT, Staging, _drop_databases_like, get_server
from tests.helpers import deep_state, wait_for

CLIENTS = "migrations/001_migrate_clients.py"
PRICES = "migrations/002_fix_prices.sql"
# The sample: 3,060 clients, 120 without a phone, 60 entered twice.
GOOD_CLIENTS = 3060 - 120 - 60


def _create(server, name: str, script: str) -> None:
    with closing(server.connect()) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    with closing(server.connect(name)) as conn, conn.cursor() as cur:
        cur.execute(script)


def make_sample(server, tmp_path: Path, monkeypatch) -> Staging:
    suffix = f"{os.getpid()}_{time.monotonic_ns() % 10**9}"
    staging_name, v2_name = f"migstaging_{suffix}", f"migv2_{suffix}"
    _create(server, staging_name, sample.STAGING)
    _create(server, v2_name, sample.V2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "STAGING_", "V2_", "BACKUP_", "LOG_DIR"))}
    env.update(
        STAGING_DATABASE_URL=server.url(staging_name),
        V2_DATABASE_URL=server.url(v2_name),
        BACKUP_DIR=str(tmp_path / "backups"),
        LOG_DIR=str(tmp_path / "logs"),
        ROLLBACK_ENV_FILE=str(tmp_path / "no.env"),
        ROLLBACK_METHOD="dump",
        ROLLBACK_SPARE="0",
        ROLLBACK_UNDO="off",  # the point restores; the undo's own test asks for it
    )
    for key in (
        "STAGING_DATABASE_URL",
        "V2_DATABASE_URL",
        "BACKUP_DIR",
        "LOG_DIR",
        "ROLLBACK_ENV_FILE",
        "ROLLBACK_METHOD",
        "ROLLBACK_SPARE",
        "ROLLBACK_UNDO",
    ):
        monkeypatch.setenv(key, env[key])
    s = Staging(server, staging_name, env, tmp_path / "backups", tmp_path / "logs")
    s.v2_name = v2_name  # type: ignore[attr-defined]
    return s


@pytest.fixture
def mig(server, tmp_path, monkeypatch):
    s = make_sample(server, tmp_path, monkeypatch)
    yield s
    _drop_databases_like(server, s.name)
    _drop_databases_like(server, s.v2_name)


@pytest.fixture
def mig18(servers, tmp_path, monkeypatch):
    server = get_server(servers, 18)
    s = make_sample(server, tmp_path, monkeypatch)
    yield s
    _drop_databases_like(server, s.name)
    _drop_databases_like(server, s.v2_name)


def state(s: Staging) -> dict:
    return deep_state(s.server, s.name)


def audit_events(s: Staging) -> list[dict]:
    path = s.log_dir / "rollback_audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_migration(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


# ------------------------------------------------------------------ run_migration.py


def test_a_dry_run_changes_nothing_and_reports_what_would_change(mig18):
    before, v2_before = state(mig18), deep_state(mig18.server, mig18.v2_name)
    result = mig18.run("run_migration.py", CLIENTS, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "dry run" and report["point_id"] is None
    assert report["migrated"] == GOOD_CLIENTS and report["failed"] == 180
    # rows of failed records (rolled back to their savepoints) are not counted as changes
    assert report["changes"] == {"public.customers": {"inserted": GOOD_CLIENTS, "updated": 0, "deleted": 0}}
    assert state(mig18) == before  # nothing changed on staging
    assert deep_state(mig18.server, mig18.v2_name) == v2_before  # nor on V2
    with open(report["failures_file"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 180
    reasons = {r["record_key"]: r["reason"] for r in rows}
    assert reasons["25"] == "client CL00025 has no phone number"
    assert reasons["3001"].startswith("duplicate client code CL00010")
    assert not any(p.name.startswith("rb_") for p in mig18.backup_dir.glob("*"))  # a dry run takes no point
    (failures,) = [e for e in audit_events(mig18) if e["event"] == "record failures"]  # one for the run
    assert (failures["failed"], failures["mode"], failures["failures_file"]) == (180, "dry run", report["failures_file"])


def _user_content(state: dict) -> dict:
    """Every user table's rows and row count (the toolkit's own schema and the sequences
    aside: an undo leaves sequences where the run left them)."""
    return {k: {t: v for t, v in state[k].items() if not t.startswith("rollback_toolkit.")} for k in ("row_counts", "content")}


def test_the_threshold_stops_the_run_and_the_runs_undo_puts_back_its_batches(mig):
    before = state(mig)
    result = mig.run("run_migration.py", CLIENTS, "--production", "--param", "strict=1", "--json", env={"ROLLBACK_UNDO": "on"})
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "rolled back" and report["batches_committed"] >= 10
    assert report["undo_run"] and report["undone"]["applied"] and report["restored_to"] is None
    assert report["undone"]["deleted"]["public.customers"] > 0
    assert "undoing the run's own changes" in result.stderr and "other sessions' writes were kept" in result.stderr
    assert _user_content(state(mig)) == _user_content(before)
    events = [(e["event"], e["outcome"]) for e in audit_events(mig)]
    assert ("automatic undo", "succeeded") in events and ("restore", "succeeded") not in events
    end = [e for e in audit_events(mig) if e["event"] == "migration end"][-1]
    assert end["undone"] is True and end["undo_run"] == report["undo_run"]


def test_the_threshold_stops_the_run_and_restores_the_point_by_itself(mig):
    before = state(mig)
    result = mig.run("run_migration.py", CLIENTS, "--production", "--param", "strict=1", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "rolled back" and report["threshold_exceeded"]
    assert report["batches_committed"] >= 10  # the breach came part-way, after committed batches
    assert report["restored_to"] == report["point_id"]
    assert "more than the failure threshold of 10%" in result.stderr
    assert state(mig) == before
    events = [(e["event"], e["outcome"]) for e in audit_events(mig)]
    for expected in [
        ("create", "succeeded"),
        ("verify", "verified"),
        ("migration start", "noted"),
        ("record failures", "noted"),
        ("threshold breach", "stopped"),
        ("restore", "succeeded"),
        ("automatic rollback", "succeeded"),
        ("migration end", "rolled back"),
    ]:
        assert expected in events, expected
    # one entry for the run's failed records, not one per batch
    assert "batch failures" not in [e for e, _ in events]
    (failures,) = [e for e in audit_events(mig) if e["event"] == "record failures"]
    assert failures["failed"] == report["failed"] and failures["failures_file"] == report["failures_file"]
    assert failures["batches"].startswith("1") and failures["batches_with_failures"] >= 10
    # the migrated state was kept as a point, so even the automatic rollback can be undone
    assert report["before_rollback_point_id"] in {p["id"] for p in mig.run_json("rollback_manager.py", "list")}


CRASHING = '''
"""Crashes at record {at}."""
def migrate(ctx):
    def handle(n):
        if n == {at}:
            raise RuntimeError("the V2 feed broke at record {at}")
        with ctx.staging.cursor() as cur:
            cur.execute("INSERT INTO products (code, name, price) VALUES (%s, 'crash test', 1)", ("X%d" % n,))
    ctx.run_batches(range(1, 1000), handle)
'''


def test_a_crash_mid_batch_after_committed_batches_restores_the_point(mig18, tmp_path):
    before = state(mig18)
    path = write_migration(tmp_path, "crash_250.py", CRASHING.format(at=250))
    result = mig18.run("run_migration.py", path, "--production", "--batch-size", "100", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["outcome"] == "rolled back" and report["batches_committed"] == 2
    assert "the V2 feed broke at record 250" in report["error"]
    assert state(mig18) == before


def test_a_crash_before_any_commit_needs_only_the_transaction_rollback(mig18, tmp_path):
    before = state(mig18)
    path = write_migration(tmp_path, "crash_50.py", CRASHING.format(at=50))
    result = mig18.run("run_migration.py", path, "--production", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["outcome"] == "failed" and report["restored_to"] is None
    assert "Nothing had been committed" in report["notes"][0]
    assert state(mig18) == before
    assert "restore" not in [e["event"] for e in audit_events(mig18)]


def test_a_constraint_violation_fails_the_record_not_the_run(mig18, tmp_path):
    body = """
def migrate(ctx):
    def handle(code):
        with ctx.staging.cursor() as cur:
            cur.execute("INSERT INTO products (code, name, price) VALUES (%s, 'n', 1)", (code,))
    ctx.run_batches(["Z1", "Z2", "P0001", "Z3"], handle, key=lambda c: c)
"""
    result = mig18.run(
        "run_migration.py", write_migration(tmp_path, "dup.py", body), "--production", "--failure-threshold", "0.5", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["migrated"], report["failed"]) == (3, 1)
    with open(report["failures_file"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["record_key"] == "P0001" and "duplicate key value violates unique constraint" in rows[0]["reason"]
    assert [r[0] for r in mig18.sql("SELECT code FROM products WHERE code LIKE 'Z%' ORDER BY code")] == ["Z1", "Z2", "Z3"]


def test_rollback_flag_restores_the_newest_point_of_the_migration_or_the_one_given(mig18):
    before = state(mig18)
    first = mig18.run("run_migration.py", CLIENTS, "--production", "--limit", "300", "--json")
    assert first.returncode == 0, first.stderr
    first_report = json.loads(first.stdout)
    assert first_report["migrated"] + first_report["failed"] == 300
    assert mig18.sql("SELECT count(*) FROM customers WHERE legacy_id IS NOT NULL")[0][0] == first_report["migrated"]
    after_first = state(mig18)
    second = json.loads(mig18.run("run_migration.py", CLIENTS, "--production", "--json").stdout)
    assert second["outcome"] == "succeeded" and second["point_id"] != first_report["point_id"]
    assert second["skipped"] == first_report["migrated"]  # a second run picks up where the first stopped

    # without an id: the newest point this migration made, i.e. the state after the first run;
    # the file may come after the flag too
    back = mig18.run("run_migration.py", "--rollback", CLIENTS, "--yes", "--json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["point_id"] == second["point_id"]
    assert state(mig18) == after_first

    # with an id: that point
    back = mig18.run("run_migration.py", CLIENTS, "--rollback", first_report["point_id"], "--yes", "--json")
    assert back.returncode == 0, back.stderr
    assert state(mig18) == before


def test_rollback_without_a_point_of_the_migration_says_what_to_do(mig18):
    result = mig18.run("run_migration.py", CLIENTS, "--rollback", "--yes")
    assert result.returncode == 2
    assert "No rollback point was made by the migration 001_migrate_clients" in result.stderr


def test_no_rollback_without_a_terminal_is_refused_before_anything_runs(mig18):
    before = state(mig18)
    result = mig18.run("run_migration.py", CLIENTS, "--production", "--no-rollback")
    assert result.returncode == 2
    assert "Refusing to skip the rollback point without confirmation" in result.stderr
    assert state(mig18) == before
    assert not mig18.backup_dir.exists() or not list(mig18.backup_dir.glob("rb_*"))


def test_a_sql_migration_runs_as_one_unit_and_honours_limit(mig18):
    dry = mig18.run_json("run_migration.py", PRICES, "--limit", "10")
    assert dry["changes"] == {"public.products": {"inserted": 0, "updated": 10, "deleted": 0}}
    assert mig18.sql("SELECT count(*) FROM products WHERE price <> round(price, 2)")[0][0] == 496  # unchanged
    prod = mig18.run_json("run_migration.py", PRICES, "--production", "--limit", "10")
    assert prod["outcome"] == "succeeded" and prod["point_id"]
    assert mig18.sql("SELECT count(*) FROM products WHERE price <> round(price, 2)")[0][0] == 486


def test_a_sql_migration_that_controls_transactions_is_refused(mig18, tmp_path):
    path = write_migration(tmp_path, "commits.sql", "UPDATE products SET price = 0;\nCOMMIT;\n")
    before = state(mig18)
    result = mig18.run("run_migration.py", path, "--production", "--yes")
    assert result.returncode == 2 and "may not control transactions itself" in result.stderr
    assert state(mig18) == before


def test_ctrl_c_rolls_back_the_batch_and_without_a_terminal_restores_the_point(mig18, tmp_path):
    body = """
import time
def migrate(ctx):
    def handle(n):
        time.sleep(0.01)
        with ctx.staging.cursor() as cur:
            cur.execute("INSERT INTO products (code, name, price) VALUES (%s, 'slow', 1)", ("S%d" % n,))
    ctx.run_batches(range(100000), handle)
"""
    before = state(mig18)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "run_migration.py"),
            write_migration(tmp_path, "slow.py", body),
            "--production",
            "--batch-size",
            "20",
        ],
        env=mig18.env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(
        lambda: mig18.sql("SELECT count(*) FROM products WHERE name = 'slow'")[0][0] >= 40,
        timeout=120,
        what="two batches of the migration to commit",
        process=proc,
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Staging is back at" in err
    assert state(mig18) == before
    end = [e for e in audit_events(mig18) if e["event"] == "migration end"][-1]
    assert end["outcome"] == "aborted"


def test_a_broken_migration_file_is_a_clear_error(mig18, tmp_path):
    result = mig18.run("run_migration.py", write_migration(tmp_path, "nomigrate.py", "x = 1\n"))
    assert result.returncode == 2 and "has no function migrate(ctx)" in result.stderr
    result = mig18.run("run_migration.py", str(tmp_path / "missing.py"))
    assert result.returncode == 2 and "There is no migration file" in result.stderr


# ------------------------------------------------------------------ the audit trail


def test_the_audit_trail_skips_and_reports_a_damaged_line(mig18):
    mig18.create_point("first")
    path = mig18.log_dir / "rollback_audit.jsonl"
    with open(path, "a") as f:
        f.write('{"event": "torn by a cra')  # a crash mid-line, no newline
    mig18.create_point("second")  # its entry starts on a line of its own
    result = mig18.run("rollback_manager.py", "audit", "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    assert [e["event"] for e in entries] == ["create", "create"]
    assert "line 2 of" in result.stderr and "is damaged" in result.stderr
    table = mig18.run("rollback_manager.py", "audit", "--limit", "1")
    assert table.returncode == 0 and "create" in table.stdout and "Point / migration" in table.stdout
    assert entries[1]["point_id"] in table.stdout and entries[0]["point_id"] not in table.stdout


# ------------------------------------------------------------------ the Python API


def test_api_round_trip_sync(mig):
    from rollback_manager import RollbackType, SyncMigrationBackup, SyncRollbackManager

    manager = SyncRollbackManager(mig.url)
    before = state(mig)
    point = manager.create_rollback_point(None, "api_001", "customers", "Customer data import")
    mig.sql("INSERT INTO customers (code, name, phone) SELECT 'A' || g, 'api', '1' FROM generate_series(1, 25) g")
    check = manager.verify_rollback(point)
    assert not check.matches and check.tables["public.customers"] == {
        "expected_rows": 2000,
        "actual_rows": 2025,
        "matches": False,
    }
    result = manager.execute_rollback(point, RollbackType.FULL)
    assert result["point_id"] == point
    assert manager.verify_rollback(point).matches
    assert state(mig) == before

    whole = manager.create_rollback_point(None, "api_002", None, "whole database")
    mig.sql("INSERT INTO products (code, name, price) VALUES ('NEW1', 'n', 1), ('NEW2', 'n', 2)")
    mig.sql("UPDATE customers SET name = 'kept' WHERE id = 1")
    partial = manager.execute_rollback(whole, RollbackType.PARTIAL)
    assert {k: v for k, v in partial["deleted"].items() if v} == {"public.products": 2}
    assert mig.sql("SELECT name FROM customers WHERE id = 1")[0][0] == "kept"  # a partial rollback keeps changed rows

    with pytest.raises(ConfigError, match="no transaction to roll back"):
        manager.execute_rollback(whole, RollbackType.TRANSACTION)

    backups = SyncMigrationBackup(manager)
    backup = backups.create_backup("products", "before the price fix")
    assert backups.verify_backup(backup).matches
    mig.sql("UPDATE products SET price = 0 WHERE id > 100")
    backups.restore_backup(backup)
    assert mig.sql("SELECT count(*) FROM products WHERE price = 0")[0][0] == 0
    archive = next(backups.manager.settings.backup_dir.glob(f"{backup}/table_*.copy.gz"))
    archive.write_bytes(archive.read_bytes()[:-5] + b"xxxxx")
    assert not backups.verify_backup(backup).matches

    events = {(e["event"], e.get("point_id")) for e in manager.get_rollback_history()}
    assert {("create", point), ("restore", point), ("verify rollback", point), ("partial rollback", whole)} <= events


def test_api_async_migration_transaction(mig18):
    from lib import MigrationTransaction, RollbackManager, RollbackType, SyncMigrationTransaction  # importable from lib too

    manager = RollbackManager(mig18.url)
    before = state(mig18)

    async def failing_after_a_commit() -> None:
        async with MigrationTransaction(
            manager, migration_id="my_migration_001", table_name="customers", description="Customer data import"
        ) as session:
            with session.cursor() as cur:
                cur.execute("INSERT INTO customers (code, name, phone) VALUES ('B1', 'batch one', '1')")
            session.commit()  # a committed batch: only the point can undo it now
            with session.cursor() as cur:
                cur.execute("INSERT INTO customers (code, name, phone) VALUES ('B2', 'batch two', '1')")
            raise ValueError("validation failed in batch two")

    with pytest.raises(ValueError, match="batch two"):
        asyncio.run(failing_after_a_commit())
    assert state(mig18) == before

    async def succeeding() -> str:
        tx = MigrationTransaction(manager, "my_migration_002", "customers", "works")
        async with tx as session:
            with session.cursor() as cur:
                cur.execute("INSERT INTO customers (code, name, phone) VALUES ('OK1', 'fine', '1')")
        verification = await manager.verify_rollback(tx.rollback_id)
        assert not verification.matches  # one row more than the point: the import is there
        return tx.rollback_id

    point = asyncio.run(succeeding())
    assert mig18.sql("SELECT count(*) FROM customers WHERE code = 'OK1'")[0][0] == 1

    async def undo() -> dict:
        await manager.execute_rollback(point, RollbackType.FULL)
        return (await manager.verify_rollback(point)).as_dict()

    assert asyncio.run(undo())["matches"] is True
    assert state(mig18) == before

    def failing_without_a_commit() -> None:
        with SyncMigrationTransaction(manager.sync, "my_migration_003", "customers") as session:
            with session.cursor() as cur:
                cur.execute("INSERT INTO customers (code, name, phone) VALUES ('T1', 'never', '1')")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing_without_a_commit()
    assert state(mig18) == before
    ends = [e for e in manager.get_rollback_history() if e["event"] == "migration end"]
    assert [e["outcome"] for e in ends] == ["rolled back", "succeeded", "transaction rolled back"]
    assert [e["migration_id"] for e in ends] == ["my_migration_001", "my_migration_002", "my_migration_003"]


def test_api_migration_transaction_with_an_undo_log_keeps_other_sessions_writes(mig18):
    from lib import MigrationTransaction, RollbackManager, SyncMigrationTransaction, SyncRollbackManager

    manager = RollbackManager(mig18.url)
    before = mig18.sql("SELECT c::text FROM customers c ORDER BY id")

    async def failing_after_a_commit() -> MigrationTransaction:
        tx = MigrationTransaction(manager, "undo_api_001", "customers", "with an undo log", undo_log=True)
        with pytest.raises(ValueError):
            async with tx as session:
                with session.cursor() as cur:
                    cur.execute("INSERT INTO customers (code, name, phone) VALUES ('U1', 'batch one', '1')")
                    cur.execute("UPDATE customers SET name = name || ' (api)' WHERE id IN (SELECT min(id) FROM customers)")
                session.commit()
                mig18.sql("INSERT INTO customers (code, name, phone) VALUES ('OTHER', 'another session', '2')")
                raise ValueError("validation failed in batch two")
        return tx

    tx = asyncio.run(failing_after_a_commit())
    assert tx.undo_run and tx.undone and tx.undone["applied"] and tx.restored is None
    assert mig18.sql("SELECT c::text FROM customers c WHERE code <> 'OTHER' ORDER BY id") == before
    assert mig18.sql("SELECT count(*) FROM customers WHERE code = 'OTHER'") == [(1,)]  # kept

    sync = SyncRollbackManager(mig18.url)
    with SyncMigrationTransaction(sync, "undo_api_002", "customers", undo_log=True) as session, session.cursor() as cur:
        cur.execute("INSERT INTO customers (code, name, phone) VALUES ('U2', 'kept until undone', '1')")
    runs = {r["run_id"]: r["undo"] for r in sync.undo_runs()}
    assert runs == {tx.undo_run: "undone", next(r for r in runs if r.startswith("undo_api_002")): "available"}
    # a point taken inside the body is an operation, and it must not end the living run's capture
    with pytest.raises(RuntimeError):
        with SyncMigrationTransaction(sync, "undo_api_003", "customers", undo_log=True) as session:
            with session.cursor() as cur:
                cur.execute("INSERT INTO customers (code, name, phone) VALUES ('U3a', 'before the point', '1')")
            session.commit()
            sync.create_rollback_point(None, "undo_api_003", None, "inside the body")
            with session.cursor() as cur:
                cur.execute("INSERT INTO customers (code, name, phone) VALUES ('U3b', 'after the point', '1')")
            session.commit()
            raise RuntimeError("boom after two commits")
    assert mig18.sql("SELECT count(*) FROM customers WHERE code IN ('U3a', 'U3b')") == [(0,)]
    dry = asyncio.run(manager.undo("undo_api_002", dry_run=True))
    assert dry["deleted"] == {"public.customers": 1} and not dry["applied"]
    assert sync.undo("undo_api_002")["applied"]
    assert mig18.sql("SELECT count(*) FROM customers WHERE code = 'U2'") == [(0,)]


def test_the_seed_api_is_awaitable_exactly_as_seed_000_shows_it(mig18):
    """RollbackManager's methods are coroutines (awaited, never called plainly); the
    synchronous twin returns results; an async MigrationBackup awaits too."""
    from rollback_manager import MigrationBackup, RollbackManager, SyncRollbackManager

    manager = RollbackManager(mig18.url)
    pending = manager.create_rollback_point(None, "seed_api", "customers", "as seed 000")
    assert asyncio.iscoroutine(pending)
    point = asyncio.run(pending)
    assert point in [p["id"] for p in manager.list_rollback_points()]  # a plain call in both
    assert isinstance(SyncRollbackManager(mig18.url).create_rollback_point(None, "sync_api", "customers"), str)

    async def backup() -> bool:
        backups = MigrationBackup(manager)
        made = await backups.create_backup("products", "async backup")
        return (await backups.verify_backup(made)).matches

    assert asyncio.run(backup()) is True


def _append_many(log_dir: str, worker: int) -> None:
    from lib import audit

    for n in range(80):
        audit.event(Path(log_dir), "concurrency", worker=worker, n=n, padding="x" * (n * 40))


@pytest.mark.unit
def test_concurrent_audit_writers_never_interleave(tmp_path):
    import multiprocessing

    from lib import audit

    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(str(tmp_path), w)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    trail = audit.read(tmp_path)
    assert trail.damaged == []
    assert sorted((e["worker"], e["n"]) for e in trail.entries) == [(w, n) for w in range(4) for n in range(80)]
    assert (tmp_path / audit.AUDIT_FILE).stat().st_mode & 0o777 == 0o600


def test_an_unattended_production_run_with_yes_ends_the_application_sessions_its_point_needs(mig18):
    """The cron-style pre-migration run: --yes reaches the template point the runner takes,
    which needs staging to itself; without --yes and a terminal it is refused first."""
    app = psycopg2.connect(mig18.url, application_name="the application")
    try:
        refused = mig18.run("run_migration.py", CLIENTS, "--production", env={"ROLLBACK_METHOD": "template"})
        assert refused.returncode == 2 and "the application" in refused.stderr
        assert audit_events(mig18) == [] or all(e["event"] != "migration start" for e in audit_events(mig18))
        result = mig18.run("run_migration.py", CLIENTS, "--production", "--yes", "--json", env={"ROLLBACK_METHOD": "template"})
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["outcome"] == "succeeded" and report["migrated"] == GOOD_CLIENTS
        assert report["point_id"] and "template" in mig18.run("rollback_manager.py", "info", report["point_id"]).stdout
        with pytest.raises(psycopg2.OperationalError):
            app.cursor().execute("SELECT 1")  # its session was ended for the copy
    finally:
        app.close()


# ------------------------------------------------------------------ retrying failed records

POSITIONS = '''
"""Twenty products keyed by their position; every fifth fails unless --param fixed=1."""
def migrate(ctx):
    def handle(n):
        if n % 5 == 0 and ctx.params.get("fixed") != "1":
            ctx.fail(n, "a multiple of five")
        with ctx.staging.cursor() as cur:
            cur.execute("INSERT INTO products (code, name, price) VALUES (%s, 'retry', 1)", ("R%d" % n,))
    ctx.run_batches(range(1, 21), handle)
'''


def failure_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_retry_failed_reruns_exactly_the_failed_records_and_writes_those_that_fail_again(mig18):
    first = mig18.run_json("run_migration.py", CLIENTS, "--production")
    assert (first["migrated"], first["failed"]) == (GOOD_CLIENTS, 180)
    with closing(mig18.server.connect(mig18.v2_name)) as conn, conn.cursor() as cur:
        cur.execute("UPDATE clients SET phone = '+886-2-1234567' WHERE phone IS NULL")  # the 120 get a phone
    before = state(mig18)

    dry = mig18.run_json("run_migration.py", CLIENTS, "--retry-failed", first["failures_file"])
    assert (dry["migrated"], dry["failed"], dry["skipped"]) == (120, 60, 0)  # the 2,880 others are not touched
    assert dry["retry_of"] == first["failures_file"] and dry["retry_not_found"] == []
    assert state(mig18) == before

    # the threshold holds for the records retried: 60 of 180 fail again, 33%
    retry = mig18.run_json(
        "run_migration.py", CLIENTS, "--retry-failed", first["failures_file"], "--production", "--failure-threshold", "0.5"
    )
    assert retry["outcome"] == "succeeded" and retry["point_id"] not in (None, first["point_id"])
    assert (retry["migrated"], retry["failed"], retry["skipped"]) == (120, 60, 0)
    assert retry["failures_file"] != first["failures_file"]
    again = failure_rows(retry["failures_file"])
    assert len(again) == 60 and all(r["reason"].startswith("duplicate client code") for r in again)
    assert {r["record_key"] for r in again} < {r["record_key"] for r in failure_rows(first["failures_file"])}
    assert mig18.sql("SELECT count(*) FROM customers WHERE legacy_id IS NOT NULL")[0][0] == GOOD_CLIENTS + 120


def test_retry_failed_finds_records_by_position_and_names_keys_it_never_met(mig18, tmp_path):
    path = write_migration(tmp_path, "positions.py", POSITIONS)
    first = mig18.run_json("run_migration.py", path, "--production", "--failure-threshold", "0.5")
    assert [r["record_key"] for r in failure_rows(first["failures_file"])] == ["5", "10", "15", "20"]

    edited = tmp_path / "edited_failures.csv"  # an operator's copy, with a record the migration does not have
    edited.write_text(
        Path(first["failures_file"]).read_text() + "99,failed,typed by hand,1,2024-01-01T00:00:00+00:00,positions\n"
    )
    dry = mig18.run_json("run_migration.py", path, "--retry-failed", str(edited), "--param", "fixed=1")
    assert (dry["migrated"], dry["failed"], dry["retry_not_found"]) == (4, 0, ["99"])

    retry = mig18.run_json(
        "run_migration.py", path, "--retry-failed", first["failures_file"], "--param", "fixed=1", "--production"
    )
    assert (retry["migrated"], retry["failed"], retry["skipped"]) == (4, 0, 0)  # records 1-4 were not run again
    assert retry["failures_file"] is None
    codes = {r[0] for r in mig18.sql("SELECT code FROM products WHERE name = 'retry'")}
    assert codes == {f"R{n}" for n in range(1, 21)}


def test_retry_failed_refuses_a_wrong_missing_or_malformed_file_before_anything_changes(mig18, tmp_path):
    other = json.loads(mig18.run("run_migration.py", write_migration(tmp_path, "positions.py", POSITIONS), "--json").stdout)[
        "failures_file"
    ]
    old_format = tmp_path / "002_other_20240101_000000_failures.csv"
    old_format.write_text("record_key,outcome,reason,batch,time\n7,failed,x,1,2024-01-01T00:00:00+00:00\n")
    only_skipped = tmp_path / "001_migrate_clients_20240101_000000_failures.csv"
    only_skipped.write_text("record_key,outcome,reason,batch,time\n7,skipped,x,1,2024-01-01T00:00:00+00:00\n")
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"\x00\xff\xfe not a failures file\n")
    no_key = tmp_path / "no_key.csv"
    no_key.write_text(
        "record_key,outcome,reason,batch,time,migration_id\n,failed,x,1,2024-01-01T00:00:00+00:00,001_migrate_clients\n"
    )
    before = state(mig18)
    for path, words in [
        (other, "is a failures file of the migration positions, not of 001_migrate_clients"),
        (old_format, "is a failures file of another migration"),
        (tmp_path / "missing.csv", "There is no failures file"),
        (garbage, "is not a failures file"),
        (no_key, "line 2 has no record_key"),
        (only_skipped, "lists no failed record"),
    ]:
        for mode in ([], ["--production", "--yes"]):
            result = mig18.run("run_migration.py", CLIENTS, "--retry-failed", str(path), *mode)
            assert result.returncode == 2, (path, result.stderr)
            error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert len(error) == 1 and words in error[0], (words, result.stderr)
    sql_retry = mig18.run("run_migration.py", PRICES, "--retry-failed", str(old_format))
    assert sql_retry.returncode == 2 and "a .sql migration has no records" in sql_retry.stderr
    assert state(mig18) == before
    assert not mig18.backup_dir.exists() or not list(mig18.backup_dir.glob("rb_*"))
    assert all(e["event"] != "migration start" or e["mode"] == "dry run" for e in audit_events(mig18))


# ------------------------------------------------------------------ the ledger of applied migrations

ADDS = '''
"""Adds products {prefix}1 to {prefix}5."""
def migrate(ctx):
    def handle(n):
        with ctx.staging.cursor() as cur:
            cur.execute("INSERT INTO products (code, name, price) VALUES (%s, 'ledger', 1)", ("{prefix}%d" % n,))
    ctx.run_batches(range(1, 6), handle)
'''


def ledger(s: Staging) -> list[tuple]:
    if s.sql("SELECT to_regclass('rollback_toolkit.migrations')")[0][0] is None:
        return []
    return s.sql("SELECT migration_id, point_id FROM rollback_toolkit.migrations ORDER BY migration_id")


def by_id(status: dict) -> dict[str, dict]:
    return {m["migration_id"]: m for m in status["migrations"]}


def test_a_folder_runs_what_is_pending_in_name_order_and_stops_at_the_first_rollback(mig18, tmp_path):
    folder = tmp_path / "migrations"
    folder.mkdir()
    write_migration(folder, "a_first.py", ADDS.format(prefix="A"))
    write_migration(folder, "b_second.py", CRASHING.format(at=150))  # a batch committed, then a crash
    write_migration(folder, "c_third.py", ADDS.format(prefix="C"))
    write_migration(folder, "_helper.py", "x = 1\n")  # not a migration
    before = state(mig18)

    dry = mig18.run("run_migration.py", str(folder), "--json")
    assert dry.returncode == 1, dry.stderr
    dry_runs = json.loads(dry.stdout)  # the crash stops a dry run of the folder too
    assert [r["migration_id"] for r in dry_runs["ran"]] == ["a_first"] and dry_runs["mode"] == "dry run"
    assert dry_runs["stopped_at"] == "b_second" and dry_runs["not_run"] == ["c_third"]
    assert "the V2 feed broke at record 150" in dry_runs["error"] and "the V2 feed broke" in dry.stderr
    assert state(mig18) == before  # a dry run never writes the ledger

    result = mig18.run("run_migration.py", str(folder), "--production", "--json")
    assert result.returncode == 1, result.stderr
    run = json.loads(result.stdout)
    assert [(r["migration_id"], r["outcome"]) for r in run["ran"]] == [("a_first", "succeeded"), ("b_second", "rolled back")]
    assert run["stopped_at"] == "b_second" and run["not_run"] == ["c_third"]
    assert "b_second rolled back" in result.stderr
    a_point, b_point = (r["point_id"] for r in run["ran"])
    assert ledger(mig18) == [("a_first", a_point)]
    assert mig18.sql("SELECT count(*) FROM products WHERE code LIKE 'C%'")[0][0] == 0

    status = mig18.run_json("run_migration.py", "--status", str(folder))
    rows = by_id(status)
    assert [m["migration_id"] for m in status["migrations"]] == ["a_first", "b_second", "c_third"]
    assert (rows["a_first"]["state"], rows["a_first"]["point_id"]) == ("applied", a_point)
    assert (rows["b_second"]["state"], rows["b_second"]["point_id"]) == ("rolled back", b_point)
    assert rows["c_third"]["state"] == "pending"

    write_migration(folder, "b_second.py", ADDS.format(prefix="B"))  # fixed
    again = mig18.run_json("run_migration.py", str(folder), "--production")
    assert again["already_applied"] == ["a_first"] and again["stopped_at"] is None
    assert [(r["migration_id"], r["outcome"]) for r in again["ran"]] == [("b_second", "succeeded"), ("c_third", "succeeded")]
    assert [m for m, _ in ledger(mig18)] == ["a_first", "b_second", "c_third"]
    nothing = mig18.run_json("run_migration.py", str(folder), "--production")
    assert nothing["ran"] == [] and nothing["already_applied"] == ["a_first", "b_second", "c_third"]


def test_status_only_reads_and_restoring_a_point_restores_the_ledger(mig18, tmp_path):
    folder = tmp_path / "migrations"
    folder.mkdir()
    first = write_migration(folder, "a_first.py", ADDS.format(prefix="A"))
    second = write_migration(folder, "b_second.py", ADDS.format(prefix="B"))
    before = state(mig18)
    fresh = mig18.run_json("run_migration.py", "--status", str(folder))
    assert [m["state"] for m in fresh["migrations"]] == ["pending", "pending"] and fresh["ledger"] is False
    assert state(mig18) == before  # --status never creates the ledger
    shipped = mig18.run_json("run_migration.py", "--status")  # the folder migrations/ by default
    assert [(m["migration_id"], m["state"]) for m in shipped["migrations"]] == [
        ("001_migrate_clients", "pending"),
        ("002_fix_prices", "pending"),
    ]
    table = mig18.run("run_migration.py", "--status", str(folder))
    assert table.returncode == 0 and "pending" in table.stdout

    a = mig18.run_json("run_migration.py", first, "--production")
    b = mig18.run_json("run_migration.py", second, "--production")
    assert ledger(mig18) == [("a_first", a["point_id"]), ("b_second", b["point_id"])]
    back = mig18.run("run_migration.py", second, "--rollback", "--yes")
    assert back.returncode == 0, back.stderr
    assert ledger(mig18) == [("a_first", a["point_id"])]  # the point had a_first applied, not b_second
    rows = by_id(mig18.run_json("run_migration.py", "--status", str(folder)))
    assert rows["a_first"]["state"] == "applied"
    assert rows["b_second"]["state"] == "rolled back" and rows["b_second"]["point_id"] == b["point_id"]
    assert f"restore to {b['point_id']}" in rows["b_second"]["detail"]

    # what a rollback to a_first's point would undo: the products, not the toolkit's own ledger
    found = mig18.run_json("rollback_manager.py", "diff", a["point_id"])
    assert found["tables_added"] == [] and found["schema_objects_added"] == 0
    assert [(t["table"], t["added"]) for t in found["tables"] if t["added"]] == [("public.products", 5)]


# ------------------------------------------------------------------ the failure rate, live and alike

TENTH = '''
"""670 records, 68 of them fail: a rate of 10.149...%, just over 10%."""
def migrate(ctx):
    def handle(n):
        if n % 10 == 0 or n == 1:
            ctx.fail(n, "refused")
    ctx.run_batches(range(1, 671), handle)
'''

RISING = '''
"""100 records; from record 51 on every third fails."""
def migrate(ctx):
    def handle(n):
        if n > 50 and n % 3 == 0:
            ctx.fail(n, "refused")
    ctx.run_batches(range(1, 101), handle)
'''


def test_the_failure_rate_is_computed_once_and_printed_alike_everywhere(mig18, tmp_path):
    path = write_migration(tmp_path, "tenth.py", TENTH)
    result = mig18.run("run_migration.py", path, "--production", "--batch-size", "1000")
    assert result.returncode == 1, result.stderr
    assert "68 of 670 records failed (10.1%), more than the failure threshold of 10%" in result.stderr
    rate_row = next(line for line in result.stdout.splitlines() if "Failure rate" in line)
    assert "10.1%" in rate_row and "10.2%" not in rate_row, rate_row


class Recorder:
    """A Reporter that keeps what a person would have seen."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.progress_texts: list[str] = []

    def info(self, text: str) -> None:
        pass

    step = ok = error = info

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def progress(self, label, total=None, unit=""):
        from lib.interaction import Silent

        return Silent().progress(label, total, unit)

    @contextmanager
    def counter(self, label, total, failures):
        yield lambda: self.progress_texts.append(failures())


def test_progress_shows_the_rate_against_the_threshold_and_warns_once_past_half(mig18, tmp_path, caplog):
    from lib.config import load_settings
    from lib.migrate import runner
    from lib.migrate.context import load

    recorder = Recorder()
    migration = load(write_migration(tmp_path, "rising.py", RISING))
    with caplog.at_level(logging.WARNING):
        report = runner.dry_run(load_settings(), recorder, migration, runner.Options(batch_size=10, threshold=0.2))
    assert report.tally.failed == 17
    assert recorder.progress_texts[0] == "0 failed, 0% of 20%"
    assert recorder.progress_texts[76] == "9 failed, 11.7% of 20%"  # 9 of 77 records
    assert recorder.progress_texts[-1] == "17 failed, 17% of 20%"
    assert len(recorder.warnings) == 1  # after batch 8: 10 of 80 is 12.5%, past 10%; batch 7's 10% is not past it
    assert "10 of 80 records failed (12.5% of 20%)" in recorder.warnings[0] and "after batch 8" in recorder.warnings[0]
    assert [r.getMessage() for r in caplog.records if "half the failure threshold" in r.getMessage()] == recorder.warnings


def test_a_role_that_cannot_keep_the_ledger_is_stopped_before_any_record(mig18, tmp_path):
    """The ledger is made ready in the first transaction, so a role that may not create
    or write it fails the run before a record is migrated, not after the last batch."""
    mig18.sql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledger_runner') "
        "THEN CREATE ROLE ledger_runner LOGIN PASSWORD 'runner-secret'; END IF; END $$"
    )
    mig18.sql("GRANT SELECT, INSERT ON products TO ledger_runner; GRANT USAGE ON SEQUENCE products_id_seq TO ledger_runner")
    runner_url = mig18.server.url(mig18.name, user="ledger_runner", password="runner-secret")
    path = write_migration(tmp_path, "a_first.py", ADDS.format(prefix="A"))
    before = state(mig18)
    args = ("run_migration.py", path, "--production", "--no-rollback", "--yes", "--json")
    result = mig18.run(*args, env={"STAGING_DATABASE_URL": runner_url})
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "failed" and report["migrated"] == 0
    assert "could not be set up in staging" in report["error"] and "permission denied" in report["error"]
    assert state(mig18) == before

    mig18.sql("CREATE SCHEMA rollback_toolkit; CREATE TABLE rollback_toolkit.migrations (migration_id text PRIMARY KEY)")
    mig18.sql("GRANT USAGE ON SCHEMA rollback_toolkit TO ledger_runner")
    result = mig18.run(*args, env={"STAGING_DATABASE_URL": runner_url})
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert "may not write the ledger" in report["error"] and report["migrated"] == 0
    assert mig18.sql("SELECT count(*) FROM products WHERE code LIKE 'A%'")[0][0] == 0
    assert "runner-secret" not in result.stderr + result.stdout


def test_the_migration_file_runs_as_seed_000_shows_it_under_a_bare_python3(mig18):
    """`python3 migrations/001_migrate_clients.py [--production | --rollback]`: the same as
    run_migration.py with the file, under .venv whatever python3 is; never exit 0 doing nothing."""
    from tests.test_first_run import _bare_python, _no_venv_env

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*_bare_python(), CLIENTS, *args],
            cwd=ROOT,
            env=_no_venv_env(mig18.env),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    dry = run("--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["outcome"] == "dry run" and "running under" in dry.stderr
    before = mig18.sql("SELECT count(*) FROM customers")[0][0]
    done = run("--production", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["outcome"] == "succeeded" and report["migrated"] == GOOD_CLIENTS
    assert mig18.sql("SELECT count(*) FROM customers")[0][0] == before + GOOD_CLIENTS
    back = run("--rollback", "--yes", "--json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["point_id"] == report["point_id"]
    assert mig18.sql("SELECT count(*) FROM customers")[0][0] == before
    wrong = run("--production", "--no-such-flag")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
