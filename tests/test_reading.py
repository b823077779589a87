"""Nothing reaches staging that was not shown to be the point: a point database changed
behind the toolkit's back, left open, corrupted or missing a file, or read by a
background that was killed, is caught before anything is swapped in, and the level each
check reached is said (catalog, pages, rows)."""

from __future__ import annotations

import json
import os
import signal
from contextlib import closing

import pytest

from lib.config import ConnInfo
from lib.sandbox.servers import LocalServer, embedded_bin_dir
from tests.conftest import Server, _prepare
from tests.helpers import deep_state, wait_for
from tests.test_restore import MIGRATION
from tests.test_template import wait_for_baseline

CORRUPT_ME = "CREATE TABLE corrupt_me AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 2000) g"


def _point_file(staging, point_id: str, table: str):
    """The file of ``table``'s main fork in a point's database, and the database."""
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    name = manifest["template_database"]
    node = manifest["fingerprint"]["relations"][f"public.{table}"][0]
    oid = staging.sql("SELECT oid FROM pg_database WHERE datname = %s", (name,))[0][0]
    return staging.server.local.data_dir / "base" / str(oid) / str(node), name


def _overwrite_row_bytes(path, block: int) -> None:
    """Bytes inside a row's text in ``block`` overwritten, the file the same size (a bad disk)."""
    with open(path, "r+b") as fh:
        fh.seek(block * 8192)
        page = fh.read(8192)
        at = page.index(b"x" * 64) + 16
        fh.seek(block * 8192 + at)
        fh.write(b"Z" * 16)


def _comment(staging, name: str) -> str:
    """A database's comment ("" while it has none, as between its copy and its seal)."""
    found = staging.sql("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,))
    return (found[0][0] if found else None) or ""


def _opened_and_changed(staging, name: str, statement: str, *, reseal: bool) -> None:
    staging.sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    with closing(staging.server.connect(name)) as conn, conn.cursor() as cur:
        cur.execute(statement)
        conn.commit()
    if reseal:
        staging.sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')


@pytest.mark.skipif(os.geteuid() != 0, reason="the server's files belong to another user")
def test_a_corrupted_page_in_a_point_is_caught_before_the_swap_and_quick_rollback_takes_the_point_before(staging):
    """Case 4: with data checksums (18's default) the server refuses the page; without
    (15's), the altered row differs from the baseline. Either way: exit 3, the relation
    named, staging untouched; quick rollback goes on to the earlier point and says so."""
    staging.sql(CORRUPT_ME)
    earlier = staging.create_point("earlier", "--method", "template")
    wait_for_baseline(staging, earlier)
    newest = staging.create_point("newest", "--method", "template")
    wait_for_baseline(staging, newest)
    staging.sql("CHECKPOINT")
    path, _ = _point_file(staging, newest, "corrupt_me")
    _overwrite_row_bytes(path, block=3)
    assert staging.run("rollback_manager.py", "verify", newest).returncode == 0  # the catalog cannot tell
    staging.sql(MIGRATION)
    migrated = deep_state(staging.server, staging.name)

    refused = staging.run("rollback_manager.py", "restore", newest, "--yes")
    assert refused.returncode == 3, refused.stderr
    assert "public.corrupt_me" in refused.stderr and "was not touched" in refused.stderr
    assert earlier in refused.stderr  # the next earlier point, named
    assert deep_state(staging.server, staging.name) == migrated

    quick = staging.run("quick_rollback.py", "--yes", "--json")
    assert quick.returncode == 0, quick.stderr
    assert f"Skipping point {newest}" in quick.stderr and "older than the newest point" in quick.stderr
    assert json.loads(quick.stdout)["point_id"] == earlier


@pytest.mark.skipif(os.geteuid() != 0, reason="the server's files belong to another user")
def test_a_relation_file_missing_from_a_point_is_caught_before_the_swap(staging):
    """Case 5: an empty table's file removed from the point: its catalog still matches
    (an absent file measures 0 bytes), reading the copy does not."""
    staging.sql("CREATE TABLE empty_one (id int)")
    point_id = staging.create_point("with an empty table", "--method", "template")
    wait_for_baseline(staging, point_id)
    staging.sql("CHECKPOINT")
    path, _ = _point_file(staging, point_id, "empty_one")
    path.unlink()
    staging.sql(MIGRATION)
    migrated = deep_state(staging.server, staging.name)
    refused = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert refused.returncode == 3, refused.stderr
    assert "public.empty_one" in refused.stderr and "damaged" in refused.stderr
    assert deep_state(staging.server, staging.name) == migrated
    assert not staging.sql("SELECT datname FROM pg_database WHERE datname LIKE '%rb_restoring'")


def test_a_point_left_open_and_changed_is_refused_and_its_change_caught_under_force(staging):
    """Case 2: found open to connections with nobody of the toolkit reading it."""
    point_id = staging.create_point("left open", "--method", "template")
    wait_for_baseline(staging, point_id)
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    _opened_and_changed(
        staging, manifest["template_database"], "UPDATE customers SET name = 'changed' WHERE id = 1", reseal=False
    )
    staging.sql(MIGRATION)
    migrated = deep_state(staging.server, staging.name)
    refused = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert refused.returncode == 3 and "found open to connections" in refused.stderr
    forced = staging.run("rollback_manager.py", "restore", point_id, "--yes", "--force")
    assert forced.returncode == 3 and "public.customers" in forced.stderr  # by its catalog or its rows
    assert deep_state(staging.server, staging.name) == migrated
    sealed = staging.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (manifest["template_database"],))
    assert sealed == [(False,)]  # sealed again by the first command that found it open


def test_a_changed_point_never_reaches_staging_through_its_spare(staging):
    """Case 1: the point changed and sealed again after its spare was read. The spare is
    good, but the point's seal is broken: quick rollback refuses it (no spare is copied
    from it again), and with an older point uses that one, saying so."""
    env = {"ROLLBACK_SPARE": "1"}
    older = staging.create_point("older", "--method", "template")
    wait_for_baseline(staging, older)
    created = staging.run_json("create_rollback_point.py", "newest", "--method", "template", env=env)
    spare = created["template_database"] + "_spare"
    wait_for(
        lambda: "ready=" in _comment(staging, spare),
        timeout=60,
        what="the spare read and ready",
    )
    _opened_and_changed(staging, created["template_database"], "UPDATE customers SET name = 'changed' WHERE id = 1", reseal=True)
    staging.sql(MIGRATION)
    quick = staging.run("quick_rollback.py", "--yes", "--json", env=env)
    assert quick.returncode == 0, quick.stderr
    assert f"Skipping point {created['id']}" in quick.stderr and "sealed again outside the toolkit" in quick.stderr
    assert json.loads(quick.stdout)["point_id"] == older
    assert staging.sql("SELECT name FROM customers WHERE id = 1") != [("changed",)]


def test_a_reading_killed_midway_leaves_no_baseline_to_trust(staging, tmp_path):
    """Case 3: the background is killed while the point is open for reading; a change
    made meanwhile is never taken into a baseline: the next command seals the point
    again and records its baseline as unknown, and deep verification says it reached
    the pages only."""
    staging.sql("CREATE TABLE kept_rows AS SELECT g AS id FROM generate_series(1, 10) g")
    ready = tmp_path / "ready"
    env = {"ROLLBACK_FAULT_PAUSE": "reading rows", "ROLLBACK_FAULT_READY": str(ready)}
    created = staging.run_json("create_rollback_point.py", "killed reading", "--method", "template", env=env)
    pid = int(wait_for(lambda: ready.is_file() and ready.read_text().split(), timeout=60, what="the reading to pause")[0])
    os.kill(pid, signal.SIGKILL)
    name = created["template_database"]
    _opened_and_changed(staging, name, "DELETE FROM kept_rows WHERE id = 1", reseal=False)  # no file changes size
    deep = staging.run_json("rollback_manager.py", "verify", created["id"], "--deep")
    assert deep["level"] == "pages" and "no baseline" in deep["rows"], deep
    record = json.loads((staging.backup_dir / created["id"] / ".verification.json").read_text())
    assert record["baseline"]["unknown"] and not record["baseline"].get("content")
    assert staging.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (name,)) == [(False,)]


@pytest.fixture
def own_server18(tmp_path):
    """A PostgreSQL 18 of this test's own, to crash on purpose."""
    server = LocalServer(embedded_bin_dir())
    try:
        server.start()
        view = Server("18own", 18, ConnInfo.parse(server.url()), server, server.bin_dir)
        _prepare(view)
        yield view
    finally:
        server.destroy()


def test_after_a_crash_unlogged_tables_come_back_empty_and_every_logged_table_exactly(own_server18, new_staging):
    """Case 7: crash recovery empties every UNLOGGED table, the point's copy's too. The
    point is said at point time, still verifies, and a restore (quick rollback, through
    the spare or the point) brings every logged table back exactly and says the unlogged
    ones are empty."""
    staging = new_staging(own_server18)
    staging.sql("INSERT INTO scratch SELECT 'more' || g, '\\x00' FROM generate_series(1, 500) g")  # the schema's UNLOGGED table
    created = staging.run("create_rollback_point.py", "with scratch", "--method", "template", "--json")
    assert created.returncode == 0, created.stderr
    assert "UNLOGGED tables" in created.stderr and "public.scratch" in created.stderr
    point_id = json.loads(created.stdout)["id"]
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    assert manifest["unlogged_tables"] == ["public.scratch"]
    before = _logged_state(staging)
    wait_for_baseline(staging, point_id)
    staging.sql(MIGRATION)
    server = own_server18.local
    server.pg_ctl("stop", "-m", "immediate")
    server.start()

    verified = staging.run("rollback_manager.py", "verify", point_id)
    assert verified.returncode == 0, verified.stderr
    quick = staging.run("quick_rollback.py", "--yes", "--json")
    assert quick.returncode == 0, quick.stderr
    assert "come back empty, as PostgreSQL's crash recovery left them" in quick.stderr and "public.scratch" in quick.stderr
    assert json.loads(quick.stdout)["verified"].startswith("rows: ")
    assert staging.sql("SELECT count(*) FROM scratch") == [(0,)]
    assert _logged_state(staging) == before


def _logged_state(staging) -> dict:
    """Everything of staging but the rows of its UNLOGGED table."""
    state = deep_state(staging.server, staging.name)
    for key in ("row_counts", "content"):
        state[key].pop("public.scratch", None)
    return state


def test_quick_rollback_never_waits_for_the_background_and_reads_what_it_swaps_in(staging, tmp_path):
    """Case 11: the background holds the spare while it reads it (paused there); a quick
    rollback does not wait for it under staging's lock: it copies the point itself and
    reads the copy (beside the point, whose baseline was not read yet) before the swap."""
    ready, resume = tmp_path / "ready", tmp_path / "resume"
    paused = {"ROLLBACK_SPARE": "1", "ROLLBACK_FAULT_PAUSE": "reading rows", "ROLLBACK_FAULT_READY": str(ready)}
    paused["ROLLBACK_FAULT_RESUME"] = str(resume)
    before = deep_state(staging.server, staging.name)
    created = staging.run_json("create_rollback_point.py", "Before migration", "--method", "template", env=paused)
    wait_for(lambda: ready.is_file() and ready.read_text().strip(), timeout=60, what="the background to hold the spare")
    staging.sql(MIGRATION)
    quick = staging.run("quick_rollback.py", "--yes", "--json", env={"ROLLBACK_SPARE": "1"}, timeout=120)
    resume.write_text("go\n")
    assert quick.returncode == 0, quick.stderr
    assert "still being prepared or read in the background; copying the point itself" in quick.stderr
    result = json.loads(quick.stdout)
    assert result["point_id"] == created["id"] and result["tool"] is None
    assert result["verified"].startswith("rows: ") and "read beside it" in result["verified"]
    assert deep_state(staging.server, staging.name) == before


def test_a_baseline_read_with_md5_row_hashes_is_compared_by_md5(staging):
    """Baselines read before rows were hashed with hashtextextended carry no ``row_hash``:
    their copies are read the old way (md5), so they still match, and a difference in
    them is still found."""
    from lib.pg.fingerprint import LARGE_OBJECTS, counted_tables, qualified, table_content

    point_id = staging.create_point("md5 baseline", "--method", "template")
    wait_for_baseline(staging, point_id)
    path = staging.backup_dir / point_id / ".verification.json"
    record = json.loads(path.read_text())
    assert record["baseline"]["row_hash"] == "columns"
    with closing(staging.server.connect(staging.name)) as conn:
        old = {qualified(s, n): table_content(conn, s, n, "md5") for s, n in counted_tables(conn)}
    assert set(old) == set(record["baseline"]["content"]) - {LARGE_OBJECTS}
    assert old != {t: record["baseline"]["content"][t] for t in old}  # the two hashes differ
    record["baseline"]["content"].update(old)
    del record["baseline"]["row_hash"]
    path.write_text(json.dumps(record))
    deep = staging.run_json("rollback_manager.py", "verify", point_id, "--deep")
    assert deep["level"] == "rows", deep

    table = sorted(old)[0]
    count, total = old[table].split(":")
    record["baseline"]["content"][table] = f"{count}:{int(total) + 1}"
    path.write_text(json.dumps(record))
    differs = staging.run("rollback_manager.py", "verify", point_id, "--deep")
    assert differs.returncode == 3 and table in differs.stderr, differs.stderr


def test_the_background_stops_reading_for_an_operation_on_staging_and_reads_again_after(staging, tmp_path):
    """While an operation holds staging's lock, the background's reading lets go of the
    point at once (sealed again, nobody reading it) instead of holding what the operation
    may need; when the lock is free it reads the point again, and its baseline is whole."""
    from lib.pg.db import system_identifier
    from lib.pg.locks import DatabaseLock

    ready, resume = tmp_path / "ready", tmp_path / "resume"
    env = {"ROLLBACK_FAULT_PAUSE": "reading rows", "ROLLBACK_FAULT_READY": str(ready), "ROLLBACK_FAULT_RESUME": str(resume)}
    created = staging.run_json("create_rollback_point.py", "read twice", "--method", "template", env=env)
    wait_for(lambda: ready.is_file() and ready.read_text().split(), timeout=60, what="the reading to pause")
    name = created["template_database"]
    operation = staging.server.connect()
    operation.autocommit = True
    try:
        with operation.cursor() as cur:
            key = DatabaseLock.key_for(system_identifier(operation), staging.name)
            cur.execute("SELECT pg_advisory_lock(%s)", (key,))
        resume.write_text("go\n")
        wait_for(
            lambda: staging.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (name,)) == [(False,)],
            timeout=60,
            what="the point sealed again while the operation holds staging",
        )
        assert not (staging.backup_dir / created["id"] / ".verification.json").is_file()
        assert not staging.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,))
    finally:
        operation.close()  # the operation ends: its lock goes with its session
    baseline = wait_for_baseline(staging, created["id"])
    assert baseline["row_counts"] and baseline.get("unknown") is None and baseline["row_hash"] == "columns"
    logs = "".join(p.read_text() for p in staging.log_dir.glob("background_*.log"))
    assert "stopped for an operation on staging" in logs and "reading again" in logs
