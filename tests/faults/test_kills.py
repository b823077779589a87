"""kill -9 of the tool in the middle of its work: staging is wholly old or wholly new,
no listed point is half-made, and the next run cleans up and succeeds."""

from __future__ import annotations

import pytest

from tests.faults.conftest import databases, kill_9, leftovers, points, start, start_paused
from tests.helpers import deep_state, wait_for


def test_kill_9_during_create(fault_staging, tmp_path):
    """Fault: kill -9 while pg_dump writes the point. Injected: a pg_dump wrapper that
    pauses before dumping. Holds: no point listed; the next create removes the
    unfinished folder and succeeds."""
    s = fault_staging
    proc, marker = start_paused(s, tmp_path, "pg_dump", "create_rollback_point.py", "killed")
    kill_9(proc, marker)
    assert points(s) == []
    assert any(name.startswith(".tmp-") for name in leftovers(s))  # what the killed run left
    point_id = s.create_point("after the kill")
    assert points(s) == [point_id]
    assert leftovers(s) == []


def test_kill_9_during_restore(fault_staging, tmp_path):
    """Fault: kill -9 while the point is rebuilt beside staging. Injected: a pg_restore
    wrapper that pauses. Holds: staging is wholly the old state; the next restore drops
    the half-built copy and succeeds."""
    s = fault_staging
    point_id = s.create_point("good")
    at_point = deep_state(s.server, s.name)
    s.sql("DELETE FROM documents; UPDATE customers SET name = 'migrated'")
    migrated = deep_state(s.server, s.name)
    proc, marker = start_paused(s, tmp_path, "pg_restore", "rollback_manager.py", "restore", point_id, "--yes")
    kill_9(proc, marker)
    assert f"{s.name}_rb_restoring" in databases(s)
    assert deep_state(s.server, s.name) == migrated
    result = s.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert deep_state(s.server, s.name) == at_point
    assert leftovers(s) == []


def test_kill_9_during_reset(server, new_staging, tmp_path):
    """Fault: kill -9 while staging is rebuilt from V2. Injected: a pg_dump wrapper that
    pauses. Holds: staging is wholly the old state; the next reset succeeds."""
    v2 = new_staging(server, "v2")
    v2.sql("CREATE TABLE only_in_v2 (id int PRIMARY KEY); INSERT INTO only_in_v2 SELECT generate_series(1, 10)")
    s = new_staging(server)
    before = deep_state(s.server, s.name)
    proc, marker = start_paused(s, tmp_path, "pg_dump", "reset_staging.py", "--yes", env={"V2_DATABASE_URL": v2.url})
    kill_9(proc, marker)
    assert deep_state(s.server, s.name) == before
    result = s.run("reset_staging.py", "--yes", env={"V2_DATABASE_URL": v2.url})
    assert result.returncode == 0, result.stderr
    assert s.sql("SELECT count(*) FROM only_in_v2")[0][0] == 10
    assert leftovers(s) == []


def _restore_killed_at(s, tmp_path, place: str) -> tuple[str, dict, dict]:
    """A point, staging changed after it, and a restore to it killed -9 at ``place``."""
    point_id = s.create_point("good")
    at_point = deep_state(s.server, s.name)
    s.sql("DELETE FROM documents")
    migrated = deep_state(s.server, s.name)
    ready = tmp_path / "ready"
    env = {"ROLLBACK_FAULT_PAUSE": place, "ROLLBACK_FAULT_READY": str(ready)}
    proc = start(s, "rollback_manager.py", "restore", point_id, "--yes", env=env)
    wait_for(ready.exists, timeout=120, what=f"the restore to pause at {place!r}", process=proc)
    kill_9(proc)
    return point_id, at_point, migrated


@pytest.mark.german
def test_kill_9_between_the_two_renames_of_a_swap(fault_staging, tmp_path):
    """Fault: kill -9 after staging was renamed away and before the copy took its name.
    Injected: ROLLBACK_FAULT_PAUSE='between renames' stops the run inside the swap's
    transaction. Holds: the server rolls the transaction back, so staging keeps its name
    and its old state; the next run allows connections again and the restore succeeds."""
    s = fault_staging
    point_id, at_point, migrated = _restore_killed_at(s, tmp_path, "between renames")
    wait_for(
        lambda: s.name in databases(s) and not any(d.startswith("rb_before_rollback") for d in databases(s)),
        timeout=120,
        what="the server to roll the renames back (staging under its name, no state kept before)",
    )
    listing = s.run("rollback_manager.py", "diff", point_id)  # opens staging: connections are allowed again
    assert listing.returncode == 0, listing.stderr
    assert "left refusing connections by an interrupted restore" in listing.stderr
    assert deep_state(s.server, s.name) == migrated  # wholly old
    result = s.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert deep_state(s.server, s.name) == at_point  # and then wholly new
    assert leftovers(s) == []


def test_kill_9_after_the_swap_before_the_undo_point_is_written(fault_staging, tmp_path):
    """Fault: kill -9 after the swap committed and before the 'state before rollback'
    point's manifest was written. Injected: ROLLBACK_FAULT_PAUSE='after swap'. Holds:
    staging is wholly the restored state; the old state is not lost: the next run
    finishes its point, which lists, and restoring it undoes the restore exactly."""
    s = fault_staging
    point_id, at_point, migrated = _restore_killed_at(s, tmp_path, "after swap")
    assert deep_state(s.server, s.name) == at_point  # wholly new
    assert points(s) == [point_id]  # the undo point is not listed half-made
    cleanup = s.run("rollback_manager.py", "cleanup")
    assert cleanup.returncode == 0, cleanup.stderr
    assert "the state before an interrupted restore, recovered and listed" in cleanup.stderr
    listed = points(s)
    assert len(listed) == 2 and listed[-1].startswith("rb_before_rollback")
    undo = s.run("rollback_manager.py", "restore", listed[-1], "--yes")
    assert undo.returncode == 0, undo.stderr
    assert deep_state(s.server, s.name) == migrated
    assert leftovers(s) == []
