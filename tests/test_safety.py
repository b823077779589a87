"""Bad input, secrets, the audit trail and the V2 guard."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import archive_file, write_tool_wrapper


def _one_paragraph(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert "error:" in stderr


@pytest.mark.parametrize(
    "env, args, code, words",
    [
        ({"STAGING_DATABASE_URL": ""}, ["Before"], 2, "STAGING_DATABASE_URL is not set"),
        ({"STAGING_DATABASE_URL": "mysql://u:pw@h/db"}, ["Before"], 2, "not a PostgreSQL URL"),
        ({"STAGING_DATABASE_URL": "postgresql://u:pw@127.0.0.1:notaport/db"}, ["Before"], 2, "port that is not a number"),
        ({"STAGING_DATABASE_URL": "postgresql://u:pw@127.0.0.1:1/db"}, ["Before"], 1, "Check that the server is running"),
    ],
)
def test_bad_configuration_gets_one_paragraph(staging, env, args, code, words):
    result = staging.run("create_rollback_point.py", *args, env=env)
    assert result.returncode == code, result.stderr
    assert words in result.stderr
    _one_paragraph(result.stderr)
    assert "pw@" not in result.stderr


@pytest.mark.german
def test_wrong_password(staging):
    """The next step is chosen by probing the server, so it is right whatever language
    the server's message is in (the German server's says 'Passwort-Authentifizierung')."""
    url = staging.server.url(staging.name, password="definitely-wrong-pw")
    result = staging.run("create_rollback_point.py", "x", env={"STAGING_DATABASE_URL": url})
    assert result.returncode == 2  # the URL is wrong: a configuration error
    assert "refused this role's login" in result.stderr and "the password in the URL" in result.stderr
    assert "definitely-wrong-pw" not in result.stderr
    _one_paragraph(result.stderr)


@pytest.mark.german
def test_missing_database(staging):
    url = staging.server.url(staging.name + "_gone")
    result = staging.run("create_rollback_point.py", "x", env={"STAGING_DATABASE_URL": url})
    assert result.returncode == 2
    assert "Check the database name in the URL" in result.stderr
    assert "refused this role's login" not in result.stderr
    _one_paragraph(result.stderr)


def test_unknown_point_id(staging):
    staging.create_point("real one")
    result = staging.run("rollback_manager.py", "restore", "rb_nope_20240101_000000", "--yes")
    assert result.returncode == 2
    assert "rb_nope_20240101_000000 not found" in result.stderr and "rollback_manager.py list" in result.stderr
    _one_paragraph(result.stderr)


def test_unusable_backup_folder(staging, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = staging.run("create_rollback_point.py", "x", env={"BACKUP_DIR": str(blocker / "backups")})
    assert result.returncode == 2
    assert "backup folder" in result.stderr and "BACKUP_DIR" in result.stderr
    _one_paragraph(result.stderr)


@pytest.mark.parametrize("under", [False, True], ids=["a file", "under a file"])
def test_a_backup_dir_that_is_a_file_is_refused_and_never_leads_to_a_reset(staging, tmp_path, under):
    """Not "no points yet", and no offer of the V2 reset: the setting is wrong."""
    staging.create_point("real one")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {"BACKUP_DIR": str(blocker / "backups" if under else blocker)}
    for args in (
        ["rollback_manager.py", "list"],
        ["quick_rollback.py", "--yes"],
        ["rollback_manager.py", "cleanup", "--keep", "1"],
    ):
        result = staging.run(*args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert f"{blocker} is a file" in result.stderr and "No rollback points yet" not in result.stderr
        assert "V2" not in result.stderr
        _one_paragraph(result.stderr)
    checked = json.loads(staging.run("check_setup.py", "--json", env=env).stdout)
    assert [f["status"] for f in checked if f["item"] == "backup folder"] == ["fail"]
    assert blocker.read_text() == "not a folder"
    assert staging.sql("SELECT count(*) FROM customers")[0][0] > 0


def test_a_log_dir_that_cannot_be_written_is_said_and_the_work_still_done(staging, tmp_path):
    """A rollback at 3 a.m. is not stopped by its log folder, but nobody is left thinking it was logged."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {"LOG_DIR": str(blocker / "logs")}
    point = staging.run("create_rollback_point.py", "unlogged", "--json", env=env)
    assert point.returncode == 0, point.stderr
    warned = [line for line in point.stderr.splitlines() if "cannot be written" in line]
    assert len(warned) == 1 and "no audit entry" in warned[0] and "LOG_DIR" in warned[0]
    quick = staging.run("quick_rollback.py", "--yes", env=env)
    assert quick.returncode == 0 and "no audit entry" in quick.stderr
    assert blocker.read_text() == ""


def test_debug_shows_the_traceback(staging):
    result = staging.run("rollback_manager.py", "info", "rb_missing", "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_secrets_appear_nowhere(staging, tmp_path):
    password = staging.server.url_base.password
    real = staging.server.bin_dir
    argv_log = tmp_path / "argv.log"
    spy = tmp_path / "spybin"
    for tool in ("pg_dump", "pg_restore", "psql"):
        write_tool_wrapper(spy, tool, real / tool, f'echo "{tool} $*" >> "{argv_log}"; exec "$REAL" "$@"')
    env = {"PG_BIN_DIR": str(spy), "PG_BIN_DIR_ONLY": "1"}
    point_id = staging.run_json("create_rollback_point.py", "secret test", env=env)["id"]
    assert staging.run("rollback_manager.py", "verify", point_id, env=env).returncode == 0
    assert staging.run("rollback_manager.py", "restore", point_id, "--yes", env=env).returncode == 0
    failed = staging.run("rollback_manager.py", "--debug", "restore", "rb_missing", "--yes", env=env)
    assert failed.returncode == 2

    recorded = argv_log.read_text()
    assert "pg_dump" in recorded and "pg_restore" in recorded
    assert password not in recorded
    for folder in (staging.backup_dir, staging.log_dir):
        for path in folder.rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), path
    assert password not in failed.stderr


def test_every_create_verify_and_restore_leaves_one_audit_line(staging):
    point_id = staging.create_point()
    staging.run("rollback_manager.py", "verify", point_id)
    staging.run("rollback_manager.py", "restore", point_id, "--yes")
    staging.run("rollback_manager.py", "restore", "rb_unknown_1", "--yes")
    lines = (staging.log_dir / "rollback_audit.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["event"] for e in entries] == ["create", "verify", "restore"]
    for e in entries:
        for key in ("timestamp", "event", "point_id", "database", "user", "host", "pid", "outcome", "duration_seconds", "error"):
            assert key in e, key
        assert e["point_id"] == point_id
        assert e["outcome"] in ("succeeded", "verified")
    assert "***" in entries[0]["database"]
    logs = list(staging.log_dir.glob("rollback_manager_*.log")) + list(staging.log_dir.glob("create_rollback_point_*.log"))
    assert logs


def test_a_failed_restore_is_audited_with_its_error(staging):
    point_id = staging.create_point()
    archive = archive_file(staging.backup_dir / point_id)
    archive.write_bytes(archive.read_bytes()[:-10])
    assert staging.run("rollback_manager.py", "restore", point_id, "--yes").returncode == 3
    last = json.loads((staging.log_dir / "rollback_audit.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "restore" and last["outcome"] == "failed" and "checksums" in last["error"]


def test_staging_that_is_really_v2_is_refused_before_anything_runs(staging):
    point_id = staging.create_point()
    staging.sql("DELETE FROM customers")
    result = staging.run("rollback_manager.py", staging.url, staging.url, "restore", point_id, "--yes")
    assert result.returncode == 2
    assert "is the V2 database" in result.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 0
    other = staging.run("rollback_manager.py", staging.server.url("rich_template"), staging.url, "restore", point_id, "--yes")
    assert other.returncode == 0, other.stderr


@pytest.mark.needs_root("mounts a read-only tmpfs")
def test_a_log_dir_on_a_read_only_mount_is_said(staging, tmp_path):
    logs = tmp_path / "ro-logs"
    logs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(logs)], capture_output=True, text=True)
    assert mounted.returncode == 0, mounted.stderr
    try:
        for args in (["create_rollback_point.py", "ro"], ["rollback_manager.py", "list"]):
            result = staging.run(*args, env={"LOG_DIR": str(logs)})
            assert result.returncode == 0, result.stderr
            assert "cannot be written (Read-only file system)" in result.stderr and "no audit entry" in result.stderr
    finally:
        subprocess.run(["umount", "-l", str(logs)], capture_output=True)


@pytest.mark.parametrize(
    "args, words",
    [
        (["rollback_manager.py", "cleanup", "--older-than", "-3", "--dry-run"], "--older-than must be a number of days"),
        (["rollback_manager.py", "cleanup", "--older-than", "nan", "--yes"], "--older-than must be a number of days"),
        (["rollback_manager.py", "cleanup", "--keep", "0", "--yes"], "--keep must be at least 1"),
        (["rollback_manager.py", "cleanup", "--keep", "-2", "--older-than", "1", "--yes"], "--keep must be at least 1"),
        (["create_rollback_point.py", "x", "--keep", "0"], "--keep must be at least 1"),
        (["rollback_manager.py", "audit", "--limit", "-5"], "--limit must be 0"),
    ],
)
def test_retention_and_limits_that_make_no_sense_are_refused_before_anything(staging, args, words):
    kept = [staging.create_point("one"), staging.create_point("two")]
    result = staging.run(*args)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert "left behind" not in result.stderr  # refused before the leftover scan, not after it
    _one_paragraph(result.stderr)
    assert [p["id"] for p in staging.run_json("rollback_manager.py", "list")] == kept


def test_a_role_that_writes_staging_but_does_not_own_it_is_refused_before_anything_and_told_why(staging):
    """As on a team where the migration role only writes: the restore of a dump point
    (in place, since the role may not create databases) is refused up front naming what
    it does not own, nothing changed; check_setup says FAILED with the fix."""
    point = staging.create_point("by the owner", "--method", "dump")
    staging.sql(
        "DROP ROLE IF EXISTS rb_writer; CREATE ROLE rb_writer LOGIN PASSWORD 'writer-pw-9';"
        f'GRANT CONNECT ON DATABASE "{staging.name}" TO rb_writer;'
        'GRANT USAGE ON SCHEMA public, "Sales Ops" TO rb_writer;'
        'GRANT ALL ON ALL TABLES IN SCHEMA public, "Sales Ops" TO rb_writer;'
        'GRANT ALL ON ALL SEQUENCES IN SCHEMA public, "Sales Ops" TO rb_writer'
    )
    url = staging.server.url(staging.name, user="rb_writer", password="writer-pw-9")
    try:
        staging.sql("DELETE FROM documents")
        before = staging.sql("SELECT count(*) FROM customers")
        refused = staging.run("rollback_manager.py", "restore", point, "--yes", env={"STAGING_DATABASE_URL": url})
        assert refused.returncode == 2, refused.stderr
        said = refused.stderr
        assert "may not restore" in said and "in place" in said and "(owner postgres)" in said and "REASSIGN OWNED" in said
        assert "Traceback" not in said and "Unexpected failure" not in said
        assert staging.sql("SELECT count(*) FROM customers") == before and staging.sql("SELECT count(*) FROM documents") == [(0,)]
        checked = staging.run("check_setup.py", "--json", env={"STAGING_DATABASE_URL": url})
        restores = {f["item"]: f for f in json.loads(checked.stdout)}["restores"]
        assert restores["status"] == "fail" and "not its own" in restores["detail"] and "OWNER TO rb_writer" in restores["fix"]
        owner = staging.run("check_setup.py", "--json")
        assert {f["item"]: f for f in json.loads(owner.stdout)}["restores"]["status"] == "ok"
    finally:
        staging.sql(
            f'REVOKE ALL ON DATABASE "{staging.name}" FROM rb_writer;'
            'REVOKE ALL ON ALL TABLES IN SCHEMA public, "Sales Ops" FROM rb_writer;'
            'REVOKE ALL ON ALL SEQUENCES IN SCHEMA public, "Sales Ops" FROM rb_writer;'
            'REVOKE USAGE ON SCHEMA public, "Sales Ops" FROM rb_writer'
        )
