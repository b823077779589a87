"""Points on disk: ids, atomic creation, permissions, listing, info, verify."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from datetime import UTC, datetime

import psycopg2
import pytest

import create_rollback_point
import rollback_manager
from lib.points.catalog import Catalog
from lib.sandbox.servers import embedded_bin_dir
from tests.conftest import ROOT
from tests.helpers import wait_for, write_tool_wrapper


@pytest.mark.unit
def test_ids_follow_the_seed_form_and_stay_unique_within_one_second(tmp_path):
    catalog = Catalog(tmp_path / "b")
    when = datetime(2024, 1, 20, 14, 30, 22, tzinfo=UTC)
    a, _ = catalog.reserve("client_migration", when)
    b, _ = catalog.reserve("client_migration", when)
    c, _ = catalog.reserve("Før migration: «test» #2", when)
    assert a == "rb_client_migration_20240120_143022"
    assert b != a and b.startswith(a)
    assert re.fullmatch(r"rb_[a-z0-9_]+_\d{8}_\d{6}", c), c


def test_create_writes_a_complete_private_point_whatever_the_umask(staging):
    old = os.umask(0)
    try:
        result = staging.run("create_rollback_point.py", "Before migration test", "--migration-id", "orders_v2", "--json")
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)  # exactly one JSON document on stdout
    point_dir = staging.backup_dir / created["id"]
    assert created["id"].startswith("rb_orders_v2_")
    assert stat.S_IMODE(staging.backup_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(point_dir.stat().st_mode) == 0o700
    for f in point_dir.rglob("*"):
        assert stat.S_IMODE(f.stat().st_mode) == (0o700 if f.is_dir() else 0o600), f
    manifest = json.loads((point_dir / "manifest.json").read_text())
    for key in (
        "id",
        "created_at",
        "description",
        "migration_id",
        "database",
        "method",
        "tool",
        "files",
        "fingerprint",
        "status",
    ):
        assert key in manifest, key
    assert manifest["status"] == "completed" and manifest["method"] == "dump"
    assert manifest["database"]["url"].count("***") == 1
    assert manifest["database"]["server_major"] == staging.server.major
    assert manifest["database"]["system_identifier"]
    assert manifest["fingerprint"]["row_counts"]['"Sales Ops"."Order ""Lines"" Ü"'] == 1200
    assert (
        manifest["fingerprint"]["row_counts"]["public.measurements_2024"]
        + manifest["fingerprint"]["row_counts"]["public.measurements_2025"]
        == 2000
    )
    assert manifest["fingerprint"]["sequences"]["public.invoice_no"] == [1077, True]
    assert manifest["fingerprint"]["large_objects"] == 3
    archive = manifest["files"][0]
    assert archive["size"] == (point_dir / archive["name"]).stat().st_size and len(archive["sha256"]) == 64


def test_list_info_verify_in_process_and_as_json(staging, capsys):
    assert create_rollback_point.main(["First", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["id"]
    assert rollback_manager.main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [p["id"] for p in listed] == [first]
    for key in ("id", "created_at", "method", "status", "description"):
        assert key in listed[0]

    assert rollback_manager.main(["list"]) == 0
    table = capsys.readouterr().out
    assert first in table and "dump" in table and "First" in table and "completed" in table

    assert rollback_manager.main(["details", first, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == first
    assert rollback_manager.main(["info", first]) == 0
    assert "Schema digest" in capsys.readouterr().out

    assert rollback_manager.main(["verify", first, "--json"]) == 0
    verified = json.loads(capsys.readouterr().out)
    assert verified["verified"] is True and verified["archive"] == "read end to end"


def test_info_file_reads_any_archive(staging, capsys):
    point_id = staging.create_point()
    archive = staging.backup_dir / point_id / "database.dir"
    assert rollback_manager.main(["info", "--file", str(archive), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["database"] == staging.name
    assert info["server_version"].startswith(str(staging.server.major))
    assert int(info["entries"]) > 20
    assert rollback_manager.main(["info", "--file", str(staging.backup_dir / point_id), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["point"]["id"] == point_id


def test_info_file_says_when_an_archive_was_made_and_shows_a_folder_as_a_point(staging):
    point_id = staging.create_point()
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    archive = staging.backup_dir / point_id / "database.dir"
    info = staging.run_json("rollback_manager.py", "info", "--file", str(archive))
    made, taken = datetime.fromisoformat(info["created_at"]), datetime.fromisoformat(manifest["created_at"])
    assert abs((made - taken).total_seconds()) < 60, (info["created_at"], manifest["created_at"])
    shown = staging.run("rollback_manager.py", "info", "--file", str(staging.backup_dir / point_id))
    assert shown.returncode == 0, shown.stderr
    assert "{" not in shown.stdout and "Schema digest" in shown.stdout
    assert "Files: every file matches the manifest" in shown.stdout


def test_a_bare_archive_is_restored_with_its_own_age(staging, tmp_path):
    point_id = staging.create_point()
    archive = tmp_path / "old.dir"
    shutil.copytree(staging.backup_dir / point_id / "database.dir", archive)
    restored = staging.run("rollback_manager.py", "restore", "--type", "backup", "--file", str(archive), "--yes")
    assert restored.returncode == 0, restored.stderr
    taken = re.search(r"taken (\S+ \S+) UTC", restored.stderr)
    assert taken, restored.stderr
    made = staging.run_json("rollback_manager.py", "info", "--file", str(archive))["created_at"]  # the archive's own time
    assert taken.group(1) == made[:19].replace("T", " ")


def test_a_point_folder_restores_when_staging_settings_changed_since(staging):
    """The folder's manifest is checked as written, not rewritten with staging's settings first."""
    point_id = staging.create_point("settings", "--method", "dump")
    staging.sql(f"ALTER DATABASE \"{staging.name}\" SET work_mem = '8MB'")
    staging.sql("DELETE FROM customers WHERE id > 100")
    restored = staging.run(
        "rollback_manager.py", "restore", "--type", "backup", "--file", str(staging.backup_dir / point_id), "--yes"
    )
    assert restored.returncode == 0, restored.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 300
    settings = staging.sql(
        "SELECT setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
        "WHERE d.datname = current_database() AND s.setrole = 0"
    )
    assert settings == [] or all("work_mem=8MB" not in (row[0] or []) for row in settings)


def test_seed_form_with_two_leading_urls(staging):
    result = staging.run("rollback_manager.py", staging.url, staging.url, "list", env={"STAGING_DATABASE_URL": ""})
    assert result.returncode == 0, result.stderr


def test_a_killed_creation_leaves_nothing_that_lists(staging, tmp_path):
    real = embedded_bin_dir() / "pg_dump" if staging.server.major == 18 else staging.server.bin_dir / "pg_dump"
    slow = write_tool_wrapper(tmp_path / "slowbin", "pg_dump", real, '"$REAL" "$@"; sleep 60')
    env = {**staging.env, "PG_BIN_DIR": str(slow.parent), "PG_BIN_DIR_ONLY": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "create_rollback_point.py"), "doomed"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: any((tmp / "database.dir" / "toc.dat").exists() for tmp in staging.backup_dir.glob(".tmp-*")),
            timeout=60,
            what="the dump to write its archive",
            process=proc,
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any(p.name.startswith(".tmp-") for p in staging.backup_dir.iterdir())
    assert staging.run_json("rollback_manager.py", "list") == []
    # the next run clears the leftovers, then works normally
    staging.create_point("after the crash")
    assert not any(p.name.startswith(".tmp-") for p in staging.backup_dir.iterdir())


def test_a_shortfall_of_free_space_is_refused_with_both_numbers(staging, monkeypatch, capsys):
    import shutil as real_shutil

    from lib.points.methods import dump

    usage = real_shutil.disk_usage(staging.backup_dir.parent)
    monkeypatch.setattr(dump.shutil, "disk_usage", lambda p: usage._replace(free=1024))
    assert create_rollback_point.main(["tight"]) == 1
    err = capsys.readouterr().err
    assert "Not enough free space" in err and "1024 bytes" in err
    size = re.search(r"\((\d+) bytes\) and only", err)
    assert size and int(size.group(1)) > 1024
    assert Catalog(staging.backup_dir).points() == []


# ------------------------------------------------------------------ --method auto tries the next method


def test_auto_falls_back_to_a_dump_when_staging_cannot_be_had_to_itself(staging):
    app = psycopg2.connect(staging.url, application_name="the application")
    try:
        made = staging.run("create_rollback_point.py", "busy", "--json", env={"ROLLBACK_METHOD": "auto"})
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["method"] == "dump"
        assert "A template point could not be taken: Refusing to disconnect" in made.stderr
        assert "Trying a dump point instead" in made.stderr
        app.cursor().execute("SELECT 1")  # nobody was disconnected
    finally:
        app.close()


def test_auto_goes_on_to_a_data_point_when_no_pg_dump_fits_either(staging, tmp_path):
    empty = tmp_path / "no-tools"
    empty.mkdir()
    app = psycopg2.connect(staging.url)
    try:
        env = {"ROLLBACK_METHOD": "auto", "PG_BIN_DIR": str(empty), "PG_BIN_DIR_ONLY": "1"}
        made = staging.run("create_rollback_point.py", "no tools", "--json", env=env)
    finally:
        app.close()
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["method"] == "data"
    assert "Trying a dump point instead" in made.stderr and "A dump point could not be taken: No pg_dump fits" in made.stderr
    failed = [e for e in _audit_entries(staging) if e["event"] == "create"][-1]["methods_failed"]
    assert [f["method"] for f in failed] == ["template", "dump"]


def test_a_failure_every_method_shares_stops_at_once(staging, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    made = staging.run("create_rollback_point.py", "x", env={"ROLLBACK_METHOD": "auto", "BACKUP_DIR": str(blocker)})
    assert made.returncode == 2 and "Trying" not in made.stderr
    unreachable = staging.run(
        "create_rollback_point.py",
        "x",
        env={"ROLLBACK_METHOD": "auto", "STAGING_DATABASE_URL": "postgresql://u:pw@127.0.0.1:1/db"},
    )
    assert unreachable.returncode == 1 and "Trying" not in unreachable.stderr
    explicit = staging.run(  # a method asked for by name is not replaced
        "create_rollback_point.py", "x", "--method", "dump", env={"PG_BIN_DIR": str(tmp_path), "PG_BIN_DIR_ONLY": "1"}
    )
    assert explicit.returncode == 1 and "No pg_dump fits" in explicit.stderr and "Trying" not in explicit.stderr


def _audit_entries(staging) -> list[dict]:
    return [json.loads(line) for line in (staging.log_dir / "rollback_audit.jsonl").read_text().splitlines()]
