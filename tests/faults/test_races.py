"""Two operations at once, locks of killed runs, and what else holds staging: sessions,
prepared transactions, invalid databases."""

from __future__ import annotations

import time
from contextlib import closing

from tests.faults.conftest import databases, kill_9, leftovers, start_paused
from tests.helpers import deep_state


def test_a_second_operation_exits_4_at_once(fault_staging, tmp_path):
    """Fault: two mutating operations on the same database. Injected: a restore paused
    in pg_restore (until the test lets it go on) while a create starts. Holds: the
    create exits 4 while the restore is still paused (it did not wait for the lock)
    and names the restore's process; the restore then finishes."""
    s = fault_staging
    point_id = s.create_point("good")
    resume = tmp_path / "resume"
    proc, marker = start_paused(s, tmp_path, "pg_restore", "rollback_manager.py", "restore", point_id, "--yes", resume=resume)
    second = s.run("create_rollback_point.py", "meanwhile")
    assert proc.poll() is None  # the restore is still paused: the create did not wait for it
    assert second.returncode == 4, second.stderr
    assert f"restore by process {proc.pid}" in second.stderr
    resume.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def test_the_lock_of_a_killed_run_does_not_block_the_next(fault_staging, tmp_path):
    """Fault: the lock holder is killed with -9. Injected: kill -9 of a restore paused in
    pg_restore. Holds: the next operation gets the lock at once (the lock file's flock
    and the server's advisory lock both die with the process)."""
    s = fault_staging
    point_id = s.create_point("good")
    proc, marker = start_paused(s, tmp_path, "pg_restore", "rollback_manager.py", "restore", point_id, "--yes")
    kill_9(proc, marker)
    began = time.monotonic()
    result = s.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began < 60
    assert leftovers(s) == []


def test_a_prepared_transaction_is_refused_by_name(fault_staging):
    """Fault: a prepared transaction on staging (it keeps the database busy and no
    session can be ended to free it). Injected: PREPARE TRANSACTION. Holds: template
    point and restore are refused with its gid and the statement that ends it; staging
    unchanged; no half-made point or database."""
    s = fault_staging
    point_id = s.create_point("good")
    s.sql("DELETE FROM documents")
    with closing(s.connect()) as conn:
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("UPDATE customers SET name = name WHERE id = 1")
            cur.execute("PREPARE TRANSACTION 'stuck_migration'")
    try:
        before = deep_state(s.server, s.name)
        for args in (
            ["create_rollback_point.py", "x", "--method", "template", "--yes"],
            ["rollback_manager.py", "restore", point_id, "--yes"],
        ):
            result = s.run(*args)
            assert result.returncode == 1, result.stderr
            assert "'stuck_migration'" in result.stderr and "ROLLBACK PREPARED 'stuck_migration'" in result.stderr
            assert "Nothing was changed" in result.stderr
        assert deep_state(s.server, s.name) == before
        assert leftovers(s) == []
    finally:
        with closing(s.server.connect(s.name)) as conn:
            conn.autocommit = True
            conn.cursor().execute("ROLLBACK PREPARED 'stuck_migration'")


def test_an_invalid_database_in_the_way_is_dropped_and_the_restore_succeeds(fault_staging):
    """Fault: an invalid database (left by an interrupted DROP) holds the name the
    restore builds under. Injected: a database of that name marked invalid
    (datconnlimit = -2). Holds: it is dropped, the restore succeeds, staging is exact."""
    s = fault_staging
    point_id = s.create_point("good")
    at_point = deep_state(s.server, s.name)
    s.sql("DELETE FROM documents")
    aside = f"{s.name}_rb_restoring"
    with closing(s.server.connect()) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{aside}"')
            cur.execute("UPDATE pg_database SET datconnlimit = -2 WHERE datname = %s", (aside,))
    result = s.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert deep_state(s.server, s.name) == at_point
    assert aside not in databases(s)


def test_a_session_in_a_transaction_during_the_swap_is_ended_not_half_swapped(fault_staging):
    """Fault: a session inside an open transaction on staging when the swap comes.
    Injected: a connection holding a row lock. Holds: with --yes it is named and ended,
    and the swap is whole (staging exact, the old state kept as a point)."""
    s = fault_staging
    point_id = s.create_point("good")
    at_point = deep_state(s.server, s.name)
    s.sql("DELETE FROM documents")
    holder = s.connect()
    holder.autocommit = False
    holder.cursor().execute("SELECT * FROM customers WHERE id = 1 FOR UPDATE")
    try:
        result = s.run("rollback_manager.py", "restore", point_id, "--yes")
        assert result.returncode == 0, result.stderr
        assert "1 session(s) ended" in result.stderr
        assert deep_state(s.server, s.name) == at_point
    finally:
        holder.close()
