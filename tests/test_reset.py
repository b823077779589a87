"""reset_staging.py: staging rebuilt from V2 across majors; V2 only read; aliases of V2 refused."""

from __future__ import annotations

import json

import pytest

from lib.config import ConnInfo
from lib.pg.db import connection
from lib.pg.fingerprint import portable_schema_lines, schema_lines
from tests.helpers import deep_state, write_tool_wrapper

V2_EXTRA = (
    "CREATE TABLE v2_only (id int PRIMARY KEY, note text); INSERT INTO v2_only SELECT g, 'v2 ' || g FROM generate_series(1, 77) g"
)


def content(state: dict) -> dict:
    """Rows, sequences, large objects and the schema. A materialized view is compared by
    its row count only: the copy refreshes it from rows loaded in another physical
    order, and avg() over double precision depends on that order in its last bits."""
    picked = {k: state[k] for k in ("row_counts", "sequences", "large_objects", "content", "schema")}
    picked["content"] = {k: v for k, v in picked["content"].items() if k != "public.city_stats"}
    return picked


def state_of(server, dbname: str, *, portable: bool) -> dict:
    """deep_state, with the schema as lines: exact on one major, what both print alike across two."""
    state = deep_state(server, dbname)
    with connection(ConnInfo.parse(server.url(dbname))) as conn:
        state["schema"] = portable_schema_lines(conn) if portable else schema_lines(conn)
    return state


@pytest.mark.parametrize("v2_major, staging_major, jobs", [(15, 18, "1"), (18, 15, "1"), (18, 18, "1"), (15, 15, "3")])
def test_reset_rebuilds_staging_from_v2_across_majors(servers, new_staging, v2_major, staging_major, jobs):
    from tests.conftest import get_server

    v2 = new_staging(get_server(servers, v2_major), "v2")
    v2.sql(V2_EXTRA)
    staging = new_staging(get_server(servers, staging_major), "stg")
    staging.sql("DELETE FROM customers WHERE id > 3; CREATE TABLE junk (x int)")
    portable = v2_major != staging_major
    v2_before = state_of(v2.server, v2.name, portable=portable)

    result = staging.run("reset_staging.py", "--yes", "--json", "--jobs", jobs, env={"V2_DATABASE_URL": v2.url})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["mode"] == "reset from V2" and out["before_point_id"]
    assert "The copy matches V2: its schema" in result.stderr
    assert content(state_of(staging.server, staging.name, portable=portable)) == content(v2_before)
    assert staging.sql("SELECT to_regclass('junk')")[0][0] is None
    assert state_of(v2.server, v2.name, portable=portable) == v2_before  # V2 only read

    undo = staging.run("rollback_manager.py", "restore", out["before_point_id"], "--yes")
    assert undo.returncode == 0, undo.stderr
    assert staging.sql("SELECT count(*) FROM customers")[0][0] == 3


def test_an_object_the_older_server_lacks_leaves_staging_untouched(pg18, pg15, new_staging):
    v2 = new_staging(pg18, "v2new")
    v2.sql("CREATE TABLE virt (a int, b int GENERATED ALWAYS AS (a * 2) VIRTUAL)")
    staging = new_staging(pg15, "stgold")
    before = deep_state(staging.server, staging.name)
    result = staging.run("reset_staging.py", "--yes", env={"V2_DATABASE_URL": v2.url})
    assert result.returncode == 1
    assert "VIRTUAL" in result.stderr or "syntax error" in result.stderr
    assert "Traceback" not in result.stderr
    assert deep_state(staging.server, staging.name) == before
    assert staging.run_json("rollback_manager.py", "list") == []


@pytest.mark.parametrize("alias", ["localhost", "other user"])
def test_a_staging_url_that_is_v2_under_another_name_is_refused(staging, alias):
    if alias == "localhost":
        v2_url = staging.url.replace("@127.0.0.1:", "@localhost:")
    else:
        staging.sql("DROP ROLE IF EXISTS v2_reader")
        staging.sql("CREATE ROLE v2_reader LOGIN PASSWORD 'reader-pw-1' SUPERUSER")
        v2_url = staging.server.url(staging.name, user="v2_reader", password="reader-pw-1")
    staging.sql("DELETE FROM documents")
    result = staging.run("reset_staging.py", "--yes", env={"V2_DATABASE_URL": v2_url})
    assert result.returncode == 2
    assert "is the V2 database" in result.stderr
    assert staging.sql("SELECT count(*) FROM documents")[0][0] == 0
    if alias != "localhost":
        staging.sql("DROP ROLE v2_reader")


def test_reset_asks_first_and_needs_v2(staging, new_staging):
    assert staging.run("reset_staging.py", "--yes").returncode == 2  # no V2_DATABASE_URL
    v2 = new_staging(staging.server, "v2ask")
    refused = staging.run("reset_staging.py", env={"V2_DATABASE_URL": v2.url})
    assert refused.returncode == 2 and "--yes" in refused.stderr


def test_large_tables_are_split_by_block_ranges_and_still_copied_exactly(servers, new_staging, monkeypatch, capsys):
    import reset_staging
    from lib.restore import rebuild as reset
    from tests.conftest import get_server

    v2 = new_staging(get_server(servers, 15), "v2split")
    staging = new_staging(get_server(servers, 18), "stgsplit")
    monkeypatch.setattr(reset, "SPLIT_PAGES", 2)  # every table of more than 2 blocks in parts
    for key, value in {**staging.env, "V2_DATABASE_URL": v2.url}.items():
        monkeypatch.setenv(key, value)
    assert reset_staging.main(["--yes", "--json", "--jobs", "3"]) == 0
    assert "part(s)" in capsys.readouterr().err
    assert content(state_of(staging.server, staging.name, portable=True)) == content(state_of(v2.server, v2.name, portable=True))


def test_a_copy_that_lost_its_indexes_and_constraints_is_refused(server, new_staging, tmp_path):
    """The copy is checked against V2's schema, not only its rows: a pg_restore that
    silently skips the indexes, constraints and foreign keys (post-data) is caught."""
    v2 = new_staging(server, "v2lost")
    staging = new_staging(server, "stglost")
    staging.sql("CREATE TABLE only_in_staging (id int)")
    before = deep_state(staging.server, staging.name)
    folder = tmp_path / "bin"
    for name in ("pg_dump", "psql"):
        write_tool_wrapper(folder, name, server.bin_dir / name, 'exec "$REAL" "$@"')
    write_tool_wrapper(
        folder, "pg_restore", server.bin_dir / "pg_restore", 'case "$*" in *post-data*) exit 0 ;; esac; exec "$REAL" "$@"'
    )
    env = {"V2_DATABASE_URL": v2.url, "PG_BIN_DIR": str(folder), "PG_BIN_DIR_ONLY": "1"}
    result = staging.run("reset_staging.py", "--yes", env=env)
    assert result.returncode == 3, result.stderr
    assert "does not match V2" in result.stderr and "schema missing: constraint" in result.stderr
    assert deep_state(staging.server, staging.name) == before
