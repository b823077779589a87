"""run_migration.py and the Python API of seed 000, on real servers with the demo's
V2 and staging samples: dry runs change nothing, thresholds and crashes roll back,
--rollback finds the right point, and the audit trail tells the story."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import psycopg2
import pytest

from lib.cli import sample
from lib.errors import ConfigError
from tests.conftest import ROOT, Staging, _drop_databases_like, get_server
from tests.helpers import deep_state

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
    )
    for key in (
        "STAGING_DATABASE_URL",
        "V2_DATABASE_URL",
        "BACKUP_DIR",
        "LOG_DIR",
        "ROLLBACK_ENV_FILE",
        "ROLLBACK_METHOD",
        "ROLLBACK_SPARE",
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
        ("batch failures", "noted"),
        ("threshold breach", "stopped"),
        ("restore", "succeeded"),
        ("automatic rollback", "succeeded"),
        ("migration end", "rolled back"),
    ]:
        assert expected in events, expected
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
    deadline = time.monotonic() + 120
    while mig18.sql("SELECT count(*) FROM products WHERE name = 'slow'")[0][0] < 40:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
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
    assert table.returncode == 0 and "create" in table.stdout and "Migration" in table.stdout


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
