"""The connection drops in the middle of a dump: the point fails, is audited as failed,
and nothing of it stays."""

from __future__ import annotations

import os
from contextlib import closing

import psycopg2

from lib.sandbox.servers import LocalServer, embedded_bin_dir
from tests.conftest import Staging
from tests.faults.conftest import last_audit, leftovers, points, start
from tests.helpers import wait_for


def _blocked_dump(s: Staging):
    """pg_dump waits for a lock held by another session: the dump is in progress and stays so."""
    holder = s.connect()
    holder.autocommit = False
    holder.cursor().execute("LOCK TABLE documents IN ACCESS EXCLUSIVE MODE")
    proc = start(s, "create_rollback_point.py", "cut off")

    def dump_waiting() -> bool:
        with closing(s.server.connect()) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'rollback-toolkit dump %%' AND datname = %s AND wait_event_type = 'Lock'",
                (s.name,),
            )
            return cur.fetchone()[0] > 0

    wait_for(dump_waiting, timeout=120, what="pg_dump to wait for the table's lock", process=proc)
    return proc, holder


def test_the_dump_session_terminated(fault_staging):
    """Fault: pg_dump's session is ended by the server. Injected: pg_terminate_backend on
    it while it waits for a lock. Holds: exit 1 naming pg_dump's error, the point is
    audited as failed, nothing of it is listed or left."""
    s = fault_staging
    proc, holder = _blocked_dump(s)
    try:
        with closing(s.server.connect()) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'rollback-toolkit dump %%' AND datname = %s",
                (s.name,),
            )
        out, err = proc.communicate(timeout=120)
    finally:
        holder.close()
    assert proc.returncode == 1, err
    assert "pg_dump" in err and "failed" in err
    assert points(s) == [] and leftovers(s) == []
    audit = last_audit(s)
    assert audit["event"] == "create" and audit["outcome"] == "failed"


def test_the_server_stopped_immediately(tmp_path):
    """Fault: the server goes down (pg_ctl stop -m immediate) in the middle of a dump.
    Injected: on a server of its own, while pg_dump waits for a lock. Holds: exit 1, the
    point audited as failed, nothing listed or left; after the server is back, the next
    create succeeds."""
    server = LocalServer(embedded_bin_dir())
    server.start()
    try:
        s = _own_staging(server, tmp_path)
        proc, holder = _blocked_dump(s)
        server.pg_ctl("-m", "immediate", "-w", "stop")
        out, err = proc.communicate(timeout=120)
        holder.close()
        assert proc.returncode == 1, err
        assert "failed" in err
        assert points(s) == [] and leftovers_on_disk(s) == []
        assert last_audit(s)["outcome"] == "failed"
        server.start()
        wait_for(lambda: _accepts_connections(server), timeout=60, what="the restarted server to accept connections")
        again = s.run("create_rollback_point.py", "after the restart")
        assert again.returncode == 0, again.stderr
        assert len(points(s)) == 1 and leftovers(s) == []
    finally:
        server.destroy()


def _accepts_connections(server: LocalServer) -> bool:
    try:
        psycopg2.connect(server.url(), connect_timeout=2).close()
    except psycopg2.OperationalError:
        return False
    return True


def leftovers_on_disk(s: Staging) -> list[str]:
    return [p.name for p in s.backup_dir.iterdir() if p.name.startswith(".tmp-")] if s.backup_dir.is_dir() else []


def _own_staging(server: LocalServer, tmp_path) -> Staging:
    view = _ServerView(server)
    with closing(view.connect()) as conn:
        conn.cursor().execute("CREATE DATABASE staging")
    with closing(view.connect("staging")) as conn:
        conn.cursor().execute(
            "CREATE TABLE documents (id serial PRIMARY KEY, body text); INSERT INTO documents (body) SELECT 'd' || g FROM generate_series(1, 100) g"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "STAGING_", "V2_", "BACKUP_", "LOG_DIR"))}
    env.update(
        STAGING_DATABASE_URL=server.url("staging"),
        BACKUP_DIR=str(tmp_path / "backups"),
        LOG_DIR=str(tmp_path / "logs"),
        ROLLBACK_ENV_FILE=str(tmp_path / "no.env"),
        ROLLBACK_METHOD="dump",
        ROLLBACK_SPARE="0",
    )
    return Staging(view, "staging", env, tmp_path / "backups", tmp_path / "logs")


class _ServerView:
    """The little of tests.conftest.Server that the helpers use, for a server of our own."""

    def __init__(self, server: LocalServer) -> None:
        self._server = server
        self.bin_dir = server.bin_dir
        self.major = server.major

    def url(self, dbname: str = "postgres", **kwargs) -> str:
        return self._server.url(dbname, **kwargs)

    def connect(self, dbname: str = "postgres"):
        conn = psycopg2.connect(self._server.url(dbname))
        conn.autocommit = True
        return conn
