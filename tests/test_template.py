"""Same-server points (CREATE DATABASE ... TEMPLATE), quick rollback and retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import psycopg2
import pytest

from tests.conftest import ROOT
from tests.helpers import archive_file, deep_state, schema_dump, wait_for
from tests.test_restore import MIGRATION, databases


def wait_for_baseline(staging, point_id: str, timeout: float = 60) -> dict:
    """The rows the background read of a point's database, once it has."""
    path = staging.backup_dir / point_id / ".verification.json"
    return wait_for(
        lambda: path.is_file() and json.loads(path.read_text()).get("baseline"),
        timeout=timeout,
        what=f"the background to read the rows of {point_id}",
    )


def db_row(server, name: str):
    conn = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT datallowconn, shobj_description(oid, 'pg_database'), datconnlimit FROM pg_database WHERE datname = %s",
                (name,),
            )
            return cur.fetchone()
    finally:
        conn.close()


def test_template_point_is_a_sealed_copy_that_lists_verifies_restores_and_deletes(staging):
    before = deep_state(staging.server, staging.name)
    created = staging.run_json("create_rollback_point.py", "Before migration", "--method", "template")
    point_id, copy = created["id"], created["template_database"]
    assert created["method"] == "template"
    assert len(copy.encode()) <= 63
    allow, comment, _ = db_row(staging.server, copy)
    assert allow is False and point_id in comment
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    assert manifest["template_database"] == copy and manifest["fingerprint"]["kind"] == "physical"
    assert "row_counts" not in manifest["fingerprint"]  # no row is read on the foreground path
    assert manifest["fingerprint"]["relations"]["public.customers"][1] > 0
    assert wait_for_baseline(staging, point_id)["row_counts"]["public.customers"] == 300

    verified = staging.run_json("rollback_manager.py", "verify", point_id)
    assert verified["verified"] is True and verified["fingerprint"] == "matches the manifest"
    assert verified["level"] == "catalog"
    deep = staging.run_json("rollback_manager.py", "verify", point_id, "--deep")
    assert deep["level"] == "rows" and "rows match the baseline" in deep["rows"]

    staging.sql(MIGRATION)
    restored = staging.run_json("rollback_manager.py", "restore", point_id, "--yes")
    assert restored["verified"].startswith("rows: ")  # every row of the copy read against the point's baseline
    assert deep_state(staging.server, staging.name) == before
    assert db_row(staging.server, copy)[0] is False  # the point stays intact for next time

    deleted = staging.run("rollback_manager.py", "delete", point_id, "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert copy not in databases(staging.server)
    assert point_id not in [p["id"] for p in staging.run_json("rollback_manager.py", "list")]


def test_two_readers_of_a_sealed_point_overlap_and_the_last_to_leave_seals_it(staging, monkeypatch):
    """The background's baseline and a diff may read one point's database at once."""
    from lib.config import load_settings
    from lib.pg.target import open_target
    from lib.points.methods import template as template_method

    created = staging.run_json("create_rollback_point.py", "read twice", "--method", "template")
    copy = created["template_database"]
    wait_for_baseline(staging, created["id"])  # the background's own read is over
    for key, value in staging.env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    with open_target(settings, check_v2=False) as one, open_target(settings, check_v2=False) as two:
        first, second = template_method.opened(one, copy), template_method.opened(two, copy)
        first.__enter__()
        reader = second.__enter__()
        first.__exit__(None, None, None)  # the first leaves while the second still reads
        assert db_row(staging.server, copy)[0] is True
        with reader.cursor() as cur:
            cur.execute("SELECT count(*) FROM customers")
            assert cur.fetchone()[0] == 300
        second.__exit__(None, None, None)
        assert db_row(staging.server, copy)[0] is False  # the last one sealed it

        # many at once: each opening and sealing under its lock, never "tuple concurrently updated"
        failures: list[BaseException] = []

        def read_often(target) -> None:
            try:
                for _ in range(15):
                    with template_method.opened(target, copy) as conn, conn.cursor() as cur:
                        cur.execute("SELECT 1")
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=read_often, args=(t,)) for t in (one, two)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == [] and db_row(staging.server, copy)[0] is False


def test_auto_chooses_template_for_a_role_that_may_create_databases_and_says_why(staging):
    result = staging.run("create_rollback_point.py", "auto", "--json", env={"ROLLBACK_METHOD": ""})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["method"] == "template"
    assert "may create databases" in result.stderr
    dumped = staging.run_json("create_rollback_point.py", "from env", env={"ROLLBACK_METHOD": "dump"})
    assert dumped["method"] == "dump"


def test_auto_chooses_dump_for_a_role_that_may_not(server, new_staging):
    staging = new_staging(server, "nocreate")
    role = f"r_{staging.name}"[:60]
    staging.sql(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'role-pw-123' NOCREATEDB")
    try:
        db = f"{staging.name}_r"
        staging.sql(f'CREATE DATABASE "{db}" OWNER "{role}"')
        env = {"STAGING_DATABASE_URL": server.url(db, user=role, password="role-pw-123")}
        result = staging.run("create_rollback_point.py", "auto", "--json", env={**env, "ROLLBACK_METHOD": ""})
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["method"] == "dump"
        assert "may not create databases" in result.stderr
        refused = staging.run("create_rollback_point.py", "t", "--method", "template", env=env)
        assert refused.returncode == 2 and "--method dump" in refused.stderr
    finally:
        staging.sql(f'DROP DATABASE IF EXISTS "{staging.name}_r" WITH (FORCE)')
        staging.sql(f'DROP ROLE IF EXISTS "{role}"')


def test_sessions_during_create_are_named_and_only_ended_with_yes(staging):
    idle = psycopg2.connect(staging.url, application_name="etl-worker")
    try:
        refused = staging.run("create_rollback_point.py", "x", "--method", "template")
        assert refused.returncode == 2
        assert "etl-worker" in refused.stderr and "--yes" in refused.stderr
        assert staging.run_json("rollback_manager.py", "list") == []
        assert not [d for d in databases(staging.server) if d.startswith("rb_x_")]
        with idle.cursor() as cur:
            cur.execute("SELECT 1")

        done = staging.run("create_rollback_point.py", "x", "--method", "template", "--yes")
        assert done.returncode == 0, done.stderr
        with pytest.raises(psycopg2.OperationalError), idle.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        idle.close()


def test_clients_that_reconnect_at_once_are_named_with_what_to_do(pg18, new_staging):
    """A pooler reconnecting as fast as its sessions are ended: the template point gives up
    after its wait and says so, naming the clients and the hooks that pause a pooler, not
    an empty list and a privilege the role has."""
    staging = new_staging(pg18)
    stop = threading.Event()

    def pooler() -> None:
        while not stop.is_set():
            try:
                conn = psycopg2.connect(staging.url, application_name="pooler-like")
                while not stop.is_set():
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
            except psycopg2.Error:
                continue

    threads = [threading.Thread(target=pooler, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        failed = staging.run("create_rollback_point.py", "x", "--method", "template", "--yes")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failed.returncode != 0
    assert "reconnected at once" in failed.stderr and "pooler-like" in failed.stderr, failed.stderr
    assert "ROLLBACK_BEFORE_SWAP" in failed.stderr and "pg_signal_backend" not in failed.stderr
    assert staging.run_json("rollback_manager.py", "list") == []


@pytest.mark.parametrize("place", ["before copy", "after copy"])
def test_a_copy_killed_half_way_leaves_no_point_and_staging_intact(staging, tmp_path, place):
    """kill -9 of the whole process group, stopped at a named place: before the server
    copies staging, and after it made the copy but before anything sealed or listed it."""
    before = deep_state(staging.server, staging.name)
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "create_rollback_point.py"), "doomed", "--method", "template", "--yes"],
        env={**staging.env, "ROLLBACK_FAULT_PAUSE": place, "ROLLBACK_FAULT_READY": str(ready)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
    )
    wait_for(ready.exists, timeout=60, what=f"the run to reach {place!r}", process=proc, every=0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert staging.run_json("rollback_manager.py", "list") == []  # nothing half-made is listed
    assert deep_state(staging.server, staging.name) == before
    assert db_row(staging.server, staging.name)[0] is True  # staging still takes connections
    # the next creation clears what the killed one left on disk and on the server
    after = staging.create_point("after", "--method", "template", "--yes")
    assert not list(staging.backup_dir.glob(".tmp-*"))
    assert [p["id"] for p in staging.run_json("rollback_manager.py", "list")] == [after]
    assert not [d for d in databases(staging.server) if d.startswith("rb_doomed_")]


def test_an_undone_quick_rollback_gives_back_the_migrated_state_exactly(staging):
    staging.create_point("Before migration", "--method", "template")
    staging.sql(MIGRATION)
    migrated_schema, migrated = schema_dump(staging.server, staging.name), deep_state(staging.server, staging.name)
    quick = staging.run_json("quick_rollback.py", "--yes")
    assert quick["unavailable_seconds"] < 5
    undo = staging.run_json("rollback_manager.py", "restore", quick["before_point_id"], "--yes")
    assert undo["verified"].startswith("rows: ")
    assert deep_state(staging.server, staging.name) == migrated
    assert schema_dump(staging.server, staging.name) == migrated_schema


def test_two_quick_rollbacks_in_a_row_both_work(staging):
    before = deep_state(staging.server, staging.name)
    point_id = staging.create_point("Before migration", "--method", "template")
    for _ in range(2):
        staging.sql(MIGRATION.replace("CREATE TABLE migration_log", "CREATE TABLE IF NOT EXISTS migration_log"))
        result = staging.run_json("quick_rollback.py", "--yes")
        assert result["point_id"] == point_id  # not the 'state before' point the first one left
        assert deep_state(staging.server, staging.name) == before


def test_quick_rollback_uses_dump_points_too_and_names_the_point_when_asking(staging):
    point_id = staging.create_point("Before the orders import", "--method", "dump")
    staging.sql("DELETE FROM customers")
    asked = staging.run("quick_rollback.py")
    assert asked.returncode == 2
    assert point_id in asked.stderr and "Before the orders import" in asked.stderr and " ago)" in asked.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 0
    assert staging.run_json("quick_rollback.py", "--yes")["point_id"] == point_id
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 300


def test_quick_rollback_without_points_offers_the_v2_reset(staging):
    result = staging.run("quick_rollback.py", "--yes")
    assert result.returncode == 1
    assert "no usable rollback point" in result.stderr and "--from-v2" in result.stderr
    reset = staging.run("quick_rollback.py", "--from-v2", "--yes")
    assert reset.returncode == 2 and "V2_DATABASE_URL is not set" in reset.stderr


def test_an_invalid_point_database_is_recognised_and_never_used(staging):
    good = staging.create_point("good", "--method", "template")
    bad = staging.run_json("create_rollback_point.py", "bad", "--method", "template")
    staging.sql("UPDATE pg_database SET datconnlimit = -2 WHERE datname = %s", (bad["template_database"],))
    try:
        assert staging.run("rollback_manager.py", "verify", bad["id"]).returncode == 3
        refused = staging.run("rollback_manager.py", "restore", bad["id"], "--yes")
        assert refused.returncode == 3 and "invalid" in refused.stderr
        quick = staging.run("quick_rollback.py", "--yes", "--json")
        assert quick.returncode == 0, quick.stderr
        assert json.loads(quick.stdout)["point_id"] == good
        assert f"Skipping point {bad['id']}" in quick.stderr
        warned = staging.run("create_rollback_point.py", "third", "--method", "template")
        assert warned.returncode == 0 and bad["template_database"] in warned.stderr
    finally:
        staging.sql("UPDATE pg_database SET datconnlimit = -1 WHERE datname = %s", (bad["template_database"],))


def test_cleanup_never_removes_the_newest_verified_point(staging):
    oldest = staging.create_point("oldest", "--method", "dump")
    verified = staging.create_point("middle", "--method", "template")
    newest = staging.create_point("newest", "--method", "dump")
    archive = archive_file(staging.backup_dir / newest)
    archive.write_bytes(archive.read_bytes()[:-50])  # the newest no longer verifies

    dry = staging.run_json("rollback_manager.py", "cleanup", "--keep", "1", "--dry-run")
    assert dry["removed"] == [oldest] and dry["kept_newest_verified"] == verified
    assert len(staging.run_json("rollback_manager.py", "list")) == 3

    assert staging.run("rollback_manager.py", "cleanup", "--keep", "1").returncode == 2  # no terminal, no --yes
    assert staging.run_json("rollback_manager.py", "cleanup", "--older-than", "1", "--yes")["removed"] == []
    done = staging.run_json("rollback_manager.py", "cleanup", "--keep", "1", "--yes")
    assert done["removed"] == [oldest]
    remaining = [p["id"] for p in staging.run_json("rollback_manager.py", "list")]
    assert remaining == [verified, newest]
    template_db = json.loads((staging.backup_dir / verified / "manifest.json").read_text())["template_database"]
    assert template_db in databases(staging.server)


def test_create_keep_removes_old_points_and_their_copies(staging):
    first = staging.run_json("create_rollback_point.py", "one", "--method", "template")
    staging.create_point("two", "--method", "template")
    third = staging.run_json("create_rollback_point.py", "three", "--method", "template", "--keep", "2")
    assert third["removed"] == [first["id"]]
    assert len(staging.run_json("rollback_manager.py", "list")) == 2  # unlisted at once
    wait_for_database(staging.server, first["template_database"], present=False)  # dropped in the background
    deleting = staging.backup_dir / f".tmp-deleting-{first['id']}"
    wait_for(lambda: not deleting.exists(), timeout=60, what=f"{deleting} to be removed in the background")


def test_template_point_of_a_database_with_a_long_name(server, new_staging):
    staging = new_staging(server, "long_" + "x" * (52 - len(str(os.getpid()))))  # "_<pid>_<n>" follows: 60-62 bytes
    assert len(staging.name.encode()) >= 58
    before = deep_state(server, staging.name)
    created = staging.run_json(
        "create_rollback_point.py", "a rather long description for a template point", "--method", "template"
    )
    assert len(created["template_database"].encode()) <= 63
    staging.sql("DELETE FROM customers WHERE id > 3")
    result = staging.run_json("quick_rollback.py", "--yes")
    assert deep_state(server, staging.name) == before
    assert len(result["before_point_id"]) > 0
    assert all(len(d.encode()) <= 63 for d in databases(server))


def wait_for_database(server, name: str, present: bool = True, timeout: float = 60) -> None:
    """Until the background helper has made (and sealed) the database, or it is gone."""

    def done() -> bool:
        if not present:
            return name not in databases(server)
        row = db_row(server, name)
        return row is not None and row[0] is False and "spare copy" in (row[1] or "")

    wait_for(done, timeout=timeout, what=f"database {name} {'to appear sealed' if present else 'to go away'}")


def wait_for_ready(server, name: str) -> None:
    """Until the background has read the spare and marked it ready (it holds it until then)."""
    wait_for(lambda: "ready=" in ((db_row(server, name) or (None, ""))[1] or ""), timeout=120, what=f"{name} read and ready")


def test_a_spare_copy_makes_quick_rollback_a_swap_and_is_prepared_again(staging):
    env = {"ROLLBACK_SPARE": "1"}
    before = deep_state(staging.server, staging.name)
    created = staging.run_json("create_rollback_point.py", "Before migration", "--method", "template", env=env)
    spare = created["template_database"] + "_spare"
    wait_for_database(staging.server, spare)
    assert db_row(staging.server, spare)[0] is False  # sealed like the point

    wait_for_ready(staging.server, spare)

    staging.sql(MIGRATION)
    result = staging.run("quick_rollback.py", "--yes", "--json", env=env)
    assert result.returncode == 0, result.stderr
    swapped = json.loads(result.stdout)
    assert swapped["tool"] == "spare copy"
    assert swapped["verified"].startswith("rows: every row read in the background")  # swapped at once, already read
    assert "Using the spare copy" in result.stderr
    assert deep_state(staging.server, staging.name) == before
    wait_for_ready(staging.server, spare)  # ready again for the next rollback (the background is done with it)

    # a spare that may have been changed is never swapped in: one left open is dropped, and the point copied...
    staging.sql(f'ALTER DATABASE "{spare}" WITH ALLOW_CONNECTIONS true')
    staging.sql(MIGRATION)
    opened = staging.run("quick_rollback.py", "--yes", "--json", env=env)
    assert opened.returncode == 0, opened.stderr
    assert "was dropped, unused: it was found open to connections" in opened.stderr
    assert json.loads(opened.stdout)["verified"].startswith("rows: ")  # the point's own copy, read before the swap
    assert deep_state(staging.server, staging.name) == before
    wait_for_ready(staging.server, spare)
    # ...and one changed behind the toolkit's back and sealed again: a table truncated
    staging.sql(f'ALTER DATABASE "{spare}" WITH ALLOW_CONNECTIONS true')
    conn = staging.server.connect(spare)
    with conn.cursor() as cur:
        cur.execute("TRUNCATE measurements_2025")
    conn.close()
    staging.sql(f'ALTER DATABASE "{spare}" WITH ALLOW_CONNECTIONS false')
    staging.sql(MIGRATION)
    tampered = staging.run("quick_rollback.py", "--yes", env=env)
    assert tampered.returncode == 0, tampered.stderr
    assert "was dropped, unused: it was opened to connections and sealed again outside the toolkit" in tampered.stderr
    assert deep_state(staging.server, staging.name) == before

    deleted = staging.run("rollback_manager.py", "delete", created["id"], "--yes", env=env)
    assert deleted.returncode == 0
    assert spare not in databases(staging.server)


def _copy_with_sessions(staging, tmp_path, *, reconnects: int):
    """A template point whose copy is paused before each attempt; at the first
    ``reconnects`` pauses a new session connects to staging (and holds on), as an
    application that reconnects at once would. Returns the run and the sessions."""
    ready, resume = tmp_path / "ready", tmp_path / "resume"
    env = {
        "ROLLBACK_FAULT_PAUSE": "before copy",
        "ROLLBACK_FAULT_EVERY": "1",
        "ROLLBACK_FAULT_READY": str(ready),
        "ROLLBACK_FAULT_RESUME": str(resume),
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "create_rollback_point.py"), "held", "--method", "template", "--yes", "--json"],
        env={**staging.env, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )

    def pauses() -> int:
        return len(ready.read_text().splitlines()) if ready.exists() else 0

    sessions = []
    arrivals = 0
    while True:
        wait_for(
            lambda seen=arrivals: pauses() > seen or proc.poll() is not None,
            timeout=120,
            what=f"pause {arrivals + 1} before a copy, or the run's end",
            every=0.02,
        )
        if pauses() == arrivals:  # the run ended
            break
        arrivals = pauses()
        if arrivals <= reconnects:
            sessions.append(psycopg2.connect(staging.url, application_name="reconnecting-app"))
        with open(resume, "a") as fh:
            fh.write("go\n")
    out, err = proc.communicate()
    return proc.returncode, out, err, arrivals, sessions


@pytest.mark.german
def test_a_session_that_slips_in_before_the_copy_is_ended_and_the_copy_retried(staging, tmp_path):
    """The retry is decided by SQLSTATE 55006, so it works on a server that speaks German."""
    code, out, err, arrivals, sessions = _copy_with_sessions(staging, tmp_path, reconnects=1)
    try:
        assert code == 0, err
        assert arrivals == 2  # the first copy met the session, the second succeeded
        created = json.loads(out)
        assert created["method"] == "template"
        assert staging.run("rollback_manager.py", "verify", created["id"]).returncode == 0
        with pytest.raises(psycopg2.OperationalError), sessions[0].cursor() as cur:
            cur.execute("SELECT 1")  # it was ended for the copy
    finally:
        for conn in sessions:
            conn.close()


@pytest.mark.servers("18", "15de")  # each attempt waits the server's 5 s for the session to go
def test_a_session_that_keeps_reconnecting_fails_the_copy_clearly_and_leaves_nothing(staging, tmp_path):
    code, out, err, arrivals, sessions = _copy_with_sessions(staging, tmp_path, reconnects=99)
    try:
        assert code == 1, err
        assert arrivals == 5
        assert "sessions kept connecting" in err and "Stop the clients" in err
        assert "Traceback" not in err
        assert staging.run_json("rollback_manager.py", "list") == []
        assert not [d for d in databases(staging.server) if d.startswith("rb_held_")]
    finally:
        for conn in sessions:
            conn.close()


def test_the_toolkits_own_sessions_are_ended_without_asking(staging):
    """A background job's short session on staging (its facts) needs no one's consent,
    while a client's does: a template point without a terminal refuses only for the client."""
    own = psycopg2.connect(staging.url, application_name="rollback-toolkit")
    try:
        taken = staging.run("create_rollback_point.py", "beside our own", "--method", "template")
        assert taken.returncode == 0, taken.stderr
        with own.cursor() as cur:
            with pytest.raises(psycopg2.OperationalError):
                cur.execute("SELECT 1")  # ended by the copy
    finally:
        own.close()
    client = psycopg2.connect(staging.url, application_name="night-migration")
    try:
        refused = staging.run("create_rollback_point.py", "beside a client", "--method", "template")
        assert refused.returncode == 2 and "night-migration" in refused.stdout + refused.stderr
    finally:
        client.close()
