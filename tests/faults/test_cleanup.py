"""cleanup removes what interrupted runs left, and says what it removed."""

from __future__ import annotations

import json
import socket

from tests.faults.conftest import databases, kill_9, leftovers, points, start, start_paused
from tests.helpers import deep_state, wait_for


def test_cleanup_removes_what_killed_runs_left_and_says_so(fault_staging, tmp_path):
    """Fault: a restore killed with -9, and a point's unfinished folder of a dead process.
    Injected: kill -9 while the restore waits on a paused pg_restore; the folder is the
    one a killed create leaves (every operation finishes what killed runs left before it
    starts, so two real leftovers never meet). Holds: --dry-run names the unfinished
    folder and the half-built database and removes nothing; cleanup removes both and
    says so; the point taken before is kept."""
    s = fault_staging
    point_id = s.create_point("good")
    proc, marker = start_paused(s, tmp_path, "pg_restore", "rollback_manager.py", "restore", point_id, "--yes", tag="0")
    kill_9(proc, marker)
    unfinished = s.backup_dir / ".tmp-rb_killed_20260101_000000"
    unfinished.mkdir(mode=0o700)
    (unfinished / ".owner").write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname()}))
    left = leftovers(s)
    assert f"{s.name}_rb_restoring" in left and any(name.startswith(".tmp-rb_killed") for name in left)

    dry = s.run("rollback_manager.py", "cleanup", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    said = json.loads(dry.stdout)["leftovers"]
    assert any("unfinished point folder" in line and ".tmp-rb_killed" in line for line in said)
    assert any(f"database {s.name}_rb_restoring" in line for line in said)
    assert sorted(leftovers(s)) == sorted(left)  # a dry run removes nothing

    done = s.run("rollback_manager.py", "cleanup")
    assert done.returncode == 0, done.stderr
    assert f"Removed database {s.name}_rb_restoring" in done.stderr and "Removed unfinished point folder" in done.stderr
    assert leftovers(s) == []
    assert points(s) == [point_id]
    assert f"{s.name}_rb_restoring" not in databases(s)
    again = s.run("rollback_manager.py", "cleanup")
    assert "Nothing left behind by interrupted runs." in again.stderr


def test_a_copy_left_by_a_run_killed_right_after_it_is_found_by_its_record(fault_staging, tmp_path):
    """Fault: kill -9 after the server made a template point's copy and before anything
    marked it (no comment, no manifest). Injected: ROLLBACK_FAULT_PAUSE='after copy'.
    Holds: the copy's name was recorded before it was created, so `cleanup --dry-run`
    names it with its size and `cleanup` removes it; staging is untouched."""
    s = fault_staging
    before = deep_state(s.server, s.name)
    ready = tmp_path / "ready"
    proc = start(
        s,
        "create_rollback_point.py",
        "killed",
        "--method",
        "template",
        "--yes",
        env={"ROLLBACK_FAULT_PAUSE": "after copy", "ROLLBACK_FAULT_READY": str(ready)},
    )
    wait_for(ready.exists, timeout=120, what="the create to pause after its copy", process=proc)
    kill_9(proc)
    left = [d for d in databases(s) if d.startswith("rb_killed_")]
    assert len(left) == 1
    dry = s.run("rollback_manager.py", "cleanup", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"Would remove database {left[0]} (" in dry.stderr and "template point copy" in dry.stderr
    assert left[0] in databases(s)
    done = s.run("rollback_manager.py", "cleanup")
    assert done.returncode == 0, done.stderr
    assert left[0] not in databases(s)
    assert deep_state(s.server, s.name) == before
    assert not list((s.backup_dir / ".intents").glob("*.json"))
