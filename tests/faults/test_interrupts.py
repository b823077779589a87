"""Ctrl-C (SIGINT) in each script while it works: what it built is removed, staging is
as it was, the exit code is 130 and the audit trail says "aborted"."""

from __future__ import annotations

import pytest

from tests.faults.conftest import interrupt, last_audit, leftovers, points, slow_tools, start, start_paused
from tests.helpers import deep_state, wait_for


@pytest.mark.parametrize(
    "script, args, slow, with_point",
    [
        ("create_rollback_point.py", ["interrupted"], "pg_dump", False),
        ("rollback_manager.py", ["restore", "{point}", "--yes"], "pg_restore", True),
        ("quick_rollback.py", ["--yes"], "pg_restore", True),
        ("simple_rollback.py", ["restore", "{point}", "--yes"], "pg_dump", True),
    ],
    ids=["create", "restore", "quick_rollback", "simple_rollback-restore-in-place"],
)
def test_ctrl_c_while_working(fault_staging, tmp_path, script, args, slow, with_point):
    """Fault: SIGINT while the script waits on a client tool. Injected: a wrapper of that
    tool that pauses. Holds: exit 130, nothing half-built left, staging unchanged, an
    'aborted' audit entry, and no point added."""
    s = fault_staging
    point_id = s.create_point("good") if with_point else None
    if script == "simple_rollback.py":
        point_id = s.run_json("simple_rollback.py", "create", "data point")["id"]
    s.sql("DELETE FROM documents")
    before, listed = deep_state(s.server, s.name), points(s)
    marker = tmp_path / "paused"
    env = slow_tools(tmp_path / "bin", s.server.bin_dir, slow, marker)
    if script == "simple_rollback.py":
        env = {"ROLLBACK_FAULT_PAUSE": "data copy", "ROLLBACK_FAULT_READY": str(marker)}  # its 'state before' copy
    proc = start(s, script, *[a.format(point=point_id) for a in args], env=env)
    wait_for(marker.exists, timeout=120, what="the script to pause in its work", process=proc)
    out, err = interrupt(proc)
    assert proc.returncode == 130, err
    assert "Interrupted" in err
    assert leftovers(s) == []
    assert deep_state(s.server, s.name) == before
    assert points(s) == listed
    assert last_audit(s)["outcome"] == "aborted"


def test_ctrl_c_during_reset(server, new_staging, tmp_path):
    """Fault: SIGINT while staging is rebuilt from V2. Injected: a pg_dump wrapper that
    pauses. Holds: exit 130, the half-built copy dropped, staging unchanged, 'aborted'."""
    v2 = new_staging(server, "v2")
    s = new_staging(server)
    s.sql("CREATE TABLE local_only (id int)")
    before = deep_state(s.server, s.name)
    proc, _ = start_paused(s, tmp_path, "pg_dump", "reset_staging.py", "--yes", env={"V2_DATABASE_URL": v2.url})
    out, err = interrupt(proc)
    assert proc.returncode == 130, err
    assert leftovers(s) == []
    assert deep_state(s.server, s.name) == before
    assert last_audit(s)["outcome"] == "aborted"


def test_ctrl_c_during_a_data_point(fault_staging, tmp_path):
    """Fault: SIGINT while simple_rollback.py copies tables. Injected:
    ROLLBACK_FAULT_PAUSE='data copy'. Holds: exit 130, no folder left, no point listed."""
    s = fault_staging
    ready = tmp_path / "ready"
    proc = start(
        s,
        "simple_rollback.py",
        "create",
        "interrupted",
        env={"ROLLBACK_FAULT_PAUSE": "data copy", "ROLLBACK_FAULT_READY": str(ready)},
    )
    wait_for(ready.exists, timeout=120, what="the data point to pause at its first table", process=proc)
    out, err = interrupt(proc)
    assert proc.returncode == 130, err
    assert leftovers(s) == [] and points(s) == []
    assert last_audit(s)["outcome"] == "aborted"
