#!/usr/bin/env python3
"""Benchmark: what run_migration.py's batching costs against the loop a user would
otherwise write by hand.

One throwaway PostgreSQL 18 server (fsync off, as throwaway servers run) with the
demo's V2 sample scaled to --clients clients and the staging sample. Each variant
migrates the same clients into a fresh copy of staging, in its own process (for its
peak memory), measured once, in one run:

  ours:      migrations/001_migrate_clients.py through the runner (a savepoint per
             record, failures logged, per-table change counts, batches of 100
             committed, failure rate checked after each)
  baseline:  the same queries in a plain psycopg2 loop, committing every 100
             records, with nothing of the above (what seed 000's scripts did)
  baseline+: the plain loop with a savepoint per record, the least a loop needs to
             keep going past a record that fails in the database

The rollback point a production run takes first is measured by bench_rollback.py.

usage: python3 bench/bench_migration.py [--clients 30000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg2  # noqa: E402
from psycopg2.extras import RealDictCursor  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(stderr=True, highlight=False)
VARIANTS = ("ours", "baseline", "baseline+")


def hand_loop(v2_url: str, staging_url: str, savepoints: bool) -> dict:
    v2, staging = psycopg2.connect(v2_url), psycopg2.connect(staging_url)
    v2.set_session(readonly=True)
    clients = v2.cursor(name="clients", cursor_factory=RealDictCursor)
    clients.itersize = 1000
    clients.execute("SELECT id, client_code, name, phone, email, address FROM clients ORDER BY id")
    migrated = failed = 0
    cur = staging.cursor()
    for n, c in enumerate(clients, start=1):
        if savepoints:
            cur.execute("SAVEPOINT r")
        if not c["phone"]:
            failed += 1
        else:
            cur.execute("SELECT id, legacy_id FROM customers WHERE legacy_id = %s OR code = %s", (c["id"], c["client_code"]))
            if cur.fetchone():
                failed += 1
            else:
                cur.execute(
                    "INSERT INTO customers (code, name, phone, email, address, legacy_id, migrated_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, now())",
                    (c["client_code"], c["name"], c["phone"], c["email"], c["address"], c["id"]),
                )
                migrated += 1
        if savepoints:
            cur.execute("RELEASE SAVEPOINT r")
        if n % 100 == 0:
            staging.commit()
    staging.commit()
    return {"migrated": migrated, "failed": failed}


def ours(v2_url: str, staging_url: str, work: Path) -> dict:
    from lib.cli.console import UI
    from lib.config import load_settings
    from lib.migrate.context import MigrationContext, load, open_staging, perform

    settings = load_settings(staging_url=staging_url, v2_url=v2_url, env_file=work / "none.env")
    migration = load(ROOT / "migrations" / "001_migrate_clients.py")
    staging = open_staging(settings, "bench")
    ctx = MigrationContext(
        settings,
        migration,
        staging,
        UI(quiet=True),
        dry_run=False,
        batch_size=100,
        threshold=1.0,
        limit=None,
        params={},
        failures_path=work / "failures.csv",
    )
    perform(ctx)
    ctx.close()
    staging.close()
    return {"migrated": ctx.tally.migrated, "failed": ctx.tally.failed}


def child(variant: str, v2_url: str, staging_url: str, work: Path) -> None:
    started = time.perf_counter()
    counts = ours(v2_url, staging_url, work) if variant == "ours" else hand_loop(v2_url, staging_url, variant == "baseline+")
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_kib": peak_kib, **counts}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=30000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "V2", "STAGING", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.child[2], Path(args.child[3]))
        return 0

    from lib.cli import sample
    from lib.sandbox.servers import LocalServer, embedded_bin_dir

    server = LocalServer(embedded_bin_dir())
    work = Path(tempfile.mkdtemp(prefix="rollback-bench-migration-"))
    results: dict[str, dict] = {}
    try:
        server.start()
        admin = psycopg2.connect(server.url())
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("CREATE DATABASE v2")
            cur.execute("CREATE DATABASE staging_template")
        for db, script in (("v2", sample.v2_sql(args.clients)), ("staging_template", sample.STAGING)):
            conn = psycopg2.connect(server.url(db))
            conn.autocommit = True
            conn.cursor().execute(script)
            conn.close()
        console.print(f"V2 sample: {args.clients} clients (plus {args.clients // 50} entered twice); PostgreSQL {server.major}")
        for variant in VARIANTS:
            with admin.cursor() as cur:
                cur.execute("DROP DATABASE IF EXISTS staging")
                cur.execute("CREATE DATABASE staging TEMPLATE staging_template")
                cur.execute("CHECKPOINT")
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, server.url("v2"), server.url("staging"), str(work)],
                capture_output=True,
                text=True,
                check=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
            )
            results[variant] = json.loads(out.stdout)
            console.print(f"  {variant}: {results[variant]['seconds']:.2f} s")
        admin.close()
    finally:
        server.destroy()
    if len({(r["migrated"], r["failed"]) for r in results.values()}) != 1:
        console.print(f"[red]The variants did not migrate the same records: {results}[/]")
        return 1
    table = Table(title=f"Migrating {args.clients} clients", title_justify="left")
    for col in ("variant", "seconds", "records/s", "peak RSS", "time vs baseline", "time vs baseline+"):
        table.add_column(col)
    records = args.clients + args.clients // 50
    for variant, r in results.items():
        table.add_row(
            variant,
            f"{r['seconds']:.2f}",
            f"{records / r['seconds']:.0f}",
            f"{r['peak_rss_kib'] / 1024:.0f} MiB",
            f"{r['seconds'] / results['baseline']['seconds']:.2f}x",
            f"{r['seconds'] / results['baseline+']['seconds']:.2f}x",
        )
    console.print(table)
    if args.json:
        print(json.dumps({"clients": args.clients, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
