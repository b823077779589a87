"""reset_staging.py: staging rebuilt from V2 across majors; V2 only read; aliases of V2 refused."""

from __future__ import annotations

import json
import os

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


def _tool(name: str, major: int):
    from lib.config import load_settings
    from lib.pg.tools import discover

    return next(t for t in discover(name, load_settings())[0] if t.major == major)


@pytest.mark.parametrize("major", [15, 18])
def test_foreign_keys_between_the_same_tables_are_never_built_at_once(servers, tmp_path, major):
    """The reset's index stage (pg_restore -j) builds two foreign keys between the same
    tables in opposite directions one after the other. Here both are forced to start
    together: another session holds both tables until both workers wait. From the
    reset's archive pg_restore sees that they lock the same tables and runs them in
    turn; from an archive of post-data alone (the shape that failed) they deadlock,
    which shows the forced start is real."""
    import threading
    import time
    from contextlib import closing

    from lib.errors import ToolError
    from lib.pg.tools import command_for
    from lib.points.methods.dump import archive_listing
    from lib.restore.rebuild import POST_DATA, post_data_archive
    from tests.conftest import get_server

    server = get_server(servers, major)
    src = f"ring_{major}_{os.getpid()}"
    with closing(server.connect()) as conn, conn.cursor() as cur:
        conn.autocommit = True
        for db in (src, f"{src}_new", f"{src}_old"):
            cur.execute(f'DROP DATABASE IF EXISTS "{db}"')
            cur.execute(f'CREATE DATABASE "{db}"')
    with closing(server.connect(src)) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE a (id int PRIMARY KEY, b int); CREATE TABLE b (id int PRIMARY KEY, a int);"
            "INSERT INTO a SELECT g, g FROM generate_series(1, 20000) g;"
            "INSERT INTO b SELECT g, g FROM generate_series(1, 20000) g;"
            "ALTER TABLE a ADD CONSTRAINT a_to_b FOREIGN KEY (b) REFERENCES b (id);"
            "ALTER TABLE b ADD CONSTRAINT b_to_a FOREIGN KEY (a) REFERENCES a (id);"
        )
        conn.commit()
    info = ConnInfo.parse(server.url(src))
    dump = command_for(_tool("pg_dump", major), conn=info)
    restore = command_for(_tool("pg_restore", major), conn=info)
    tables = tmp_path / "tables.dump"
    dump.run(["--format=custom", "--section=pre-data", "--section=data", f"--file={tables}", *info.tool_args()])
    reset_shape = post_data_archive(dump, ["--format=custom", *info.tool_args()], tmp_path / "schema.dump")
    old_shape = [POST_DATA, str(tmp_path / "post.dump")]
    dump.run(["--format=custom", POST_DATA, f"--file={old_shape[1]}", *info.tool_args()])

    def build(db: str, post: list[str]) -> str | None:
        """Tables and rows, the primary keys, then the two foreign keys by two workers
        started together; the error pg_restore gave, or None."""
        restore.run(restore.into(db, [str(tables)]))
        listing = archive_listing(restore.tool, post).splitlines()
        keys, foreign = tmp_path / f"{db}.keys", tmp_path / f"{db}.foreign"
        keys.write_text("\n".join(line for line in listing if "FK CONSTRAINT" not in line) + "\n")
        foreign.write_text("\n".join(line for line in listing if "FK CONSTRAINT" in line) + "\n")
        assert len(foreign.read_text().split()) > 2 and "a_to_b" in foreign.read_text() and "b_to_a" in foreign.read_text()
        restore.run(restore.into(db, ["-L", str(keys), *post]))
        failure: list[str] = []

        def workers() -> None:
            try:
                restore.run(restore.into(db, ["-L", str(foreign), *post], jobs=2))
            except ToolError as exc:
                failure.append(str(exc))

        with closing(server.connect(db)) as holder, holder.cursor() as cur:
            cur.execute("BEGIN; LOCK TABLE a, b IN ACCESS EXCLUSIVE MODE")
            thread = threading.Thread(target=workers)
            thread.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                cur.execute(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s USING (pid)"
                    " WHERE NOT l.granted AND s.datname = current_database() AND s.query LIKE '%FOREIGN KEY%'"
                )
                if cur.fetchone()[0] >= 1:
                    break
                time.sleep(0.05)
            time.sleep(0.5)  # a second worker, when there is one, is waiting too by now
            cur.execute("COMMIT")
        thread.join(120)
        assert not thread.is_alive()
        return failure[0] if failure else None

    assert build(f"{src}_new", reset_shape) is None
    with closing(server.connect(f"{src}_new")) as conn, conn.cursor() as cur:
        cur.execute("SELECT conname FROM pg_constraint WHERE contype = 'f' ORDER BY 1")
        assert [r[0] for r in cur.fetchall()] == ["a_to_b", "b_to_a"]
    old = build(f"{src}_old", old_shape)
    assert old is not None and "deadlock detected" in old
    with closing(server.connect()) as conn, conn.cursor() as cur:
        conn.autocommit = True
        for db in (src, f"{src}_new", f"{src}_old"):
            cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
