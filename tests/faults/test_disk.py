"""The backup folder runs out of space, or the file-size limit is hit, while a point
is written: the create fails clearly and the older points and their checksums stay
intact."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager

import pytest

from tests.faults.conftest import leftovers, points, start
from tests.helpers import wait_for, write_tool_wrapper


@contextmanager
def small_filesystem(path, megabytes: int):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0700", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.fail(f"root could not mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def tools_that(folder, bin_dir, pg_dump_body: str) -> dict:
    for name in ("pg_dump", "pg_restore", "psql"):
        write_tool_wrapper(folder, name, bin_dir / name, pg_dump_body if name == "pg_dump" else 'exec "$REAL" "$@"')
    return {"PG_BIN_DIR": str(folder), "PG_BIN_DIR_ONLY": "1"}


def _older_point_intact(s, older: str) -> None:
    assert points(s) == [older]
    assert leftovers(s) == []
    verified = s.run("rollback_manager.py", "verify", older)
    assert verified.returncode == 0, verified.stderr


@pytest.mark.needs_root("mounts a small tmpfs")
def test_backup_folder_full(fault_staging, tmp_path):
    """Fault: no space left in BACKUP_DIR during pg_dump. Injected: BACKUP_DIR on a 40 MB
    tmpfs that a pg_dump wrapper fills up before dumping (after the free-space check
    passed). Holds: exit 1 naming the cause; the older point lists and verifies."""
    s = fault_staging
    with small_filesystem(tmp_path / "small", 40) as small:
        env = {"BACKUP_DIR": str(small)}
        s.env.update(env)
        s.backup_dir = small
        older = s.create_point("before the disk filled")
        filler = small / ".filler"
        body = f'dd if=/dev/zero of="{filler}" bs=64k >/dev/null 2>&1; exec "$REAL" "$@"'
        result = s.run("create_rollback_point.py", "fills the disk", env=tools_that(tmp_path / "bin", s.server.bin_dir, body))
        filler.unlink(missing_ok=True)
        assert result.returncode == 1, result.stderr
        assert "No space left on device" in result.stderr
        _older_point_intact(s, older)


def test_file_size_limit(fault_staging, tmp_path):
    """Fault: the file-size limit (ulimit -f) is hit while pg_dump writes. Injected: a
    pg_dump wrapper that sets `ulimit -f 16` (16 KB). Holds: exit 1 with pg_dump's
    error; the older point lists and verifies; nothing half-made is left."""
    s = fault_staging
    older = s.create_point("before the limit")
    body = 'ulimit -f 16; exec "$REAL" "$@"'
    result = s.run("create_rollback_point.py", "too big", env=tools_that(tmp_path / "bin", s.server.bin_dir, body))
    assert result.returncode == 1, result.stderr
    assert "pg_dump" in result.stderr and "failed" in result.stderr
    _older_point_intact(s, older)


@pytest.mark.needs_root("mounts a small tmpfs")
def test_a_data_point_on_a_full_disk(fault_staging, tmp_path):
    """Fault: no space left while simple_rollback.py writes (no client tool involved).
    Injected: BACKUP_DIR on a 40 MB tmpfs, filled up while the run is paused at its first
    table (ROLLBACK_FAULT_PAUSE='data copy'), after the free-space check passed. Holds:
    exit 1 naming the cause; the older point lists and verifies."""
    s = fault_staging
    with small_filesystem(tmp_path / "small", 40) as small:
        s.env.update(BACKUP_DIR=str(small))
        s.backup_dir = small
        older = s.run_json("simple_rollback.py", "create", "first")["id"]
        ready, resume = tmp_path / "ready", tmp_path / "resume"
        env = {"ROLLBACK_FAULT_PAUSE": "data copy", "ROLLBACK_FAULT_READY": str(ready), "ROLLBACK_FAULT_RESUME": str(resume)}
        proc = start(s, "simple_rollback.py", "create", "second", env=env)
        wait_for(ready.exists, timeout=120, what="the data point to pause at its first table", process=proc)
        filler = small / ".filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        resume.touch()
        out, err = proc.communicate(timeout=120)
        filler.unlink()
        assert proc.returncode == 1, err
        assert "No space left on device" in err
        _older_point_intact(s, older)
