"""Wrong targets, protected databases, ignored restore errors and secrets."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import closing
from pathlib import Path

import pexpect
import pytest

from tests.conftest import ROOT
from tests.faults.conftest import kill_9, leftovers, start_paused
from tests.helpers import deep_state, write_tool_wrapper


@pytest.mark.parametrize(
    "args",
    [
        ["rollback_manager.py", "restore", "{point}", "--yes"],
        ["rollback_manager.py", "restore", "{point}", "--type", "partial", "--table", "documents", "--yes"],
        ["quick_rollback.py", "--yes"],
        ["simple_rollback.py", "restore", "{point}", "--yes"],
    ],
    ids=["restore", "partial", "quick", "simple"],
)
def test_a_protected_database_needs_its_name_not_just_yes(fault_staging, args):
    """Fault: a destructive command aimed at a protected database with --yes only.
    Injected: PROTECTED_DATABASES names staging. Holds: refused with exit 2 and nothing
    changed; a wrong --confirm-database is refused too; the right one goes ahead."""
    s = fault_staging
    point_id = s.create_point("good")
    s.sql("INSERT INTO documents (owner_name, body) VALUES ('x', 'after the point')")
    before = deep_state(s.server, s.name)
    env = {"PROTECTED_DATABASES": f"production, {s.name}"}
    argv = [a.format(point=point_id) for a in args]
    refused = s.run(*argv, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "is a protected database (PROTECTED_DATABASES), and --yes alone is not enough" in refused.stderr
    wrong = s.run(*argv, "--confirm-database", "production", env=env)
    assert wrong.returncode == 2
    assert deep_state(s.server, s.name) == before
    done = s.run(*argv, "--confirm-database", s.name, env=env)
    assert done.returncode == 0, done.stderr
    assert s.sql("SELECT count(*) FROM documents WHERE body = 'after the point'")[0][0] == 0


def test_a_protected_database_name_typed_at_the_prompt(fault_staging):
    """Fault: an operator answers the confirmation of a protected database. Injected: a
    terminal (pexpect); first a wrong name, then the right one. Holds: the wrong name
    changes nothing; the right one restores."""
    s = fault_staging
    point_id = s.create_point("good")
    s.sql("DELETE FROM documents")
    env = {**s.env, "PROTECTED_DATABASES": s.name}
    for typed, code in (("staging_other", 2), (s.name, 0)):
        child = pexpect.spawn(
            sys.executable,
            [str(ROOT / "rollback_manager.py"), "restore", point_id],
            env=env,
            cwd=str(ROOT),
            encoding="utf-8",
            timeout=120,
        )
        child.expect_exact("type its name to confirm")
        child.sendline(typed)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == code
        assert s.sql("SELECT count(*) FROM documents")[0][0] == (0 if code else 2)


def test_a_production_migration_on_a_protected_database_needs_its_name(fault_staging, tmp_path):
    """Fault: --production --yes on a protected database. Injected: PROTECTED_DATABASES.
    Holds: refused before any point or change; with --confirm-database it runs."""
    s = fault_staging
    migration = tmp_path / "touch.py"
    migration.write_text("def migrate(ctx):\n    ctx.staging.cursor().execute(\"UPDATE documents SET body = 'migrated'\")\n")
    env = {"PROTECTED_DATABASES": s.name}
    refused = s.run("run_migration.py", str(migration), "--production", "--yes", env=env)
    assert refused.returncode == 2 and "protected database" in refused.stderr
    assert not s.backup_dir.exists() or not list(s.backup_dir.glob("rb_*"))
    done = s.run("run_migration.py", str(migration), "--production", "--confirm-database", s.name, env=env)
    assert done.returncode == 0, done.stderr
    assert s.sql("SELECT DISTINCT body FROM documents")[0][0] == "migrated"


def test_pg_restore_reporting_ignored_errors_is_a_failure(fault_staging, tmp_path):
    """Fault: pg_restore exits 0 but reports 'errors ignored on restore'. Injected: a
    pg_restore wrapper that runs the real one and then says so. Holds: the restore fails
    before the swap, staging unchanged, nothing left."""
    s = fault_staging
    point_id = s.create_point("good")
    s.sql("DELETE FROM documents")
    before = deep_state(s.server, s.name)
    folder = tmp_path / "bin"
    for name in ("pg_dump", "psql"):
        write_tool_wrapper(folder, name, s.server.bin_dir / name, 'exec "$REAL" "$@"')
    write_tool_wrapper(
        folder,
        "pg_restore",
        s.server.bin_dir / "pg_restore",
        '"$REAL" "$@"; echo "pg_restore: warning: errors ignored on restore: 3" >&2; exit 0',
    )
    result = s.run("rollback_manager.py", "restore", point_id, "--yes", env={"PG_BIN_DIR": str(folder), "PG_BIN_DIR_ONLY": "1"})
    assert result.returncode == 1, result.stderr
    assert "errors ignored on restore" in result.stderr and "counts as failed" in result.stderr
    assert deep_state(s.server, s.name) == before
    assert leftovers(s) == []


# ------------------------------------------------------------------ secrets

PASSWORD = "Sekr1t-pw-for-argv-test"


@pytest.fixture
def secret_staging(fault_staging):
    s = fault_staging
    with closing(s.server.connect()) as conn, conn.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS secret_owner")
        cur.execute(f"CREATE ROLE secret_owner LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    s.env["STAGING_DATABASE_URL"] = s.server.url(s.name, user="secret_owner", password=PASSWORD)
    return s


def _argv_of_every_process() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return found


def test_the_password_is_in_no_argv_log_audit_manifest_or_message(secret_staging, tmp_path):
    """Fault: a password that could leak. Injected: a URL with a distinctive password;
    every process's argv sampled while a dump is paused, then all files and messages
    searched. Holds: it appears nowhere."""
    s = secret_staging
    proc, _ = start_paused(s, tmp_path, "pg_dump", "create_rollback_point.py", "secret", seconds=3)
    sampled = _argv_of_every_process()
    assert any("pg_dump" in argv for argv in sampled)
    assert not [argv for argv in sampled if PASSWORD in argv]
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    bad = s.run("rollback_manager.py", "restore", "no_such_point", "--yes")
    failing = s.run(
        "create_rollback_point.py",
        "x",
        env={"STAGING_DATABASE_URL": s.server.url(s.name, user="secret_owner", password=PASSWORD + "x")},
    )
    texts = [out, err, bad.stdout, bad.stderr, failing.stdout, failing.stderr]
    for folder in (s.backup_dir, s.log_dir):
        texts += [p.read_bytes().decode(errors="replace") for p in folder.rglob("*") if p.is_file()]
    assert all(PASSWORD not in t for t in texts)
    assert "password authentication failed" in failing.stderr


def test_a_password_file_open_to_others_is_warned_about(fault_staging, tmp_path):
    """Fault: ~/.pgpass readable by others (libpq then ignores it). Injected: PGPASSFILE
    with mode 0644. Holds: every script warns and says the chmod to run."""
    s = fault_staging
    pgpass = tmp_path / "pgpass"
    pgpass.write_text("*:*:*:*:whatever\n")
    pgpass.chmod(0o644)
    result = s.run("rollback_manager.py", "list", env={"PGPASSFILE": str(pgpass)})
    assert result.returncode == 0
    assert f"{pgpass} can be read by others (mode 644)" in result.stderr and f"chmod 600 {pgpass}" in result.stderr


def test_points_and_logs_stay_private_under_umask_000(fault_staging, tmp_path):
    """Fault: a permissive umask. Injected: umask 000 for the run. Holds: point folders
    0700, their files 0600, logs and the audit trail 0600."""
    s = fault_staging
    result = subprocess.run(
        [sys.executable, str(ROOT / "create_rollback_point.py"), "private", "--method", "data"],
        env=s.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0),
    )
    assert result.returncode == 0, result.stderr
    point = next(p for p in s.backup_dir.iterdir() if p.name.startswith("rb_"))
    assert point.stat().st_mode & 0o777 == 0o700
    assert s.backup_dir.stat().st_mode & 0o777 == 0o700
    assert {f.stat().st_mode & 0o777 for f in point.iterdir()} == {0o600}
    assert {f.stat().st_mode & 0o777 for f in s.log_dir.iterdir()} == {0o600}


def test_a_killed_run_leaves_no_password_file_behind(secret_staging, tmp_path):
    """Fault: kill -9 while a tool runs with its temporary password file. Injected:
    kill -9 during a paused pg_dump. Holds: the next run removes the file (it names the
    dead process), so the password does not stay on disk."""
    s = secret_staging
    proc, marker = start_paused(s, tmp_path, "pg_dump", "create_rollback_point.py", "killed")
    pid = proc.pid
    left = [p for p in Path(tempfile.gettempdir()).glob(f"rollback-pgpass-{pid}-*")]
    assert left and PASSWORD in left[0].read_text()
    kill_9(proc, marker)
    assert s.run("rollback_manager.py", "list").returncode == 0
    assert not list(Path(tempfile.gettempdir()).glob(f"rollback-pgpass-{pid}-*"))
