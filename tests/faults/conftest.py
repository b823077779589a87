"""Helpers of the fault suite: slow client tools to stop a run at a known place,
killing, and looking for what a broken run left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers import wait_for, write_tool_wrapper

TOOLS = ("pg_dump", "pg_restore", "psql")


def slow_tools(folder: Path, bin_dir: Path, slow: str, marker: Path, seconds: int = 60, resume: Path | None = None) -> dict:
    """PG_BIN_DIR holding only wrappers of the real tools; ``slow`` writes its pid to
    ``marker`` and sleeps before running (until ``resume`` exists, when given).
    Returns the environment to add."""
    wait = f'while [ ! -e "{resume}" ]; do sleep 0.05; done' if resume else f"sleep {seconds}"
    for name in TOOLS:
        body = f'echo $$ > "{marker}"; {wait}; exec "$REAL" "$@"' if name == slow else 'exec "$REAL" "$@"'
        write_tool_wrapper(folder, name, bin_dir / name, body)
    return {"PG_BIN_DIR": str(folder), "PG_BIN_DIR_ONLY": "1"}


def start(staging, script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        env={**staging.env, **(env or {})},
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_paused(
    staging,
    tmp_path: Path,
    slow: str,
    *args: str,
    seconds: int = 60,
    env: dict | None = None,
    tag: str = "",
    resume: Path | None = None,
) -> tuple:
    """Start the script with ``slow`` paused, and return once it is paused: (process, marker)."""
    marker = tmp_path / f"paused{tag}"
    tools = slow_tools(tmp_path / f"bin{tag}", staging.server.bin_dir, slow, marker, seconds, resume)
    proc = start(staging, *args, env={**(env or {}), **tools})
    wait_for(marker.exists, timeout=120, what=f"{slow} to be paused", process=proc, every=0.05)
    return proc, marker


def kill_9(proc: subprocess.Popen, marker: Path | None = None) -> None:
    """kill -9 of the tool itself; a wrapper it left sleeping is stopped too."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    if marker is not None and marker.exists():
        try:
            os.kill(int(marker.read_text().strip()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def interrupt(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=120)


def databases(staging) -> set[str]:
    return set(_query(staging, "SELECT datname FROM pg_database"))


def _query(staging, statement: str, params=None) -> list:
    conn = staging.server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def leftovers(staging) -> list[str]:
    """Temporary databases of this staging, and unfinished point folders."""
    found = [d for d in _query(staging, "SELECT datname FROM pg_database") if d.startswith(f"{staging.name}_rb_")]
    if staging.backup_dir.is_dir():
        found += [p.name for p in staging.backup_dir.iterdir() if p.name.startswith(".tmp-")]
    return found


def points(staging) -> list[str]:
    result = staging.run("rollback_manager.py", "list", "--json")
    assert result.returncode == 0, result.stderr
    return [p["id"] for p in json.loads(result.stdout)]


def last_audit(staging) -> dict:
    return json.loads((staging.log_dir / "rollback_audit.jsonl").read_text().splitlines()[-1])


@pytest.fixture
def fault_staging(server, new_staging):
    """A fresh staging on each major (and, for tests marked german, on the German server)."""
    return new_staging(server)


@pytest.fixture
def age_keys(tmp_path):
    """A new age identity: the environment that encrypts to it and opens with it."""
    from pyrage import x25519

    identity = x25519.Identity.generate()
    key = tmp_path / "key.txt"
    key.write_text(f"# created for the test\n# public key: {identity.to_public()}\n{identity}\n")
    key.chmod(0o600)
    return {"ROLLBACK_ENCRYPT_TO": str(identity.to_public()), "ROLLBACK_DECRYPT_KEY_FILE": str(key)}
